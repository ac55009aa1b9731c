"""Is issue 3's 3.0 bpw result luck? The calibrated plan against llama.cpp's IQ2_M preset on
other held-out text.

Reads the files `kld_vs_cap.py` left in its work folder (run that first, same --workdir):
the F32 model, the calibration stats, the presets and the calibrated files. For each slice
of the held-out text (the 8192 tokens kld_vs_cap.py scores, the next 8192, the rest) it
measures the KL divergence against F32 of the calibrated plan (with the output-error search;
it has no random choices since issue 11, so no seeds), of the same plan without the search,
and of the IQ2_M and IQ2_S presets.

    python benchmarks/kld_robustness.py
"""

from __future__ import annotations

import argparse
import json
import logging
import time
from pathlib import Path

import gguf

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.llamacpp import open_llama, tokenize
from edgemoe.report.tables import table
from edgemoe.runtime import textscore
from export.imatrix import read_stats

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=str(ROOT / "models/stdlib-moe"))
    ap.add_argument("--bpw", type=float, default=3.0)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/edgemoe-kld", help="kld_vs_cap.py's --workdir")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/kld_robustness.json"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    t0 = time.time()
    work, model_dir = Path(args.workdir), Path(args.model)
    f32, stats_path = work / "f32.gguf", work / "stats.gguf"
    presets = {p: work / f"preset-{p}.gguf" for p in ("IQ2_M", "IQ2_S")}
    missing = [str(p) for p in (f32, stats_path, *presets.values()) if not p.is_file()]
    if missing:
        raise SystemExit(f"run benchmarks/kld_vs_cap.py --workdir {work} first: no {missing}")

    model = pipeline.open_model(model_dir)
    stats = read_stats(stats_path)
    n_params = sum(s.n_elements for s in model.specs)
    probe = pipeline.make_budget(model.adapter, 10**12, ctx=args.ctx)
    cap = probe.runtime_bytes + int(args.bpw * n_params / 8)
    plan, _ = pipeline.make_plan(model, pipeline.make_budget(model.adapter, cap, ctx=args.ctx),
                                 stats=stats, progress=False)
    files = {"calibrated": pipeline.export(model, plan, work / f"robust-{args.bpw}.gguf",
                                           stats=stats, progress=False)}
    files["calibrated, search 0"] = pipeline.export(
        model, plan, work / f"robust-search0-{args.bpw}.gguf", stats=stats, progress=False,
        search=0)
    files.update({f"llama.cpp {p}": path for p, path in presets.items()})

    llm = open_llama(f32, n_ctx=64, logits_all=False)
    text = (model_dir / "heldout.txt").read_text()
    tokens = tokenize(llm, text)
    llm.close()
    slices = {"held-out 0-8191": tokens[:8192], "held-out 8192-16383": tokens[8192:16384],
              f"held-out 16384-{len(tokens) - 1}": tokens[16384:]}
    results = {}
    for name, toks in slices.items():
        ref = textscore.logprobs(f32, toks, args.ctx)
        results[name] = {k: textscore.compare(ref, textscore.logprobs(p, toks, args.ctx), toks,
                                              args.ctx).kld_mean for k, p in files.items()}
    rows = []
    for name, r in results.items():
        for k, v in r.items():
            rows.append([name, k, f"{v:.5f}", f"{v / r['llama.cpp IQ2_M']:.3f}"])
    iq2_m = sum(int(t.n_bytes) for t in gguf.GGUFReader(presets["IQ2_M"]).tensors)
    print(f"{args.bpw} bpw plan: {mp.format_size(plan.weight_bytes)} of weights; IQ2_M: "
          f"{mp.format_size(iq2_m)}")
    print(table(rows, ["text", "file", "KLD", "ratio to IQ2_M"]))
    out = {"bpw": args.bpw, "tokens": {k: len(v) for k, v in slices.items()},
           "kld": results, "seconds": time.time() - t0}
    Path(args.out).write_text(json.dumps(out, indent=1))
    print(f"wrote {args.out} in {time.time() - t0:.0f} s")


if __name__ == "__main__":
    main()
