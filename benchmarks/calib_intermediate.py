"""Issue 11: which intermediate GGUF keeps calibration's statistics closest to a run of the
full-precision model, when an HF source cannot be copied whole (a disk budget).

On the bundled model, calibration runs once on the F32 GGUF (the reference) and once on each
intermediate (uniform Q8_0 ... Q2_K, and routed experts low-bit with everything else Q8_0).
Against the reference: importance matrices (cosine and relative error per tensor), expert
frequency and REAP saliency (and the experts a 3/4 keep would prune), input covariances,
and the KL divergence (held-out text, against F32) of the calibrated plan made from each
intermediate's statistics at caps of 2.5 / 3 / 4 bpw (without probes; with `--probes`, every
row takes the scales the probes measure once on F32, so that only the statistics differ).

    nice python benchmarks/calib_intermediate.py     # writes benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
from scipy.stats import spearmanr

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.calibration.collect import DEFAULT_COV_BUDGET, collect, cov_plan
from edgemoe.calibration.intermediate import Candidate, candidate_plan
from edgemoe.calibration.sensitivity import measure_scales
from edgemoe.llamacpp import tokenize
from edgemoe.runtime import textscore
from memory_planner.joint import kept_by_saliency

ROOT = Path(__file__).resolve().parents[1]
RUNS = (("Q8_0", "Q8_0"), ("Q4_K", "Q4_K"), ("Q2_K", "Q2_K"), ("Q2_K", "Q8_0"),
        ("Q3_K", "Q3_K"), ("Q3_K", "Q8_0"), ("Q4_K", "Q8_0"), ("Q6_K", "Q6_K"),
        ("Q6_K", "Q8_0"))


def _cos(a, b) -> float:
    a, b = a.reshape(-1).astype(np.float64), b.reshape(-1).astype(np.float64)
    return float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-300))


def _rel(a, b) -> float:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-300))


def compare(stats, ref) -> dict:
    """Statistics of an intermediate against the reference's."""
    cos, rel = [], []
    for name in ref.in_sum2:
        a, b = stats.importance(name), ref.importance(name)
        cos.append(_cos(a, b))
        rel.append(_rel(a, b))
    freq, sal, rho, pruned = [], [], [], 0
    for layer, e in ref.experts.items():
        s = stats.experts[layer]
        freq.append(float(np.abs(s.frequency - e.frequency).max()))
        sal.append(_rel(s.saliency, e.saliency))
        rho.append(float(spearmanr(s.saliency, e.saliency).statistic))
    keep = 3 * next(iter(ref.experts.values())).n_expert // 4
    ka, kb = kept_by_saliency(stats, keep), kept_by_saliency(ref, keep)
    pruned = sum(len(set(ka[k]) ^ set(kb[k])) // 2 for k in kb)
    cov = [_rel(stats.in_cov[n], ref.in_cov[n]) for n in ref.in_cov]
    return {"importance_cos_mean": float(np.mean(cos)), "importance_cos_min": float(min(cos)),
            "importance_rel_mean": float(np.mean(rel)), "importance_rel_max": float(max(rel)),
            "freq_absdiff_max": float(max(freq)), "saliency_rel_mean": float(np.mean(sal)),
            "saliency_spearman_min": float(min(rho)), "pruned_differently": pruned,
            "cov_rel_mean": float(np.mean(cov)), "cov_rel_max": float(max(cov))}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models/stdlib-moe"))
    ap.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    ap.add_argument("--tokens", type=int, default=4096, help="held-out tokens to score")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--calib-tokens", type=int, default=None,
                    help="calibration tokens (default: all of MODEL/calib.txt)")
    ap.add_argument("--probes", action="store_true",
                    help="measure sensitivity scales on F32 and plan every row with them "
                         "(default: plans without probes, as `calibrate --no-sensitivity`)")
    ap.add_argument("--uniform", default=None,
                    help="instead of the calibrated plans, score a uniform TYPE model "
                         "quantized with each row's imatrix (search 0): the statistics' "
                         "effect alone, at a fraction of the cost")
    ap.add_argument("--no-kld", action="store_true",
                    help="compare the statistics only (no plans, no held-out scoring)")
    ap.add_argument("--runs", nargs="+", default=None,
                    help="intermediates as EXPERT_TYPE/OTHER_TYPE (default: all)")
    ap.add_argument("--workdir", default="/tmp/edgemoe-calib-int")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/calib_intermediate.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model)
    model = pipeline.open_model(model_dir)
    a = model.adapter
    big = mp.Budget(2**62)
    f32 = pipeline.export(model, mp.uniform_plan(model.specs, "F32", big, check_budget=False),
                          work / "f32.gguf", progress=False)
    held = tokenize(f32, (model_dir / "heldout.txt").read_text())[: args.tokens]
    ref_logprobs = textscore.logprobs(f32, held, args.ctx)
    calib = (model_dir / "calib.txt").read_text()
    blocks = cov_plan(model.specs, DEFAULT_COV_BUDGET)
    n_params = sum(s.n_elements for s in model.specs)
    probe = pipeline.make_budget(a, 10**12, ctx=args.ctx)
    overhead = probe.kv_bytes + probe.compute_bytes

    def run_stats(path, label):
        t = time.time()
        s = collect(path, calib, model.specs, a.n_layer, a.n_expert, n_ctx=args.ctx,
                    max_tokens=args.calib_tokens, progress=False, cov_blocks=blocks)
        return s, time.time() - t

    def plans_kld(stats, label):
        out = {}
        if args.no_kld:
            return out
        if args.uniform:
            plan = mp.uniform_plan(model.specs, args.uniform, big, check_budget=False)
            path = pipeline.export(model, plan, work / f"u-{args.uniform}-{label}.gguf",
                                   stats=stats, progress=False, search=0)
            q = textscore.compare(ref_logprobs, textscore.logprobs(path, held, args.ctx), held,
                                  args.ctx)
            return {args.uniform: {"kld": q.kld_mean, "bpw": plan.bits_per_weight,
                                   "kept": plan.n_experts_kept,
                                   "types": {t.name: t.type for t in plan.tensors}}}
        for bpw in args.bpw:
            budget = pipeline.make_budget(a, overhead + int(bpw * n_params / 8), ctx=args.ctx)
            plan, _ = pipeline.make_plan(model, budget, stats=stats, progress=False)
            path = pipeline.export(model, plan, work / f"plan-{label}-{bpw}.gguf", stats=stats,
                                   progress=False)
            q = textscore.compare(ref_logprobs, textscore.logprobs(path, held, args.ctx), held,
                                  args.ctx)
            out[str(bpw)] = {"kld": q.kld_mean, "bpw": plan.bits_per_weight,
                             "kept": plan.n_experts_kept,
                             "types": {t.name: t.type for t in plan.tensors}}
        return out

    ref, secs = run_stats(f32, "F32")
    if args.probes:
        ref = measure_scales(model, ref, tokenize(f32, calib)[:2048], base_type="F32",
                             n_ctx=args.ctx, progress=False)
    results = {"F32": {"seconds": secs, "bpw": 32.0, "plans": plans_kld(ref, "F32")}}
    out = Path(args.out)

    def dump():
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({"model": str(model_dir), "tokens": len(held),
                                   "results": results, "seconds": time.time() - t0},
                                  indent=1))

    dump()
    print("F32", {b: round(p["kld"], 5) for b, p in results["F32"]["plans"].items()},
          flush=True)
    runs = [tuple(r.split("/")) for r in args.runs] if args.runs else RUNS
    for expert_type, other_type in runs:
        c = Candidate(expert_type, other_type, "?")
        plan = candidate_plan(model.specs, c)
        path = pipeline.export(model, plan, work / f"int-{expert_type}-{other_type}.gguf",
                               progress=False, cpu_rows=True)  # as calibrate writes it
        stats, secs = run_stats(path, c.label)
        stats = replace(stats, scales=ref.scales, prune_scale=ref.prune_scale)
        row = {"seconds": secs, "bpw": plan.bits_per_weight, "file_bytes": path.stat().st_size,
               **compare(stats, ref), "plans": plans_kld(stats, c.label.replace(" ", "_"))}
        for bpw, p in row["plans"].items():
            # tensors whose type differs from the F32 row's
            p["types_changed"] = sum(t != results["F32"]["plans"][bpw]["types"][n]
                                     for n, t in p["types"].items())
        results[c.label] = row
        print(c.label, {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()
                        if k != "plans"},
              {b: round(p["kld"], 5) for b, p in row["plans"].items()}, flush=True)
        dump()
    print("F32", "seconds", results["F32"]["seconds"],
          {b: round(p["kld"], 5) for b, p in results["F32"]["plans"].items()}, flush=True)
    print("F32", {b: round(p["kld"], 5) for b, p in results["F32"]["plans"].items()})
    print(f"wrote {out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
