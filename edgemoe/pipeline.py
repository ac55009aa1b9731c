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
from export.arch import Adapter, TensorRecipe, adapter_for
from export.quantize import relative_error
from export.source import HFSource
from export.tokenizer import add_tokenizer
from export.writer import write_gguf

log = logging.getLogger(__name__)

DEFAULT_CTX = 4096
DEFAULT_KV_TYPE = "f16"


@dataclass
class Model:
    """An opened source: its tensors, its adapter and the recipes binding the two."""

    source: HFSource
    adapter: Adapter
    recipes: list[TensorRecipe]

    @property
    def specs(self) -> list[mp.TensorSpec]:
        return [r.spec for r in self.recipes]


def open_model(path: str | Path) -> Model:
    """Open an HF checkpoint directory; raises if the architecture or a tensor is missing."""
    source = HFSource(path)
    adapter = adapter_for(source.config)
    recipes = adapter.recipes(source.names)
    for r in recipes:  # shapes promised by the config must be the checkpoint's
        got = source.shape(r.hf_names[0])
        want = r.spec.shape[1:] if r.spec.n_experts else r.spec.shape
        if r.rows is None and tuple(got) != tuple(want):
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


def _sample(recipe: TensorRecipe, source, max_experts: int) -> np.ndarray:
    """A representative piece of a tensor for error measurement (a few experts at most)."""
    if not recipe.spec.n_experts:
        return recipe.load(source)
    E = recipe.spec.n_experts
    picks = np.unique(np.linspace(0, E - 1, min(E, max_experts)).round().astype(int))
    return np.stack([recipe.load_expert(source, int(e)) for e in picks])


def measure_damage(model: Model, ladder: Sequence[str] = mp.DEFAULT_LADDER,
                   max_rows: int = 512, max_experts: int = 8,
                   progress: bool = True) -> dict[str, dict[str, float]]:
    """Relative quantization error of every quantizable tensor at every candidate type.

    Measured with ggml itself on sampled rows; the planner's damage proxy until
    calibration statistics are given.
    """
    damage: dict[str, dict[str, float]] = {}
    todo = [r for r in model.recipes if r.spec.quantizable]
    for r in tqdm(todo, desc="measuring quantization error", disable=not progress):
        data = _sample(r, model.source, max_experts)
        damage[r.spec.name] = {
            legal: relative_error(data, legal, max_rows=max_rows)
            for legal, _ in mp.quant_types.candidate_types(r.spec, tuple(ladder))
            if legal != "F32"
        }
    return damage


def make_plan(model: Model, budget: mp.Budget, type_name: str | None = None,
              ladder: Sequence[str] = mp.DEFAULT_LADDER, progress: bool = True) -> mp.MemoryPlan:
    """A forced single-type plan (`type_name`), or the least-damage plan under the budget."""
    if type_name is not None:
        return mp.uniform_plan(model.specs, type_name, budget)
    # fail on an impossible cap before spending time on measurements
    mp.planner.check_minimum(model.specs, budget, ladder)
    damage = measure_damage(model, ladder, progress=progress)
    return mp.solve(model.specs, damage, budget, ladder=ladder)


def export(model: Model, plan: mp.MemoryPlan, out: str | Path, threads: int | None = None,
           progress: bool = True) -> Path:
    """Write the GGUF for `plan`; nothing is left at `out` if anything fails."""
    adapter, source = model.adapter, model.source

    def metadata(w) -> None:
        w.add_name(source.path.name)
        adapter.add_metadata(w, plan.n_experts_kept or None)
        add_tokenizer(w, source.path, vocab_size=adapter.n_vocab)

    return write_gguf(out, arch_name=adapter.arch_name, recipes=model.recipes, source=source,
                      plan=plan, add_metadata=metadata, threads=threads, progress=progress)
