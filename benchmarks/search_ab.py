"""The output-error search of two revisions on the same statistics and plans: KL divergence
against the F32 model in llama.cpp, and the export's CPU time.

`kld_vs_cap.py` calibrates (with a time budget for the probes) and plans again on every run,
so its rows move with the machine's speed; here one calibration (its `reference_run`, the
same F32 reference, held-out tokens and calibration) and one plan per cap serve every row,
and only the search differs: `search 0` (llama-quantize's bytes), the search of `--old REV`
(export/search.py as that git revision has it) and this tree's. The share of the search's
KLD gain this tree keeps is new gain / old gain.

    python benchmarks/search_ab.py --old HEAD~1
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from kld_vs_cap import reference_run  # noqa: E402 (this script's folder is on sys.path)

from edgemoe import pipeline  # noqa: E402
from edgemoe.report.tables import table  # noqa: E402
from edgemoe.runtime import textscore  # noqa: E402
from export import writer  # noqa: E402


def old_search(rev: str, tmp: Path):
    """`quantize_rows_searched` of export/search.py at git revision `rev`."""
    path = tmp / "search_old.py"
    path.write_text(subprocess.run(["git", "-C", str(ROOT), "show", f"{rev}:export/search.py"],
                                   check=True, capture_output=True, text=True).stdout)
    spec = importlib.util.spec_from_file_location("export.search_old", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # its relative imports resolve in package export
    return module.quantize_rows_searched


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", required=True, help="git revision of the search to compare with")
    ap.add_argument("--model", default=str(ROOT / "models/stdlib-moe"))
    ap.add_argument("--bpw", type=float, nargs="+", default=[2.5, 3.0, 4.0])
    ap.add_argument("--tokens", type=int, default=8192, help="held-out tokens to score")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--workdir", default="/tmp/edgemoe-search-ab")
    ap.add_argument("--out", default=str(ROOT / "benchmarks/results/search_ab.json"))
    args = ap.parse_args()
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    model, _, tokens, ref, stats = reference_run(Path(args.model), work, args.tokens, args.ctx)
    a = model.adapter
    n_params = sum(s.n_elements for s in model.specs)
    overhead = pipeline.make_budget(a, 10**12, ctx=args.ctx).runtime_bytes
    new = writer.quantize_rows_searched
    with tempfile.TemporaryDirectory() as tmp:
        old = old_search(args.old, Path(tmp))
    searches = (("search 0", new, 0), (f"search of {args.old}", old, pipeline.DEFAULT_SEARCH),
                ("this tree's search", new, pipeline.DEFAULT_SEARCH))
    results, rows = [], []
    try:
        for bpw in args.bpw:
            budget = pipeline.make_budget(a, overhead + int(bpw * n_params / 8), ctx=args.ctx)
            plan, _ = pipeline.make_plan(model, budget, stats=stats, progress=False)
            entry = {"bpw": bpw, "types": sorted({t.type for t in plan.tensors})}
            for i, (label, fn, search) in enumerate(searches):
                writer.quantize_rows_searched = fn
                out = work / f"search-{i}-{bpw}.gguf"
                t0 = time.process_time()  # one worker: this process's CPU is the export's
                pipeline.export(model, plan, out, stats=stats, progress=False, threads=1,
                                search=search)
                cpu = time.process_time() - t0
                q = textscore.compare(ref, textscore.logprobs(out, tokens, args.ctx), tokens,
                                      args.ctx)
                entry[label] = {"kld": q.kld_mean, "export_cpu_seconds": cpu}
            base = entry["search 0"]["kld"]
            gain_old = base - entry[searches[1][0]]["kld"]
            gain_new = base - entry[searches[2][0]]["kld"]
            entry["gain_kept"] = gain_new / gain_old if gain_old > 0 else None
            results.append(entry)
            cells = [f"{entry[s[0]]['kld']:.5f} ({entry[s[0]]['export_cpu_seconds']:.1f} s)"
                     for s in searches]
            kept = entry["gain_kept"]
            rows.append([f"{bpw}", *cells, "-" if kept is None else f"{kept:.1%}"])
    finally:
        writer.quantize_rows_searched = new
    print(table(rows, ["bpw"] + [f"{s[0]}: KLD (export CPU)" for s in searches]
                + ["gain kept"]))
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                            capture_output=True, text=True).stdout.strip()
    Path(args.out).write_text(json.dumps({"old": args.old, "head": commit, "tokens":
                                          len(tokens), "results": results}, indent=1))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
