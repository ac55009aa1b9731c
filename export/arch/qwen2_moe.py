"""Qwen1.5-MoE / Qwen2-MoE (HF `qwen2_moe`) -> GGUF arch `qwen2moe`.

Every block is MoE: softmax routing over the routed experts without renormalisation (llama.cpp
hard-codes that), plus one shared expert whose output is scaled by a sigmoid gate
(`shared_expert_gate`, GGUF `ffn_gate_inp_shexp`, a single row kept F32 as llama.cpp's
converter keeps it). Q, K and V carry biases; rope is NEOX-style in both HF and llama.cpp.
"""

from __future__ import annotations

import gguf

from memory_planner.types import TensorSpec

from .base import Adapter, UnsupportedModelError, blk_spec


class Qwen2MoeAdapter(Adapter):
    model_type = "qwen2_moe"
    arch = gguf.MODEL_ARCH.QWEN2MOE

    def check_supported(self) -> None:
        super().check_supported()
        if self.config.get("norm_topk_prob", False):
            raise UnsupportedModelError(
                "qwen2_moe with norm_topk_prob=true: llama.cpp's qwen2moe never renormalises "
                "the top-k routing weights, so its output would differ from the checkpoint")
        if self.config.get("mlp_only_layers") or self.config.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedModelError(
                "qwen2_moe with dense layers (mlp_only_layers / decoder_sparse_step) has no "
                "llama.cpp equivalent")
        if self.config.get("use_sliding_window"):
            raise UnsupportedModelError("qwen2_moe with use_sliding_window=true: llama.cpp's "
                                        "qwen2moe attends over the whole context")
        if self.n_head * self.head_dim != self.n_embd:
            raise UnsupportedModelError(
                f"qwen2_moe with head_dim {self.head_dim} * {self.n_head} heads != hidden_size "
                f"{self.n_embd}: llama.cpp's qwen2moe needs them equal")
        if not self.shared_ff:
            raise UnsupportedModelError("qwen2_moe without a shared expert: llama.cpp's qwen2moe "
                                        "requires one")

    def expert_ff(self) -> int:
        return int(self.cfg("moe_intermediate_size"))

    @property
    def shared_ff(self) -> int:
        return int(self.cfg("shared_expert_intermediate_size", default=0))

    @property
    def qkv_bias(self) -> bool:
        return bool(self.config.get("qkv_bias", True))  # Qwen2 attention always had biases

    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        E = n_experts_kept or self.n_expert
        d, ff, sh = self.n_embd, self.expert_ff(), self.shared_ff
        qd = self.n_head * self.head_dim
        kvd = self.n_head_kv * self.head_dim
        specs = [TensorSpec("token_embd.weight", (self.n_vocab, d), "token_embd")]
        for i in range(self.n_layer):
            specs.append(blk_spec(i, "attn_norm", (d,), quantizable=False))
            for kind, rows in (("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd)):
                specs.append(blk_spec(i, kind, (rows, d)))
                if self.qkv_bias:
                    specs.append(blk_spec(i, kind, (rows,), quantizable=False, suffix="bias"))
            specs += [
                blk_spec(i, "attn_output", (d, qd)),
                blk_spec(i, "ffn_norm", (d,), quantizable=False),
                blk_spec(i, "ffn_gate_inp", (E, d), quantizable=False),
                blk_spec(i, "ffn_gate_exps", (E, ff, d), n_experts=E),
                blk_spec(i, "ffn_up_exps", (E, ff, d), n_experts=E),
                blk_spec(i, "ffn_down_exps", (E, d, ff), n_experts=E),
                # HF's (1, hidden) gate stays 2-D, as llama.cpp's converter writes it
                blk_spec(i, "ffn_gate_inp_shexp", (1, d), quantizable=False),
                blk_spec(i, "ffn_gate_shexp", (sh, d)),
                blk_spec(i, "ffn_up_shexp", (sh, d)),
                blk_spec(i, "ffn_down_shexp", (d, sh)),
            ]
        specs.append(TensorSpec("output_norm.weight", (d,), "output_norm", quantizable=False))
        if not self.tied_embeddings:
            specs.append(TensorSpec("output.weight", (self.n_vocab, d), "output"))
        return specs

    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's converter writes for Qwen2MoeForCausalLM."""
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(int(self.cfg("intermediate_size", default=self.expert_ff())))
        w.add_expert_feed_forward_length(self.expert_ff())
        w.add_expert_shared_feed_forward_length(self.shared_ff)
