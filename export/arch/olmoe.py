"""OLMoE (HF `olmoe`) -> GGUF arch `olmoe`.

Every block is MoE with softmax routing and no renormalisation of the top-k weights
(llama.cpp hard-codes that). Q and K are RMS-normalised over the whole projection (not per
head) before rope, which is NEOX-style in both HF and llama.cpp; llama.cpp sizes both norms
{n_embd}, so K and V must have as many heads as Q.
"""

from __future__ import annotations

import gguf

from .base import Adapter, UnsupportedModelError


class OlmoeAdapter(Adapter):
    model_type = "olmoe"
    arch = gguf.MODEL_ARCH.OLMOE

    def check_supported(self) -> None:
        super().check_supported()
        if self.config.get("norm_topk_prob", False):
            raise UnsupportedModelError(
                "olmoe with norm_topk_prob=true: llama.cpp's olmoe never renormalises the top-k "
                "routing weights, so its output would differ from the checkpoint")
        if self.config.get("clip_qkv") is not None:
            raise UnsupportedModelError("olmoe with clip_qkv: llama.cpp's olmoe does not clamp "
                                        "Q, K and V")
        if self.config.get("attention_bias"):
            raise UnsupportedModelError("olmoe with attention_bias=true: llama.cpp's olmoe has "
                                        "no attention output bias")
        if self.n_head_kv != self.n_head or self.n_head * self.head_dim != self.n_embd:
            raise UnsupportedModelError(
                f"olmoe with {self.n_head_kv} KV heads of {self.head_dim} for {self.n_head} "
                f"heads and hidden_size {self.n_embd}: llama.cpp's olmoe sizes the Q and K norms "
                "n_embd, so it needs n_head_kv == n_head and head_dim * n_head == hidden_size")

    def expert_ff(self) -> int:
        return int(self.cfg("intermediate_size"))

    def layer_tensors(self, i, d, hd, ff, n_expert):
        return super().layer_tensors(i, d, hd, ff, n_expert) + [
            ("attn_q_norm", (self.n_head * hd,), False),
            ("attn_k_norm", (self.n_head_kv * hd,), False),
        ]

    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's converter writes for OlmoeForCausalLM."""
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(self.expert_ff())
