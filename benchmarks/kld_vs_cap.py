"""Issue 3's benchmark: at several memory caps, KL divergence against the F32 model in llama.cpp
of the calibrated plan and of the alternatives a user has.

For each cap (given as bits per weight of the bundled model's weights):
  calibrated    edgemoe: calibration stats, importance-weighted damage scaled by measured
                per-tensor sensitivity probes, pruning allowed, imatrix quantization with
                the output-error search (export's default --search)
  calibrated, search 0    the same plan written without the search (ablation: the bytes
                llama-quantize writes for these types and this imatrix)
  calibrated, no probes   the same without the sensitivity probes (ablation)
  uncalibrated  edgemoe without stats: plain relative error, no imatrix
  mc-style      the joint program with expert importance = frequency x mean routing weight
                (MC's criterion) instead of measured output energy / REAP saliency
  uniform T     every quantizable tensor at type T, imatrix quantization (searched, as
                every edgemoe export with these stats), if it fits
  llama.cpp P   llama_model_quantize preset P (Q2_K, Q3_K_M, Q4_K_M, IQ2_XXS, ...) with the
                same imatrix, whatever its size (its size is shown)
The comparison set at a cap: every alternative that fits it, plus the smallest llama.cpp
preset no smaller than the calibrated file (which may not fit). bpw is weight bits over the
unpruned model's parameters, the same scale for every row.
Then Spearman's rank correlation between predicted damage and measured KLD over the plans.

    python benchmarks/kld_vs_cap.py                     # bundled model, caps 2.5 / 3 / 4 bpw
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
from edgemoe.calibration.collect import calibrate
from edgemoe.damage import importance, measure_damage
from edgemoe.llamacpp import llama_quantize, open_llama, tokenize
from edgemoe.report.tables import table
from edgemoe.runtime import textscore
from memory_planner.stats import CalibStats, ExpertStats

ROOT = Path(__file__).resolve().parents[1]
PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ2_M", "Q2_K_S", "Q2_K",
           "IQ3_XXS", "IQ3_XS", "IQ3_S", "Q3_K_S", "IQ3_M", "Q3_K_M", "IQ4_XS", "Q4_K_S",
           "Q4_K_M")
# types ggml can make without an importance matrix (token_embd has none): the others are
# covered by llama.cpp's IQ presets
UNIFORM = ("Q2_K", "IQ2_S", "IQ3_XXS", "Q3_K", "IQ3_S", "IQ4_XS", "Q4_K",
           "Q5_K", "Q6_K", "Q8_0")


def mc_style(stats: CalibStats) -> CalibStats:
    """The same statistics with expert importance = frequency x mean routing weight."""
    experts = {}
    for layer, e in stats.experts.items():
        importance = e.weight_sum  # = selections x mean weight
        experts[layer] = ExpertStats(e.selected, e.weight_sum, importance, importance,
                                     float(importance.sum()))
    return replace(stats, experts=experts)


def weight_bytes(path: Path) -> int:
    llm = open_llama(path, n_ctx=64, logits_all=False)
    try:
        import llama_cpp

        return int(llama_cpp.llama_model_size(llm.model))
    finally:
        llm.close()


def reference_run(model_dir: Path, work: Path, n_tokens: int, ctx: int,
                  heldout: str | None = None, calib: str | None = None):
    """What every row is measured against (search_ab.py too): the model, its F32 GGUF, the
    first `n_tokens` held-out tokens (default text MODEL/heldout.txt), the F32 model's
    log-probabilities on them in windows of `ctx`, and the statistics `calibrate` measures
    on the F32 GGUF with probes (default text MODEL/calib.txt)."""
    model = pipeline.open_model(model_dir)
    f32 = pipeline.export(model, mp.uniform_plan(model.specs, "F32", mp.Budget(2**62),
                                                 check_budget=False), work / "f32.gguf",
                          progress=False)
    text = Path(heldout or model_dir / "heldout.txt").read_text()
    llm = open_llama(f32, n_ctx=64, logits_all=False)
    tokens = tokenize(llm, text)[:n_tokens]
    llm.close()
    ref = textscore.logprobs(f32, tokens, ctx)
    stats = calibrate(str(model_dir), text=calib or str(model_dir / "calib.txt"),
                      output=str(work / "stats.gguf"), calib_model=str(f32), calib_type="F32",
                      sensitivity=True, progress=False)
    return model, f32, tokens, ref, stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models/stdlib-moe"))
    ap.add_argument("--heldout", default=None, help="default: MODEL/heldout.txt")
    ap.add_argument("--calib", default=None, help="default: MODEL/calib.txt")
    ap.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/edgemoe-kld")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kld_vs_cap.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    model_dir = Path(args.model)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    t0 = time.time()

    model, f32, tokens, ref, stats = reference_run(model_dir, work, args.tokens, args.ctx,
                                                   args.heldout, args.calib)
    a = model.adapter
    unprobed = replace(stats, scales={}, prune_scale=None)
    imatrix_by_name = {s.name: importance(stats, s) for s in model.specs
                       if s.quantizable and stats.importance(s.name) is not None}

    def measure(path: Path) -> dict:
        q = textscore.compare(ref, textscore.logprobs(path, tokens, args.ctx), tokens, args.ctx)
        return {"kld": q.kld_mean, "kld_p99": q.kld_p99, "top1": q.top1_agreement,
                "ppl": q.ppl, "ppl_ref": q.ppl_reference, "weight_bytes": weight_bytes(path)}

    # llama.cpp presets do not depend on the cap: measure each once
    presets = {}
    for p in PRESETS:
        out = work / f"preset-{p}.gguf"
        try:
            llama_quantize(f32, out, p, imatrix={k: v.reshape(-1) for k, v in
                                                  imatrix_by_name.items()})
        except RuntimeError as exc:
            print(f"preset {p}: {exc}")
            continue
        presets[p] = measure(out)

    n_params = sum(s.n_elements for s in model.specs)
    damage_cal = measure_damage(model, stats=stats, progress=False,
                                ladder=mp.DEFAULT_LADDER + mp.quant_types.IMATRIX_LADDER_EXTRA)
    probe = pipeline.make_budget(a, 10**12, ctx=args.ctx)
    overhead = probe.runtime_bytes  # the same at every cap
    results, rank_points = [], []
    for bpw in args.bpw:
        cap = overhead + int(bpw * n_params / 8)
        budget = pipeline.make_budget(a, cap, ctx=args.ctx)
        rows = {}

        def run(label, plan, use_stats, bpw=bpw, cap=cap, rows=rows,
                search=pipeline.DEFAULT_SEARCH):
            out = work / f"{label.replace(' ', '_')}-{bpw}.gguf"
            pipeline.export(model, plan, out, stats=use_stats, progress=False, search=search)
            m = measure(out)
            m.update(predicted=plan.predicted_damage, bpw=plan.bits_per_weight,
                     experts_kept=plan.n_experts_kept, fits=plan.total_bytes <= cap)
            rows[label] = m
            return m

        plan, tradeoff = pipeline.make_plan(model, budget, stats=stats, progress=False)
        run("calibrated", plan, stats)
        run("calibrated, search 0", plan, stats, search=0)
        for label, plan_stats, quant_stats in (("calibrated, no probes", unprobed, stats),
                                               ("uncalibrated", None, None),
                                               ("mc-style", mc_style(unprobed), stats)):
            try:
                p, _ = pipeline.make_plan(model, budget, stats=plan_stats, progress=False)
            except mp.BudgetTooSmallError as exc:  # e.g. no IQ2 types without an imatrix
                print(f"{label} at {bpw} bpw: {exc}")
                continue
            run(label, p, quant_stats)
        for t in UNIFORM:
            up = mp.uniform_plan(model.specs, t, budget, check_budget=False)
            if up.total_bytes > cap:
                continue
            up = replace(up, tensors=tuple(
                replace(tp, damage=damage_cal.table(model.specs).get(tp.name, {}).get(tp.type,
                                                                                      0.0))
                for tp in up.tensors))
            run(f"uniform {t}", up, stats)
        for p, m in presets.items():
            rows[f"llama.cpp {p}"] = {**m, "fits": m["weight_bytes"] + overhead <= cap,
                                      "bpw": 8 * m["weight_bytes"] / n_params}
        results.append({"bpw_target": bpw, "cap_bytes": cap, "rows": rows,
                        "tradeoff": [r.__dict__ for r in tradeoff]})
        rank_points += [(r["predicted"], r["kld"]) for k, r in rows.items()
                        if "predicted" in r and (k == "calibrated" or k.startswith("uniform"))]

    # more plans for the rank correlation: the calibrated planner across a range of caps
    for bpw in np.linspace(2.2, 6.0, 8):
        cap = overhead + int(bpw * n_params / 8)
        budget = pipeline.make_budget(a, cap, ctx=args.ctx)
        plan = mp.solve(model.specs, damage_cal.table(model.specs), budget,
                        ladder=mp.DEFAULT_LADDER + mp.quant_types.IMATRIX_LADDER_EXTRA)
        out = work / f"rank-{bpw:.2f}.gguf"
        pipeline.export(model, plan, out, stats=stats, progress=False)
        rank_points.append((plan.predicted_damage, measure(out)["kld"]))
    rho = float(spearmanr([p for p, _ in rank_points], [k for _, k in rank_points]).statistic)

    lines = []
    for res in results:
        rows = res["rows"]
        ours = rows["calibrated"]
        for v in rows.values():  # one scale for every row: bits over the unpruned model
            v["bpw_model"] = 8 * v["weight_bytes"] / n_params
        alternatives = {k: v for k, v in rows.items() if not k.startswith("calibrated")}
        fitting = {k: v for k, v in alternatives.items() if v.get("fits")}
        larger = [(v["weight_bytes"], k) for k, v in alternatives.items()
                  if k.startswith("llama.cpp") and v["weight_bytes"] >= ours["weight_bytes"]]
        nearest = min(larger)[1] if larger else None
        field = dict(fitting, **({nearest: alternatives[nearest]} if nearest else {}))
        best = min(field, key=lambda k: field[k]["kld"])
        ratio = ours["kld"] / field[best]["kld"]
        res.update(best_alternative=best, ratio_to_best=ratio, nearest_larger_preset=nearest)
        print(f"\ncap {mp.format_size(res['cap_bytes'])} (target {res['bpw_target']} bpw): "
              f"calibrated KLD {ours['kld']:.4f}; best alternative that fits, or the smallest "
              f"llama.cpp preset no smaller than ours ({nearest}): {best} "
              f"{field[best]['kld']:.4f}; ratio {ratio:.2f}")
        t = [[k, f"{v['bpw_model']:.2f}", f"{v['weight_bytes'] / 1e6:.2f}", f"{v['kld']:.4f}",
              f"{v['kld_p99']:.3f}", f"{v['top1']:.3f}", f"{v['ppl']:.3f}",
              "yes" if v.get("fits") else "no", str(v.get("experts_kept", "")),
              f"{v['predicted']:.4g}" if "predicted" in v else ""]
             for k, v in sorted(rows.items(), key=lambda kv: kv[1]["kld"])]
        print(table(t, ["plan", "bpw", "MB", "KLD", "KLD p99", "top-1", "PPL", "fits",
                        "experts", "predicted"]))
        lines.append(res)
    print(f"\nSpearman(predicted damage, measured KLD) over {len(rank_points)} plans: {rho:.3f}")
    summary = {"model": str(model_dir), "tokens": len(tokens), "n_params": n_params,
               "ppl_f32": results[0]["rows"]["calibrated"]["ppl_ref"] if results else None,
               "results": lines, "spearman": rho, "rank_points": rank_points,
               "seconds": time.time() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(summary, indent=1, default=float))
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
