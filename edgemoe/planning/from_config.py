"""Plan a model from its config.json alone: no weights, no download of 1.3 TB.

The adapter lists every GGUF tensor with its shape, `pipeline.make_budget` adds the KV cache
and compute buffers, and the solver picks types with the shape-only damage priors of
`memory_planner.priors`. The result says what fits and at how many bits per weight; a plan
from measured damage (with the weights) can only be better informed, not larger.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

import memory_planner as mp
from export.arch import adapter_for
from memory_planner.joint import keep_grid, solve_joint
from memory_planner.priors import (
    DAMAGE_MODEL,
    PRUNING_COST_RATIO,
    prior_damage,
    prior_expert_shares,
    type_error,
)
from memory_planner.stats import CalibStats, ExpertStats

from ..pipeline import DEFAULT_CTX, DEFAULT_KV_TYPE, make_budget


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
                     ladder: Sequence[str] | None = None,
                     prune: bool = True, budget: mp.Budget | None = None,
                     solver=mp.solve) -> mp.MemoryPlan:
    """The least-damage plan under `memory` predicted from shapes alone, or a uniform one.

    With `type_name` every quantizable tensor gets that type (llama.cpp's fallbacks apply);
    otherwise types come from `ladder` (default: the planner's, with the family's own
    candidates such as gpt-oss's MXFP4), ranked by the damage priors. Raises
    BudgetTooSmallError (with the smallest total) when nothing fits. `budget` and `solver`
    replace the single-pool ones (a GPU + CPU plan: edgemoe.planning.gpu).
    """
    adapter = adapter_for(read_config(config_path))
    if ladder is None:
        ladder = mp.quant_types.with_types(mp.DEFAULT_LADDER, adapter.extra_types)
    specs = adapter.tensor_specs()
    budget = budget or make_budget(adapter, memory, ctx, kv_type, reserve)
    if type_name is not None:
        if solver is not mp.solve:
            raise ValueError("--type makes a one-type plan: it cannot be placed on devices")
        return mp.uniform_plan(specs, type_name, budget)
    damage = prior_damage(specs, ladder, experts_used=adapter.n_expert_used)
    shipped = adapter.shipped_types()
    for s in specs:  # a shipped type (gpt-oss's MXFP4 experts) loses nothing
        if shipped.get(s.kind) in damage.get(s.name, {}):
            damage[s.name][shipped[s.kind]] = 0.0
    if not prune or adapter.n_expert <= adapter.n_expert_used:
        mp.planner.check_minimum(specs, budget, ladder)
        return solver(specs, damage, budget, ladder=ladder, damage_model=DAMAGE_MODEL)
    return _plan_with_pruning(adapter, damage, budget, ladder, solver)


def _plan_with_pruning(adapter, damage, budget: mp.Budget, ladder, solver) -> mp.MemoryPlan:
    """The joint program on priors: experts of a layer are assumed to carry log-normal
    shares of its output energy (memory_planner.priors). It decides how many experts to
    keep; which ones is a calibration question, so the plan names no expert ids."""
    specs = adapter.tensor_specs()
    grid = keep_grid(adapter.n_expert, adapter.n_expert_used, n_groups=adapter.n_expert_groups)
    mp.planner.check_minimum(adapter.tensor_specs(grid[-1]), budget, ladder)
    shares = prior_expert_shares(adapter.n_expert)
    moe_layers = sorted({s.layer for s in specs if s.n_experts})
    ones = np.ones(adapter.n_expert)
    stats = CalibStats(experts={layer: ExpertStats(ones, ones, shares, shares, 1.0)
                                for layer in moe_layers})
    per_expert = {s.name: {t: d * shares for t, d in damage[s.name].items()}
                  for s in specs if s.n_experts}
    dense = {n: d for n, d in damage.items() if n not in per_expert}
    routed = next((damage[s.name][t] / type_error(t) for s in specs if s.n_experts
                   for t in damage[s.name]), 1.0)  # the routed share, as the priors weigh it
    plan, _ = solve_joint(adapter.tensor_specs, dense, per_expert, stats, budget, grid,
                          ladder=ladder, damage_model=DAMAGE_MODEL,
                          prune_scale=routed * PRUNING_COST_RATIO,
                          n_groups=adapter.n_expert_groups, solver=solver)
    if plan.n_experts_kept < plan.n_experts:
        plan = replace(plan, kept_experts={},
                       solver=plan.solver + " (which experts: calibrate to choose)")
    return plan


def is_config_only(source: str | Path) -> bool:
    """A config.json, or a folder with one and no weights: planned from shapes alone."""
    p = Path(source)
    return p.is_file() and p.suffix == ".json" or (
        p.is_dir() and (p / "config.json").is_file() and not any(p.glob("*.safetensors")))

