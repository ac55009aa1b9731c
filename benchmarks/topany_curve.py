"""Expert activations removed vs perplexity increase, measured in llama.cpp.

On the bundled reference model (models/stdlib-moe, exported F32): thresholds are chosen on
calib.txt and measured on heldout.txt, against the same model with tau = 0:
  uniform        one tau for every layer, the quantile of the calibration ratios
  layer          per-layer shares from single-layer sensitivity curves (KLD), least damage
  layer+protect  the same thresholds, the first `--protect` positions keep all experts
                 (MC's ODP idea reduced to its cheapest form: protect attention-sink tokens)
and the damage-budget calibration (<= 1% perplexity increase on calib.txt) is measured on
held-out text too. Goal (MC#): >= 20% fewer expert activations for <= 1% perplexity.

    python benchmarks/topany_curve.py [--model models/stdlib-moe | --gguf FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgemoe.llamacpp import tokenize  # noqa: E402
from edgemoe.report.tables import table  # noqa: E402
from edgemoe.runtime import topany, topany_calibrate  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"


def export_f32(model_dir: Path, out: Path) -> Path:
    import memory_planner as mp
    from edgemoe import pipeline

    weights = max(f.stat().st_mtime for f in model_dir.glob("*.safetensors"))
    if out.exists() and out.stat().st_mtime > weights:  # exported from these weights
        return out
    model = pipeline.open_model(model_dir)
    plan = mp.uniform_plan(model.specs, "F32", mp.Budget(cap_bytes=1 << 62), check_budget=False)
    return pipeline.export(model, plan, out)


def check_exactness(path: Path, tokens: list[int], threads: int | None) -> dict:
    import gguf

    from edgemoe.calibration.hooks import EvalHooks
    from edgemoe.llamacpp import eval_logits, open_llama
    from edgemoe.runtime.model import load

    arch = gguf.GGUFReader(path).get_field("general.architecture").contents()
    plain = eval_logits(open_llama(path, n_ctx=len(tokens), threads=threads), tokens)
    hooked = load(path, top_any=0, n_ctx=len(tokens), threads=threads, logits_all=True,
                  hooks=EvalHooks())
    k1 = open_llama(path, n_ctx=len(tokens), threads=threads,
                    kv_overrides={f"{arch}.expert_used_count": 1})
    hooks = EvalHooks()
    topany.SlotDropper(lambda layer, w: np.arange(w.shape[1])[None, :] % 2 == 1).install(hooks)
    dropped = load(path, top_any=0, n_ctx=len(tokens), threads=threads, logits_all=True,
                   hooks=hooks)
    return {"tokens": len(tokens),
            "tau0_bit_identical": bool(np.array_equal(eval_logits(hooked, tokens), plain)),
            "drop_second_equals_k1": bool(np.array_equal(eval_logits(dropped, tokens),
                                                         eval_logits(k1, tokens)))}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", default=str(ROOT / "models" / "stdlib-moe"))
    p.add_argument("--gguf", default=None, help="measure this GGUF instead of exporting F32")
    p.add_argument("--out-dir", default="/tmp/edgemoe-bench")
    p.add_argument("--ctx", type=int, default=512)
    p.add_argument("--calib-tokens", type=int, default=8192)
    p.add_argument("--heldout-tokens", type=int, default=16384)
    p.add_argument("--grid", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.8",
                   help="shares of the removable slots for the sensitivity curves")
    p.add_argument("--shares", default="0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4")
    p.add_argument("--protect", type=int, default=4)
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    t_start = time.time()

    model_dir = Path(args.model)
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = Path(args.gguf) if args.gguf else export_f32(model_dir, out_dir /
                                                         f"{model_dir.name}-F32.gguf")
    calib = tokenize(path, (model_dir / "calib.txt").read_text(), args.calib_tokens)
    held = tokenize(path, (model_dir / "heldout.txt").read_text(), args.heldout_tokens)
    print(f"{path.name}: {len(calib)} calibration tokens, {len(held)} held-out tokens", flush=True)

    # exactness on this model: the callback with tau = 0 against plain llama-cpp-python,
    # and dropping every second slot against expert_used_count = 1
    exact = check_exactness(path, held[:256], args.threads)
    print(f"tau = 0 bit-identical: {exact['tau0_bit_identical']}; every second slot dropped "
          f"== expert_used_count 1: {exact['drop_second_equals_k1']}", flush=True)

    ev_cal = topany_calibrate.Evaluator(path, calib, args.ctx, args.threads)
    ev_held = topany_calibrate.Evaluator(path, held, args.ctx, args.threads)
    grid = [float(x) for x in args.grid.split(",")]
    t0 = time.time()
    cal = topany_calibrate.Calibrator(ev_cal, grid)
    t_sens = time.time() - t0
    k = ev_cal.k
    max_share = (k - 1) / k

    def measure(method: str, target: float | None, tau: np.ndarray, protect: int = 0) -> dict:
        ev_held.topany.protect_first = protect
        s, use = ev_held.run(tau)
        ev_held.topany.protect_first = 0
        return {"method": method, "target_share": target, "thresholds": tau.tolist(),
                "removed_share": use.removed_share, "experts_per_token": use.experts_per_token,
                "ppl": s.ppl, "ppl_increase": s.ppl / ev_held.base.ppl - 1.0,
                "kld_mean": s.kld_mean, "kld_p99": s.kld_p99,
                "top1_agreement": s.top1_agreement,
                "layer_removed_share": {str(li): v for li, v in use.layer_shares().items()}}

    curve = []
    for share in [float(x) for x in args.shares.split(",")]:
        if share >= max_share:
            continue
        curve.append(measure("uniform", share, ev_cal.uniform(share)))
        tau = cal.thresholds(share)
        curve.append(measure("layer", share, tau))
        if args.protect:
            curve.append(measure(f"layer+protect{args.protect}", share, tau, args.protect))
        print(" | ".join(f"{r['method']} {100 * r['removed_share']:.1f}% "
                         f"{100 * r['ppl_increase']:+.2f}%" for r in curve[-3:]), flush=True)

    budget = {}
    for method, fn in (("uniform", ev_cal.uniform), ("layer", cal.thresholds)):
        c = topany_calibrate.fit(ev_cal, fn, method, max_ppl_increase=0.01)
        budget[method] = {"calibration": c.to_dict(),
                          "heldout": measure(f"{method} (1% budget on calib)", None,
                                             np.asarray(c.thresholds, np.float32))}

    rows = [[r["method"], f"{100 * r['target_share']:.0f}%" if r["target_share"] else "-",
             f"{100 * r['removed_share']:.1f}%", f"{r['experts_per_token']:.3f}",
             f"{r['ppl']:.4f}", f"{100 * r['ppl_increase']:+.2f}%", f"{r['kld_mean']:.5f}",
             f"{100 * r['top1_agreement']:.2f}%"]
            for r in curve + [b["heldout"] for b in budget.values()]]
    print(f"\nheld-out perplexity at tau = 0: {ev_held.base.ppl:.4f} on {ev_held.base.n_tokens} "
          f"scored tokens; k = {k}; {len(ev_cal.moe_layers)} MoE layers")
    print(table(rows, ["thresholds", "target", "removed", "experts/token", "ppl", "ppl +",
                       "KLD", "top-1 agree"]))
    within = [r for r in curve if r["ppl_increase"] <= 0.01]
    best = max(within, key=lambda r: r["removed_share"]) if within else None
    honest = max((b["heldout"] for b in budget.values()), key=lambda r: r["removed_share"]
                 if r["ppl_increase"] <= 0.01 else -1)
    print("\nlargest held-out removal within +1% perplexity on the curve: "
          + (f"{100 * best['removed_share']:.1f}% ({best['method']}, "
             f"{100 * best['ppl_increase']:+.2f}%)" if best else "none"))
    print(f"calibrated for <= 1% on calib.txt, measured on held-out: "
          f"{100 * honest['removed_share']:.1f}% removed, {100 * honest['ppl_increase']:+.2f}% "
          f"perplexity ({honest['method']})")
    report = model_dir / "training_report.json"
    result = {
        "model": str(path),
        "training_report": json.loads(report.read_text()) if report.exists() else None,
        "calib_tokens": len(calib), "heldout_tokens": len(held),
        "eval_ctx": args.ctx, "k": k, "moe_layers": ev_cal.moe_layers,
        "ppl_base_heldout": ev_held.base.ppl, "scored_heldout_tokens": ev_held.base.n_tokens,
        "sensitivity": {"grid": cal.grid.tolist(),
                        "kld": {str(li): c.tolist() for li, c in cal.curves.items()},
                        "seconds": t_sens},
        "exactness": exact, "curve": curve, "damage_budget_1pct": budget,
        "best_within_1pct": best, "calibrated_1pct_heldout": honest,
        "goal": ">= 20% fewer expert activations for <= 1% perplexity increase",
        "seconds": time.time() - t_start, "threads": args.threads or os.cpu_count(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "topany_curve.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
