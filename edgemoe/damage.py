"""Predicted damage: how much each candidate type hurts each tensor, the planner's input.

Measured with ggml itself on sampled rows (relative quantization error), importance-weighted
when calibration statistics are given, one number per dense tensor and one per expert.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from tqdm import tqdm

import memory_planner as mp
from export.quantize import default_threads, relative_error, sample_rows
from memory_planner.joint import damage_with_kept
from memory_planner.stats import CalibStats

if TYPE_CHECKING:
    from .pipeline import Model

SAMPLED_ROWS = 256  # rows of each tensor (of each measured expert) quantized


@dataclass
class Damage:
    """Predicted damage of each candidate type: one number per dense tensor, one per expert
    (already weighted by the expert's share of its layer) for stacked expert tensors."""

    dense: dict[str, dict[str, float]]
    per_expert: dict[str, dict[str, np.ndarray]]
    model: str  # "relative-error" (no calibration) or "calibrated"

    def table(self, specs, kept=None) -> dict[str, dict[str, float]]:
        return damage_with_kept(specs, self.dense, self.per_expert, kept)

    def scaled(self, scales: dict[str, float]) -> Damage:
        """Damage in KL-divergence units, with per-tensor scales measured by probes
        (tensors without a measured scale take the median)."""
        if not scales:
            return self
        default = float(np.median(list(scales.values())))

        def k(name):
            return scales.get(name, default)

        return Damage(
            {n: {t: v * k(n) for t, v in d.items()} for n, d in self.dense.items()},
            {n: {t: v * k(n) for t, v in d.items()} for n, d in self.per_expert.items()},
            self.model + "+probed",
        )


def expert_shares(stats: CalibStats | None, spec: mp.TensorSpec) -> np.ndarray:
    """Each expert's weight in the tensor's damage: its output-energy share when calibration
    measured it, its selection share from an imatrix's counts, else uniform."""
    E = spec.n_experts
    if stats is not None and spec.layer in stats.experts:
        return stats.experts[spec.layer].energy_share
    if stats is not None and spec.name in stats.counts and len(stats.counts[spec.name]) == E:
        c = np.asarray(stats.counts[spec.name], dtype=np.float64)
        if c.sum() > 0:
            return c / c.sum()
    return np.full(E, 1.0 / E)


def measured_experts(n_expert: int, max_experts: int = 16) -> np.ndarray:
    """The experts whose error `measure_damage` measures (evenly spaced); the others take
    their mean."""
    return np.unique(np.linspace(0, n_expert - 1, min(n_expert, max_experts)).round()
                     .astype(int))


def measure_damage(model: Model, ladder: Sequence[str] = mp.DEFAULT_LADDER,
                   stats: CalibStats | None = None, max_rows: int = SAMPLED_ROWS,
                   max_experts: int = 16, progress: bool = True,
                   only: Collection[str] | None = None) -> Damage:
    """Relative quantization error of every quantizable tensor at every candidate type.

    Measured with ggml itself on sampled rows. With calibration `stats` the error is
    importance-weighted per column (and the quantizer uses the same importance matrix, as
    llama.cpp does); each expert slice is measured with its own importance row and weighted
    by the expert's share of the layer. For models with many experts, `max_experts` evenly
    spaced experts are measured and the others take their mean error. `only`: these
    tensors' alone.
    """
    dense: dict[str, dict[str, float]] = {}
    per_expert: dict[str, dict[str, np.ndarray]] = {}
    todo = [r for r in model.recipes if r.spec.quantizable
            and (only is None or r.spec.name in only)]
    # each type's (and expert's) error on a thread of its own: ggml quantizes and reads back
    # without the GIL
    with ThreadPoolExecutor(default_threads()) as pool:
        for r in tqdm(todo, desc="measuring quantization error", disable=not progress):
            _measure(model, r, ladder, stats, max_rows, max_experts, pool, dense, per_expert)
    return Damage(dense, per_expert, "calibrated" if stats is not None else "relative-error")


def _measure(model: Model, r, ladder: Sequence[str], stats: CalibStats | None, max_rows: int,
             max_experts: int, pool: ThreadPoolExecutor, dense: dict, per_expert: dict) -> None:
    """One tensor's errors at every candidate type, into `dense` or `per_expert`."""
    spec = r.spec
    imatrix = importance(stats, spec)
    types = measured_types(spec, ladder, imatrix is not None)
    if not spec.n_experts:
        # only the rows relative_error samples are read: a 129k-row token_embd stays
        # on disk
        rows = sample_rows(spec.shape[0], max_rows)
        data = r.load_rows(model.source, rows)
        one = functools.partial(_error, data, imatrix, len(rows))
        dense[spec.name] = dict(zip(types, pool.map(one, types)))
        return
    E = spec.n_experts
    errs = {t: np.full(E, np.nan) for t in types}
    jobs = expert_errors(model, r, measured_experts(E, max_experts), types, imatrix, max_rows,
                         pool)
    for (e, t), job in jobs.items():
        errs[t][e] = job.result()
    share = expert_shares(stats, spec)
    per_expert[spec.name] = {
        t: np.where(np.isnan(v), np.nanmean(v), v) * share for t, v in errs.items()
    }


def expert_errors(model: Model, r, experts: Sequence[int], types: Sequence[str],
                  imatrix: np.ndarray | None, max_rows: int, pool: ThreadPoolExecutor
                  ) -> dict[tuple[int, str], Future]:
    """Each of `experts`' relative error at each of `types` (unweighted), on the rows
    `measure_damage` samples: futures on `pool`, every (expert, type) at once, each
    expert's rows read once. `imatrix`: the tensor's, (n_expert, n_per_row), or None."""
    jobs = {}
    for e in experts:
        data = r.load_expert(model.source, int(e))
        data = data[sample_rows(len(data), max_rows)]  # the rows relative_error measures
        im = None if imatrix is None else imatrix[e]
        for t in types:
            jobs[int(e), t] = pool.submit(_error, data, im, max_rows, t)
    return jobs


def measured_types(spec: mp.TensorSpec, ladder: Sequence[str], imatrix: bool) -> list[str]:
    """The types of `ladder` whose error `measure_damage` measures for `spec` (with an
    importance matrix or without)."""
    types = [t for t, _ in mp.quant_types.candidate_types(spec, tuple(ladder)) if t != "F32"]
    if not imatrix:  # ggml cannot make these types without an importance matrix
        types = [t for t in types if t not in mp.quant_types.REQUIRES_IMATRIX]
    return types


def _error(data: np.ndarray, imatrix, max_rows: int, type_name: str) -> float:
    return relative_error(data, type_name, imatrix, max_rows=max_rows)


def importance(stats: CalibStats | None, spec: mp.TensorSpec) -> np.ndarray | None:
    """The imatrix for a tensor, shaped (n_expert, n_per_row) or (n_per_row,), if known."""
    return None if stats is None else stats.importance_for(spec)
