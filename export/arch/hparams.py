"""An architecture's hyperparameters as one frozen record, parsed once per adapter.

HF adapters fill it from config.json (`hparams_from_config` reads both spellings of a key,
and a multimodal config's `text_config`); the GGUF adapter from the file's `{arch}.*` keys
and tensor shapes. Everything after parsing (tensor shapes, KV cache and compute buffer
sizes, metadata) reads the record, never the config again.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or an option edgemoe cannot export."""


@dataclass(frozen=True, kw_only=True)
class HParams:
    """The sizes llama.cpp sees, for every architecture here."""

    n_layer: int
    n_embd: int
    n_head: int
    n_head_kv: int
    head_dim: int  # K width per head (llama.cpp's key_length)
    value_dim: int  # V width per head (value_length)
    n_vocab: int
    n_expert: int
    n_expert_used: int
    expert_ff: int  # width of one routed expert's FFN
    dense_ff: int = 0  # width of a dense FFN (feed_forward_length)
    shared_ff: int = 0  # width of the always-active shared expert(s) (0: none)
    # routing groups of group-limited routing (DeepSeek-V3: 8); 1 when there are none.
    # llama.cpp splits the experts of a file into this many equal groups, in order, so a
    # pruned file must keep a multiple of it, ideally the same number from each group
    n_expert_groups: int = 1
    tied_embeddings: bool = False
    # NextN / multi-token-prediction blocks written after the trunk (blk.{n_layer}...), as
    # the family's converter writes them; llama.cpp's decode neither runs nor caches them
    n_nextn: int = 0
    qkv_bias: bool = False  # Q, K and V carry biases (Qwen2)
    # latent attention (DeepSeek MLA), 0 without: llama.cpp caches K only, one row of
    # kv_lora_rank + qk_rope_dim per token and layer
    kv_lora_rank: int = 0
    qk_rope_dim: int = 0
    # written as metadata by HF adapters; None where a GGUF source lacks the key (the
    # GGUF adapter copies the source's metadata as it is)
    context_length: int | None = None
    rope_theta: float | None = None
    rms_eps: float | None = None

    @property
    def is_mla(self) -> bool:
        return self.kv_lora_rank > 0


def config_value(config: Mapping, *keys: str, default=None):
    """The first of `keys` present in the config (or its text_config); `default` if none
    is (raises when there is no default)."""
    for src in (config, config.get("text_config") or {}):
        for k in keys:
            if k in src and src[k] is not None:
                return src[k]
    if default is not None:
        return default
    raise UnsupportedModelError(f"config.json has none of {', '.join(keys)}")


def rope_scaling(config: Mapping) -> dict:
    """The rope scaling parameters under either spelling (transformers 5 or earlier)."""
    return dict(config.get("rope_parameters") or config.get("rope_scaling") or {})


def rope_type(config: Mapping) -> str:
    p = rope_scaling(config)
    return p.get("rope_type") or p.get("type") or "default"


def hparams_from_config(config: Mapping, expert_ff_key: str) -> dict:
    """The fields of `HParams` every HF config spells alike (as keyword arguments, for a
    family to complete or override); `expert_ff_key` names the routed experts' width."""
    c = config
    n_embd = int(config_value(c, "hidden_size"))
    n_head = int(config_value(c, "num_attention_heads"))
    head_dim = int(config_value(c, "head_dim", default=n_embd // n_head))
    expert_ff = int(config_value(c, expert_ff_key))
    theta = (c.get("rope_parameters") or {}).get("rope_theta")
    return dict(
        n_layer=int(config_value(c, "num_hidden_layers")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(config_value(c, "num_key_value_heads", default=n_head)),
        head_dim=head_dim,
        value_dim=head_dim,
        n_vocab=int(config_value(c, "vocab_size")),
        n_expert=int(config_value(c, "num_experts", "num_local_experts", "n_routed_experts")),
        n_expert_used=int(config_value(c, "num_experts_per_tok")),
        expert_ff=expert_ff,
        dense_ff=int(config_value(c, "intermediate_size", default=expert_ff)),
        tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        context_length=int(config_value(c, "max_position_embeddings")),
        rope_theta=float(theta or config_value(c, "rope_theta", default=10000.0)),
        rms_eps=float(config_value(c, "rms_norm_eps")),
    )
