"""Qwen3.5-MoE / Qwen3.6-MoE (HF `qwen3_5_moe`, text part `qwen3_5_moe_text`) -> GGUF arch
`qwen35moe`.

The release is a vision-language wrapper (`Qwen3_5MoeForConditionalGeneration`): the text
model's settings sit in config.json's `text_config`, its tensors under
`model.language_model.`, the vision tower under `model.visual.` and the multi-token-prediction
block under `mtp.`. Only the text model is exported; the vision tower and the MTP block are
left out (llama.cpp's converter with `--no-mtp`; the vision tower goes to an mmproj file).

Blocks are hybrid: every `full_attention_interval`-th is gated full attention (Q carries a
per-head output gate: attn_q has 2 * n_head * head_dim rows), the others Gated DeltaNet
linear attention, whose recurrent state (a conv window and one head_k x head_v matrix per
value head) replaces the KV cache. Every block is MoE: softmax routing with renormalised
top-k, plus a shared expert behind a sigmoid gate (`ffn_gate_inp_shexp`, kept F32).

The transforms are those of llama.cpp's converter (conversion/qwen.py): RMS norm weights
are stored as offsets from 1 in HF (`1 + w`) and written with the 1 added, except the
DeltaNet output norm; A_log is written as A = -exp(A_log); the conv kernel loses its
middle axis; and with fewer key than value heads the value heads are reordered from
grouped-by-key-head to tiled order (`_v_tiled`), as ggml broadcasts.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from functools import partial

import gguf
import numpy as np

from memory_planner.quant_types import kv_bytes_per_element
from memory_planner.types import TensorSpec

from .base import Adapter, UnsupportedModelError, blk_spec, expert_specs, shared_expert_specs
from .hparams import HParams, config_value, hparams_from_config, rope_scaling

# the HF default interleaved-MRoPE sections, which llama.cpp's converter writes when the
# config names none (llama.cpp requires the key)
DEFAULT_MROPE_SECTIONS = (11, 11, 10, 0)
# GGUF tensors whose HF weights are norms stored as offsets from 1
_OFFSET_NORMS = ("attn_norm", "post_attention_norm", "attn_q_norm", "attn_k_norm",
                 "output_norm")


@dataclass(frozen=True, kw_only=True)
class Qwen35HParams(HParams):
    """Beside the common sizes: the DeltaNet layers' shapes and which blocks they are."""

    recurrent: tuple[bool, ...]  # per block: linear attention (True) or full attention
    full_attention_interval: int
    conv_kernel: int  # linear_conv_kernel_dim
    k_heads: int  # linear_num_key_heads (llama.cpp's ssm.group_count)
    v_heads: int  # linear_num_value_heads (ssm.time_step_rank)
    k_head_dim: int  # linear_key_head_dim (ssm.state_size)
    v_head_dim: int  # linear_value_head_dim
    rope_dim: int  # rotated dimensions per head (head_dim * partial_rotary_factor)
    rope_sections: tuple[int, int, int, int]
    has_dense_ff: bool  # config.json names intermediate_size (the converter writes it then)

    @property
    def conv_channels(self) -> int:
        """Channels of the causal conv: q, k and v of every head."""
        return 2 * self.k_heads * self.k_head_dim + self.v_heads * self.v_head_dim

    @property
    def d_inner(self) -> int:
        return self.v_heads * self.v_head_dim

    def state_floats(self) -> int:
        """Recurrent state of one linear-attention block for one sequence, in floats
        (llama_hparams::n_embd_r + n_embd_s): the conv window minus its oldest column, and
        one k_head_dim x v_head_dim matrix per value head."""
        conv = (self.conv_kernel - 1) * self.conv_channels
        return conv + self.k_head_dim * self.d_inner


def _text(config: dict) -> dict:
    """The text model's settings: `text_config` of the release's wrapper, else the config."""
    return {**config, **(config.get("text_config") or {})}


