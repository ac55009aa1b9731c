"""Calibration statistics as the planner uses them: which experts matter, which columns matter.

Gathered by running the model on text (`edgemoe calibrate`), or read from a llama.cpp
importance matrix (which has the column statistics and per-expert selection counts only).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .types import TensorSpec


@dataclass(frozen=True)
class ExpertStats:
    """One MoE layer over the calibration tokens; arrays have one entry per expert."""

    selected: np.ndarray  # how many tokens picked the expert (top-k)
    weight_sum: np.ndarray  # sum of its routing weights (as the architecture normalises them)
    saliency_sum: np.ndarray  # sum over routed tokens of weight * ||expert output||  (REAP)
    energy_sum: np.ndarray  # sum over routed tokens of (weight * ||expert output||)^2
    output_energy: float  # sum over tokens of ||MoE output||^2 (the layer's whole signal)

    @property
    def n_expert(self) -> int:
        return len(self.selected)

    @property
    def frequency(self) -> np.ndarray:
        """Share of tokens routed to each expert."""
        return self.selected / max(1.0, float(self.selected.sum()))

    @property
    def mean_weight(self) -> np.ndarray:
        return self.weight_sum / np.maximum(self.selected, 1)

    @property
    def saliency(self) -> np.ndarray:
        """REAP: mean over the tokens routed to the expert of weight x output norm."""
        return self.saliency_sum / np.maximum(self.selected, 1)

    @property
    def energy_share(self) -> np.ndarray:
        """Each expert's share of the layer's output energy: its weight in damage sums."""
        if self.output_energy > 0 and self.energy_sum.sum() > 0:
            return self.energy_sum / self.output_energy
        return np.full(self.n_expert, 1.0 / self.n_expert)


@dataclass(frozen=True)
class CalibSource:
    """The model the statistics were measured on, as far as it differs from the model:
    its tensor types (`"Q8_0"`, `"Q3_K experts, Q8_0 others"`, ...), their bits per weight,
    and the fidelity class measured for such a source (BENCHMARKS.md, issue 11): `exact`
    (the model itself, or F32/F16/BF16), `near`, `close`, `coarse`, `rough` (importance
    matrices off by < 1%, < 2.5%, < 5% and more, on average)."""

    types: str
    bpw: float
    fidelity: str

    def describe(self) -> str:
        return f"measured on {self.types} ({self.bpw:.2f} bpw): fidelity {self.fidelity}"


@dataclass(frozen=True)
class CalibStats:
    """Everything calibration measured. Importance matrices are llama.cpp's: per tensor,
    the sum over calibration tokens of each input column squared (`in_sum2`, one row per
    expert for stacked expert tensors) and how many tokens went into each row (`counts`)."""

    in_sum2: dict[str, np.ndarray] = field(default_factory=dict)  # (n_mat, n_per_row)
    counts: dict[str, np.ndarray] = field(default_factory=dict)  # (n_mat,)
    experts: dict[int, ExpertStats] = field(default_factory=dict)  # MoE layer -> stats
    n_tokens: int = 0
    datasets: tuple[str, ...] = ()
    # measured in the runtime (edgemoe.calibration.sensitivity): KL divergence per unit of predicted
    # damage, per tensor, and for pruning; empty / None when not measured
    scales: dict[str, float] = field(default_factory=dict)
    prune_scale: float | None = None
    # the inputs' second moments in diagonal blocks of B columns, summed over the same
    # tokens as `in_sum2` ((n_mat, n_blocks, B, B)); edgemoe's export searches quantizations
    # with them. Empty when not collected (llama.cpp imatrix files, over the size budget)
    # tensors that read the same input (q/k/v, a layer's gate/up) share one array object
    in_cov: dict[str, np.ndarray] = field(default_factory=dict)
    source: CalibSource | None = None  # what ran; None: not recorded (llama.cpp files)

    def importance(self, name: str) -> np.ndarray | None:
        """Mean squared input per column (n_mat x n_per_row): the quantizers' imatrix.

        Rows of experts no token reached get ones, as llama-quantize does.
        """
        s = self.in_sum2.get(name)
        if s is None:
            return None
        c = self.counts[name].reshape(-1, 1).astype(np.float64)
        out = np.where(c > 0, s / np.maximum(c, 1), 1.0)
        return out.astype(np.float32)

    def importance_for(self, spec: TensorSpec) -> np.ndarray | None:
        """The imatrix of a tensor shaped for it: (n_expert, n_per_row) for a stacked expert
        tensor (one row shared by all experts when only one was measured), else
        (n_per_row,); None when not measured."""
        im = self.importance(spec.name)
        if im is None:
            return None
        im = im.reshape(-1, spec.row_length)
        if spec.n_experts:
            return np.broadcast_to(im, (spec.n_experts, spec.row_length)) if len(im) == 1 else im
        return im[0]

    def covariance(self, name: str) -> np.ndarray | None:
        """Mean input second moment per matrix, (n_mat, n_blocks, B, B), float32.

        Matrices no token reached get the identity (like the imatrix's ones). One matrix for
        a stacked expert tensor is shared by its experts and known up to a scale only.
        """
        s = self.in_cov.get(name)
        if s is None:
            return None
        counts = self.counts[name].astype(np.float64)
        if len(s) != len(counts):  # shared by the experts
            return (s / max(1.0, float(counts.sum()))).astype(np.float32)
        c = counts.reshape(-1, 1, 1, 1)
        eye = np.broadcast_to(np.eye(s.shape[-1]), s.shape[1:])
        return np.where(c > 0, s / np.maximum(c, 1), eye).astype(np.float32)

    @property
    def has_expert_stats(self) -> bool:
        return bool(self.experts)

    def check_model(self, specs: list[TensorSpec], where: str) -> None:
        """Raise ValueError unless these statistics could come from a model with `specs`:
        they must share tensors with it, each with the model's row length and a matrix per
        expert (or one for all)."""
        by_name = {s.name: s for s in specs}
        shared = [n for n in self.in_sum2 if n in by_name]
        if self.in_sum2 and not shared:
            raise ValueError(f"{where} is from another model: none of its "
                             f"{len(self.in_sum2)} tensors ({next(iter(self.in_sum2))}, ...) "
                             "is in this one")
        for name in shared:
            spec, (n_mat, n_col) = by_name[name], self.in_sum2[name].shape
            if n_col != spec.row_length or n_mat not in (1, max(1, spec.n_experts)):
                raise ValueError(
                    f"{where} is from another model: {name} has {n_mat} x {n_col} statistics, "
                    f"this model's is {max(1, spec.n_experts)} x {spec.row_length}")

