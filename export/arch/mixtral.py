"""Mixtral (HF `mixtral`) -> GGUF arch `llama` with experts.

llama.cpp's llama arch applies rope to interleaved pairs while HF rotates halves, so the
rows of Q and K are permuted per head (the same reordering llama.cpp's converter makes).
Routing: softmax over all experts, top-k, renormalised, as in HF.
"""

from __future__ import annotations

import gguf

from .base import Adapter, _rope_permute


class MixtralAdapter(Adapter):
    model_type = "mixtral"
    arch = gguf.MODEL_ARCH.LLAMA
    expert_ff_key = "intermediate_size"

    def transform_for(self, gguf_name: str):
        if gguf_name.endswith("attn_q.weight"):
            return lambda w: _rope_permute(w, self.hp.n_head)
        if gguf_name.endswith("attn_k.weight"):
            return lambda w: _rope_permute(w, self.hp.n_head_kv)
        return None

    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        hp = self.hp
        w.add_vocab_size(hp.n_vocab)
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(hp.expert_ff)
        w.add_rope_dimension_count(hp.head_dim)
        if hp.head_dim != hp.n_embd // hp.n_head:
            w.add_key_length(hp.head_dim)
            w.add_value_length(hp.head_dim)
