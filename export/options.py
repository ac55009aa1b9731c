"""Everything an export needs besides the model and the plan, as one record.

`export_options` builds it once from the calibration statistics: the importance matrix and
input covariances of each tensor the file holds, sliced to the experts the plan keeps, and
how to quantize them (search, threads, an earlier file to copy from, progress bar).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from memory_planner.stats import CalibStats

from .arch.base import TensorRecipe
from .search import DEFAULT_SEARCH
from .split import SplitSpec


@dataclass(frozen=True)
class ExportOptions:
    """How `write_gguf` quantizes.

    `imatrix` maps a GGUF tensor name to its importance matrix (n_per_row, or
    n_expert x n_per_row for the experts the file keeps). `covariance` maps a tensor name to
    its inputs' second moments ((n_blocks, B, B), or one per kept expert; an expert tensor's
    single one is shared, each expert scaling its correlations by its own imatrix row); with
    `search` > 1 those tensors' rows get up to `search` candidate quantizations and keep the
    one with the least output error (`export.search.quantize_rows_searched`). `reuse` is an
    earlier export of the same source with the same statistics: tensors it holds with the
    same name, shape and type are copied from it instead of being read and quantized again
    (the sensitivity probes change one group of tensors at a time). `threads`: quantizing
    workers (None: `default_threads()`). `split`: write llama.cpp's split layout, or one
    file of it (`export.split.SplitSpec`). `cpu_rows`: a file edgemoe alone runs (a
    calibration intermediate), whose Q8_0 tensors without an imatrix take ggml-cpu's faster
    row quantizer (`export.quantize.quantize_rows`). `overwrite`: a file no longer needed
    that a whole-file output is written over in place, keeping its pages in the page cache
    (`export.gguf_io.resumable_output`; the calibration's layer segments).
    """

    imatrix: Mapping[str, np.ndarray] = field(default_factory=dict)
    covariance: Mapping[str, np.ndarray] = field(default_factory=dict)
    search: int = DEFAULT_SEARCH
    reuse: str | Path | None = None
    threads: int | None = None
    progress: bool = True
    split: SplitSpec | None = None
    cpu_rows: bool = False
    overwrite: Path | None = None


def export_options(stats: CalibStats | None, full: Sequence[TensorRecipe],
                   recipes: Sequence[TensorRecipe],
                   kept: Mapping[int, Sequence[int]] | None = None, *,
                   search: int = DEFAULT_SEARCH,
                   reuse: str | Path | None = None, threads: int | None = None,
                   progress: bool = True, split: SplitSpec | None = None,
                   cpu_rows: bool = False) -> ExportOptions:
    """The options for writing `recipes` (the file's tensors, experts pruned as `kept` says:
    layer -> source expert ids) of a model whose unpruned tensors are `full`.

    Each quantizable tensor gets its imatrix from `stats` when measured, and its input
    covariance when `search` > 1 will use it, both sliced to the kept experts.
    """
    imatrix: dict[str, np.ndarray] = {}
    covariance: dict[str, np.ndarray] = {}
    if stats is not None:
        specs = {r.spec.name: r.spec for r in full}
        for r in recipes:
            if not r.spec.quantizable:
                continue
            pick = list(kept[r.spec.layer]) if kept and r.spec.n_experts else None
            im = stats.importance_for(specs[r.spec.name])
            if im is not None:
                imatrix[r.spec.name] = im if pick is None else im[pick]
            cov = stats.covariance(r.spec.name) if search > 1 else None
            if cov is not None:
                cov = cov if r.spec.n_experts and len(cov) > 1 else cov[0]  # 3-D: shared
                covariance[r.spec.name] = cov if pick is None or cov.ndim == 3 else cov[pick]
    return ExportOptions(imatrix, covariance, search, reuse, threads, progress, split, cpu_rows)
