"""The export pipeline: source -> budget -> damage estimates (`edgemoe.damage`) -> plan ->
GGUF file.

Each step is a function a test or another tool can call on its own; the CLI strings them.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import memory_planner as mp
from export.arch import Adapter, TensorRecipe, adapter_for_source
from export.options import export_options
from export.search import DEFAULT_SEARCH
from export.source import GGUFSource, HFSource, open_source
from export.split import SplitSpec
from export.writer import write_gguf
from memory_planner.joint import keep_grid, solve_joint
from memory_planner.stats import CalibStats
from memory_planner.types import (
    DEFAULT_CTX,
    DEFAULT_KV_TYPE,
    DEFAULT_N_BATCH,
    DEFAULT_N_UBATCH,
)

from .damage import measure_damage

log = logging.getLogger(__name__)


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
                kv_type: str = DEFAULT_KV_TYPE, reserve: str | int = 0,
                n_batch: int = DEFAULT_N_BATCH, n_ubatch: int = DEFAULT_N_UBATCH,
                flash_attn: bool | None = None, simulate: bool = True) -> mp.Budget:
    """The cap with the KV cache, compute and output buffers and reserve that must fit
    beside the weights, for a context of `ctx` tokens at `kv_type`, batches of
    `n_batch`/`n_ubatch` tokens and flash attention on or off (None: on only for a quantized
    KV cache, which llama.cpp requires it for; edgemoe's runtime and the llama-server command
    it prints use the same). A context llama.cpp refuses raises ContextRefusedError.

    The buffers are llama.cpp's own allocation, simulated without weights from the header of
    the file the adapter would write (`runtime.simulate`); where the pinned llama.cpp cannot
    load the architecture (or `simulate` is False) the adapter's formulas stand in, and
    `memory_source` says so. Buffers do not depend on the weight types (llama.cpp allocates
    the same context and compute bytes for F16 and Q4_0 weights: BENCHMARKS.md), and
    pruning only shrinks them, so one simulation with all experts holds for every plan.
    """
    from .llamacpp import ContextRefusedError
    from .runtime.simulate import SimulationError, simulate_allocation

    if flash_attn is None:
        flash_attn = kv_type.lower() not in ("f32", "f16", "bf16")
    n_batch = min(ctx, n_batch)
    common = dict(cap_bytes=mp.parse_size(memory), reserve_bytes=mp.parse_size(reserve),
                  ctx=ctx, kv_type=kv_type, n_batch=n_batch,
                  n_ubatch=min(n_batch, n_ubatch), flash_attn=flash_attn)
    why = "not asked"
    if simulate:
        try:
            a = simulate_allocation(adapter, ctx=ctx, kv_type=kv_type, n_batch=n_batch,
                                    n_ubatch=n_ubatch, flash_attn=flash_attn)
            return mp.Budget(kv_bytes=a.context, compute_bytes=a.compute,
                             output_bytes=a.output, memory_source="llama.cpp", **common)
        except ContextRefusedError:
            raise
        except SimulationError as e:
            why = str(e)
            log.warning("llama.cpp could not simulate %s's memory (%s): formulas stand in",
                        adapter.arch_name, why)
    return mp.Budget(kv_bytes=adapter.kv_bytes(ctx, kv_type),
                     compute_bytes=adapter.compute_bytes(ctx, n_ubatch),
                     output_bytes=4 * adapter.n_vocab,
                     memory_source=f"formula ({why})", **common)


def make_plan(model: Model, budget: mp.Budget, type_name: str | None = None,
              ladder: Sequence[str] | None = None, stats: CalibStats | None = None,
              prune: bool = True, progress: bool = True,
              solver=mp.solve) -> tuple[mp.MemoryPlan, list]:
    """A forced single-type plan (`type_name`), or the least-damage plan under the budget.
    `solver` plans one keep count (a GPU + CPU plan passes edgemoe.planning.gpu's).

    With calibration statistics that include expert saliency and a measured pruning scale
    (sensitivity probes), and `prune`, expert pruning is weighed against bits: returns the
    plan and the keep-count trade-off it explored.
    """
    if type_name is not None:
        if solver is not mp.solve:
            raise ValueError("--type makes a one-type plan: it cannot be placed on devices")
        return mp.uniform_plan(model.specs, type_name, budget), []
    adapter = model.adapter
    if ladder is None:
        ladder = mp.quant_types.with_types(
            mp.DEFAULT_LADDER, adapter.extra_types) + (
            mp.quant_types.IMATRIX_LADDER_EXTRA if stats else ())
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
        plan, tradeoff = solver(model.specs, damage.table(model.specs), budget, ladder=ladder,
                                damage_model=damage.model), []
    else:
        plan, tradeoff = solve_joint(adapter.tensor_specs, damage.dense, damage.per_expert,
                                     stats, budget, grid, ladder=ladder,
                                     damage_model=damage.model,
                                     prune_scale=_prune_scale(stats),
                                     n_groups=adapter.n_expert_groups, solver=solver)
    if stats is not None and stats.source is not None:  # how far the statistics' model is
        plan = replace(plan, calibration=stats.source.describe())
    return plan, tradeoff


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
           split: SplitSpec | None = None, cpu_rows: bool = False) -> Path:
    """Write the GGUF for `plan` (pruned as it says, quantized with the importance matrix of
    `stats` when given); nothing is left at `out` if anything fails. `reuse`: an earlier
    export of this model with the same `stats` and `search`, whose tensors of the same type
    are copied. Where `stats` hold input covariances and `search` > 1, rows get up to
    `search` candidate quantizations, the later ones corrected by error feedback, and keep the
    one with the least output error (export.search.quantize_rows_searched); `search` 0 or
    1 writes what llama-quantize writes with the same imatrix. `split`: llama.cpp's split
    files (`export.split`); returns the first file's path (or the shard's). `cpu_rows`: a
    file only edgemoe runs, Q8_0 by ggml-cpu's faster row quantizer (`ExportOptions`)."""
    adapter, source = model.adapter, model.source
    kept = {int(k): v for k, v in plan.kept_experts.items()} or None
    recipes = adapter.recipes(source.names, kept) if kept else model.recipes
    options = export_options(stats, model.recipes, recipes, kept, search=search,
                             reuse=reuse, threads=threads, progress=progress, split=split,
                             cpu_rows=cpu_rows)

    def metadata(w) -> None:
        w.add_name(source.name)
        adapter.add_metadata(w, plan.n_experts_kept or None)
        adapter.add_tokenizer(w, source)

    return write_gguf(out, arch_name=adapter.arch_name, recipes=recipes, source=source,
                      plan=plan, add_metadata=metadata, options=options)


def load_stats(model: Model, stats: str | None = None, imatrix: str | None = None,
               calib_text: str | None = None) -> tuple[CalibStats | None, str | None]:
    """Calibration statistics and their file: a stats/imatrix file (checked against `model`),
    or a calibration run on `calib_text` (with probes) written beside the working folder."""
    from export.imatrix import read_stats

    given = [x for x in (stats, imatrix, calib_text) if x]
    if len(given) > 1:
        raise ValueError("give one of --stats, --imatrix, --calib-text")
    path = stats or imatrix
    if path:
        calib = read_stats(path)
        calib.check_model(model.specs, path)
        return calib, path
    if calib_text:
        from .calibration.collect import calibrate

        out = f"{model.source.path.name}.stats.gguf"
        return calibrate(str(model.source.path), text=calib_text, output=out,
                         sensitivity=True), out
    return None, None

