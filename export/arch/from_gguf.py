"""An adapter for a GGUF source, built from the file's own metadata and tensor list.

A GGUF (F32/F16/BF16/Q8_0, what model pages publish) is already in llama.cpp's layout, so
tensors map to themselves: the only changes an export makes are the types and, when
pruning, the expert axis (stacked `*_exps` tensors, router rows, correction bias). Every
hyperparameter key is copied through with its GGUF type, and so is the tokenizer, verbatim;
only the expert counts are rewritten for a pruned file.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence

import gguf
from gguf.gguf_writer import GGUFValue

from memory_planner.quant_types import kv_bytes_per_element
from memory_planner.types import TensorSpec

from .base import Adapter, IncompleteCheckpointError, TensorRecipe, UnsupportedModelError
from .deepseek2 import DeepseekV3Adapter

_LAYER_RE = re.compile(r"^blk\.(\d+)\.(.+)\.(weight|bias)$")
_PLAIN_RE = re.compile(r"^(.+)\.(weight|bias)$")

# Keys not copied: those the exporter writes itself (architecture, name, file type, plan),
# those that described how the source was quantized or split, and the tokenizer, which
# add_tokenizer copies.
_NOT_COPIED_PREFIXES = ("general.architecture", "general.name", "general.file_type",
                        "general.quantization_version", "edgemoe.", "quantize.", "split.",
                        "tokenizer.")

# Non-stacked tensors whose first (numpy) axis is the expert, sliced when pruning.
_EXPERT_ROW_KINDS = ("ffn_gate_inp", "exp_probs_b")


def _kind(name: str) -> tuple[str, int | None]:
    m = _LAYER_RE.match(name)
    if m:
        return m.group(2), int(m.group(1))
    m = _PLAIN_RE.match(name)
    return (m.group(1) if m else name), None


class GGUFAdapter(Adapter):
    """Any architecture llama.cpp knows, read from a GGUF's metadata (`{arch}.*` keys)."""

    model_type = "gguf"

    def __init__(self, metadata: Mapping[str, GGUFValue], shapes: Mapping[str, tuple[int, ...]]):
        """`metadata`: every key with its GGUF type; `shapes`: tensor name -> numpy shape, in
        file order."""
        self.metadata = dict(metadata)
        self.config = {k: v.value for k, v in self.metadata.items()}
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        name = self.config.get(gguf.Keys.General.ARCHITECTURE)
        if name is None:
            raise UnsupportedModelError("the GGUF has no general.architecture")
        self._arch_name = str(name)
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        self.arch = by_name.get(self._arch_name)
        if self.arch is None:
            raise UnsupportedModelError(f"GGUF architecture {self._arch_name!r} is unknown to "
                                        "the installed gguf-py")
        self.check_supported()

    @classmethod
    def from_source(cls, source) -> GGUFAdapter:
        return cls(source.metadata, {n: source.shape(n) for n in source.names})

    # ---- hyperparameters, from `{arch}.*` keys
    @property
    def arch_name(self) -> str:
        return self._arch_name

    def key(self, suffix: str, default=None):
        """The value of `{arch}.{suffix}`; arrays (per-layer values) give their maximum."""
        v = self.config.get(f"{self._arch_name}.{suffix}")
        if v is None:
            if default is not None:
                return default
            raise UnsupportedModelError(f"the GGUF has no {self._arch_name}.{suffix}")
        return max(v) if isinstance(v, list) else v

    @property
    def n_layer(self) -> int:
        return int(self.key("block_count"))

    @property
    def n_embd(self) -> int:
        return int(self.key("embedding_length"))

    @property
    def n_head(self) -> int:
        return int(self.key("attention.head_count"))

    @property
    def n_head_kv(self) -> int:
        return int(self.key("attention.head_count_kv", default=self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.key("attention.key_length", default=self.n_embd // self.n_head))

    @property
    def value_dim(self) -> int:
        return int(self.key("attention.value_length", default=self.head_dim))

    @property
    def n_vocab(self) -> int:
        if "token_embd.weight" in self.shapes:
            return self.shapes["token_embd.weight"][0]
        return int(self.key("vocab_size"))

    @property
    def n_expert(self) -> int:
        return int(self.key("expert_count", default=0))

    @property
    def n_expert_used(self) -> int:
        return int(self.key("expert_used_count", default=0))

    @property
    def n_expert_groups(self) -> int:
        return int(self.key("expert_group_count", default=1))

    def expert_ff(self) -> int:
        for name, shape in self.shapes.items():
            if _kind(name)[0] == "ffn_up_exps":
                return shape[1]
        return int(self.key("expert_feed_forward_length", default=self.key("feed_forward_length")))

    @property
    def shared_ff(self) -> int:
        for name, shape in self.shapes.items():
            if _kind(name)[0] == "ffn_up_shexp":
                return shape[0]
        return 0

    # ---- DeepSeek-style latent attention (MLA): llama.cpp caches K only
    @property
    def is_mla(self) -> bool:
        return f"{self._arch_name}.attention.kv_lora_rank" in self.config

    @property
    def kv_lora_rank(self) -> int:
        return int(self.key("attention.kv_lora_rank"))

    @property
    def qk_rope_dim(self) -> int:
        return int(self.key("rope.dimension_count"))

    @property
    def n_shared(self) -> int:
        return int(self.key("expert_shared_count", default=0))

    @property
    def dense_ff(self) -> int:
        return int(self.key("feed_forward_length", default=0))

    def check_supported(self) -> None:
        if self.n_expert <= 0:
            raise UnsupportedModelError(
                f"the GGUF ({self._arch_name}) has no {self._arch_name}.expert_count: edgemoe "
                "exports mixture-of-experts models")
        if not 0 < self.n_expert_used <= self.n_expert:
            raise UnsupportedModelError(f"expert_used_count {self.n_expert_used} for "
                                        f"{self.n_expert} experts")

    # ---- GGUF tensors: the file's own, the expert axis resized when pruning
    def _is_expert_axis(self, name: str, shape: tuple[int, ...]) -> bool:
        kind = _kind(name)[0]
        return bool(shape) and shape[0] == self.n_expert and (
            kind.endswith("_exps") or kind in _EXPERT_ROW_KINDS)

    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        E = n_experts_kept or self.n_expert
        specs = []
        for name, shape in self.shapes.items():
            kind, layer = _kind(name)
            stacked = kind.endswith("_exps") and len(shape) == 3
            if self._is_expert_axis(name, shape):
                shape = (E, *shape[1:])
            # what llama.cpp's converter and llama-quantize keep in F32
            quantizable = (len(shape) >= 2 and name.endswith(".weight")
                           and not kind.startswith("ffn_gate_inp") and not kind.endswith("norm"))
            specs.append(TensorSpec(name, shape, kind, layer, n_experts=E if stacked else 0,
                                    quantizable=quantizable))
        return specs

    def moe_layers(self) -> list[int]:
        return sorted({_kind(n)[1] for n in self.shapes if _kind(n)[0] == "ffn_gate_inp"})

    def recipes(self, hf_names: Iterable[str],
                kept_experts: dict[int, Sequence[int]] | None = None) -> list[TensorRecipe]:
        """Each tensor from itself; stacked expert tensors and expert rows follow the kept
        experts."""
        have = set(hf_names)
        kept, E_out = self._kept(kept_experts)
        out, missing = [], []
        for spec in self.tensor_specs(E_out):
            if spec.name not in have:
                missing.append(spec.name)
                continue
            full = self.shapes[spec.name]
            rows = kept.get(spec.layer) if self._is_expert_axis(spec.name, full) else None
            out.append(TensorRecipe(spec, (spec.name,), rows=rows, hf_shape=full,
                                    stacked=bool(spec.n_experts)))
        if missing:
            raise IncompleteCheckpointError(f"the GGUF lacks {len(missing)} tensors: "
                                            + ", ".join(missing[:8]))
        return out

    # ---- memory the runtime needs besides weights
    def kv_bytes(self, ctx: int, kv_type: str = "f16") -> int:
        """K and V rows of every layer; K only for latent attention (MLA)."""
        v = 0 if self.is_mla else self.value_dim
        per_token = self.n_layer * self.n_head_kv * (self.head_dim + v)
        return int(round(per_token * ctx * kv_bytes_per_element(kv_type)))

    def compute_bytes(self, ctx: int, n_ubatch: int = 512) -> int:
        if self.is_mla:  # the DeepSeek adapter's estimate, from the same hyperparameters
            return DeepseekV3Adapter.compute_bytes(self, ctx, n_ubatch)
        return super().compute_bytes(ctx, n_ubatch)

    # ---- metadata: copied through
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """Every key of the source but those the exporter writes, expert counts updated."""
        E = n_experts_kept or self.n_expert
        rewrite = {f"{self._arch_name}.expert_count": E,
                   f"{self._arch_name}.expert_used_count": min(self.n_expert_used, E)}
        for key, v in self.metadata.items():
            if key.startswith(_NOT_COPIED_PREFIXES):
                continue
            w.add_key_value(key, rewrite.get(key, v.value), v.type, v.sub_type)

    def add_tokenizer(self, w: gguf.GGUFWriter, source) -> None:
        """The source's tokenizer.* keys, verbatim."""
        for key, v in self.metadata.items():
            if key.startswith("tokenizer."):
                w.add_key_value(key, v.value, v.type, v.sub_type)
