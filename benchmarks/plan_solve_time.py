"""How long shape-only planning takes for real model sizes (config.json only, no weights).

For each public config and cap: number of GGUF tensors, number of MILP variables (one per
tensor and candidate type), wall time of `plan_from_config` (specs, priors and solve; imports
excluded), the plan's bits per weight and total bytes. Writes
benchmarks/results/plan_solve_time.json.

    python benchmarks/plan_solve_time.py
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import scipy  # noqa: E402

import memory_planner as mp  # noqa: E402
from edgemoe.planning.from_config import plan_from_config, read_config  # noqa: E402
from export.arch import adapter_for  # noqa: E402
from memory_planner.quant_types import (  # noqa: E402
    IMATRIX_LADDER_EXTRA,
    candidate_types,
    with_types,
)

CONFIGS = ROOT / "tests" / "fixtures" / "configs"
IQ_LADDER = mp.DEFAULT_LADDER + IMATRIX_LADDER_EXTRA
CTX = 8192
CASES = [  # (config, cap, ladder name)
    ("mixtral-8x7b", "20GB", "default"),
    ("mixtral-8x7b", "32GB", "default"),
    ("qwen3-235b-a22b", "96GB", "default"),
    ("qwen3-235b-a22b", "160GB", "default"),
    ("deepseek-v3", "128GB", "imatrix"),
    ("deepseek-v3", "200GB", "imatrix"),
    ("deepseek-v3", "256GB", "default"),
    ("deepseek-v3", "400GB", "default"),
    ("qwen3.5-397b-a17b", "128GB", "default"),
    ("qwen3.5-397b-a17b", "128GB", "imatrix"),
    ("qwen3.5-397b-a17b", "64GB", "default"),
    ("qwen3.5-397b-a17b", "64GB", "imatrix"),
    ("gpt-oss-120b", "64GB", "default"),
    ("gpt-oss-120b", "128GB", "default"),
]
LADDERS = {"default": mp.DEFAULT_LADDER, "imatrix": IQ_LADDER}


def run_case(name: str, cap: str, ladder_name: str) -> dict:
    path = CONFIGS / f"{name}.json"
    adapter = adapter_for(read_config(path))
    ladder = with_types(LADDERS[ladder_name], adapter.extra_types)  # gpt-oss: + MXFP4
    specs = adapter.tensor_specs()
    row = {
        "model": name, "cap": cap, "ladder": ladder_name, "ctx": CTX, "tensors": len(specs),
        "variables": sum(len(candidate_types(s, ladder)) for s in specs),
    }
    t0 = time.perf_counter()
    try:
        plan = plan_from_config(path, cap, ctx=CTX, ladder=ladder)
    except mp.BudgetTooSmallError as e:
        row.update(seconds=time.perf_counter() - t0, status="too small",
                   minimum_total_bytes=e.minimum_total_bytes)
        return row
    row.update(seconds=time.perf_counter() - t0, status=plan.solver,
               bits_per_weight=plan.bits_per_weight, weight_bytes=plan.weight_bytes,
               kv_bytes=plan.budget.kv_bytes, compute_bytes=plan.budget.compute_bytes,
               total_bytes=plan.total_bytes)
    return row


def main() -> None:
    rows = [run_case(*case) for case in CASES]
    head = f"{'model':<17}{'tensors':>8}{'vars':>7}{'cap':>7}{'ladder':>9}{'solve s':>9}" \
           f"{'bpw':>7}{'weights':>11}{'KV':>10}{'compute':>10}{'total':>11}  status"
    print(head)
    print("-" * len(head))
    for r in rows:
        bpw = f"{r['bits_per_weight']:.3f}" if "bits_per_weight" in r else "-"
        total = mp.format_size(r.get("total_bytes", r.get("minimum_total_bytes")))
        status = r["status"] if "total_bytes" in r else f"needs >= {total}"
        total = total if "total_bytes" in r else "-"
        parts = [mp.format_size(r[k]) if k in r else "-"
                 for k in ("weight_bytes", "kv_bytes", "compute_bytes")]
        print(f"{r['model']:<17}{r['tensors']:>8}{r['variables']:>7}{r['cap']:>7}"
              f"{r['ladder']:>9}{r['seconds']:>9.2f}{bpw:>7}{parts[0]:>11}{parts[1]:>10}"
              f"{parts[2]:>10}{total:>11}  {status}")
    out = ROOT / "benchmarks" / "results" / "plan_solve_time.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    meta = {"python": platform.python_version(), "scipy": scipy.__version__,
            "cpus": os.cpu_count(), "machine": platform.machine()}
    out.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1))
    print(f"\nwrote {out.relative_to(ROOT)}")


if __name__ == "__main__":
    main()
