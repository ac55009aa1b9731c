"""Issue 11's benchmark: what the output-error search costs next to ggml's plain quantization,
and how much of the 16-candidate search's output-error gain cheaper strategies keep.

Over the bundled model's searched tensors (every matrix with measured input covariances;
expert slices one call each, as export quantizes them), per type:
  time   time of `quantize_rows_searched` / time of ggml's plain `quantize_rows` on the same
         rows, one thread (BLAS too), timed next to each other matrix by matrix; the median
         over --repeats runs (the 16-candidate reference is timed in the first run only)
  kept   (plain - strategy) / (plain - 16 candidates): output errors under the measured
         covariances, summed over all matrices (issue 11's measure: tensors with large
         output errors, output.weight above all, weigh most)
  kept/t the same ratio per GGUF tensor, averaged over tensors
  cut    1 - strategy / plain: the share of the summed output error removed
Strategies (`export.search.quantize_rows_searched`):
  weightings 16   best of the imatrix and 15 other column weightings per row (before issue 11)
  weightings 2    best of the imatrix and its square root per row
  feedback 2      the default (--search 2): GPTQ on ggml's grid (scalar K-quants, IQ4_XS) or a
                  target shift (other types), re-quantized by ggml, for the rows whose error
                  under the covariance exceeds select (0.8; Q3_K 1.25) times their error
                  with independent columns
  feedback 2 s1.0 the same with select 1.0 (fewer rows)
  feedback 2 all  the same for every row (select 0)
  feedback 3      every row; then a target shift from the best so far (--search 3)
  shift 2         the target shift for every type (no GPTQ), the default select
Then end to end, with the default threads: `pipeline.export` of a calibrated plan with
--search 0 and with the default, and llama.cpp's `llama_model_quantize` of the same types
(median wall time over --repeats runs).

The machine may be shared with other jobs: the ratios are measured run by run, next to each
other, and the JSON keeps every run.

    python benchmarks/search_cost.py                        # calibrates into --workdir first
    python benchmarks/search_cost.py --stats stats.gguf --types Q4_K,IQ3_S --repeats 1
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memory_planner as mp  # noqa: E402
from edgemoe import pipeline  # noqa: E402
from edgemoe.llamacpp import llama_quantize  # noqa: E402
from export import quantize as q  # noqa: E402
from export.imatrix import read_stats  # noqa: E402

TYPES = ("Q2_K", "Q3_K", "IQ3_S", "IQ2_S", "IQ2_XS", "Q4_K", "IQ4_XS",  # issue 11's list
         "IQ1_S", "IQ2_XXS", "IQ3_XXS", "Q5_K")  # the bundled model's plans use these too
REFERENCE = "weightings 16"
STRATEGIES = {  # label: keyword arguments of quantize_rows_searched
    REFERENCE: dict(tries=16, strategy="weightings"),
    "weightings 2": dict(tries=2, strategy="weightings"),
    "feedback 2": dict(tries=2),
    "feedback 2 s1.0": dict(tries=2, select=1.0),
    "feedback 2 all": dict(tries=2, select=0.0),
    "feedback 3": dict(tries=3),
    "shift 2": dict(tries=2, strategy="shift"),
}


def matrices(model, stats) -> list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray]]:
    """(GGUF tensor name, rows, imatrix, covariance) of every searched matrix, expert slices
    apart, as export hands them to the quantizer."""
    out = []
    for r in model.recipes:
        spec = r.spec
        cov = stats.covariance(spec.name) if spec.quantizable else None
        if cov is None:
            continue
        im = pipeline.importance(stats, spec)
        data = r.load(model.source)
        if not spec.n_experts:
            out.append((spec.name, np.ascontiguousarray(data, np.float32), im, cov[0]))
            continue
        for e in range(spec.n_experts):
            c = cov[e] if len(cov) > 1 else q.scaled_correlation(cov[0], im[e])
            out.append((spec.name, np.ascontiguousarray(data[e], np.float32), im[e], c))
    return out


def wide_matrix(mats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """A 768 x 2048 matrix (the shape issue 11's costs were first measured on) tiled from the
    model's expert slices, with their covariances as its 8 blocks: for timing only."""
    experts = [m for m in mats if "_exps" in m[0] and m[1].shape == (256, 256)][:24]
    w = np.block([[experts[8 * i + k][1] for k in range(8)] for i in range(3)])
    cov = np.concatenate([experts[k][3] for k in range(8)])
    im = np.concatenate([np.diagonal(c) for c in cov]).astype(np.float32)
    return np.ascontiguousarray(w, np.float32), im, cov


def timed(fn, *args, **kwargs):
    t0 = time.process_time()  # this process's CPU time: less swayed by other jobs
    out = fn(*args, **kwargs)
    return out, time.process_time() - t0


def measure_type(mats, wide, type_name: str, repeats: int) -> dict:
    """Per strategy: per-run time ratios and errors summed over all / per tensor, and time
    ratios on the wide matrix."""
    q.quantize_rows(mats[0][1][:1], type_name, mats[0][2])  # IQ tables built outside the clock
    names = sorted({m[0] for m in mats})
    plain_err = {n: 0.0 for n in names}
    errs = {s: {n: 0.0 for n in names} for s in STRATEGIES}
    ratios: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    wide_ratios: dict[str, list[float]] = {s: [] for s in STRATEGIES}
    selected = rows = 0
    for run in range(repeats):
        t_plain = 0.0
        t_strat = {s: 0.0 for s in STRATEGIES}
        for name, w, im, cov in mats:
            raw, dt = timed(q.quantize_rows, w, type_name, im)
            t_plain += dt
            if run == 0:
                e = q.output_error(w, raw, type_name, cov)
                plain_err[name] += float(e.sum())
                diag = np.square(q.dequantize(raw, type_name, w.shape).astype(np.float64) - w)
                diag = diag @ np.diagonal(cov, axis1=1, axis2=2).reshape(-1).astype(np.float64)
                selected += int((e > q.select_ratio(type_name) * diag).sum())
                rows += len(w)
            for s, kw in STRATEGIES.items():
                if run and s == REFERENCE:
                    continue
                raw_s, dt = timed(q.quantize_rows_searched, w, type_name, im, cov, **kw)
                t_strat[s] += dt
                if run == 0:
                    errs[s][name] += float(q.output_error(w, raw_s, type_name, cov).sum())
        for s in STRATEGIES:
            if not (run and s == REFERENCE):
                ratios[s].append(t_strat[s] / t_plain)
        w, im, cov = wide
        t_wide = timed(q.quantize_rows, w, type_name, im)[1]
        for s, kw in STRATEGIES.items():
            if not (run and s == REFERENCE):
                dt = timed(q.quantize_rows_searched, w, type_name, im, cov, **kw)[1]
                wide_ratios[s].append(dt / t_wide)
        print(f"  {type_name} run {run + 1}/{repeats}: plain {t_plain:.2f} s", flush=True)
    base, ref = sum(plain_err.values()), sum(errs[REFERENCE].values())
    out = {"plain_error": base, "rows_selected_share": selected / rows, "strategies": {}}
    for s in STRATEGIES:
        total = sum(errs[s].values())
        per_tensor = [(plain_err[n] - errs[s][n]) / (plain_err[n] - errs[REFERENCE][n])
                      for n in names if plain_err[n] > errs[REFERENCE][n]]
        out["strategies"][s] = {
            "time_ratio": float(np.median(ratios[s])), "time_ratios": ratios[s],
            "wide_time_ratio": float(np.median(wide_ratios[s])), "wide_time_ratios": wide_ratios[s],
            "error": total, "kept": (base - total) / (base - ref),
            "kept_per_tensor_mean": float(np.mean(per_tensor)), "cut": 1 - total / base,
        }
    return out


def end_to_end(model, stats, bpw: float, workdir: Path, repeats: int) -> dict:
    """Wall times of edgemoe's export (search 0, default) and llama-quantize, same types."""
    n_params = sum(s.n_elements for s in model.specs)
    probe = pipeline.make_budget(model.adapter, 10**12)
    cap = probe.kv_bytes + probe.compute_bytes + int(bpw * n_params / 8)
    plan, _ = pipeline.make_plan(model, pipeline.make_budget(model.adapter, cap), stats=stats,
                                 progress=False, prune=False)
    f32 = pipeline.export(model, mp.uniform_plan(model.specs, "F32", mp.Budget(2**62),
                                                 check_budget=False),
                          workdir / "f32.gguf", progress=False)
    imatrix = {s.name: pipeline.importance(stats, s).reshape(-1) for s in model.specs
               if s.quantizable and stats.importance(s.name) is not None}
    overrides = {f"^{re.escape(t.name)}$": t.type for t in plan.tensors}
    runs = {
        "llama-quantize": lambda: llama_quantize(f32, workdir / "lq.gguf", "Q8_0",
                                                 overrides=overrides, imatrix=imatrix),
        "edgemoe --search 0": lambda: pipeline.export(model, plan, workdir / "s0.gguf",
                                                      stats=stats, search=0, progress=False),
        f"edgemoe --search {q.DEFAULT_SEARCH}": lambda: pipeline.export(
            model, plan, workdir / "s2.gguf", stats=stats, progress=False),
    }
    times: dict[str, list[float]] = {k: [] for k in runs}
    for _ in range(repeats):
        for k, fn in runs.items():
            t0 = time.perf_counter()  # wall time: export runs on several threads
            fn()
            times[k].append(time.perf_counter() - t0)
    types = sorted({t.type for t in plan.tensors})
    return {"bpw": bpw, "types": types, "seconds": times,
            "median_seconds": {k: float(np.median(v)) for k, v in times.items()}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models/stdlib-moe"))
    ap.add_argument("--stats", default=None,
                    help="calibration stats with covariances (default: calibrate into "
                         "--workdir, reused when present)")
    ap.add_argument("--types", default=",".join(TYPES))
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--bpw", type=float, default=3.0, help="end-to-end plan (0: skip)")
    ap.add_argument("--workdir", default="/tmp/edgemoe-search-cost")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/search_cost.json"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    model = pipeline.open_model(args.model)
    stats_path = Path(args.stats) if args.stats else work / "stats.gguf"
    if not stats_path.is_file():
        from edgemoe.calibration.collect import calibrate

        calibrate(args.model, text=str(Path(args.model) / "calib.txt"), output=str(stats_path),
                  progress=False)
    stats = read_stats(stats_path)
    mats = matrices(model, stats)
    print(f"{len(mats)} matrices, {sum(m[1].size for m in mats)} weights; "
          f"{args.repeats} runs on {os.cpu_count()} CPUs (possibly shared)")
    wide = wide_matrix(mats)
    per_type = {}
    for t in args.types.split(","):
        per_type[t] = measure_type(mats, wide, t, args.repeats)
    e2e = end_to_end(model, stats, args.bpw, work, args.repeats) if args.bpw else None

    types = list(per_type)
    print(f"\nper type and strategy: time x plain quantization (median of {args.repeats} runs, "
          f"{REFERENCE} 1 run), share of the {REFERENCE} gain kept (summed / mean per tensor)")
    head = f"{'type':<8}" + "".join(f"{s:>18}" for s in STRATEGIES) + f"{'rows sel.':>10}"
    print(head + "\n" + "-" * len(head))
    for t in types:
        r = per_type[t]["strategies"]
        cells = [f"x{r[s]['time_ratio']:.2f} {r[s]['kept']:.2f}/{r[s]['kept_per_tensor_mean']:.2f}"
                 for s in STRATEGIES]
        print(f"{t:<8}" + "".join(f"{c:>18}" for c in cells)
              + f"{per_type[t]['rows_selected_share']:>10.0%}")
    print("\nshare of the plain quantization's summed output error removed, and time x plain "
          "on a 768 x 2048 matrix (8 super-blocks a row)")
    print(head[:-10] + "\n" + "-" * (len(head) - 10))
    for t in types:
        r = per_type[t]["strategies"]
        cells = [f"{r[s]['cut']:.0%} x{r[s]['wide_time_ratio']:.2f}" for s in STRATEGIES]
        print(f"{t:<8}" + "".join(f"{c:>18}" for c in cells))
    if e2e:
        print(f"\nend to end, {e2e['bpw']} bpw plan ({', '.join(e2e['types'])}), median "
              "seconds:")
        for k, v in e2e["median_seconds"].items():
            print(f"  {k:<22}{v:7.2f}")
    result = {
        "meta": {"model": args.model, "stats": str(stats_path), "repeats": args.repeats,
                 "cpus": os.cpu_count(), "machine": platform.machine(),
                 "shared_machine": "possibly: other jobs may run alongside",
                 "blas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
                 "seconds": time.time() - t0, "matrices": len(mats),
                 "weights": int(sum(m[1].size for m in mats))},
        "types": per_type, "end_to_end": e2e,
    }
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"\nwrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
