"""Qwen3-MoE (HF `qwen3_moe`) -> GGUF arch `qwen3moe`.

Rope is NEOX-style in both HF and llama.cpp, so Q/K need no permutation. llama.cpp always
renormalises the top-k routing weights for this arch, and every layer is an MoE layer.
"""

from __future__ import annotations

import gguf

from .base import Adapter


class Qwen3MoeAdapter(Adapter):
    model_type = "qwen3_moe"
    arch = gguf.MODEL_ARCH.QWEN3MOE

    def check_supported(self) -> None:
        super().check_supported()
        self.refuse_topk_norm(llama_renormalises=True)
        self.refuse_dense_layers()

    def layer_tensors(self, i, d, hd, ff, n_expert):
        return super().layer_tensors(i, d, hd, ff, n_expert) + [
            ("attn_q_norm", (hd,), False),
            ("attn_k_norm", (hd,), False),
        ]

    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        hp = self.hp
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(hp.dense_ff)
        w.add_expert_feed_forward_length(hp.expert_ff)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
