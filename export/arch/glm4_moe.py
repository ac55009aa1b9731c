"""GLM-4.5 / 4.6 / 4.7 and GLM-4.5-Air (HF `glm4_moe`) -> GGUF arch `glm4moe`.

Written as llama.cpp's converter (conversion/glm.py, Glm4MoeModel) writes it. The first
`first_k_dense_replace` blocks have a dense FFN; the rest route with sigmoid scores plus a
selection-only correction bias (`e_score_correction_bias` -> `exp_probs_b`), optional
group-limited top-k, renormalised weights times `routed_scaling_factor`, beside one shared
expert. Attention has Q/K/V biases (`attention_bias`), optional per-head Q/K norms
(`use_qk_norm`) and NEOX rope over the first `partial_rotary_factor` of each head, as HF
rotates halves: no permutation. The norm before the FFN is GGUF's `post_attention_norm`.

The NextN (multi-token prediction) block(s) after the trunk are written as the converter
writes them by default (`blk.{n_layer}`, `nextn.*` tensors, `nextn_predict_layers`):
llama.cpp's decode does not run them (nor, by default, load them: TENSOR_SKIP) and holds no
KV cache for them, but speculative MTP does. A pruned file leaves them out, as the
converter's `--no-mtp` does: expert_count is one number for every block, and the NextN
block's experts are never seen by a calibration run.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf

from memory_planner.types import TensorSpec

from .base import Adapter, UnsupportedModelError, blk_spec, expert_specs, shared_expert_specs
from .hparams import HParams, config_value, hparams_from_config, rope_scaling


@dataclass(frozen=True, kw_only=True)
class GlmHParams(HParams):
    n_shared: int  # shared experts, each expert_ff wide
    n_dense_lead: int  # leading blocks with a dense FFN
    rope_dim: int  # rotated dimensions per head
    qk_norm: bool
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool


class Glm4MoeAdapter(Adapter):
    model_type = "glm4_moe"
    arch = gguf.MODEL_ARCH.GLM4_MOE
    expert_row_kinds = ("ffn_gate_inp", "exp_probs_b")
    hp: GlmHParams
    # llama.cpp's glm4moe graph aborts on input embeddings unless its rope is M-RoPE
    # (src/models/glm4-moe.cpp: "This GGUF does not support multimodal")
    takes_input_embeddings = False

    @classmethod
    def parse(cls, config: dict) -> GlmHParams:
        def get(key: str, default=None):
            return config_value(config, key, default=default)

        common = hparams_from_config(config, "moe_intermediate_size")
        n_shared, n_group = int(get("n_shared_experts", 0)), int(get("n_group", 1))
        # the converter's default is 0.5 (GLM's), from rope_parameters or the top level
        factor = float(rope_scaling(config).get("partial_rotary_factor")
                       or get("partial_rotary_factor", 0.5))
        common.update(shared_ff=n_shared * common["expert_ff"], n_expert_groups=n_group,
                      qkv_bias=bool(get("attention_bias", False)),
                      n_nextn=int(get("num_nextn_predict_layers", 0)))
        return GlmHParams(
            **common,
            n_shared=n_shared,
            n_dense_lead=int(get("first_k_dense_replace", 0)),
            rope_dim=int(common["head_dim"] * factor),
            qk_norm=bool(get("use_qk_norm", False)),
            topk_group=int(get("topk_group", 1)),
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(get("norm_topk_prob", False)),
        )

    def check_supported(self) -> None:
        super().check_supported()
        act = config_value(self.config, "hidden_act", default="silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r}: llama.cpp's glm4moe uses silu")
        if self.hp.n_shared == 0:
            # the graph adds build_ffn(shared) unconditionally: it needs the tensors
            raise UnsupportedModelError("glm4_moe without a shared expert: llama.cpp's glm4moe "
                                        "always runs one")
        if self.hp.n_expert % self.hp.n_expert_groups:
            raise UnsupportedModelError(f"{self.hp.n_expert} experts in {self.hp.n_expert_groups}"
                                        " groups: llama.cpp needs equal groups")
        if self.config.get("mrope_section") or rope_scaling(self.config).get("mrope_section"):
            raise UnsupportedModelError("glm4_moe with M-RoPE (the vision model's text part) is "
                                        "not supported by edgemoe")

    # ---- GGUF tensors
    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        """Every GGUF tensor, in file order: the trunk, then (unpruned) the NextN blocks."""
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        d, V = hp.n_embd, hp.n_vocab
        blocks = hp.n_layer + (hp.n_nextn if E == hp.n_expert else 0)
        specs = [TensorSpec("token_embd.weight", (V, d), "token_embd")]
        for i in range(blocks):
            specs += self._attention(i)
            specs += self._dense_ffn(i) if i < hp.n_dense_lead else self._moe_ffn(i, E)
            if i >= hp.n_layer:
                specs += [
                    blk_spec(i, "nextn.eh_proj", (d, 2 * d)),
                    blk_spec(i, "nextn.enorm", (d,), quantizable=False),
                    blk_spec(i, "nextn.hnorm", (d,), quantizable=False),
                    blk_spec(i, "nextn.shared_head_norm", (d,), quantizable=False),
                ]
        specs += self.head_specs()
        return specs

    def _attention(self, i: int) -> list[TensorSpec]:
        hp = self.hp
        d, hd = hp.n_embd, hp.head_dim
        qd, kvd = hp.n_head * hd, hp.n_head_kv * hd
        out = [blk_spec(i, "attn_norm", (d,), quantizable=False)]
        for kind, rows in (("attn_q", qd), ("attn_k", kvd), ("attn_v", kvd)):
            out.append(blk_spec(i, kind, (rows, d)))
            if hp.qkv_bias:
                out.append(blk_spec(i, kind, (rows,), quantizable=False, suffix="bias"))
        if hp.qk_norm:
            out += [blk_spec(i, "attn_q_norm", (hd,), quantizable=False),
                    blk_spec(i, "attn_k_norm", (hd,), quantizable=False)]
        return out + [
            blk_spec(i, "attn_output", (d, qd)),
            blk_spec(i, "post_attention_norm", (d,), quantizable=False),
        ]

    def _dense_ffn(self, i: int) -> list[TensorSpec]:
        d, ff = self.hp.n_embd, self.hp.dense_ff
        return [blk_spec(i, "ffn_gate", (ff, d)), blk_spec(i, "ffn_up", (ff, d)),
                blk_spec(i, "ffn_down", (d, ff))]

    def _moe_ffn(self, i: int, E: int) -> list[TensorSpec]:
        d, ff, sh = self.hp.n_embd, self.hp.expert_ff, self.hp.shared_ff
        return [
            blk_spec(i, "ffn_gate_inp", (E, d), quantizable=False),  # router: F32, as llama.cpp
            blk_spec(i, "exp_probs_b", (E,), quantizable=False, suffix="bias"),
            *expert_specs(i, E, ff, d),
            *shared_expert_specs(i, sh, d),
        ]

    def moe_layers(self) -> list[int]:
        """The trunk's MoE blocks (pruning leaves the NextN block out of the file)."""
        return list(range(self.hp.n_dense_lead, self.hp.n_layer))

    # ---- metadata
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's converter writes for Glm4MoeForCausalLM."""
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        nextn = hp.n_nextn if E == hp.n_expert else 0
        # the trunk and the NextN blocks
        self.add_common_metadata(w, n_experts_kept, n_blocks=hp.n_layer + nextn)
        w.add_feed_forward_length(hp.dense_ff)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_rope_dimension_count(hp.rope_dim)
        w.add_expert_group_count(hp.n_expert_groups)
        w.add_expert_group_used_count(hp.topk_group)
        w.add_expert_feed_forward_length(hp.expert_ff)
        w.add_expert_shared_count(hp.n_shared)
        w.add_leading_dense_block_count(hp.n_dense_lead)
        w.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
        w.add_expert_weights_scale(hp.routed_scaling_factor)
        w.add_expert_weights_norm(hp.norm_topk_prob)
        if nextn:
            w.add_nextn_predict_layers(nextn)

    def add_tokenizer(self, w: gguf.GGUFWriter, source) -> None:
        """GLM's special tokens, as the converter names them by content when the tokenizer
        files do not: BOS [gMASK], EOT <|user|>, UNK <|endoftext|>, EOM <|observation|>."""
        from ..tokenizer import add_tokenizer

        add_tokenizer(w, source.path, vocab_size=self.hp.n_vocab, special_defaults={
            "bos": "[gMASK]", "eot": "<|user|>", "unk": "<|endoftext|>",
            "eom": "<|observation|>"})
