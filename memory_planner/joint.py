"""Trade experts for bits: expert pruning and the per-tensor type choice as one program.

GGUF stores one expert count for the whole model, so pruning keeps the same number of
experts in every MoE layer. For each keep count on a grid the least salient experts of each
layer go (REAP saliency), the type knapsack is solved for the smaller model, and the plan
with the least total predicted damage (quantization + pruning) wins.

Units: every damage is a relative squared error of the output of the layer part it hits.
A tensor quantized with relative weight error eps (importance-weighted) perturbs its
output by about eps; an expert tensor's damage is the sum over kept experts of each
expert's error times its share of the layer's output energy; pruning an expert removes its
whole share. So one objective compares bits and experts.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace

import numpy as np

from .planner import PlanError, solve
from .quant_types import DEFAULT_LADDER
from .stats import CalibStats
from .types import Budget, MemoryPlan, TensorSpec

ExpertDamage = Mapping[str, Mapping[str, np.ndarray]]  # _exps tensor -> type -> per expert


def kept_by_saliency(stats: CalibStats, n_keep: int,
                     n_groups: int = 1) -> dict[int, tuple[int, ...]]:
    """Per MoE layer, the `n_keep` most salient experts (ids ascending).

    With group-limited routing (DeepSeek: experts in `n_groups` contiguous groups) each
    group keeps the same number, its most salient, so the pruned model has the same groups.
    """
    if n_keep % n_groups:
        raise ValueError(f"keeping {n_keep} experts does not divide into {n_groups} groups")
    kept = {}
    for layer, e in stats.experts.items():
        size = e.n_expert // n_groups
        ids = []
        for g in range(n_groups):
            sal = e.saliency[g * size:(g + 1) * size]
            ids += [g * size + int(i) for i in np.argsort(-sal, kind="stable")[:n_keep // n_groups]]
        kept[layer] = tuple(sorted(ids))
    return kept


def pruning_damage(stats: CalibStats, kept: Mapping[int, Sequence[int]]) -> dict[int, float]:
    """Per layer, the output-energy share of the experts that go."""
    out = {}
    for layer, e in stats.experts.items():
        share = e.energy_share
        gone = np.ones(e.n_expert, dtype=bool)
        gone[list(kept[layer])] = False
        out[layer] = float(share[gone].sum())
    return out


def damage_with_kept(specs: Sequence[TensorSpec], dense: Mapping[str, Mapping[str, float]],
                     per_expert: ExpertDamage,
                     kept: Mapping[int, Sequence[int]] | None) -> dict[str, dict[str, float]]:
    """A planner damage table for the (possibly pruned) `specs`."""
    table: dict[str, dict[str, float]] = {}
    for s in specs:
        if not s.quantizable:
            continue
        if s.n_experts and s.name in per_expert:
            ids = list(kept[s.layer]) if kept else slice(None)
            table[s.name] = {t: float(np.asarray(v)[ids].sum())
                             for t, v in per_expert[s.name].items()}
        else:
            table[s.name] = dict(dense[s.name])
    return table


@dataclass(frozen=True)
class TradeOff:
    """One point of the keep-ratio grid."""

    n_keep: int
    feasible: bool
    quant_damage: float = float("nan")
    prune_damage: float = float("nan")
    bits_per_weight: float = float("nan")
    weight_bytes: int = 0

    @property
    def total_damage(self) -> float:
        return self.quant_damage + self.prune_damage


def keep_grid(n_expert: int, n_used: int,
              ratios: Sequence[float] = (1.0, 0.875, 0.75, 0.625, 0.5),
              n_groups: int = 1) -> list[int]:
    """Keep counts for the given ratios: multiples of the routing groups, never below the
    router's top-k."""
    floor = -(-max(n_used, n_groups) // n_groups) * n_groups
    counts = {max(floor, int(round(n_expert * r / n_groups)) * n_groups) for r in ratios}
    return sorted((c for c in counts if c <= n_expert), reverse=True)


def solve_joint(
    specs_for: Callable[[int], list[TensorSpec]],
    dense: Mapping[str, Mapping[str, float]],
    per_expert: ExpertDamage,
    stats: CalibStats,
    budget: Budget,
    grid: Sequence[int],
    ladder: Sequence[str] = DEFAULT_LADDER,
    damage_model: str = "calibrated",
    prune_scale: float = 1.0,
    n_groups: int = 1,
    solver: Callable[..., MemoryPlan] = solve,
) -> tuple[MemoryPlan, list[TradeOff]]:
    """The least-damage (keep count, types) plan under `budget`, and the whole trade-off.

    `prune_scale` converts pruning damage (output-energy share) to the units of `dense` and
    `per_expert` when those were rescaled (e.g. to measured KL divergence). `solver` makes
    the plan of one keep count (`planner.solve`'s arguments; a GPU + CPU plan's differs)."""
    n_expert = max(s.n_experts for s in specs_for(grid[0]))
    best: MemoryPlan | None = None
    best_total = np.inf
    rows = []
    smallest_error: PlanError | None = None
    for n_keep in grid:
        kept = kept_by_saliency(stats, n_keep, n_groups) if n_keep < n_expert else None
        specs = specs_for(n_keep)
        table = damage_with_kept(specs, dense, per_expert, kept)
        prune = prune_scale * sum(pruning_damage(stats, kept).values()) if kept else 0.0
        try:
            plan = solver(specs, table, budget, ladder=ladder, damage_model=damage_model)
        except PlanError as exc:
            smallest_error = exc
            rows.append(TradeOff(n_keep, False))
            continue
        quant = plan.predicted_damage
        rows.append(TradeOff(n_keep, True, quant, prune, plan.bits_per_weight, plan.weight_bytes))
        total = quant + prune
        if total < best_total:
            best_total = total
            best = replace(
                plan, n_experts=n_expert, n_experts_kept=n_keep,
                kept_experts={str(k): tuple(v) for k, v in (kept or {}).items()},
                solver=f"{plan.solver}; keep {n_keep}/{n_expert}", pruning_damage=prune,
            )
    if best is None:
        if smallest_error is not None:
            raise smallest_error
        raise PlanError("no keep count gave a plan")
    return best, rows
