"""Pick one GGUF type per tensor: least predicted damage with the weights under the budget.

This is a multiple-choice knapsack (exactly one type per tensor, one byte constraint),
solved exactly as a mixed-integer program by HiGHS through `scipy.optimize.milp`.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from .quant_types import (
    DEFAULT_LADDER,
    REQUIRES_IMATRIX,
    candidate_types,
    format_size,
    legal_type,
    tensor_nbytes,
)
from .types import Budget, MemoryPlan, TensorPlan, TensorSpec

log = logging.getLogger(__name__)

Damage = Mapping[str, Mapping[str, float]]  # tensor name -> legal type name -> damage


class PlanError(ValueError):
    """No plan satisfies the request."""


class BudgetTooSmallError(PlanError):
    """The cap is below the smallest model the ladder can make."""

    def __init__(self, message: str, minimum_total_bytes: int):
        super().__init__(message)
        self.minimum_total_bytes = minimum_total_bytes


def _options(specs: Sequence[TensorSpec], damage: Damage | None, ladder: Sequence[str]):
    """Per tensor: list of (legal type, asked type, nbytes, damage)."""
    out = []
    for s in specs:
        opts = []
        for legal, asked in candidate_types(s, tuple(ladder)):
            nbytes = tensor_nbytes(s.n_elements, s.row_length, legal)
            if not s.quantizable or legal == "F32":
                d = 0.0
            elif damage is None:
                d = 0.0
            elif legal in REQUIRES_IMATRIX and legal not in damage.get(s.name, {}):
                continue  # no importance matrix for this tensor: the type is not an option
            else:
                try:
                    d = float(damage[s.name][legal])
                except KeyError:
                    raise PlanError(f"no damage estimate for {s.name} as {legal}") from None
            opts.append((legal, asked, nbytes, d))
        out.append(opts)
    return out


def _check_fits(min_weight_bytes: int, budget: Budget, what: str) -> None:
    avail = budget.weight_bytes_available
    if min_weight_bytes > avail:
        need = min_weight_bytes + budget.cap_bytes - avail
        raise BudgetTooSmallError(
            f"memory cap {format_size(budget.cap_bytes)} is below the smallest {what}: "
            f"{format_size(need)} in all ({format_size(min_weight_bytes)} weights + "
            f"{format_size(budget.kv_bytes)} KV cache for {budget.ctx} tokens at {budget.kv_type} "
            f"+ {format_size(budget.compute_bytes + budget.output_bytes)} compute and output "
            f"buffers + {format_size(budget.reserve_bytes)} reserve)",
            minimum_total_bytes=need,
        )


def check_minimum(specs: Sequence[TensorSpec], budget: Budget,
                  ladder: Sequence[str] = DEFAULT_LADDER) -> int:
    """Raise BudgetTooSmallError unless the smallest ladder plan fits; returns its bytes."""
    min_bytes = sum(min(o[2] for o in opts) for opts in _options(specs, None, ladder))
    _check_fits(min_bytes, budget, f"model the ladder ({ladder[-1]} at the bottom) can make")
    return min_bytes


def _n_experts(specs: Sequence[TensorSpec]) -> int:
    return max((s.n_experts for s in specs), default=0)


def uniform_plan(specs: Sequence[TensorSpec], type_name: str, budget: Budget,
                 damage: Damage | None = None, check_budget: bool = True) -> MemoryPlan:
    """Every quantizable tensor at `type_name` (with llama.cpp's block fallbacks)."""
    tensors = []
    for s in specs:
        legal = legal_type(type_name, s.row_length) if s.quantizable else "F32"
        nbytes = tensor_nbytes(s.n_elements, s.row_length, legal)
        d = 0.0
        if damage is not None and s.quantizable and legal != "F32":
            d = float(damage.get(s.name, {}).get(legal, np.nan))
        tensors.append(TensorPlan(s.name, legal, nbytes, s.n_elements, d,
                                  type_name.upper() if legal != type_name.upper() else None))
    E = _n_experts(specs)
    plan = MemoryPlan(tuple(tensors), budget, damage_model="uniform", n_experts=E,
                      n_experts_kept=E, solver=f"uniform {type_name.upper()}")
    if check_budget:
        _check_fits(plan.weight_bytes, budget, f"{type_name.upper()} model")
    return plan


def _classes(options) -> list[list[int]]:
    """Tensors with identical options (same sizes and damages) are interchangeable.

    A model has dozens of copies of each expert tensor; one integer count per (class,
    type) instead of one binary per (tensor, type) removes that symmetry, which otherwise
    makes branch-and-bound prove optimality over every permutation of the copies.
    """
    groups: dict[tuple, list[int]] = {}
    for i, opts in enumerate(options):
        groups.setdefault(tuple(opts), []).append(i)
    return list(groups.values())


def solve(specs: Sequence[TensorSpec], damage: Damage, budget: Budget,
          ladder: Sequence[str] = DEFAULT_LADDER, damage_model: str = "relative-error",
          time_limit: float = 60.0) -> MemoryPlan:
    """The least-damage assignment of ladder types whose weights fit `budget`."""
    check_minimum(specs, budget, ladder)
    options = _options(specs, damage, ladder)
    classes = _classes(options)
    avail = budget.weight_bytes_available

    # variables: per class, how many of its tensors take each option
    sizes = np.array([o[2] for c in classes for o in options[c[0]]], dtype=np.float64)
    cost = np.array([o[3] for c in classes for o in options[c[0]]], dtype=np.float64)
    upper = np.array([len(c) for c in classes for _ in options[c[0]]], dtype=np.float64)
    rows = [k for k, c in enumerate(classes) for _ in options[c[0]]]
    n = len(sizes)
    count = np.array([len(c) for c in classes], dtype=np.float64)
    choose = csr_array((np.ones(n), (rows, np.arange(n))), shape=(len(classes), n))
    # bytes scaled to MiB keeps the coefficients in a range HiGHS is comfortable with
    scale = float(2**20)
    slack = 0.0
    for _attempt in range(5):
        constraints = [
            LinearConstraint(choose, count, count),
            LinearConstraint(sizes[None, :] / scale, -np.inf, (avail - slack) / scale),
        ]
        res = milp(cost, constraints=constraints, integrality=np.ones(n),
                   bounds=Bounds(0, upper), options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
        if res.x is None:
            raise PlanError(f"the solver found no plan: {res.message}")
        x = np.round(res.x).astype(int)
        used = int(sizes @ x)
        if used <= avail:
            break
        # solver tolerances let the byte row overshoot by a hair: tighten and solve again
        slack += used - avail + 1
    else:
        raise PlanError("the solver's plans kept overshooting the budget")

    # hand each class's counts out to its tensors, most bits first, in file order
    pick: dict[int, tuple] = {}
    j = 0
    for c in classes:
        opts = options[c[0]]
        members = iter(c)
        for k, o in enumerate(opts):
            for _ in range(x[j + k]):
                pick[next(members)] = o
        j += len(opts)
    tensors = []
    for i, s in enumerate(specs):
        legal, asked, nbytes, d = pick[i]
        tensors.append(TensorPlan(s.name, legal, nbytes, s.n_elements, d,
                                  asked if asked != legal else None))
    status = "optimal" if res.status == 0 else f"status {res.status}: {res.message}"
    E = _n_experts(specs)
    return MemoryPlan(tuple(tensors), budget, damage_model=damage_model, n_experts=E,
                      n_experts_kept=E, solver=f"milp/highs {status}")
