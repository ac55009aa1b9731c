"""gpt-oss (HF `gpt_oss`) -> GGUF arch `gpt-oss`.

Attention: Q/K/V/O with biases, a learned per-head sink logit (`attn_sinks`, F32), NEOX rope
with YaRN, and sliding-window layers alternating with full ones, starting with a window
layer (llama.cpp's default pattern for the arch; its converter writes no pattern key).
Routing: the router (with a bias) picks the top-k logits and softmaxes over those k only
(llama.cpp's SOFTMAX_WEIGHT gating). Experts: a clamped SwiGLU (alpha 1.702, limit 7, both
hard-coded in llama.cpp), with biases on gate, up and down.

HF ships the experts stacked, one tensor per projection: `gate_up_proj` [E, d, 2 ff] with
gate and up *interleaved* along the last axis (gate = even columns), `down_proj` [E, ff, d],
both (in x out), transposed here to GGUF's (out x in); or, in the release, as MXFP4
`*_blocks` / `*_scales` in (out x in) orientation, which the source dequantizes (a plan that
keeps MXFP4 for the experts writes the same values back: ggml's MXFP4 reproduces every
shipped block exactly). Biases: `gate_up_proj_bias` [E, 2 ff] (interleaved too) and
`down_proj_bias` [E, d]; they are 2-D (expert x width) and follow the kept experts when
pruning, as the router rows and bias do.

The KV cache: full layers hold the context, window layers `n_swa + n_ubatch` cells rounded up
to 256 (llama_kv_cache_iswa, with `swa_full` off as llama-server and llama-cli run it).
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass

import gguf

from memory_planner.quant_types import kv_bytes_per_element
from memory_planner.types import TensorSpec

from .base import Adapter, TensorRecipe, UnsupportedModelError, blk_spec
from .deepseek2 import Yarn, yarn_scaling
from .hparams import HParams, config_value, hparams_from_config

log = logging.getLogger(__name__)

# what llama.cpp's LLM_FFN_SWIGLU_OAI_MOE hard-codes (src/llama-graph.cpp)
LLAMA_SWIGLU_ALPHA, LLAMA_SWIGLU_LIMIT = 1.702, 7.0
KV_PAD = 256  # llama.cpp pads the context and the window caches to 256 cells
N_UBATCH = 512  # llama.cpp's default micro-batch, part of a window cache's size

_EXPERT_TENSOR = re.compile(r"model\.layers\.(\d+)\.mlp\.experts\.(gate_up_proj|down_proj)"
                            r"(_blocks|_bias)?$")
_EXPERT_KIND = {"gate": "ffn_gate_exps", "up": "ffn_up_exps", "down": "ffn_down_exps"}


@dataclass(frozen=True, kw_only=True)
class GptOssHParams(HParams):
    n_swa: int  # sliding window of the window layers
    swa_layers: tuple[bool, ...]  # per layer: a window layer
    yarn: Yarn | None


def _pad(n: int, to: int = KV_PAD) -> int:
    return -(-n // to) * to


class GptOssAdapter(Adapter):
    model_type = "gpt_oss"
    arch = gguf.MODEL_ARCH.GPT_OSS
    expert_ff_key = "intermediate_size"
    expert_row_kinds = ("ffn_gate_inp", *_EXPERT_KIND.values())  # router + expert biases
    extra_types = ("MXFP4",)
    hp: GptOssHParams
    per_block_fields = ("swa_layers",)
    block_period = 2  # llama.cpp: window attention in even blocks

    @classmethod
    def parse(cls, config: dict) -> GptOssHParams:
        common = hparams_from_config(config, cls.expert_ff_key)
        n = common["n_layer"]
        types = config.get("layer_types") or [
            "sliding_attention" if i % 2 == 0 else "full_attention" for i in range(n)]
        return GptOssHParams(
            **common, qkv_bias=True,
            n_swa=int(config_value(config, "sliding_window")),
            swa_layers=tuple(t == "sliding_attention" for t in types),
            yarn=yarn_scaling(config),
        )

    def check_supported(self) -> None:
        self.refuse_rope_scaling(("default", "yarn"), "llama.cpp's gpt-oss takes default or yarn")
        self.refuse_more_used_than_experts()
        hp, c = self.hp, self.config
        pattern = tuple(i % 2 == 0 for i in range(hp.n_layer))
        if hp.swa_layers != pattern:
            raise UnsupportedModelError(
                "gpt_oss layer_types other than sliding/full alternating from layer 0: "
                "llama.cpp's gpt-oss assumes that pattern (the converter writes no other)")
        for key, want in (("swiglu_alpha", LLAMA_SWIGLU_ALPHA),
                          ("swiglu_limit", LLAMA_SWIGLU_LIMIT)):
            if float(c.get(key, want)) != want:
                raise UnsupportedModelError(f"gpt_oss with {key}={c[key]}: llama.cpp "
                                            f"hard-codes {want}")
        if hp.yarn is not None and (c.get("rope_parameters") or c.get("rope_scaling") or {}).get(
                "truncate") is False:
            # the release's setting: llama.cpp rounds YaRN's correction range outwards, as
            # transformers does with truncate=true; logits differ by ~1e-4 relative
            log.info("gpt_oss YaRN truncate=false: llama.cpp always truncates the correction "
                     "range; its logits differ slightly from transformers' (any GGUF)")
        if c.get("attention_bias") is False:
            raise UnsupportedModelError("gpt_oss without attention biases: llama.cpp's "
                                        "gpt-oss requires them")

    # ---- GGUF tensors
    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        d, ff, H = hp.n_embd, hp.expert_ff, hp.n_head
        qd, kvd = H * hp.head_dim, hp.n_head_kv * hp.head_dim
        specs = [TensorSpec("token_embd.weight", (hp.n_vocab, d), "token_embd")]
        for i in range(hp.n_layer):
            specs.append(blk_spec(i, "attn_norm", (d,), quantizable=False))
            for kind, rows, cols in (("attn_q", qd, d), ("attn_k", kvd, d), ("attn_v", kvd, d),
                                     ("attn_output", d, qd)):
                specs += [blk_spec(i, kind, (rows, cols)),
                          blk_spec(i, kind, (rows,), quantizable=False, suffix="bias")]
            specs += [
                blk_spec(i, "attn_sinks", (H,), quantizable=False),
                blk_spec(i, "post_attention_norm", (d,), quantizable=False),
                blk_spec(i, "ffn_gate_inp", (E, d), quantizable=False),
                blk_spec(i, "ffn_gate_inp", (E,), quantizable=False, suffix="bias"),
            ]
            for kind, shape in (("ffn_gate_exps", (ff, d)), ("ffn_up_exps", (ff, d)),
                                ("ffn_down_exps", (d, ff))):
                specs += [blk_spec(i, kind, (E, *shape), n_experts=E),
                          blk_spec(i, kind, (E, shape[0]), quantizable=False, suffix="bias")]
        specs.append(TensorSpec("output_norm.weight", (d,), "output_norm", quantizable=False))
        specs.append(TensorSpec("output.weight", (hp.n_vocab, d), "output"))
        return specs

    def gguf_name(self, tmap: gguf.TensorNameMap, hf_name: str) -> str | None:
        """The stacked expert tensors get a placeholder, "blk.N.hf.<what>", that
        `derived_recipe` splits; the sinks have no .weight suffix in HF."""
        m = _EXPERT_TENSOR.match(hf_name)
        if m:
            return f"blk.{m.group(1)}.hf.{m.group(2)}{m.group(3) or ''}"
        if hf_name.endswith(".self_attn.sinks"):
            hf_name += ".weight"
        return super().gguf_name(tmap, hf_name)

    def derived_recipe(self, spec: TensorSpec, direct: dict[str, str]) -> TensorRecipe | None:
        """Expert weights and biases from HF's stacked (and, for gate/up, fused) tensors."""
        what = next((w for w, k in _EXPERT_KIND.items() if k == spec.kind), None)
        if what is None:
            return None
        hp = self.hp
        E, d, ff = hp.n_expert, hp.n_embd, hp.expert_ff
        fused = what != "down"
        hf = f"blk.{spec.layer}.hf.{'gate_up_proj' if fused else 'down_proj'}"
        half = slice(0 if what == "gate" else 1, None, 2) if fused else slice(None)
        width = 2 * ff if fused else d
        if spec.name.endswith(".bias"):
            if hf + "_bias" not in direct:
                return None
            rows = None if spec.shape[0] == E else self._kept_ids(spec)
            return TensorRecipe(spec, (direct[hf + "_bias"],), rows=rows,
                                transform=lambda b: b[..., half], hf_shape=(E, width))
        if hf + "_blocks" in direct:  # MXFP4: dequantized (out x in) already
            name = direct[hf + "_blocks"]
            hf_shape = (E, width, d) if fused else (E, d, ff)
            transform = (lambda w: w[half]) if fused else None
        elif hf in direct:  # BF16 / F32: (in x out)
            name = direct[hf]
            hf_shape = (E, d, width) if fused else (E, ff, d)
            transform = (lambda w: w.T[half]) if fused else (lambda w: w.T)
        else:
            return None
        return TensorRecipe(spec, (name,), rows=self._kept_ids(spec), transform=transform,
                            hf_shape=hf_shape, stacked=True)

    def _kept_ids(self, spec: TensorSpec) -> tuple[int, ...] | None:
        """The source experts of a pruned layer (set by `recipes` for this call)."""
        ids = self._pruned.get(spec.layer) if self._pruned else None
        return tuple(ids) if ids is not None else None

    _pruned: dict[int, tuple[int, ...]] | None = None

    def recipes(self, hf_names, kept_experts=None):
        # derived_recipe needs the kept experts of the layer, which base.recipes keeps local
        self._pruned = {int(k): tuple(v) for k, v in (kept_experts or {}).items()}
        try:
            return super().recipes(hf_names, kept_experts)
        finally:
            self._pruned = None

    def shipped_types(self) -> dict[str, str]:
        """The release's experts are MXFP4: ggml's MXFP4 reproduces them exactly."""
        quant = (self.config.get("quantization_config") or {}).get("quant_method")
        return dict.fromkeys(_EXPERT_KIND.values(), "MXFP4") if quant == "mxfp4" else {}

    # ---- memory
    def kv_bytes(self, ctx: int, kv_type: str = "f16") -> int:
        """Full layers cache the (padded) context; window layers n_swa + one micro-batch,
        padded to 256 cells, at most the context (llama_kv_cache_iswa)."""
        hp = self.hp
        full = _pad(ctx)
        window = min(full, _pad(hp.n_swa + N_UBATCH))
        cells = sum(window if swa else full for swa in hp.swa_layers)
        per_cell = hp.n_head_kv * (hp.head_dim + hp.value_dim)
        return int(round(cells * per_cell * kv_bytes_per_element(kv_type)))

    # ---- metadata
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys llama.cpp's converter writes for GptOssForCausalLM."""
        hp = self.hp
        self.add_common_metadata(w, n_experts_kept)
        w.add_feed_forward_length(hp.dense_ff)
        w.add_key_length(hp.head_dim)
        w.add_value_length(hp.head_dim)
        w.add_sliding_window(hp.n_swa)
        w.add_expert_feed_forward_length(hp.expert_ff)
        y = hp.yarn
        if y is not None:
            w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
            w.add_rope_scaling_factor(y.factor)
            w.add_rope_scaling_orig_ctx_len(y.orig_ctx)
            for value, add in ((y.ext_factor, w.add_rope_scaling_yarn_ext_factor),
                               (y.attn_factor, w.add_rope_scaling_yarn_attn_factor),
                               (y.beta_fast, w.add_rope_scaling_yarn_beta_fast),
                               (y.beta_slow, w.add_rope_scaling_yarn_beta_slow)):
                if value is not None:
                    add(value)

