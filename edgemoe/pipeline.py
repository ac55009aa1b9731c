"""The export pipeline: source -> budget -> damage estimates -> plan -> GGUF file.

Each step is a function a test or another tool can call on its own; the CLI strings them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

import memory_planner as mp
from export.arch import Adapter, TensorRecipe, adapter_for_source
from export.quantize import DEFAULT_SEARCH, relative_error, sample_rows
from export.source import GGUFSource, HFSource, open_source
from export.writer import write_gguf
from memory_planner.joint import damage_with_kept, keep_grid, solve_joint
from memory_planner.stats import CalibStats

log = logging.getLogger(__name__)

DEFAULT_CTX = 4096
DEFAULT_KV_TYPE = "f16"


@dataclass
class Model:
    """An opened source: its tensors, its adapter and the recipes binding the two."""

    source: HFSource | GGUFSource
    adapter: Adapter
    recipes: list[TensorRecipe]

    @property
    def specs(self) -> list[mp.TensorSpec]:
        return [r.spec for r in self.recipes]


def open_model(path: str | Path) -> Model:
    """Open an HF checkpoint directory or a GGUF file; raises if the architecture or a tensor
    is missing."""
    source = open_source(path)
    adapter = adapter_for_source(source)
    recipes = adapter.recipes(source.names)
    for r in recipes:  # shapes promised by the config must be the checkpoint's
        got = source.shape(r.hf_names[0])
        want = r.source_shape
        if tuple(got) != tuple(want):
            raise ValueError(f"{r.hf_names[0]} has shape {tuple(got)}, config implies {want}")
    return Model(source, adapter, recipes)


def make_budget(adapter: Adapter, memory: str | int, ctx: int = DEFAULT_CTX,
                kv_type: str = DEFAULT_KV_TYPE, reserve: str | int = 0) -> mp.Budget:
    """The cap with the KV cache, compute buffers and reserve that must fit beside weights."""
    return mp.Budget(
        cap_bytes=mp.parse_size(memory),
        kv_bytes=adapter.kv_bytes(ctx, kv_type),
        compute_bytes=adapter.compute_bytes(ctx),
        reserve_bytes=mp.parse_size(reserve),
        ctx=ctx,
        kv_type=kv_type,
    )


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


def _expert_shares(stats: CalibStats | None, spec: mp.TensorSpec) -> np.ndarray:
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


def measure_damage(model: Model, ladder: Sequence[str] = mp.DEFAULT_LADDER,
                   stats: CalibStats | None = None, max_rows: int = 256,
                   max_experts: int = 16, progress: bool = True) -> Damage:
    """Relative quantization error of every quantizable tensor at every candidate type.

    Measured with ggml itself on sampled rows. With calibration `stats` the error is
    importance-weighted per column (and the quantizer uses the same importance matrix, as
    llama.cpp does); each expert slice is measured with its own importance row and weighted
    by the expert's share of the layer. For models with many experts, `max_experts` evenly
    spaced experts are measured and the others take their mean error.
    """
    dense: dict[str, dict[str, float]] = {}
    per_expert: dict[str, dict[str, np.ndarray]] = {}
    todo = [r for r in model.recipes if r.spec.quantizable]
    for r in tqdm(todo, desc="measuring quantization error", disable=not progress):
        spec = r.spec
        types = [t for t, _ in mp.quant_types.candidate_types(spec, tuple(ladder)) if t != "F32"]
        imatrix = importance(stats, spec)
        if imatrix is None:  # ggml cannot make these types without an importance matrix
            types = [t for t in types if t not in mp.quant_types.REQUIRES_IMATRIX]
        if not spec.n_experts:
            # only the rows relative_error samples are read: a 129k-row token_embd stays
            # on disk
            rows = sample_rows(spec.shape[0], max_rows)
            data = r.load_rows(model.source, rows)
            dense[spec.name] = {t: relative_error(data, t, imatrix, max_rows=len(rows))
                                for t in types}
            continue
        E = spec.n_experts
        picks = np.unique(np.linspace(0, E - 1, min(E, max_experts)).round().astype(int))
        errs = {t: np.full(E, np.nan) for t in types}
        for e in picks:
            data = r.load_expert(model.source, int(e))
            im = None if imatrix is None else imatrix[e]
            for t in types:
                errs[t][e] = relative_error(data, t, im, max_rows=max_rows)
        share = _expert_shares(stats, spec)
        per_expert[spec.name] = {
            t: np.where(np.isnan(v), np.nanmean(v), v) * share for t, v in errs.items()
        }
    return Damage(dense, per_expert, "calibrated" if stats is not None else "relative-error")


def importance(stats: CalibStats | None, spec: mp.TensorSpec) -> np.ndarray | None:
    """The imatrix for a tensor, shaped (n_expert, n_per_row) or (n_per_row,), if known."""
    if stats is None:
        return None
    im = stats.importance(spec.name)
    if im is None:
        return None
    im = im.reshape(-1, spec.row_length)
    if spec.n_experts:
        return np.broadcast_to(im, (spec.n_experts, spec.row_length)) if len(im) == 1 else im
    return im[0]


def make_plan(model: Model, budget: mp.Budget, type_name: str | None = None,
              ladder: Sequence[str] | None = None, stats: CalibStats | None = None,
              prune: bool = True, progress: bool = True) -> tuple[mp.MemoryPlan, list]:
    """A forced single-type plan (`type_name`), or the least-damage plan under the budget.

    With calibration statistics that include expert saliency and a measured pruning scale
    (sensitivity probes), and `prune`, expert pruning is weighed against bits: returns the
    plan and the keep-count trade-off it explored.
    """
    if type_name is not None:
        return mp.uniform_plan(model.specs, type_name, budget), []
    if ladder is None:
        ladder = mp.DEFAULT_LADDER + (mp.quant_types.IMATRIX_LADDER_EXTRA if stats else ())
    adapter = model.adapter
    grid = [adapter.n_expert]
    # pruning is weighed only when probes measured its cost: without that scale the
    # energy-share estimate over-prunes (BENCHMARKS.md, "calibrated, no probes")
    if prune and stats is not None and stats.has_expert_stats and stats.prune_scale:
        grid = keep_grid(adapter.n_expert, adapter.n_expert_used,
                         n_groups=adapter.n_expert_groups)
    # fail on an impossible cap before spending time on measurements
    mp.planner.check_minimum(adapter.tensor_specs(grid[-1]), budget, ladder)
    damage = measure_damage(model, ladder, stats, progress=progress)
    if stats is not None:
        damage = damage.scaled(stats.scales)
    if len(grid) == 1:
        plan = mp.solve(model.specs, damage.table(model.specs), budget, ladder=ladder,
                        damage_model=damage.model)
        return plan, []
    return solve_joint(adapter.tensor_specs, damage.dense, damage.per_expert, stats, budget,
                       grid, ladder=ladder, damage_model=damage.model,
                       prune_scale=_prune_scale(stats), n_groups=adapter.n_expert_groups)


def _prune_scale(stats: CalibStats) -> float:
    """Pruning damage in the units of the (possibly probed) quantization damage."""
    if not stats.scales:
        return 1.0
    if stats.prune_scale is None:
        return float(np.median(list(stats.scales.values())))
    return stats.prune_scale


def export(model: Model, plan: mp.MemoryPlan, out: str | Path, stats: CalibStats | None = None,
           threads: int | None = None, progress: bool = True,
           reuse: str | Path | None = None, search: int = DEFAULT_SEARCH,
           search_seed: int = 0) -> Path:
    """Write the GGUF for `plan` (pruned as it says, quantized with the importance matrix of
    `stats` when given); nothing is left at `out` if anything fails. `reuse`: an earlier
    export of this model with the same `stats` and `search`, whose tensors of the same type
    are copied. Where `stats` hold input covariances and `search` > 1, rows get up to
    `search` ggml quantizations, the later ones corrected by error feedback, and keep the
    one with the least output error (export.quantize.quantize_rows_searched); `search` 0 or
    1 writes what llama-quantize writes with the same imatrix. `search_seed` fixed the random
    candidates of the search before issue 11; the error-feedback search has none."""
    from export.options import export_options  # (belongs with the imports above)

    adapter, source = model.adapter, model.source
    kept = {int(k): v for k, v in plan.kept_experts.items()} or None
    recipes = adapter.recipes(source.names, kept) if kept else model.recipes
    options = export_options(stats, model.recipes, recipes, kept, search=search,
                             search_seed=search_seed, reuse=reuse, threads=threads,
                             progress=progress)

    def metadata(w) -> None:
        w.add_name(source.name)
        adapter.add_metadata(w, plan.n_experts_kept or None)
        adapter.add_tokenizer(w, source)

    return write_gguf(out, arch_name=adapter.arch_name, recipes=recipes, source=source,
                      plan=plan, add_metadata=metadata, options=options)
