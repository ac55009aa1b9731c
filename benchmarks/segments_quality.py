"""What calibrating in layer segments costs in quality (issue 11), on the bundled model.

The statistics of a run in segments are those of the whole run to the bit
(tests/edgemoe/calibration/test_segments.py), and so are the probes' scales where both runs
probe the same tensors (`edgemoe.calibration.segment_probes`, test_segment_probes.py); what
may differ is which probes fit the default budget, priced differently in segments. This
calibrates the bundled model's HF checkpoint both ways (Q8_0; the segmented run two of its
four blocks at a time, chosen here since the model is smaller than the residual stream of
its text and no disk budget asks for segments; the default probe budget both times),
then plans and exports at the three caps of kld_vs_cap.py (2.5 / 3 / 4 bits per weight)
with each, and measures the KL divergence against the F32 model in llama.cpp on 8192
held-out tokens.

    python benchmarks/segments_quality.py     # writes benchmarks/results/segments_quality.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.calibration import segments
from edgemoe.calibration.collect import calibrate
from edgemoe.calibration.intermediate import CANDIDATES, candidate_plan
from edgemoe.llamacpp import tokenize
from edgemoe.report.tables import table
from edgemoe.runtime import textscore

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models/stdlib-moe"))
    ap.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/edgemoe-segq")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/segments_quality.json"))
    args = ap.parse_args()
    t0 = time.time()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model_dir = Path(args.model)
    model = pipeline.open_model(model_dir)
    calib_text = model_dir / "calib.txt"
    f32 = pipeline.export(model, mp.uniform_plan(model.specs, "F32", mp.Budget(2**62),
                                                 check_budget=False), work / "f32.gguf",
                          progress=False)
    tokens = tokenize(f32, (model_dir / "heldout.txt").read_text())[: args.tokens]
    ref = textscore.logprobs(f32, tokens, args.ctx)

    runs = {}
    choose = segments.choose
    q8 = (CANDIDATES[0], candidate_plan(model.specs, CANDIDATES[0]))
    for label, forced in (("whole", None), ("segments", [(0, 2), (2, 4)])):
        # the model is smaller than the residual stream of its calibration text, so no disk
        # budget asks for segments: the choice is made here, two blocks a segment
        segments.choose = choose if forced is None else (lambda *a, r=forced, **k: (*q8, r))
        started = time.time()
        stats = calibrate(str(model_dir), text=str(calib_text), output=str(work / f"{label}.gguf"),
                          sensitivity=True, progress=False)
        runs[label] = {"stats": stats, "seconds": time.time() - started}
        print(f"{label}: {stats.source.describe()}, {time.time() - started:.0f} s", flush=True)
    segments.choose = choose
    a, b = runs["whole"]["stats"], runs["segments"]["stats"]
    assert "segments" in b.source.types, b.source.types
    same = all(np.array_equal(a.in_sum2[n], b.in_sum2[n]) for n in a.in_sum2)
    scale_ratio = [b.scales[n] / a.scales[n] for n in a.scales if a.scales[n] > 0]

    n_params = sum(s.n_elements for s in model.specs)
    overhead = pipeline.make_budget(model.adapter, 10**12, ctx=args.ctx).runtime_bytes
    rows, results = [], []
    for bpw in args.bpw:
        budget = pipeline.make_budget(model.adapter, overhead + int(bpw * n_params / 8),
                                      ctx=args.ctx)
        got = {}
        for label, run in runs.items():
            plan, _ = pipeline.make_plan(model, budget, stats=run["stats"], progress=False)
            out = pipeline.export(model, plan, work / f"{label}-{bpw}.gguf",
                                  stats=run["stats"], progress=False)
            q = textscore.compare(ref, textscore.logprobs(out, tokens, args.ctx), tokens,
                                  args.ctx)
            got[label] = {"kld": q.kld_mean, "weight_bytes": plan.weight_bytes,
                          "n_experts_kept": plan.n_experts_kept}
        results.append({"bpw": bpw, **got})
        w, s = got["whole"]["kld"], got["segments"]["kld"]
        rows.append([f"{bpw}", f"{w:.5f}", f"{s:.5f}", f"{s / w - 1:+.1%}"])
    print(table(rows, ["bpw", "KLD, whole", "KLD, in segments", "difference"]))
    print(f"statistics bit-equal: {same}; probe scales segments/whole: median "
          f"{np.median(scale_ratio):.3f}, range {min(scale_ratio):.3f}-{max(scale_ratio):.3f}")
    Path(args.out).write_text(json.dumps({
        "model": str(model_dir), "tokens": len(tokens), "stats_bit_equal": same,
        "calibration": {k: {"source": v["stats"].source.describe(), "seconds": v["seconds"]}
                        for k, v in runs.items()},
        "scale_ratio": {"median": float(np.median(scale_ratio)), "min": min(scale_ratio),
                        "max": max(scale_ratio)},
        "results": results, "seconds": time.time() - t0}, indent=1))
    print(f"wrote {args.out} ({time.time() - t0:.0f} s)")


if __name__ == "__main__":
    main()
