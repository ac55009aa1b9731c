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
Strategies (`export.quantize.quantize_rows_searched`):
  weightings 16   best of the imatrix and 15 other column weightings per row (before issue 11)
  weightings 2    best of the imatrix and its square root per row
  feedback 2      the default (--search 2): GPTQ on ggml's grid (scalar K-quants, IQ4_XS) or a
                  target shift (other types), re-quantized by ggml, for the rows whose error
                  correlates with the inputs (select 1.0)
  feedback 2 all  the same for every row (select 0)
  feedback 3      every row, a target shift after the first candidate (--search 3)
  shift 2         the target shift for every type (no GPTQ), select 1.0
Then end to end, with the default threads: `pipeline.export` of a calibrated plan with
--search 0 and with the default, and llama.cpp's `llama_model_quantize` of the same types
(median wall time over --repeats runs).

The machine may be shared with other jobs: the ratios are measured run by run, next to each
other, and the JSON keeps every run.

    python benchmarks/search_cost.py                        # calibrates into --workdir first
    python benchmarks/search_cost.py --stats stats.gguf --types Q4_K,IQ3_S --repeats 1
"""

from __future__ import annotations

import os

for _var in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")  # before numpy loads: one thread, like ggml's calls

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import re  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memory_planner as mp  # noqa: E402
from edgemoe import pipeline  # noqa: E402
from edgemoe.llamacpp import llama_quantize  # noqa: E402
from export import quantize as q  # noqa: E402
from export.imatrix import read_stats  # noqa: E402

TYPES = ("Q2_K", "Q3_K", "IQ3_S", "IQ2_S", "IQ2_XS", "Q4_K", "IQ4_XS")
REFERENCE = "weightings 16"
STRATEGIES = {  # label: keyword arguments of quantize_rows_searched
    REFERENCE: dict(tries=16, strategy="weightings"),
    "weightings 2": dict(tries=2, strategy="weightings"),
    "feedback 2": dict(tries=2),
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


def timed(fn, *args, **kwargs):
    t0 = time.perf_counter()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0


def measure_type(mats, type_name: str, repeats: int) -> dict:
    """Per strategy: per-run time ratios and errors summed over all / per tensor."""
    q.quantize_rows(mats[0][1][:1], type_name, mats[0][2])  # IQ tables built outside the clock
    names = sorted({m[0] for m in mats})
    plain_err = {n: 0.0 for n in names}
    errs = {s: {n: 0.0 for n in names} for s in STRATEGIES}
    ratios: dict[str, list[float]] = {s: [] for s in STRATEGIES}
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
                selected += int((e > q.SELECT_RATIO * diag).sum())
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
        print(f"  {type_name} run {run + 1}/{repeats}: plain {t_plain:.2f} s", flush=True)
    base, ref = sum(plain_err.values()), sum(errs[REFERENCE].values())
    out = {"plain_error": base, "rows_selected_share": selected / rows, "strategies": {}}
    for s in STRATEGIES:
        total = sum(errs[s].values())
        per_tensor = [(plain_err[n] - errs[s][n]) / (plain_err[n] - errs[REFERENCE][n])
                      for n in names if plain_err[n] > errs[REFERENCE][n]]
        out["strategies"][s] = {
            "time_ratio": float(np.median(ratios[s])), "time_ratios": ratios[s],
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
            times[k].append(timed(fn)[1])
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
        from edgemoe.calibrate import calibrate

        calibrate(args.model, text=str(Path(args.model) / "calib.txt"), output=str(stats_path),
                  progress=False)
    stats = read_stats(stats_path)
    mats = matrices(model, stats)
    print(f"{len(mats)} matrices, {sum(m[1].size for m in mats)} weights; "
          f"{args.repeats} runs on {os.cpu_count()} CPUs (possibly shared)")
    per_type = {}
    for t in args.types.split(","):
        per_type[t] = measure_type(mats, t, args.repeats)
    e2e = end_to_end(model, stats, args.bpw, work, args.repeats) if args.bpw else None

    types = list(per_type)
    print(f"\ntime: x plain quantization (median of {args.repeats} runs; "
          f"{REFERENCE}: 1 run); kept: share of the {REFERENCE} gain (summed / per-tensor "
          "mean)")
    head = f"{'strategy':<16}" + "".join(f"{t:>19}" for t in types)
    print(head + "\n" + "-" * len(head))
    for s in STRATEGIES:
        cells = []
        for t in types:
            r = per_type[t]["strategies"][s]
            kept = f"{r['kept']:5.2f}/{r['kept_per_tensor_mean']:4.2f}"
            cells.append(f"x{r['time_ratio']:5.2f} {kept}")
        print(f"{s:<16}" + "".join(f"{c:>19}" for c in cells))
    print(f"{'cut (16 / default)':<16}" + "".join(
        f"{per_type[t]['strategies'][REFERENCE]['cut']:>11.0%} /"
        f"{per_type[t]['strategies']['feedback 2']['cut']:>5.0%}" for t in types))
    print(f"{'rows selected':<16}" + "".join(
        f"{per_type[t]['rows_selected_share']:>19.0%}" for t in types))
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
