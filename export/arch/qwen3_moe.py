"""Qwen3-MoE (HF `qwen3_moe`) -> GGUF arch `qwen3moe`.

Rope is NEOX-style in both HF and llama.cpp, so Q/K need no permutation. llama.cpp always
renormalises the top-k routing weights for this arch, and every layer is an MoE layer.
"""

from __future__ import annotations

import gguf

from .base import Adapter, UnsupportedModelError


class Qwen3MoeAdapter(Adapter):
    model_type = "qwen3_moe"
    arch = gguf.MODEL_ARCH.QWEN3MOE

    def check_supported(self) -> None:
        super().check_supported()
        if not self.config.get("norm_topk_prob", False):
            raise UnsupportedModelError(
                "qwen3_moe with norm_topk_prob=false: llama.cpp's qwen3moe always renormalises "
                "the top-k routing weights, so its output would differ from the checkpoint"
            )
        if self.config.get("mlp_only_layers") or self.config.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedModelError(
                "qwen3_moe with dense layers (mlp_only_layers / decoder_sparse_step) has no "
                "llama.cpp equivalent"
            )

    def expert_ff(self) -> int:
        return int(self.cfg("moe_intermediate_size"))

    def layer_tensors(self, i, d, hd, ff, n_expert):
        return super().layer_tensors(i, d, hd, ff, n_expert) + [
            ("attn_q_norm", (hd,), False),
            ("attn_k_norm", (hd,), False),
        ]

    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(int(self.cfg("intermediate_size", default=self.expert_ff())))
        w.add_expert_feed_forward_length(self.expert_ff())
        w.add_key_length(self.head_dim)
        w.add_value_length(self.head_dim)
