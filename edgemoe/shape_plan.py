"""Plan a model from its config.json alone: no weights, no download of 1.3 TB.

The adapter lists every GGUF tensor with its shape, `pipeline.make_budget` adds the KV cache
and compute buffers, and the solver picks types with the shape-only damage priors of
`memory_planner.priors`. The result says what fits and at how many bits per weight; a plan
from measured damage (with the weights) can only be better informed, not larger.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import memory_planner as mp
from export.arch import adapter_for
from memory_planner.priors import DAMAGE_MODEL, prior_damage

from .pipeline import DEFAULT_CTX, DEFAULT_KV_TYPE, make_budget


def read_config(config_path: str | Path) -> dict:
    """config.json as a dict, from the file itself or the directory that holds it."""
    path = Path(config_path)
    if path.is_dir():
        path = path / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"no config.json at {path}")
    return json.loads(path.read_text())


def plan_from_config(config_path: str | Path, memory: str | int, ctx: int = DEFAULT_CTX,
                     kv_type: str = DEFAULT_KV_TYPE, reserve: str | int = 0,
                     type_name: str | None = None,
                     ladder: Sequence[str] = mp.DEFAULT_LADDER) -> mp.MemoryPlan:
    """The least-damage plan under `memory` predicted from shapes alone, or a uniform one.

    With `type_name` every quantizable tensor gets that type (llama.cpp's fallbacks apply);
    otherwise types come from `ladder`, ranked by the damage priors. Raises
    BudgetTooSmallError (with the smallest total) when nothing fits.
    """
    adapter = adapter_for(read_config(config_path))
    specs = adapter.tensor_specs()
    budget = make_budget(adapter, memory, ctx, kv_type, reserve)
    if type_name is not None:
        return mp.uniform_plan(specs, type_name, budget)
    mp.planner.check_minimum(specs, budget, ladder)
    damage = prior_damage(specs, ladder, experts_used=adapter.n_expert_used)
    return mp.solve(specs, damage, budget, ladder=ladder, damage_model=DAMAGE_MODEL)
