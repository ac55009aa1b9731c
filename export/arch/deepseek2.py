"""DeepSeek-V2 / V3 (HF `deepseek_v2`, `deepseek_v3`) -> GGUF arch `deepseek2`.

Attention is MLA, written as llama.cpp's converter writes it for the "absorbed" path: the
low-rank Q (`attn_q_a`, `attn_q_a_norm`, `attn_q_b`; V2-Lite has no q_lora_rank and a plain
`attn_q`), the joint latent + rope projection `attn_kv_a_mqa` with `attn_kv_a_norm`, and HF's
`kv_b_proj` split per head into `attn_k_b` (ggml {qk_nope, kv_lora_rank, n_head}, i.e.
transposed) and `attn_v_b` ({kv_lora_rank, v_head_dim, n_head}). llama.cpp then runs MLA as
MQA over the latent: its KV cache holds one (kv_lora_rank + qk_rope_head_dim) row per token
and layer, and V is a view of K.

The first `first_k_dense_replace` blocks have a dense FFN; the rest are MoE with a shared
expert. V3 routes with sigmoid scores plus a selection-only correction bias (`exp_probs_b`)
and group-limited top-k; V2 with softmax. The multi-token-prediction block(s) after the last
layer (`num_nextn_predict_layers`) are not exported, as llama.cpp's converter skips them.
Pruning slices the router rows and the correction bias with the experts.

Rope: DeepSeek's rope dimensions are interleaved pairs, llama.cpp's "normal" rope, so no
permutation is needed; a transformers config with `rope_interleave: false` (rotate-half rope)
has the rope rows of q and of the shared k_pe reordered into pairs.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import gguf
import numpy as np

from memory_planner.types import TensorSpec

from .base import (
    Adapter,
    TensorRecipe,
    UnsupportedModelError,
    _rope_permute,
    blk_spec,
    expert_specs,
    shared_expert_specs,
)
from .hparams import HParams, config_value, hparams_from_config, rope_scaling, rope_type

log = logging.getLogger(__name__)

_GATING = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID,
           "softmax": gguf.ExpertGatingFuncType.SOFTMAX}


@dataclass(frozen=True)
class Yarn:
    """YaRN rope scaling, as the config gives it (None: key absent)."""

    factor: float
    orig_ctx: int
    ext_factor: float | None = None
    attn_factor: float | None = None
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale_all_dim: float | None = None


@dataclass(frozen=True, kw_only=True)
class DeepseekHParams(HParams):
    """DeepSeek's own hyperparameters beside the common ones. Attention is recorded as
    llama.cpp runs absorbed MLA: one KV head of kv_lora_rank + qk_rope_dim (head_dim),
    values kv_lora_rank wide."""

    q_lora_rank: int  # 0: Q is a single full-rank matrix (V2-Lite)
    qk_nope_dim: int
    v_head_dim: int
    n_shared: int  # shared experts, each expert_ff wide
    n_dense_lead: int  # leading blocks with a dense FFN (first_k_dense_replace)
    scoring_func: str
    topk_method: str
    topk_group: int  # groups a token's experts come from (0 without groups)
    routed_scaling_factor: float
    norm_topk_prob: bool
    rope_interleaved: bool  # DeepSeek's own layout; transformers' `false` rotates halves
    yarn: Yarn | None

    @property
    def has_correction_bias(self) -> bool:
        """V3's `e_score_correction_bias`, GGUF `exp_probs_b`: present with noaux_tc routing."""
        return self.topk_method == "noaux_tc"


def yarn_scaling(config: dict) -> Yarn | None:
    """The config's YaRN rope scaling (None when its rope type is not yarn); DeepSeek's and
    gpt-oss's adapters read it alike."""
    if rope_type(config) != "yarn":
        return None
    p = rope_scaling(config)
    if p.get("factor") is None:
        raise UnsupportedModelError("yarn rope scaling without a factor")

    def opt(value) -> float | None:
        return None if value is None else float(value)

    orig = p.get("original_max_position_embeddings") or config_value(
        config, "original_max_position_embeddings")
    return Yarn(float(p["factor"]), int(orig), opt(p.get("extrapolation_factor")),
                opt(p.get("attention_factor", p.get("attn_factor"))), opt(p.get("beta_fast")),
                opt(p.get("beta_slow")), opt(p.get("mscale_all_dim")))


