"""Each stage of edgemoe at scale, beside llama.cpp's own tool for the same job (issue 11).

On a synthetic Qwen3-30B-A3B-like checkpoint (qwen3_moe, BF16, a real BPE tokenizer; built
shard by shard by `export_peak_rss.build_checkpoint`), every command runs in a child process
of its own, measured by `measure.run_measured`: wall time, CPU time, peak anonymous RSS of
the process tree, peak extra disk in its working folder (TMPDIR points there too), bytes
read (read_bytes from the device with the inputs evicted from the page cache first, and
rchar). Rounds interleave edgemoe and llama.cpp (their order alternates by round); a job is
not repeated once its runs took more than --stage-budget seconds in all.

| stage | edgemoe | llama.cpp |
|---|---|---|
| convert | `export --type Q8_0` | `convert_hf_to_gguf.py --outtype q8_0` |
| calibrate | `calibrate` HF source (probes on) | `llama-imatrix` on the Q8_0 GGUF |
| calibrate, disk capped | `calibrate --max-disk CAP` (the export's cap) | the same run |
| calibrate, in segments | `calibrate --max-disk OUT --calib-type Q8_0` | the same run |
| calibrate, no probes | `calibrate --no-sensitivity` | the same `llama-imatrix` run |
| calibrate, GGUF source | `calibrate Q8_0.gguf` (probes on) | the same `llama-imatrix` run |
| calibrate, GGUF, no probes | `calibrate Q8_0.gguf --no-sensitivity` | the same run |
| plan | `plan --stats --no-prune` | (no such tool) |
| export | `export --plan --stats` (search on) | `llama-quantize --imatrix --tensor-type` (BF16) |
| export, search 0 | `export ... --search 0` | the same `llama-quantize` run |
| validate | `validate` (perplexity, speed, memory) | `llama-perplexity` (when it builds) |

Same tokens for both calibrations: the same text, --ctx, and --chunks windows (edgemoe
--max-tokens chunks * ctx). Writes benchmarks/results/scale.json (merged by size) and prints
the table and the extrapolation (`scale_extrapolate.py`).

    nice python benchmarks/scale.py --size 1gb [--runs 3] [--work /tmp/edgemoe-scale]
    nice python benchmarks/scale.py --size 8gb
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from export_peak_rss import Shape, build_checkpoint, checkpoint_bytes  # noqa: E402
from measure import run_measured  # noqa: E402
from scale_extrapolate import (  # noqa: E402
    PROBE_SHARE,
    damage_work,
    extrapolate,
    fmt_extrapolation,
)

RESULTS = ROOT / "benchmarks" / "results" / "scale.json"
SIZES = {  # Qwen3-30B-A3B's layer (hidden 2048, expert FFN 768, 32/4 heads, top-8)
    "1gb": Shape(experts=64, layers=1, heads=32, kv_heads=4),
    "8gb": Shape(experts=128, layers=6, heads=32, kv_heads=4),
}
CALIB_TEXT = ROOT / "edgemoe" / "data" / "calibration.txt"
HELDOUT_TEXT = ROOT / "models" / "stdlib-moe" / "heldout.txt"
EDGEMOE = [sys.executable, "-m", "edgemoe.supervise"]
GB = 1e9

# job -> (side, stage rows it serves); rows pair an edgemoe job with a llama.cpp job
ROWS = [
    ("convert", "em_convert", "ll_convert"),
    ("calibrate", "em_calib", "ll_imatrix"),
    ("calibrate, --max-disk = the cap", "em_calib_capped", "ll_imatrix"),
    ("calibrate, --max-disk = the output's size", "em_calib_segments", "ll_imatrix"),
    ("calibrate, no probes", "em_calib_noprobes", "ll_imatrix"),
    ("calibrate, GGUF source", "em_calib_gguf_probes", "ll_imatrix"),
    ("calibrate, GGUF source, no probes", "em_calib_gguf", "ll_imatrix"),
    ("plan", "em_plan", None),
    ("export", "em_export", "ll_quantize"),
    ("export, search 0", "em_export_s0", "ll_quantize"),
    ("validate", "em_validate", "ll_perplexity"),
]
STAGES = {"convert": ("em_convert", "ll_convert"),
          "calibrate": ("em_calib", "em_calib_capped", "em_calib_segments", "em_calib_noprobes",
                        "em_calib_gguf_probes", "em_calib_gguf", "ll_imatrix"),
          "plan": ("em_plan",), "export": ("em_export", "em_export_s0", "ll_quantize"),
          "validate": ("em_validate", "ll_perplexity")}


@functools.cache
def llama_tool(name: str) -> Path | None:
    """llama.cpp's `name` tool, built from the sdist on first use (tests/llama_tools.py);
    None for llama-perplexity if it cannot be built (validate then has no baseline)."""
    from tests import llama_tools as lt

    try:
        return getattr(lt, f"llama_{name}_path")()
    except lt.LlamaToolError as e:
        if name != "perplexity":
            raise
        print(f"llama-perplexity not available ({e}): validate runs without a baseline")
        return None


class Setup:
    """The inputs every job shares, made once per size in `work`."""

    def __init__(self, work: Path, shape: Shape, chunks: int, ctx: int, cap: str | None):
        self.work, self.shape, self.chunks, self.ctx = work, shape, chunks, ctx
        self.model = build_checkpoint(work, shape)
        self.products = work / "products"
        self.products.mkdir(exist_ok=True)
        self.q8 = self._gguf("Q8_0")
        self.bf16 = self._gguf("BF16")
        self.cap = cap or self._default_cap()
        self.out_bytes = self._output_bytes()
        self.stats: Path | None = None  # the stats file plan and export use

    def _gguf(self, type_name: str) -> Path:
        out = self.work / f"model-{type_name}.gguf"
        if not out.is_file():
            print(f"writing {out.name} ...", flush=True)
            subprocess.run([*EDGEMOE, "export", str(self.model), "--memory", "10TB", "--type",
                            type_name, "-o", str(out)], check=True, cwd=ROOT, env=child_env(),
                           stdout=subprocess.DEVNULL)
        return out

    def _default_cap(self) -> str:
        """Room for the weights at 3.5 bits per weight (a plan that mixes types) + KV + compute
        at ctx 4096."""
        import memory_planner as mp
        from edgemoe import pipeline

        model = pipeline.open_model(self.model)
        budget = pipeline.make_budget(model.adapter, 0, 4096)
        q3 = mp.uniform_plan(model.specs, "Q3_K", mp.Budget(2**62)).weight_bytes
        q4 = mp.uniform_plan(model.specs, "Q4_K", mp.Budget(2**62)).weight_bytes
        return str(int((q3 + q4) / 2 + budget.kv_bytes + budget.compute_bytes))

    def _output_bytes(self) -> int:
        """The size of the export at the cap: of a file an earlier export job left, else
        the cap less KV and compute at ctx 4096 (what the plan fills with weights)."""
        done = self.product("out-search0.gguf")
        if done.is_file():
            return done.stat().st_size
        from edgemoe import pipeline

        model = pipeline.open_model(self.model)
        budget = pipeline.make_budget(model.adapter, 0, 4096)
        return int(self.cap) - budget.kv_bytes - budget.compute_bytes

    def product(self, name: str) -> Path:
        return self.products / name


def child_env(tmp: Path | None = None) -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "EDGEMOE_LLAMA_SDIST":
           os.environ.get("EDGEMOE_LLAMA_SDIST", "/tmp/sdist/llama_cpp_python-0.3.36")}
    if tmp is not None:
        env["TMPDIR"] = str(tmp)
    return env


def job_command(job: str, s: Setup, run: Path) -> tuple[list[str], list[Path]] | None:
    """The command of `job` in run folder `run`, and the inputs to evict; None if it cannot
    run (a missing tool or product)."""
    from edgemoe.report.tables import llama_quantize_command
    from memory_planner import MemoryPlan
    from tests.llama_converter import converter_command

    model, tokens = str(s.model), str(s.chunks * s.ctx)
    calib = ["--text", str(CALIB_TEXT), "--ctx", str(s.ctx), "--max-tokens", tokens,
             "-o", "stats.gguf"]
    if s.stats is None:  # chosen once: every plan and export of a run uses the same
        s.stats = next((p for p in (s.product("stats.gguf"), s.product("stats-noprobes.gguf"))
                        if p.is_file()), None)
    stats = s.stats
    plan, out_s0 = s.product("plan.json"), s.product("out-search0.gguf")
    if job == "em_convert":
        return [*EDGEMOE, "export", model, "--memory", "10TB", "--type", "Q8_0", "-o",
                "out.gguf"], [s.model]
    if job == "ll_convert":
        return converter_command(s.model, run / "out.gguf", "q8_0", pre="qwen2"), [s.model]
    if job == "em_calib":
        return [*EDGEMOE, "calibrate", model, *calib], [s.model]
    if job == "em_calib_capped":  # the intermediate within the cap
        return [*EDGEMOE, "calibrate", model, *calib, "--max-disk", s.cap], [s.model]
    if job == "em_calib_segments":  # within the output's size: Q8_0 in layer segments
        return [*EDGEMOE, "calibrate", model, *calib, "--max-disk", str(s.out_bytes),
                "--calib-type", "Q8_0"], [s.model]
    if job == "em_calib_noprobes":
        return [*EDGEMOE, "calibrate", model, *calib, "--no-sensitivity"], [s.model]
    if job == "em_calib_gguf_probes":
        return [*EDGEMOE, "calibrate", str(s.q8), *calib], [s.q8]
    if job == "em_calib_gguf":
        return [*EDGEMOE, "calibrate", str(s.q8), *calib, "--no-sensitivity"], [s.q8]
    if job == "ll_imatrix":
        repack = [] if _extra_bufts() else ["--no-repack"]
        return [str(llama_tool("imatrix")), "-m", str(s.q8), "-f", str(CALIB_TEXT), "-c",
                str(s.ctx), "-b", str(s.ctx), "--chunks", str(s.chunks), "--no-ppl",
                "--process-output", "-t", str(os.cpu_count()), *repack,
                "-o", "imatrix.gguf"], [s.q8]
    if stats is None:
        return None
    budget = ["--memory", s.cap, "--ctx", "4096", "--stats", str(stats)]
    if job == "em_plan":
        return [*EDGEMOE, "plan", model, *budget, "--no-prune", "-o", "plan.json"], [s.model]
    if not plan.is_file():
        return None
    if job in ("em_export", "em_export_s0"):
        search = ["--search", "0"] if job == "em_export_s0" else []
        return [*EDGEMOE, "export", model, *budget, "--plan", str(plan), *search,
                "-o", "out.gguf"], [s.model]
    if job == "ll_quantize":
        shown = llama_quantize_command(MemoryPlan.load(plan), imatrix=str(stats),
                                       src=str(s.bf16), dst="out.gguf")
        cmd = shown.split("\n", 1)[1] if shown.startswith("#") else shown  # a note first
        cmd = cmd.replace("llama-quantize", str(llama_tool("quantize")), 1)
        return ["bash", "-c", cmd], [s.bf16]
    if not out_s0.is_file():
        return None
    heldout = ["--text", str(HELDOUT_TEXT), "--max-tokens", tokens]
    if job == "em_validate":
        return [*EDGEMOE, "validate", str(out_s0), *heldout, "--json", "report.json"], [out_s0]
    if job == "ll_perplexity" and llama_tool("perplexity"):
        repack = [] if _extra_bufts() else ["--no-repack"]
        return [str(llama_tool("perplexity")), "-m", str(out_s0), "-f", str(HELDOUT_TEXT), "-c",
                str(s.ctx), "-b", str(s.ctx), "--chunks", str(s.chunks), *repack], [out_s0]
    return None


def _extra_bufts() -> bool:
    from edgemoe.llamacpp import use_extra_bufts

    return use_extra_bufts()


def harvest(job: str, s: Setup, run: Path) -> None:
    """Keep what later jobs need from the first successful run of `job`."""
    keep = {"em_calib": ("stats.gguf", "stats.gguf"),
            "em_calib_segments": ("stats.gguf", "stats.gguf"),
            "em_calib_gguf_probes": ("stats.gguf", "stats.gguf"),
            "em_calib_noprobes": ("stats.gguf", "stats-noprobes.gguf"),
            "em_plan": ("plan.json", "plan.json"), "em_export_s0": ("out.gguf", "out-search0.gguf")}
    if job in keep and not s.product(keep[job][1]).is_file() and (run / keep[job][0]).is_file():
        shutil.copy(run / keep[job][0], s.product(keep[job][1]))


def run_jobs(s: Setup, jobs: list[str], runs: int, budget: float, max_anon: int,
             deadline: float) -> dict[str, list[dict]]:
    """Rounds of `jobs`; no job starts after `deadline` (time.time()). The raw runs are
    also saved in `work`/runs.json as they come."""
    results: dict[str, list[dict]] = {j: [] for j in jobs}
    spent = dict.fromkeys(jobs, 0.0)
    for r in range(runs):
        for stage in STAGES.values():
            order = [j for j in stage if j in jobs]
            if r % 2:  # alternate which side goes first
                order.reverse()
            for job in order:
                done = results[job]
                if spent[job] > budget or (done and done[-1]["returncode"] != 0) \
                        or time.time() > deadline:
                    continue
                name = f"{job}-{r}-{os.getpid()}"  # two invocations may share a work folder
                run = s.work / "runs" / name
                shutil.rmtree(run, ignore_errors=True)
                (run / "tmp").mkdir(parents=True)
                got = job_command(job, s, run)
                if got is None:
                    continue
                cmd, inputs = got
                print(f"[{r + 1}/{runs}] {job} ...", end=" ", flush=True)
                m = run_measured(cmd, run, s.work / "runs" / f"{name}.log", [run],
                                 env=child_env(run / "tmp"), inputs=inputs, max_anon=max_anon)
                d = m.to_dict()
                d["output_bytes"] = sum(f.stat().st_size for f in run.glob("*.gguf"))
                if m.returncode == 0:
                    harvest(job, s, run)
                else:
                    log = (s.work / "runs" / f"{name}.log").read_text(errors="replace")
                    d["log_tail"] = log[-1500:]
                done.append(d)
                spent[job] += m.seconds
                print(f"{m.seconds:.1f} s, anon {m.peak_anon / GB:.2f} GB, disk "
                      f"{m.peak_disk / GB:.2f} GB, read {m.read_bytes / GB:.2f} GB, "
                      f"rc {m.returncode}", flush=True)
                shutil.rmtree(run, ignore_errors=True)
                (s.work / "runs.json").write_text(json.dumps(results, indent=1))
    return results


KEYS = ("seconds", "cpu_seconds", "busiest_thread_seconds", "threads_seconds", "peak_anon",
        "peak_file", "peak_disk", "read_bytes", "rchar", "output_bytes")


def summarize(results: dict[str, list[dict]]) -> list[dict]:
    """Per stage row and side: medians of the successful runs; a side whose every run was
    stopped (killed, or over --max-anon) gets its longest run as a lower bound."""
    def med(job: str | None) -> dict | None:
        runs = results.get(job, []) if job else []
        ok = [r for r in runs if r["returncode"] == 0]
        if ok:
            return {"runs": len(ok), **{k: statistics.median(r.get(k, 0) for r in ok)
                                        for k in KEYS}}
        stopped = [r for r in runs if r["returncode"] < 0 or r.get("killed_over")
                   or r.get("stopped")]
        if not stopped:
            return None
        r = max(stopped, key=lambda r: r["seconds"])
        return {"runs": 0, "lower_bound": True, **{k: r.get(k, 0) for k in KEYS}}

    rows = []
    for label, em, ll in ROWS:
        a, b = med(em), med(ll)
        failed = [r.get("log_tail", "")[-300:] for r in results.get(em, [])
                  if r["returncode"] > 0 and not r.get("stopped")]
        if a is None and b is None and not failed:
            continue
        ratio = {k: a[k] / b[k] for k in ("seconds", "cpu_seconds", "peak_anon")
                 if a and b and b[k]} if a and b else {}
        rows.append({"stage": label, "edgemoe_job": em, "llama_job": ll, "edgemoe": a,
                     "llama": b, "ratio": ratio, "edgemoe_failed": failed})
    return rows


def fmt_table(rows: list[dict]) -> str:
    head = (f"{'stage':<34}{'side':<9}{'n':>3}{'wall s':>9}{'cpu s':>9}{'serial':>7}{'anon GB':>9}"
            f"{'disk GB':>9}{'read GB':>9}{'rchar GB':>9}{'x llama':>9}")
    lines = [head, "-" * len(head)]
    for r in rows:
        for side in ("edgemoe", "llama"):
            m = r[side]
            if m is None:
                continue
            ratio = f"{r['ratio']['seconds']:.2f}" if side == "edgemoe" and r["ratio"] else ""
            ratio = (">" if m.get("lower_bound") and ratio else "") + ratio
            lines.append(f"{r['stage'] if side == 'edgemoe' or not r['edgemoe'] else '':<34}"
                         f"{side:<9}{m['runs']:>3}{m['seconds']:>9.1f}{m['cpu_seconds']:>9.1f}"
                         f"{_serial(m):>7.2f}"
                         f"{m['peak_anon'] / GB:>9.2f}{m['peak_disk'] / GB:>9.2f}"
                         f"{m['read_bytes'] / GB:>9.2f}{m['rchar'] / GB:>9.2f}{ratio:>9}")
        if r["edgemoe_failed"]:
            lines.append(f"{'':<34}edgemoe failed: {r['edgemoe_failed'][0]!r}")
    return "\n".join(lines)


def _serial(m: dict) -> float:
    """The busiest thread's share of all threads' CPU time (1: serial work)."""
    total = m.get("threads_seconds") or 0.0
    return m.get("busiest_thread_seconds", 0.0) / total if total else 1.0


def model_facts(s: Setup) -> dict:
    from edgemoe import pipeline

    model = pipeline.open_model(s.model)
    a = model.adapter
    params = sum(int(x) for spec in model.specs for x in [_numel(spec.shape)])
    routed = sum(_numel(spec.shape) for spec in model.specs if spec.n_experts)
    embd = sum(_numel(spec.shape) for spec in model.specs if spec.kind == "token_embd")
    return {"shape": asdict(s.shape), "checkpoint_bytes": checkpoint_bytes(s.model),
            "q8_bytes": s.q8.stat().st_size, "bf16_gguf_bytes": s.bf16.stat().st_size,
            "params": params, "active_params": params - embd - routed * (1 - a.n_expert_used
                                                                          / a.n_expert),
            "tensors": len(model.specs), "quantizable": sum(x.quantizable for x in model.specs),
            "damage_work": damage_work(model.specs),
            "chunks": s.chunks, "ctx": s.ctx, "tokens": s.chunks * s.ctx, "cap": s.cap,
            "probe_share": PROBE_SHARE}


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= int(d)
    return n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=sorted(SIZES), default="1gb")
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgemoe-scale"))
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--stage-budget", type=float, default=900.0,
                    help="stop repeating a job once its runs took this many seconds")
    ap.add_argument("--stages", default=",".join(STAGES), help="subset of " + ",".join(STAGES))
    ap.add_argument("--jobs", default=None,
                    help="run these jobs only (e.g. em_calib), instead of --stages")
    ap.add_argument("--chunks", type=int, default=16, help="calibration windows (both tools)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--cap", default=None, help="memory cap of plan/export (default: ~3.5 bpw)")
    ap.add_argument("--max-anon", type=float, default=16.0,
                    help="GB of anonymous RSS at which a job's process tree is killed")
    ap.add_argument("--time-limit", type=float, default=float("inf"),
                    help="seconds after which no new job starts (the table uses what ran)")
    ap.add_argument("--fresh", action="store_true",
                    help="replace the stored runs of this size instead of adding to them")
    ap.add_argument("--report", action="store_true",
                    help="only print (and store) the table and extrapolation of stored runs")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoint and GGUFs")
    ap.add_argument("--results", type=Path, default=RESULTS,
                    help="the results file (another machine's runs go in a file of their own)")
    args = ap.parse_args()
    results_path = args.results

    if args.report:  # the table and extrapolation again, from the stored runs
        data = json.loads(results_path.read_text())
        entry = data["sizes"][args.size]
        if "damage_work" not in entry:
            from edgemoe import pipeline
            entry["damage_work"] = damage_work(pipeline.open_model(
                args.work / args.size / "model").specs)
        entry["rows"] = summarize(entry["jobs"])
        entry["extrapolation"] = extrapolate(entry)
        print(fmt_table(entry["rows"]) + "\n\n" + fmt_extrapolation(entry["extrapolation"]))
        results_path.write_text(json.dumps(data, indent=1))
        return
    t0 = time.time()
    work = args.work / args.size
    work.mkdir(parents=True, exist_ok=True)
    s = Setup(work, SIZES[args.size], args.chunks, args.ctx, args.cap)
    facts = model_facts(s)
    print(f"{args.size}: {facts['checkpoint_bytes'] / GB:.2f} GB BF16, {facts['params']:,} "
          f"parameters ({facts['active_params']:,.0f} active), cap {int(s.cap) / GB:.2f} GB, "
          f"output about {s.out_bytes / GB:.2f} GB",
          flush=True)
    jobs = args.jobs.split(",") if args.jobs else [
        j for st in args.stages.split(",") for j in STAGES[st]]
    results = run_jobs(s, jobs, args.runs, args.stage_budget, int(args.max_anon * GB),
                       t0 + args.time_limit)
    data = json.loads(results_path.read_text()) if results_path.is_file() else {"sizes": {}}
    old = data["sizes"].get(args.size, {})
    if not args.fresh and old.get("shape") == facts["shape"] \
            and old.get("tokens") == facts["tokens"]:
        # runs accumulate across invocations on the same model and tokens
        results = {j: old["jobs"].get(j, []) + results.get(j, [])
                   for j in {*old["jobs"], *results}}
    rows = summarize(results)
    print("\n" + fmt_table(rows))

    entry = {**facts, "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
             "machine": {"cores": os.cpu_count(), "cpu": platform.processor() or
                         platform.machine(), "load_avg_at_end": os.getloadavg()},
             "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                                      capture_output=True, text=True).stdout.strip(),
             "runs_requested": args.runs, "total_seconds": time.time() - t0,
             "jobs": results, "rows": rows}
    entry["extrapolation"] = extrapolate(entry)
    print("\n" + fmt_extrapolation(entry["extrapolation"]))
    data["sizes"][args.size] = entry
    results_path.write_text(json.dumps(data, indent=1))
    print(f"\nwrote {results_path} ({time.time() - t0:.0f} s in all)")
    if not args.keep:
        for p in (s.q8, s.bf16, *s.products.glob("*.gguf")):
            p.unlink(missing_ok=True)
        shutil.rmtree(s.model, ignore_errors=True)


if __name__ == "__main__":
    main()
