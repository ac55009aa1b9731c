"""Mixtral (HF `mixtral`) -> GGUF arch `llama` with experts.

llama.cpp's llama arch applies rope to interleaved pairs while HF rotates halves, so the
rows of Q and K are permuted per head (the same reordering llama.cpp's converter makes).
Routing: softmax over all experts, top-k, renormalised, as in HF.
"""

from __future__ import annotations

import gguf
import numpy as np

from .base import Adapter


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from [first half | second half] to interleaved pairs."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


class MixtralAdapter(Adapter):
    model_type = "mixtral"
    arch = gguf.MODEL_ARCH.LLAMA

    def expert_ff(self) -> int:
        return int(self.cfg("intermediate_size"))

    def transform_for(self, gguf_name: str):
        if gguf_name.endswith("attn_q.weight"):
            return lambda w: _rope_permute(w, self.n_head)
        if gguf_name.endswith("attn_k.weight"):
            return lambda w: _rope_permute(w, self.n_head_kv)
        return None

    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        w.add_vocab_size(self.n_vocab)
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(self.expert_ff())
        w.add_rope_dimension_count(self.head_dim)
        if self.head_dim != self.n_embd // self.n_head:
            w.add_key_length(self.head_dim)
            w.add_value_length(self.head_dim)