class DeepseekV3Adapter(Adapter):
    model_type = "deepseek_v3"
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    default_scoring_func = "sigmoid"
    default_topk_method = "noaux_tc"
    expert_row_kinds = ("ffn_gate_inp", "exp_probs_b")
    hp: DeepseekHParams

    @classmethod
    def parse(cls, config: dict) -> DeepseekHParams:
        def get(key: str, default=None):
            return config_value(config, key, default=default)

        common = hparams_from_config(config, "moe_intermediate_size")
        rank, rope = int(get("kv_lora_rank")), int(get("qk_rope_head_dim"))
        n_group, n_shared = int(get("n_group", 1)), int(get("n_shared_experts", 0))
        common.update(n_head_kv=1, head_dim=rank + rope, value_dim=rank,
                      dense_ff=int(get("intermediate_size")),
                      shared_ff=n_shared * common["expert_ff"], n_expert_groups=n_group)
        return DeepseekHParams(
            **common,
            kv_lora_rank=rank,
            qk_rope_dim=rope,
            q_lora_rank=int(config.get("q_lora_rank") or 0),  # null in V2-Lite
            qk_nope_dim=int(get("qk_nope_head_dim")),
            v_head_dim=int(get("v_head_dim")),
            n_shared=n_shared,
            n_dense_lead=int(get("first_k_dense_replace", 0)),
            scoring_func=str(get("scoring_func", cls.default_scoring_func)),
            topk_method=str(get("topk_method", cls.default_topk_method)),
            topk_group=int(get("topk_group")) if n_group > 1 else 0,
            routed_scaling_factor=float(get("routed_scaling_factor", 1.0)),
            norm_topk_prob=bool(get("norm_topk_prob", False)),
            rope_interleaved=bool(get("rope_interleave", True)),
            yarn=yarn_scaling(config),
        )

    def check_supported(self) -> None:
        self.refuse_rope_scaling(("default", "yarn"),
                                 "llama.cpp's deepseek2 takes default or yarn")
        self.refuse_more_used_than_experts()
        if int(config_value(self.config, "moe_layer_freq", default=1)) != 1:
            raise UnsupportedModelError(
                "moe_layer_freq != 1 interleaves dense and MoE blocks; llama.cpp's deepseek2 "
                "only has leading dense blocks (first_k_dense_replace)"
            )
        hp = self.hp
        if hp.scoring_func not in _GATING:
            raise UnsupportedModelError(f"scoring_func {hp.scoring_func!r} has no llama.cpp "
                                        f"gating function; known: {', '.join(_GATING)}")
        act = config_value(self.config, "hidden_act", default="silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r}: llama.cpp's deepseek2 uses silu")
        for key in ("attention_bias", "mlp_bias"):
            if self.config.get(key):
                raise UnsupportedModelError(f"{key}=true: llama.cpp's deepseek2 has no such biases")
        if hp.n_expert_groups > 1 and hp.topk_method == "group_limited_greedy":
            # llama.cpp ranks groups by the sum of their top-2 scores (V3's rule); V2's
            # group_limited_greedy ranks them by their best score. Rarely a different pick.
            log.warning("%s: llama.cpp ranks expert groups by top-2 sum, the checkpoint's "
                        "group_limited_greedy by max; routing can differ slightly",
                        self.model_type)

    # ---- GGUF tensors
    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        """Every GGUF tensor llama.cpp's deepseek2 loader creates, in file order.

        The MTP block (layer `num_hidden_layers`) is left out.
        """
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        d, V = hp.n_embd, hp.n_vocab
        specs = [TensorSpec("token_embd.weight", (V, d), "token_embd")]
        for i in range(hp.n_layer):
            specs += self._attention(i)
            specs += self._dense_ffn(i) if i < hp.n_dense_lead else self._moe_ffn(i, E)
        specs += self.head_specs()
        return specs

    def _attention(self, i: int) -> list[TensorSpec]:
        hp = self.hp
        d, H, rank, q_rank = hp.n_embd, hp.n_head, hp.kv_lora_rank, hp.q_lora_rank
        qk_head = hp.qk_nope_dim + hp.qk_rope_dim
        out = [blk_spec(i, "attn_norm", (d,), quantizable=False)]
        if q_rank:
            out += [
                blk_spec(i, "attn_q_a_norm", (q_rank,), quantizable=False),
                blk_spec(i, "attn_kv_a_norm", (rank,), quantizable=False),
                blk_spec(i, "attn_q_a", (q_rank, d)),
                blk_spec(i, "attn_q_b", (H * qk_head, q_rank)),
            ]
        else:
            out += [
                blk_spec(i, "attn_kv_a_norm", (rank,), quantizable=False),
                blk_spec(i, "attn_q", (H * qk_head, d)),
            ]
        return out + [
            blk_spec(i, "attn_kv_a_mqa", (rank + hp.qk_rope_dim, d)),
            # per head: k_b maps a q_nope row into the latent (rows of length qk_nope: 128,
            # not a multiple of 256, so K-quants fall back), v_b maps the latent to v
            blk_spec(i, "attn_k_b", (H, rank, hp.qk_nope_dim)),
            blk_spec(i, "attn_v_b", (H, hp.v_head_dim, rank)),
            blk_spec(i, "attn_output", (d, H * hp.v_head_dim)),
        ]

    def _dense_ffn(self, i: int) -> list[TensorSpec]:
        d, ff = self.hp.n_embd, self.hp.dense_ff
        return [
            blk_spec(i, "ffn_norm", (d,), quantizable=False),
            blk_spec(i, "ffn_gate", (ff, d)),
            blk_spec(i, "ffn_up", (ff, d)),
            blk_spec(i, "ffn_down", (d, ff)),
        ]

    def _moe_ffn(self, i: int, E: int) -> list[TensorSpec]:
        d, ff, sh = self.hp.n_embd, self.hp.expert_ff, self.hp.shared_ff
        out = [
            blk_spec(i, "ffn_norm", (d,), quantizable=False),
            blk_spec(i, "ffn_gate_inp", (E, d), quantizable=False),  # router: F32, as llama.cpp
        ]
        if self.hp.has_correction_bias:
            out.append(blk_spec(i, "exp_probs_b", (E,), quantizable=False, suffix="bias"))
        out += expert_specs(i, E, ff, d)
        if sh:
            out += shared_expert_specs(i, sh, d)
        return out

    def nextn_blocks(self, n_experts_kept: int) -> int:
        """NextN (MTP) blocks written after the trunk: none for V2/V3, as their converter."""
        return 0

    def moe_layers(self) -> list[int]:
        return list(range(self.hp.n_dense_lead, self.hp.n_layer))

    def ignores(self, hf_name: str) -> bool:
        """Also the multi-token-prediction block(s): layers from num_hidden_layers on."""
        m = re.match(r"model\.layers\.(\d+)\.", hf_name)
        return super().ignores(hf_name) or (m is not None and int(m.group(1)) >= self.hp.n_layer)

    def transform_for(self, gguf_name: str):
        if self.hp.rope_interleaved:
            return None
        kind = gguf_name.split(".")[-2]
        if kind in ("attn_q", "attn_q_b"):
            return self._permute_q_rope
        if kind == "attn_kv_a_mqa":
            return self._permute_kv_rope
        return None

    def _permute_q_rope(self, w: np.ndarray) -> np.ndarray:
        """Per head [nope | rope] rows: the rope rows from halves to interleaved pairs."""
        hp = self.hp
        heads = w.reshape(hp.n_head, hp.qk_nope_dim + hp.qk_rope_dim, -1).copy()
        rope = heads[:, hp.qk_nope_dim:]
        flat = rope.reshape(hp.n_head * hp.qk_rope_dim, -1)
        heads[:, hp.qk_nope_dim:] = _rope_permute(flat, hp.n_head).reshape(rope.shape)
        return heads.reshape(w.shape)

    def _permute_kv_rope(self, w: np.ndarray) -> np.ndarray:
        """[latent | k_pe] rows: the shared k_pe rows from halves to interleaved pairs."""
        out = w.copy()
        out[self.hp.kv_lora_rank:] = _rope_permute(w[self.hp.kv_lora_rank:], 1)
        return out

    def derived_recipe(self, spec: TensorSpec, direct: dict[str, str]) -> TensorRecipe | None:
        """attn_k_b / attn_v_b: the per-head halves of HF's kv_b_proj, as llama.cpp splits it.

        kv_b_proj rows are, per head, qk_nope rows of k then v_head_dim rows of v, each a
        vector over the latent (kv_lora_rank). k_b is stored transposed, (head, latent, nope),
        so that llama.cpp multiplies q_nope into the latent ("absorbed" MLA).
        """
        if spec.kind not in ("attn_k_b", "attn_v_b"):
            return None
        kv_b = direct.get(f"blk.{spec.layer}.attn_kv_b.weight")
        if kv_b is None:
            return None
        hp = self.hp
        H, nope, v, rank = hp.n_head, hp.qk_nope_dim, hp.v_head_dim, hp.kv_lora_rank

        def split(w: np.ndarray) -> np.ndarray:
            per_head = w.reshape(H, nope + v, rank)
            if spec.kind == "attn_k_b":
                return per_head[:, :nope, :].transpose(0, 2, 1)
            return per_head[:, nope:, :]

        return TensorRecipe(spec, (kv_b,), transform=split, hf_shape=(H * (nope + v), rank))

    # ---- metadata
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's deepseek2 loader reads, as its own converter writes them."""
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        n_group = hp.n_expert_groups
        if E % n_group:
            raise UnsupportedModelError(
                f"{E} experts cannot be split into the model's {n_group} routing groups"
            )
        w.add_vocab_size(hp.n_vocab)
        w.add_context_length(hp.context_length)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(hp.n_layer + self.nextn_blocks(E))  # V2/V3: MTP block not exported
        w.add_feed_forward_length(hp.dense_ff)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)  # 1: absorbed MLA is MQA over the latent
        w.add_key_length(hp.head_dim)  # kv_lora_rank + qk_rope_dim
        w.add_value_length(hp.value_dim)  # kv_lora_rank
        w.add_key_length_mla(hp.qk_nope_dim + hp.qk_rope_dim)
        w.add_value_length_mla(hp.v_head_dim)
        # 0 means a full-rank attn_q; llama.cpp needs the key unless it guesses a "lite" model
        w.add_q_lora_rank(hp.q_lora_rank)
        w.add_kv_lora_rank(hp.kv_lora_rank)
        w.add_rope_dimension_count(hp.qk_rope_dim)
        w.add_rope_freq_base(hp.rope_theta)
        self._add_rope_scaling(w)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_leading_dense_block_count(hp.n_dense_lead)
        w.add_expert_feed_forward_length(hp.expert_ff)
        w.add_expert_count(E)
        w.add_expert_used_count(min(hp.n_expert_used, E))
        w.add_expert_shared_count(hp.n_shared)
        w.add_expert_weights_scale(hp.routed_scaling_factor)
        w.add_expert_weights_norm(hp.norm_topk_prob)
        w.add_expert_gating_func(_GATING[hp.scoring_func])
        if n_group > 1:
            w.add_expert_group_count(n_group)
            w.add_expert_group_used_count(hp.topk_group)

    def _add_rope_scaling(self, w: gguf.GGUFWriter) -> None:
        """YaRN keys as llama.cpp's converter writes them (both spellings of each key read)."""
        y = self.hp.yarn
        if y is None:
            return
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(y.factor)
        w.add_rope_scaling_orig_ctx_len(y.orig_ctx)
        if y.ext_factor is not None:
            w.add_rope_scaling_yarn_ext_factor(y.ext_factor)
        if y.attn_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(y.attn_factor)
        if y.beta_fast is not None:
            w.add_rope_scaling_yarn_beta_fast(y.beta_fast)
        if y.beta_slow is not None:
            w.add_rope_scaling_yarn_beta_slow(y.beta_slow)
        if y.mscale_all_dim is not None:
            # llama.cpp divides this key by 0.1 for deepseek2 (its converter writes 0.1 * x)
            w.add_rope_scaling_yarn_log_mul(0.1 * y.mscale_all_dim)


class DeepseekV2Adapter(DeepseekV3Adapter):
    """DeepSeek-V2 / V2-Lite: softmax routing, no correction bias, same tensors otherwise.

    `norm_topk_prob` is honoured as DeepSeek's own code does (llama.cpp's expert_weights_norm);
    transformers' DeepseekV2 never renormalises, so the two agree only when it is false, as
    in the published V2 / V2-Lite configs.
    """

    model_type = "deepseek_v2"
    default_scoring_func = "softmax"
    default_topk_method = "greedy"
