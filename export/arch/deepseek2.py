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

import gguf
import numpy as np

from memory_planner.quant_types import kv_bytes_per_element
from memory_planner.types import TensorSpec

from .base import Adapter, TensorRecipe, UnsupportedModelError, blk_spec
from .mixtral import _rope_permute

log = logging.getLogger(__name__)

_GATING = {"sigmoid": gguf.ExpertGatingFuncType.SIGMOID,
           "softmax": gguf.ExpertGatingFuncType.SOFTMAX}


class DeepseekV3Adapter(Adapter):
    model_type = "deepseek_v3"
    arch = gguf.MODEL_ARCH.DEEPSEEK2
    default_scoring_func = "sigmoid"
    default_topk_method = "noaux_tc"
    expert_row_kinds = ("ffn_gate_inp", "exp_probs_b")

    # ---- hyperparameters
    @property
    def q_lora_rank(self) -> int | None:
        r = self.config.get("q_lora_rank")
        return int(r) if r else None  # null in V2-Lite: Q is a single full-rank matrix

    @property
    def kv_lora_rank(self) -> int:
        return int(self.cfg("kv_lora_rank"))

    @property
    def qk_nope_dim(self) -> int:
        return int(self.cfg("qk_nope_head_dim"))

    @property
    def qk_rope_dim(self) -> int:
        return int(self.cfg("qk_rope_head_dim"))

    @property
    def v_head_dim(self) -> int:
        return int(self.cfg("v_head_dim"))

    @property
    def n_dense_lead(self) -> int:
        return int(self.cfg("first_k_dense_replace", default=0))

    @property
    def n_shared(self) -> int:
        return int(self.cfg("n_shared_experts", default=0))

    @property
    def dense_ff(self) -> int:
        return int(self.cfg("intermediate_size"))

    @property
    def scoring_func(self) -> str:
        return str(self.cfg("scoring_func", default=self.default_scoring_func))

    @property
    def has_correction_bias(self) -> bool:
        """V3's `e_score_correction_bias`, GGUF `exp_probs_b`: present with noaux_tc routing."""
        return self.cfg("topk_method", default=self.default_topk_method) == "noaux_tc"

    @property
    def rope_params(self) -> dict:
        return self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}

    @property
    def rope_type(self) -> str:
        p = self.rope_params
        return p.get("rope_type") or p.get("type") or "default"

    @property
    def rope_interleaved(self) -> bool:
        """DeepSeek's own layout (pairs); transformers' `rope_interleave: false` rotates halves."""
        return bool(self.cfg("rope_interleave", default=True))

    @property
    def n_expert_groups(self) -> int:
        return int(self.cfg("n_group", default=1))

    def expert_ff(self) -> int:
        return int(self.cfg("moe_intermediate_size"))

    def check_supported(self) -> None:
        if self.rope_type not in ("default", "yarn"):
            raise UnsupportedModelError(
                f"rope scaling {self.rope_type!r} is not supported by edgemoe's {self.model_type} "
                "adapter (llama.cpp's deepseek2 takes default or yarn)"
            )
        if self.n_expert_used > self.n_expert:
            raise UnsupportedModelError(
                f"num_experts_per_tok {self.n_expert_used} > number of experts {self.n_expert}"
            )
        if int(self.cfg("moe_layer_freq", default=1)) != 1:
            raise UnsupportedModelError(
                "moe_layer_freq != 1 interleaves dense and MoE blocks; llama.cpp's deepseek2 "
                "only has leading dense blocks (first_k_dense_replace)"
            )
        if self.scoring_func not in _GATING:
            raise UnsupportedModelError(f"scoring_func {self.scoring_func!r} has no llama.cpp "
                                        f"gating function; known: {', '.join(_GATING)}")
        act = self.cfg("hidden_act", default="silu")
        if act != "silu":
            raise UnsupportedModelError(f"hidden_act {act!r}: llama.cpp's deepseek2 uses silu")
        for key in ("attention_bias", "mlp_bias"):
            if self.config.get(key):
                raise UnsupportedModelError(f"{key}=true: llama.cpp's deepseek2 has no such biases")
        if self.rope_type == "yarn" and self.rope_params.get("factor") is None:
            raise UnsupportedModelError("yarn rope scaling without a factor")
        n_group = self.n_expert_groups
        if n_group > 1 and self.cfg("topk_method", default="") == "group_limited_greedy":
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
        E = n_experts_kept or self.n_expert
        d, V = self.n_embd, self.n_vocab
        specs = [TensorSpec("token_embd.weight", (V, d), "token_embd")]
        for i in range(self.n_layer):
            specs += self._attention(i)
            specs += self._dense_ffn(i) if i < self.n_dense_lead else self._moe_ffn(i, E)
        specs.append(TensorSpec("output_norm.weight", (d,), "output_norm", quantizable=False))
        if not self.tied_embeddings:
            specs.append(TensorSpec("output.weight", (V, d), "output"))
        return specs

    def _attention(self, i: int) -> list[TensorSpec]:
        d, H, rank = self.n_embd, self.n_head, self.kv_lora_rank
        qk_head = self.qk_nope_dim + self.qk_rope_dim
        out = [blk_spec(i, "attn_norm", (d,), quantizable=False)]
        if self.q_lora_rank:
            out += [
                blk_spec(i, "attn_q_a_norm", (self.q_lora_rank,), quantizable=False),
                blk_spec(i, "attn_kv_a_norm", (rank,), quantizable=False),
                blk_spec(i, "attn_q_a", (self.q_lora_rank, d)),
                blk_spec(i, "attn_q_b", (H * qk_head, self.q_lora_rank)),
            ]
        else:
            out += [
                blk_spec(i, "attn_kv_a_norm", (rank,), quantizable=False),
                blk_spec(i, "attn_q", (H * qk_head, d)),
            ]
        return out + [
            blk_spec(i, "attn_kv_a_mqa", (rank + self.qk_rope_dim, d)),
            # per head: k_b maps a q_nope row into the latent (rows of length qk_nope: 128,
            # not a multiple of 256, so K-quants fall back), v_b maps the latent to v
            blk_spec(i, "attn_k_b", (H, rank, self.qk_nope_dim)),
            blk_spec(i, "attn_v_b", (H, self.v_head_dim, rank)),
            blk_spec(i, "attn_output", (d, H * self.v_head_dim)),
        ]

    def _dense_ffn(self, i: int) -> list[TensorSpec]:
        d, ff = self.n_embd, self.dense_ff
        return [
            blk_spec(i, "ffn_norm", (d,), quantizable=False),
            blk_spec(i, "ffn_gate", (ff, d)),
            blk_spec(i, "ffn_up", (ff, d)),
            blk_spec(i, "ffn_down", (d, ff)),
        ]

    def _moe_ffn(self, i: int, E: int) -> list[TensorSpec]:
        d, ff, sh = self.n_embd, self.expert_ff(), self.expert_ff() * self.n_shared
        out = [
            blk_spec(i, "ffn_norm", (d,), quantizable=False),
            blk_spec(i, "ffn_gate_inp", (E, d), quantizable=False),  # router: F32, as llama.cpp
        ]
        if self.has_correction_bias:
            out.append(blk_spec(i, "exp_probs_b", (E,), quantizable=False, suffix="bias"))
        out += [
            blk_spec(i, "ffn_gate_exps", (E, ff, d), n_experts=E),
            blk_spec(i, "ffn_up_exps", (E, ff, d), n_experts=E),
            blk_spec(i, "ffn_down_exps", (E, d, ff), n_experts=E),
        ]
        if sh:
            out += [
                blk_spec(i, "ffn_gate_shexp", (sh, d)),
                blk_spec(i, "ffn_up_shexp", (sh, d)),
                blk_spec(i, "ffn_down_shexp", (d, sh)),
            ]
        return out

    def moe_layers(self) -> list[int]:
        return list(range(self.n_dense_lead, self.n_layer))

    def ignores(self, hf_name: str) -> bool:
        """Also the multi-token-prediction block(s): layers from num_hidden_layers on."""
        m = re.match(r"model\.layers\.(\d+)\.", hf_name)
        return super().ignores(hf_name) or (m is not None and int(m.group(1)) >= self.n_layer)

    def gguf_name(self, tmap: gguf.TensorNameMap, hf_name: str) -> str | None:
        # gguf-py knows the correction bias as "...gate.e_score_correction" + ".bias"
        if hf_name.endswith(".gate.e_score_correction_bias"):
            hf_name = hf_name.removesuffix("_bias") + ".bias"
        return super().gguf_name(tmap, hf_name)

    def transform_for(self, gguf_name: str):
        if self.rope_interleaved:
            return None
        kind = gguf_name.split(".")[-2]
        if kind in ("attn_q", "attn_q_b"):
            return self._permute_q_rope
        if kind == "attn_kv_a_mqa":
            return self._permute_kv_rope
        return None

    def _permute_q_rope(self, w: np.ndarray) -> np.ndarray:
        """Per head [nope | rope] rows: the rope rows from halves to interleaved pairs."""
        heads = w.reshape(self.n_head, self.qk_nope_dim + self.qk_rope_dim, -1).copy()
        rope = heads[:, self.qk_nope_dim:]
        flat = rope.reshape(self.n_head * self.qk_rope_dim, -1)
        heads[:, self.qk_nope_dim:] = _rope_permute(flat, self.n_head).reshape(rope.shape)
        return heads.reshape(w.shape)

    def _permute_kv_rope(self, w: np.ndarray) -> np.ndarray:
        """[latent | k_pe] rows: the shared k_pe rows from halves to interleaved pairs."""
        out = w.copy()
        out[self.kv_lora_rank:] = _rope_permute(w[self.kv_lora_rank:], 1)
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
        H, nope, v, rank = self.n_head, self.qk_nope_dim, self.v_head_dim, self.kv_lora_rank

        def split(w: np.ndarray) -> np.ndarray:
            per_head = w.reshape(H, nope + v, rank)
            if spec.kind == "attn_k_b":
                return per_head[:, :nope, :].transpose(0, 2, 1)
            return per_head[:, nope:, :]

        return TensorRecipe(spec, (kv_b,), transform=split, hf_shape=(H * (nope + v), rank))

    # ---- memory the runtime needs besides weights
    def kv_bytes(self, ctx: int, kv_type: str = "f16") -> int:
        """llama.cpp's MLA cache: one K row of kv_lora_rank + qk_rope per token and layer.

        The cache is K-only (llama_kv_cache allocates no V tensor when is_mla()); V is a
        view of the first kv_lora_rank columns of K.
        """
        per_token = self.n_layer * (self.kv_lora_rank + self.qk_rope_dim)
        return int(round(per_token * ctx * kv_bytes_per_element(kv_type)))

    def compute_bytes(self, ctx: int, n_ubatch: int = 512) -> int:
        """llama.cpp's CPU compute buffer for one micro-batch, without flash attention.

        Absorbed MLA attends with n_head rows of kv_lora_rank + qk_rope (576 for V3) per
        token, so the attention peak is the score matrix and its mask (n_head + 1 rows of
        ctx per token) plus about three latent-width activations (Q, the absorbed q_nope and
        the attention output over the latent). The logits and FFN come after the attention
        buffers are freed, so the peak is the larger of the two, plus residual-stream copies.
        Measured for a V3-width model (2 layers) in llama-cpp-python 0.3.36: 969 MB at ctx
        2048 and 2.59 GB at ctx 8192, where this gives 1.11 GB and 2.74 GB.
        """
        ub = min(n_ubatch, ctx)
        latent = self.n_head * (self.kv_lora_rank + self.qk_rope_dim)
        attention = ub * ctx * (self.n_head + 1) * 4 + ub * latent * 4 * 3
        moe = (self.n_expert_used + self.n_shared) * self.expert_ff()
        ffn = ub * max(self.dense_ff, moe) * 4 * 3 + ub * self.n_expert * 4 * 4
        logits = ub * self.n_vocab * 4
        stream = ub * self.n_embd * 4 * 8
        return max(attention, logits + ffn) + stream

    # ---- metadata
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's deepseek2 loader reads, as its own converter writes them."""
        E = n_experts_kept or self.n_expert
        n_group = int(self.cfg("n_group", default=1))
        if E % n_group:
            raise UnsupportedModelError(
                f"{E} experts cannot be split into the model's {n_group} routing groups"
            )
        w.add_vocab_size(self.n_vocab)
        w.add_context_length(int(self.cfg("max_position_embeddings")))
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layer)  # MTP block not exported: no nextn_predict_layers
        w.add_feed_forward_length(self.dense_ff)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(1)  # absorbed MLA is MQA over the latent
        w.add_key_length(self.kv_lora_rank + self.qk_rope_dim)
        w.add_value_length(self.kv_lora_rank)
        w.add_key_length_mla(self.qk_nope_dim + self.qk_rope_dim)
        w.add_value_length_mla(self.v_head_dim)
        # 0 means a full-rank attn_q; llama.cpp needs the key unless it guesses a "lite" model
        w.add_q_lora_rank(self.q_lora_rank or 0)
        w.add_kv_lora_rank(self.kv_lora_rank)
        w.add_rope_dimension_count(self.qk_rope_dim)
        w.add_rope_freq_base(self.rope_theta)
        self._add_rope_scaling(w)
        w.add_layer_norm_rms_eps(self.rms_eps)
        w.add_leading_dense_block_count(self.n_dense_lead)
        w.add_expert_feed_forward_length(self.expert_ff())
        w.add_expert_count(E)
        w.add_expert_used_count(min(self.n_expert_used, E))
        w.add_expert_shared_count(self.n_shared)
        w.add_expert_weights_scale(float(self.cfg("routed_scaling_factor", default=1.0)))
        w.add_expert_weights_norm(bool(self.cfg("norm_topk_prob", default=False)))
        w.add_expert_gating_func(_GATING[self.scoring_func])
        if n_group > 1:
            w.add_expert_group_count(n_group)
            w.add_expert_group_used_count(int(self.cfg("topk_group")))

    def _add_rope_scaling(self, w: gguf.GGUFWriter) -> None:
        """YaRN keys as llama.cpp's converter writes them (both spellings of each key read)."""
        p = self.rope_params
        if self.rope_type != "yarn":
            return
        orig = p.get("original_max_position_embeddings") or self.cfg(
            "original_max_position_embeddings")
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(float(p["factor"]))
        w.add_rope_scaling_orig_ctx_len(int(orig))
        if p.get("extrapolation_factor") is not None:
            w.add_rope_scaling_yarn_ext_factor(float(p["extrapolation_factor"]))
        attn_factor = p.get("attention_factor", p.get("attn_factor"))
        if attn_factor is not None:
            w.add_rope_scaling_yarn_attn_factor(float(attn_factor))
        if p.get("beta_fast") is not None:
            w.add_rope_scaling_yarn_beta_fast(float(p["beta_fast"]))
        if p.get("beta_slow") is not None:
            w.add_rope_scaling_yarn_beta_slow(float(p["beta_slow"]))
        if p.get("mscale_all_dim") is not None:
            # llama.cpp divides this key by 0.1 for deepseek2 (its converter writes 0.1 * x)
            w.add_rope_scaling_yarn_log_mul(0.1 * float(p["mscale_all_dim"]))


class DeepseekV2Adapter(DeepseekV3Adapter):
    """DeepSeek-V2 / V2-Lite: softmax routing, no correction bias, same tensors otherwise.

    `norm_topk_prob` is honoured as DeepSeek's own code does (llama.cpp's expert_weights_norm);
    transformers' DeepseekV2 never renormalises, so the two agree only when it is false, as
    in the published V2 / V2-Lite configs.
    """

    model_type = "deepseek_v2"
    default_scoring_func = "softmax"
    default_topk_method = "greedy"