class Qwen35MoeAdapter(Adapter):
    model_type = "qwen3_5_moe"
    arch = gguf.MODEL_ARCH.QWEN35MOE
    ignored_tensors = Adapter.ignored_tensors + (r"^model\.visual\.", r"^(model\.)?mtp\.")
    hp: Qwen35HParams
    per_block_fields = ("recurrent",)  # written as recurrent_layers, which llama.cpp reads

    @property
    def block_period(self) -> int:
        # a model of some blocks needs attention and recurrent blocks both: llama.cpp's
        # hybrid memory has no buffer for a kind without blocks (GGML_ASSERT(buffer))
        return self.hp.full_attention_interval

    @classmethod
    def parse(cls, config: dict) -> Qwen35HParams:
        c = _text(config)
        common = hparams_from_config(c, "moe_intermediate_size")
        n_layer = common["n_layer"]
        interval = int(c.get("full_attention_interval") or 4)
        types = c.get("layer_types") or [
            "linear_attention" if (i + 1) % interval else "full_attention" for i in range(n_layer)]
        if len(types) != n_layer or set(types) - {"linear_attention", "full_attention"}:
            raise UnsupportedModelError(f"layer_types {types} is not {n_layer} of "
                                        "linear_attention / full_attention")
        rope = rope_scaling(c)
        factor = float(rope.get("partial_rotary_factor", c.get("partial_rotary_factor", 0.25)))
        sections = list(rope.get("mrope_section") or DEFAULT_MROPE_SECTIONS)[:4]
        common.update(shared_ff=int(config_value(c, "shared_expert_intermediate_size")))
        return Qwen35HParams(
            **common,
            recurrent=tuple(t == "linear_attention" for t in types),
            full_attention_interval=interval,
            conv_kernel=int(config_value(c, "linear_conv_kernel_dim")),
            k_heads=int(config_value(c, "linear_num_key_heads")),
            v_heads=int(config_value(c, "linear_num_value_heads")),
            k_head_dim=int(config_value(c, "linear_key_head_dim")),
            v_head_dim=int(config_value(c, "linear_value_head_dim")),
            rope_dim=int(common["head_dim"] * factor),
            rope_sections=tuple(sections + [0] * (4 - len(sections))),
            has_dense_ff="intermediate_size" in c,
        )

    def __init__(self, config: dict):
        super().__init__(_text(config))  # parsing and refusals read the text model's options

    def check_supported(self) -> None:
        super().check_supported()
        self.refuse_dense_layers()
        if self.config.get("norm_topk_prob", True) is False:
            raise UnsupportedModelError("qwen3_5_moe with norm_topk_prob=false: llama.cpp's "
                                        "qwen35moe always renormalises the top-k weights")
        if self.config.get("attention_bias"):
            raise UnsupportedModelError("qwen3_5_moe with attention_bias=true: llama.cpp's "
                                        "qwen35moe has no attention biases")
        hp = self.hp
        if hp.v_heads % hp.k_heads:
            raise UnsupportedModelError(f"{hp.v_heads} value heads are not a multiple of "
                                        f"{hp.k_heads} key heads")

    # ---- GGUF tensors
    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        d, ff, sh = hp.n_embd, hp.expert_ff, hp.shared_ff
        specs = [TensorSpec("token_embd.weight", (hp.n_vocab, d), "token_embd")]
        for i in range(hp.n_layer):
            specs.append(blk_spec(i, "attn_norm", (d,), quantizable=False))
            specs += self._linear_attention(i) if hp.recurrent[i] else self._attention(i)
            specs += [
                blk_spec(i, "post_attention_norm", (d,), quantizable=False),
                blk_spec(i, "ffn_gate_inp", (E, d), quantizable=False),
                *expert_specs(i, E, ff, d),
                # one row: ggml sees a 1-D tensor and llama.cpp never quantizes it
                blk_spec(i, "ffn_gate_inp_shexp", (1, d), quantizable=False),
                *shared_expert_specs(i, sh, d),
            ]
        specs += self.head_specs()
        return specs

    def _attention(self, i: int) -> list[TensorSpec]:
        hp = self.hp
        d, hd = hp.n_embd, hp.head_dim
        return [
            blk_spec(i, "attn_q", (2 * hp.n_head * hd, d)),  # per head: query, then gate
            blk_spec(i, "attn_k", (hp.n_head_kv * hd, d)),
            blk_spec(i, "attn_v", (hp.n_head_kv * hd, d)),
            blk_spec(i, "attn_output", (d, hp.n_head * hd)),
            blk_spec(i, "attn_q_norm", (hd,), quantizable=False),
            blk_spec(i, "attn_k_norm", (hd,), quantizable=False),
        ]

    def _linear_attention(self, i: int) -> list[TensorSpec]:
        hp = self.hp
        d, nv = hp.n_embd, hp.v_heads
        return [
            blk_spec(i, "attn_qkv", (hp.conv_channels, d)),
            blk_spec(i, "attn_gate", (hp.d_inner, d)),
            # llama.cpp keeps the conv kernel, A, dt bias and norms F32 (llama-quant.cpp)
            blk_spec(i, "ssm_conv1d", (hp.conv_channels, hp.conv_kernel), quantizable=False),
            blk_spec(i, "ssm_dt", (nv,), quantizable=False, suffix="bias"),
            TensorSpec(f"blk.{i}.ssm_a", (nv,), "ssm_a", i, quantizable=False),
            blk_spec(i, "ssm_alpha", (nv, d)),
            blk_spec(i, "ssm_beta", (nv, d)),
            blk_spec(i, "ssm_norm", (hp.v_head_dim,), quantizable=False),
            blk_spec(i, "ssm_out", (d, hp.d_inner)),
        ]

    def gguf_name(self, tmap: gguf.TensorNameMap, hf_name: str) -> str | None:
        # the release's wrapper nests the text model; gguf-py knows dt_bias as dt_proj.bias
        name = hf_name.replace("model.language_model.", "model.", 1)
        name = re.sub(r"\.linear_attn\.dt_bias$", ".linear_attn.dt_proj.bias", name)
        return super().gguf_name(tmap, name)

    def recipes(self, hf_names, kept_experts=None):
        # the conv kernel is (channels, 1, kernel) in HF
        return [replace(r, hf_shape=(r.spec.shape[0], 1, r.spec.shape[1]))
                if r.spec.kind == "ssm_conv1d" else r
                for r in super().recipes(hf_names, kept_experts)]

    def transform_for(self, gguf_name: str):
        hp = self.hp
        kind = gguf_name.split(".")[2] if gguf_name.startswith("blk.") else gguf_name.split(".")[0]
        if kind in _OFFSET_NORMS:
            return lambda w: w + 1.0
        tile = partial(_v_tiled, k_heads=hp.k_heads, v_per_k=hp.v_heads // hp.k_heads)
        qk = 2 * hp.k_heads * hp.k_head_dim
        if kind == "attn_qkv":
            return lambda w: np.concatenate([w[:qk], tile(w[qk:], hp.v_head_dim)])
        if kind == "attn_gate":
            return lambda w: tile(w, hp.v_head_dim)
        if kind in ("ssm_alpha", "ssm_beta", "ssm_dt"):
            return lambda w: tile(w, 1)
        if kind == "ssm_a":
            return lambda w: -np.exp(tile(w, 1))
        if kind == "ssm_conv1d":
            def conv(w):
                w = w.reshape(w.shape[0], -1)
                return np.concatenate([w[:qk], tile(w[qk:], hp.v_head_dim)])
            return conv
        if kind == "ssm_out":
            return lambda w: tile(w.T, hp.v_head_dim).T
        return None

    # ---- memory the runtime needs besides weights
    def kv_bytes(self, ctx: int, kv_type: str = "f16", n_seq: int = 1) -> int:
        """llama.cpp's hybrid memory: the KV cache of the full-attention blocks for `ctx`
        tokens, plus the F32 recurrent state of the linear-attention blocks, one per
        sequence (llama_memory_recurrent: r and s rows of n_embd_r and n_embd_s floats),
        whatever the context."""
        hp = self.hp
        n_attn = hp.recurrent.count(False)
        kv = n_attn * hp.n_head_kv * (hp.head_dim + hp.value_dim) * ctx
        state = hp.recurrent.count(True) * hp.state_floats() * 4 * max(1, n_seq)
        return int(round(kv * kv_bytes_per_element(kv_type))) + state

    # ---- metadata
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's converter writes for Qwen3_5MoeForConditionalGeneration."""
        hp = self.hp
        self.add_common_metadata(w, n_experts_kept)
        if hp.has_dense_ff:
            w.add_feed_forward_length(hp.dense_ff)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.value_dim)
        w.add_expert_feed_forward_length(hp.expert_ff)
        w.add_expert_shared_feed_forward_length(hp.shared_ff)
        w.add_ssm_conv_kernel(hp.conv_kernel)
        w.add_ssm_state_size(hp.k_head_dim)
        w.add_ssm_group_count(hp.k_heads)
        w.add_ssm_time_step_rank(hp.v_heads)
        w.add_ssm_inner_size(hp.d_inner)
        # gguf-py 0.19 has no add_recurrent_layers: the key as the sdist's gguf-py names it
        w.add_array(f"{self.arch_name}.attention.recurrent_layers", list(hp.recurrent))
        w.add_full_attention_interval(hp.full_attention_interval)
        w.add_rope_dimension_count(hp.rope_dim)
        w.add_rope_dimension_sections(list(hp.rope_sections))


def _v_tiled(w: np.ndarray, head_dim: int, k_heads: int, v_per_k: int) -> np.ndarray:
    """Rows of value heads from grouped order (the v_per_k heads of key head 0, then of key
    head 1, ...) to tiled order (head 0 of every key head, then head 1, ...), as llama.cpp's
    converter reorders them for ggml's broadcast. A no-op when there are as many of each."""
    if v_per_k == 1:
        return w
    rest = w.shape[1:]
    return (w.reshape(k_heads, v_per_k, head_dim, *rest).swapaxes(0, 1)
             .reshape(w.shape))


class Qwen35MoeTextAdapter(Qwen35MoeAdapter):
    """The text model saved on its own (`Qwen3_5MoeForCausalLM`): a flat config."""

    model_type = "qwen3_5_moe_text"
