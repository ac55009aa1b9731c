"""A GGUF tensor's recipe: which source tensors it is read from, and how."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from memory_planner.types import TensorSpec

Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TensorRecipe:
    """How to build one GGUF tensor from source tensors.

    Stacked expert tensors come either from one source tensor per output expert (`hf_names`
    holds one name per expert, in output order: HF checkpoints) or, with `stacked`, from one
    stacked source tensor whose first axis is the expert (a GGUF source); `rows` then names
    the source expert of each output expert. For other tensors `hf_names` is a single name
    and `rows` selects rows of its first axis (router rows, correction-bias entries of kept
    experts). `transform` is applied to each loaded slice (rope permutation, the split of a
    fused tensor); `hf_shape` is the shape the source tensor must have when it is not the
    GGUF tensor's own.
    """

    spec: TensorSpec
    hf_names: tuple[str, ...]
    rows: tuple[int, ...] | None = None
    transform: Transform | None = None
    hf_shape: tuple[int, ...] | None = None
    stacked: bool = False

    @property
    def source_shape(self) -> tuple[int, ...]:
        """The shape each source tensor named in `hf_names` must have."""
        if self.hf_shape is not None:
            return tuple(self.hf_shape)
        if self.spec.n_experts and not self.stacked:
            return tuple(self.spec.shape[1:])
        return tuple(self.spec.shape)

    def load(self, source) -> np.ndarray:
        """The whole GGUF tensor as float32, in GGUF (numpy) orientation."""
        if self.spec.n_experts:
            return np.stack([self.load_expert(source, e) for e in range(self.spec.n_experts)])
        a = source.load(self.hf_names[0], self.rows)
        if self.transform is not None:
            a = self.transform(a)
        return np.ascontiguousarray(a, dtype=np.float32)

    def load_rows(self, source, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (sorted) of a non-expert GGUF tensor as float32; only those are read
        from disk unless a transform needs the whole tensor."""
        if self.spec.n_experts or self.transform is not None:
            return self.load(source)[rows]
        picked = rows if self.rows is None else np.asarray(self.rows)[rows]
        a = source.load(self.hf_names[0], tuple(int(i) for i in picked))
        return np.ascontiguousarray(a, dtype=np.float32)

    def load_expert(self, source, e: int) -> np.ndarray:
        """Expert slice `e` (output numbering) of a stacked tensor, 2-D float32."""
        if self.stacked:
            a = source.load(self.hf_names[0], e if self.rows is None else self.rows[e])
        else:
            a = source.load(self.hf_names[e])
        if self.transform is not None:
            a = self.transform(a)
        return np.ascontiguousarray(a, dtype=np.float32)
