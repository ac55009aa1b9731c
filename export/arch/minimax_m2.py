"""MiniMax-M2 (HF `minimax_m2`) -> GGUF arch `minimax-m2`.

Written as llama.cpp's converter (conversion/minimax.py, MiniMaxM2Model) writes it. Every
block is MoE without a shared expert: sigmoid scores plus a selection-only correction bias
(`block_sparse_moe.e_score_correction_bias` -> `exp_probs_b`), top-k renormalised (llama.cpp
hard-codes that for this arch, as transformers does). Q and K are RMS-normalised over all
heads at once (`attn_q_norm` is n_head * head_dim wide), then NEOX rope turns the first
`rotary_dim` dimensions of each head (the released config's legacy key; transformers 5
spells it `partial_rotary_factor`). The experts' FFN width is `intermediate_size`.
"""

from __future__ import annotations

import gguf

from .base import Adapter, UnsupportedModelError, blk_spec
from .hparams import config_value, rope_scaling


class MiniMaxM2Adapter(Adapter):
    model_type = "minimax_m2"
    arch = gguf.MODEL_ARCH.MINIMAXM2
    expert_row_kinds = ("ffn_gate_inp", "exp_probs_b")
    expert_ff_key = "intermediate_size"

    @property
    def rope_dim(self) -> int:
        """Rotated dimensions per head: `rotary_dim`, else partial_rotary_factor * head_dim."""
        dim = config_value(self.config, "rotary_dim", default=0)
        if not dim:
            factor = rope_scaling(self.config).get("partial_rotary_factor") or config_value(
                self.config, "partial_rotary_factor", default=1.0)
            dim = int(self.hp.head_dim * float(factor))
        return int(dim)

    def check_supported(self) -> None:
        super().check_supported()
        scoring = config_value(self.config, "scoring_func", default="sigmoid")
        if scoring != "sigmoid":
            raise UnsupportedModelError(f"scoring_func {scoring!r}: llama.cpp's minimax-m2 is "
                                        "written with sigmoid routing")
        act = config_value(self.config, "hidden_act", default="silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r}: llama.cpp's minimax-m2 uses silu")
        if self.rope_dim % 2 or self.rope_dim > self.hp.head_dim:
            raise UnsupportedModelError(f"rotary_dim {self.rope_dim} for head_dim "
                                        f"{self.hp.head_dim}")

    def layer_tensors(self, i, d, hd, ff, n_expert):
        qd, kvd = self.hp.n_head * hd, self.hp.n_head_kv * hd
        return super().layer_tensors(i, d, hd, ff, n_expert) + [
            ("attn_q_norm", (qd,), False),  # over all heads at once
            ("attn_k_norm", (kvd,), False),
        ]

    def tensor_specs(self, n_experts_kept: int | None = None):
        specs = super().tensor_specs(n_experts_kept)
        E = n_experts_kept or self.hp.n_expert
        out = []
        for s in specs:
            out.append(s)
            if s.kind == "ffn_gate_inp":  # the correction bias follows the router
                out.append(blk_spec(s.layer, "exp_probs_b", (E,), quantizable=False,
                                    suffix="bias"))
        return out

    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's converter writes for MiniMaxM2ForCausalLM."""
        hp = self.hp
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(hp.expert_ff)
        w.add_expert_feed_forward_length(hp.expert_ff)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_rope_dimension_count(self.rope_dim)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
