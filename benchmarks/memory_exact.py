"""The plan's memory beside the weights: the old formulas, llama.cpp's own allocation
simulated without weights (`edgemoe.runtime.simulate`), and what llama.cpp allocates when it
loads the exported file (`memory_breakdown`), at three context lengths.

Models: the bundled one and a tiny DeepSeek-V3 (MLA), each exported uniformly at Q4_K;
then the time `make_budget` takes for DeepSeek-V3 from its config.json alone (671B).
The numbers go to benchmarks/results/memory_exact.json.

    python benchmarks/memory_exact.py [--out-dir /tmp/edgemoe-mem]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import memory_planner as mp  # noqa: E402
from edgemoe import pipeline  # noqa: E402
from edgemoe.report.tables import table  # noqa: E402
from edgemoe.runtime.memory import memory_breakdown  # noqa: E402
from edgemoe.runtime.model import load  # noqa: E402
from export.arch import adapter_for  # noqa: E402

CTXS = (512, 4096, 32768)
CONFIG = ROOT / "tests" / "fixtures" / "configs" / "deepseek-v3.json"


def _models(out: Path) -> dict[str, Path]:
    from tests.arch_fixtures import build_deepseek_v3
    from tests.tokenizer_fixtures import make_bpe_tokenizer

    (out / "bpe").mkdir(parents=True, exist_ok=True)
    (out / "dsv3").mkdir(exist_ok=True)
    tok = make_bpe_tokenizer(out / "bpe", style="qwen2")
    return {"stdlib-moe (bundled)": ROOT / "models" / "stdlib-moe",
            "tiny DeepSeek-V3 (MLA)": build_deepseek_v3(out / "dsv3", tok)}


def _mb(n: int) -> str:
    return f"{n / 1e6:.2f}"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="/tmp/edgemoe-mem")
    args = ap.parse_args()
    out = Path(args.out_dir)
    rows, record = [], []
    for name, src in _models(out).items():
        model = pipeline.open_model(src)
        plan = mp.uniform_plan(model.specs, "Q4_K", mp.Budget(10**12))
        path = pipeline.export(model, plan, out / f"{src.name}-q4_k.gguf", progress=False)
        for ctx in CTXS:
            old = pipeline.make_budget(model.adapter, 10**12, ctx=ctx, simulate=False)
            new = pipeline.make_budget(model.adapter, 10**12, ctx=ctx)
            llm = load(path, n_ctx=ctx, top_any=0, threads=1)
            real = memory_breakdown(llm)
            llm.close()
            real_total = sum(real.values())
            old_total, new_total = (plan.weight_bytes + b.runtime_bytes for b in (old, new))
            rows.append([name, str(ctx), _mb(old.compute_bytes), _mb(new.compute_bytes),
                         _mb(real["compute"]), _mb(old_total), _mb(new_total),
                         _mb(real_total), f"{100 * (new_total / real_total - 1):+.2f}%"])
            record.append({"model": name, "ctx": ctx, "old": old.to_dict(),
                           "simulated": new.to_dict(), "real": real,
                           "weight_bytes": plan.weight_bytes})
    print(table(rows, ["model", "ctx", "compute old", "compute sim", "compute real",
                       "total old", "total sim", "total real", "sim vs real"]))
    a = adapter_for(json.loads(CONFIG.read_text()))
    times = []
    for ctx in CTXS:
        t0 = time.perf_counter()
        b = pipeline.make_budget(a, "1TB", ctx=ctx)
        times.append([str(ctx), f"{time.perf_counter() - t0:.2f} s", b.memory_source,
                      _mb(b.kv_bytes), _mb(b.compute_bytes)])
    print("\nDeepSeek-V3 from config.json (671B parameters):")
    print(table(times, ["ctx", "make_budget", "source", "KV MB", "compute MB"]))
    (ROOT / "benchmarks" / "results" / "memory_exact.json").write_text(
        json.dumps({"files": record, "shape_only_deepseek_v3": times}, indent=1))


if __name__ == "__main__":
    main()
