"""Issue 11's probe benchmark: sensitivity probes inside the eval callback against the probe
exports they replace, on the bundled model.

Both start from the same statistics (calibrate on MODEL/calib.txt, run as F32, as
benchmarks/kld_vs_cap.py does) and probe on the same 2048 tokens. Reported: the probes' wall
time, the scales side by side, and the KL divergence (against F32, held-out text) of the
calibrated plan at kld_vs_cap.py's three caps with each set of scales (exported with the
output-error search, as kld_vs_cap's "calibrated" row).

The old probes are today's code at `--old-rev` (loaded from git); `--old-json` reuses a
result this script wrote before instead of running them again.

    PYTHONPATH=. nice python benchmarks/probe_cost.py --old-rev ce8ede7

`--default` adds `calibrate`'s own probes (their reference taken from the calibration run,
on its default tokens and time budget; timed with the run they follow):

    PYTHONPATH=. nice python benchmarks/probe_cost.py --default --probe-seconds 1e9 \
        --old-json benchmarks/results/probe_cost.json \
        --out benchmarks/results/probe_cost_default.json
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.calibration.collect import calibrate
from edgemoe.calibration.sensitivity import measure_scales
from edgemoe.llamacpp import open_llama, tokenize
from edgemoe.report.tables import table
from edgemoe.runtime import textscore
from export.imatrix import read_stats

ROOT = Path(__file__).resolve().parents[1]


def old_measure_scales(rev: str, work: Path):
    """`measure_scales` as it was at git revision `rev` (probe exports)."""
    src = subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:edgemoe/calibration/"
                          "sensitivity.py"], check=True, capture_output=True, text=True).stdout
    path = work / "old_sensitivity.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("edgemoe.calibration.old_sensitivity", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.measure_scales


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models/stdlib-moe"))
    ap.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score")
    ap.add_argument("--probe-tokens", type=int, default=2048)
    ap.add_argument("--probe-seconds", type=float, nargs="+", default=[300.0],
                    help="probe budgets to run (300: calibrate's default for a short run)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--old-rev", default=None, help="git revision of the old probes")
    ap.add_argument("--old-json", default=None, help="old probes' result from an earlier run")
    ap.add_argument("--no-kld", action="store_true", help="time and scales only")
    ap.add_argument("--default", action="store_true",
                    help="also `calibrate` with its default probes (reference from the run, "
                         "default tokens and budget), timed with the run")
    ap.add_argument("--stats", default=None, help="statistics from an earlier run")
    ap.add_argument("--workdir", default="/tmp/edgemoe-probe-cost")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/probe_cost.json"))
    args = ap.parse_args()
    model_dir = Path(args.model)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model = pipeline.open_model(model_dir)
    a = model.adapter
    f32 = pipeline.export(model, mp.uniform_plan(model.specs, "F32", mp.Budget(2**62),
                                                 check_budget=False), work / "f32.gguf",
                          progress=False)
    t = time.time()
    if args.stats:  # from an earlier run of this script
        stats, calib_seconds = read_stats(args.stats), float("nan")
    else:
        stats = calibrate(str(model_dir), text=str(model_dir / "calib.txt"),
                          calib_model=str(f32), calib_type="F32", sensitivity=False,
                          progress=False, output=str(work / "stats.gguf"))
        calib_seconds = time.time() - t
    probe_tokens = tokenize(model_dir, (model_dir / "calib.txt").read_text())[:args.probe_tokens]

    runs = {}
    if args.default:  # what `edgemoe calibrate` does: probes after the run, its default budget
        t = time.time()
        new = calibrate(str(model_dir), text=str(model_dir / "calib.txt"), calib_model=str(f32),
                        calib_type="F32", sensitivity=True, progress=False,
                        output=str(work / "stats-probed.gguf"))
        runs["calibrate's default"] = {"seconds": time.time() - t, "scales": new.scales,
                                       "prune_scale": new.prune_scale,
                                       "includes": "the calibration run"}
    for budget in args.probe_seconds:
        t = time.time()
        new = measure_scales(model, stats, probe_tokens, f32, n_ctx=args.ctx, seconds=budget,
                             progress=False)
        runs[f"callback {budget:g} s"] = {"seconds": time.time() - t, "scales": new.scales,
                                          "prune_scale": new.prune_scale, "budget": budget}
    if args.old_json:
        runs["export"] = json.loads(Path(args.old_json).read_text())["runs"]["export"]
        runs["export"].pop("kld", None)
    elif args.old_rev:
        t = time.time()
        old = old_measure_scales(args.old_rev, work)(model, stats, probe_tokens, base_type="F32",
                                                     n_ctx=args.ctx, progress=False)
        runs["export"] = {"seconds": time.time() - t, "scales": old.scales,
                          "prune_scale": old.prune_scale, "rev": args.old_rev}

    def save() -> None:  # after every stage: a long run stopped early keeps what it measured
        Path(args.out).write_text(json.dumps({
            "model": str(model_dir), "calib_seconds": calib_seconds,
            "probe_tokens": len(probe_tokens), "heldout_tokens": args.tokens, "runs": runs},
            indent=1, default=float))

    save()
    if args.no_kld:
        return
    text = (model_dir / "heldout.txt").read_text()
    llm = open_llama(f32, n_ctx=64, logits_all=False)
    tokens = tokenize(llm, text)[:args.tokens]
    llm.close()
    ref = textscore.logprobs(f32, tokens, args.ctx)
    n_params = sum(s.n_elements for s in model.specs)
    overhead = pipeline.make_budget(a, 10**12, ctx=args.ctx).runtime_bytes
    for label, r in runs.items():
        probed = replace(stats, scales=r["scales"], prune_scale=r["prune_scale"])
        r["kld"] = {}
        for bpw in args.bpw:
            cap = overhead + int(bpw * n_params / 8)
            plan, _ = pipeline.make_plan(model, pipeline.make_budget(a, cap, ctx=args.ctx),
                                         stats=probed, progress=False)
            out = pipeline.export(model, plan, work / f"{label}-{bpw}.gguf", stats=probed,
                                  progress=False)
            q = textscore.compare(ref, textscore.logprobs(out, tokens, args.ctx), tokens,
                                  args.ctx)
            r["kld"][str(bpw)] = {"kld": q.kld_mean, "bpw": plan.bits_per_weight,
                                  "experts_kept": plan.n_experts_kept}
            print(f"{label} {bpw} bpw: KLD {q.kld_mean:.5f}", flush=True)
            save()

    names = sorted({n for r in runs.values() for n in r["scales"]})
    rows = [[n] + [f"{runs[k]['scales'].get(n, float('nan')):.4g}" for k in runs]
            for n in names]
    rows.append(["(pruning)"] + [f"{runs[k]['prune_scale'] or float('nan'):.4g}" for k in runs])
    print(table(rows, ["tensor"] + [f"scale ({k})" for k in runs]))
    for k in runs:
        if "export" in runs and k != "export":
            a_, b_ = (np.log([runs[x]["scales"].get(n, np.nan) for n in names])
                      for x in (k, "export"))
            print(f"{k}: correlation of log scales with the export probes' "
                  f"{np.corrcoef(a_, b_)[0, 1]:.3f}")
    for k, r in runs.items():
        print(f"{k}: probes {r['seconds']:.0f} s (calibration run {calib_seconds:.0f} s); KLD "
              + ", ".join(f"{b}: {v['kld']:.5f}" for b, v in r.get("kld", {}).items()))
    save()
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
