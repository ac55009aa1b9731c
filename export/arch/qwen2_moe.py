"""Qwen1.5-MoE / Qwen2-MoE (HF `qwen2_moe`) -> GGUF arch `qwen2moe`.

Every block is MoE: softmax routing over the routed experts without renormalisation (llama.cpp
hard-codes that), plus one shared expert whose output is scaled by a sigmoid gate
(`shared_expert_gate`, GGUF `ffn_gate_inp_shexp`, a single row kept F32 as llama.cpp's
converter keeps it). Q, K and V carry biases; rope is NEOX-style in both HF and llama.cpp.
"""

from __future__ import annotations

from dataclasses import replace

import gguf

from memory_planner.types import TensorSpec

from .base import Adapter, UnsupportedModelError, blk_spec, expert_specs, shared_expert_specs
from .hparams import HParams, config_value


class Qwen2MoeAdapter(Adapter):
    model_type = "qwen2_moe"
    arch = gguf.MODEL_ARCH.QWEN2MOE

    @classmethod
    def parse(cls, config: dict) -> HParams:
        return replace(
            super().parse(config),
            shared_ff=int(config_value(config, "shared_expert_intermediate_size", default=0)),
            qkv_bias=bool(config.get("qkv_bias", True)),  # Qwen2 attention always had biases
        )

    def check_supported(self) -> None:
        super().check_supported()
        self.refuse_topk_norm(llama_renormalises=False)
        self.refuse_dense_layers()
        if self.config.get("use_sliding_window"):
            raise UnsupportedModelError("qwen2_moe with use_sliding_window=true: llama.cpp's "
                                        "qwen2moe attends over the whole context")
        hp = self.hp
        if hp.n_head * hp.head_dim != hp.n_embd:
            raise UnsupportedModelError(
                f"qwen2_moe with head_dim {hp.head_dim} * {hp.n_head} heads != hidden_size "
                f"{hp.n_embd}: llama.cpp's qwen2moe needs them equal")
        if not hp.shared_ff:
            raise UnsupportedModelError("qwen2_moe without a shared expert: llama.cpp's qwen2moe "
                                        "requires one")

    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        d, ff, sh = hp.n_embd, hp.expert_ff, hp.shared_ff
        qd = hp.n_head * hp.head_dim
        kvd = hp.n_head_kv * hp.head_dim
        specs = [TensorSpec("token_embd.weight", (hp.n_vocab, d), "token_embd")]
        for i in range(hp.n_layer):
            specs.append(blk_spec(i, "attn_norm", (d,), quantizable=False))
            for kind, rows in (("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd)):
                specs.append(blk_spec(i, kind, (rows, d)))
                if hp.qkv_bias:
                    specs.append(blk_spec(i, kind, (rows,), quantizable=False, suffix="bias"))
            specs += [
                blk_spec(i, "attn_output", (d, qd)),
                blk_spec(i, "ffn_norm", (d,), quantizable=False),
                blk_spec(i, "ffn_gate_inp", (E, d), quantizable=False),
                *expert_specs(i, E, ff, d),
                # HF's (1, hidden) gate stays 2-D, as llama.cpp's converter writes it
                blk_spec(i, "ffn_gate_inp_shexp", (1, d), quantizable=False),
                *shared_expert_specs(i, sh, d),
            ]
        specs += self.head_specs()
        return specs

    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's converter writes for Qwen2MoeForCausalLM."""
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(self.hp.dense_ff)
        w.add_expert_feed_forward_length(self.hp.expert_ff)
        w.add_expert_shared_feed_forward_length(self.hp.shared_ff)
