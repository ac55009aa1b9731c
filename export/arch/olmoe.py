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
    expert_ff_key = "intermediate_size"

    def check_supported(self) -> None:
        super().check_supported()
        self.refuse_topk_norm(llama_renormalises=False)
        if self.config.get("clip_qkv") is not None:
            raise UnsupportedModelError("olmoe with clip_qkv: llama.cpp's olmoe does not clamp "
                                        "Q, K and V")
        if self.config.get("attention_bias"):
            raise UnsupportedModelError("olmoe with attention_bias=true: llama.cpp's olmoe has "
                                        "no attention output bias")
        hp = self.hp
        if hp.n_head_kv != hp.n_head or hp.n_head * hp.head_dim != hp.n_embd:
            raise UnsupportedModelError(
                f"olmoe with {hp.n_head_kv} KV heads of {hp.head_dim} for {hp.n_head} "
                f"heads and hidden_size {hp.n_embd}: llama.cpp's olmoe sizes the Q and K norms "
                "n_embd, so it needs n_head_kv == n_head and head_dim * n_head == hidden_size")

    def layer_tensors(self, i, d, hd, ff, n_expert):
        return super().layer_tensors(i, d, hd, ff, n_expert) + [
            ("attn_q_norm", (self.hp.n_head * hd,), False),
            ("attn_k_norm", (self.hp.n_head_kv * hd,), False),
        ]

    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's converter writes for OlmoeForCausalLM."""
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(self.hp.expert_ff)
