"""Memory planning for MoE GGUF exports: pure numpy/scipy, no model code.

Owns the plan types (`TensorSpec`, `Budget`, `TensorPlan`, `MemoryPlan`), GGUF type sizes
and fallbacks, and the solvers. Imports neither `export` nor `edgemoe`.
"""

from .planner import BudgetTooSmallError, PlanError, solve, uniform_plan
from .quant_types import (
    DEFAULT_LADDER,
    format_size,
    legal_type,
    parse_size,
    tensor_nbytes,
)
from .types import Budget, MemoryPlan, TensorPlan, TensorSpec

__all__ = [
    "DEFAULT_LADDER", "Budget", "BudgetTooSmallError", "MemoryPlan", "PlanError", "TensorPlan",
    "TensorSpec", "format_size", "legal_type", "parse_size", "solve", "tensor_nbytes",
    "uniform_plan",
]
