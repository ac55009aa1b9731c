"""Shape-only plans for the MoE families of issue 12 (config.json only, no weights), at 128 GB
and 64 GB with an 8192-token context: every part of the total (weights, KV cache, compute
buffers) and planning time (`plan_solve_time.run_case`), and the uniform Q8_0 file the
config predicts (router, norms and biases F32, as llama-quantize leaves them). Writes
benchmarks/results/plan_new_families.json.

    python benchmarks/plan_new_families.py [config-name ...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from plan_solve_time import CONFIGS, run_case  # noqa: E402

import memory_planner as mp  # noqa: E402
from edgemoe.planning.from_config import read_config  # noqa: E402
from export.arch import adapter_for  # noqa: E402

MODELS = ("glm-4.7", "minimax-m2.7", "deepseek-v3.2")
CAPS = ("128GB", "64GB")


def q8_0_prediction(name: str) -> dict:
    """GGUF parameters and the bytes of a uniform Q8_0 file's tensors."""
    specs = adapter_for(read_config(CONFIGS / f"{name}.json")).tensor_specs()
    plan = mp.uniform_plan(specs, "Q8_0", mp.Budget(cap_bytes=2**62), check_budget=False)
    return {"parameters": int(sum(np.prod(s.shape) for s in specs)),
            "q8_0_weight_bytes": plan.weight_bytes}


def main(names: list[str]) -> None:
    rows = []
    for name in names:
        q8 = q8_0_prediction(name)
        for cap in CAPS:
            rows.append({**run_case(name, cap, "imatrix"), **q8})
    size = mp.format_size
    head = (f"{'model':<15}{'cap':>6}{'solve s':>9}{'bpw':>7}{'weights':>11}{'KV 8K':>10}"
            f"{'compute':>10}{'total':>11}  status")
    print(head)
    print("-" * len(head))
    for r in rows:
        if "total_bytes" not in r:
            print(f"{r['model']:<15}{r['cap']:>6}{r['seconds']:>9.2f}  needs >= "
                  f"{size(r['minimum_total_bytes'])}")
            continue
        print(f"{r['model']:<15}{r['cap']:>6}{r['seconds']:>9.2f}{r['bits_per_weight']:>7.3f}"
              f"{size(r['weight_bytes']):>11}{size(r['kv_bytes']):>10}"
              f"{size(r['compute_bytes']):>10}{size(r['total_bytes']):>11}  {r['status']}")
    print()
    for name in names:
        r = next(r for r in rows if r["model"] == name)
        print(f"{name}: {r['parameters']:,} GGUF parameters; uniform Q8_0 tensors "
              f"{r['q8_0_weight_bytes']:,} bytes")
    out = ROOT / "benchmarks" / "results" / "plan_new_families.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main(sys.argv[1:] or list(MODELS))
