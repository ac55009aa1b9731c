"""An adapter for a GGUF source, built from the file's own metadata and tensor list.

A GGUF (F32/F16/BF16/Q8_0, what model pages publish) is already in llama.cpp's layout, so
tensors map to themselves: the only changes an export makes are the types and, when
pruning, the expert axis (stacked `*_exps` tensors, router rows, correction bias). Every
hyperparameter key is copied through with its GGUF type, and so is the tokenizer, verbatim;
only the expert counts are rewritten for a pruned file.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import gguf
from gguf.gguf_writer import GGUFValue

from memory_planner.names import parse_tensor_name
from memory_planner.quant_types import kv_bytes_per_element
from memory_planner.types import TensorSpec

from .base import Adapter, IncompleteCheckpointError, TensorRecipe, UnsupportedModelError
from .hparams import HParams

# Keys not copied: those the exporter writes itself (architecture, name, file type, plan),
# those that described how the source was quantized or split, and the tokenizer, which
# add_tokenizer copies.
_NOT_COPIED_PREFIXES = ("general.architecture", "general.name", "general.file_type",
                        "general.quantization_version", "edgemoe.", "quantize.", "split.",
                        "tokenizer.")

# Non-stacked tensors whose first (numpy) axis is the expert, sliced when pruning.
_EXPERT_ROW_KINDS = ("ffn_gate_inp", "exp_probs_b")


def gguf_hparams(arch_name: str, values: Mapping, shapes: Mapping[str, tuple[int, ...]]
                 ) -> HParams:
    """The hyperparameters of a GGUF from its `{arch}.*` keys (`values`: key -> value) and
    its tensor shapes (which give the FFN widths where the file has the tensors)."""

    def key(suffix: str, default=None, required: bool = True):
        """`{arch}.{suffix}`; arrays (per-layer values) give their maximum."""
        v = values.get(f"{arch_name}.{suffix}")
        if v is None:
            if default is not None or not required:
                return default
            raise UnsupportedModelError(f"the GGUF has no {arch_name}.{suffix}")
        return max(v) if isinstance(v, list) else v

    def width(kind: str, axis: int) -> int | None:
        return next((s[axis] for n, s in shapes.items() if parse_tensor_name(n)[0] == kind), None)

    def optional(suffix: str, cast):
        v = key(suffix, required=False)
        return None if v is None else cast(v)

    n_embd, n_head = int(key("embedding_length")), int(key("attention.head_count"))
    head_dim = int(key("attention.key_length", default=n_embd // n_head))
    expert_ff = width("ffn_up_exps", 1)
    mla = f"{arch_name}.attention.kv_lora_rank" in values
    return HParams(
        n_layer=int(key("block_count")),
        n_embd=n_embd,
        n_head=n_head,
        n_head_kv=int(key("attention.head_count_kv", default=n_head)),
        head_dim=head_dim,
        value_dim=int(key("attention.value_length", default=head_dim)),
        n_vocab=(shapes["token_embd.weight"][0] if "token_embd.weight" in shapes
                 else int(key("vocab_size"))),
        n_expert=int(key("expert_count", default=0)),
        n_expert_used=int(key("expert_used_count", default=0)),
        expert_ff=expert_ff if expert_ff is not None else int(
            key("expert_feed_forward_length", default=key("feed_forward_length"))),
        dense_ff=int(key("feed_forward_length", default=0)),
        shared_ff=width("ffn_up_shexp", 0) or 0,
        n_expert_groups=int(key("expert_group_count", default=1)),
        tied_embeddings="output.weight" not in shapes,
        kv_lora_rank=int(key("attention.kv_lora_rank")) if mla else 0,
        qk_rope_dim=int(key("rope.dimension_count")) if mla else 0,
        context_length=optional("context_length", int),
        rope_theta=optional("rope.freq_base", float),
        rms_eps=optional("attention.layer_norm_rms_epsilon", float),
    )


class GGUFAdapter(Adapter):
    """Any architecture llama.cpp knows, read from a GGUF's metadata (`{arch}.*` keys)."""

    model_type = "gguf"

    def __init__(self, metadata: Mapping[str, GGUFValue], shapes: Mapping[str, tuple[int, ...]]):
        """`metadata`: every key with its GGUF type; `shapes`: tensor name -> numpy shape, in
        file order."""
        self.metadata = dict(metadata)
        self.shapes = {n: tuple(s) for n, s in shapes.items()}
        values = {k: v.value for k, v in self.metadata.items()}
        name = values.get(gguf.Keys.General.ARCHITECTURE)
        if name is None:
            raise UnsupportedModelError("the GGUF has no general.architecture")
        by_name = {v: k for k, v in gguf.MODEL_ARCH_NAMES.items()}
        self.arch = by_name.get(str(name))
        if self.arch is None:
            raise UnsupportedModelError(f"GGUF architecture {str(name)!r} is unknown to "
                                        "the installed gguf-py")
        self.hp = gguf_hparams(self.arch_name, values, self.shapes)
        self.check_supported()

    @classmethod
    def from_source(cls, source) -> GGUFAdapter:
        return cls(source.metadata, {n: source.shape(n) for n in source.names})

    def check_supported(self) -> None:
        hp, arch = self.hp, self.arch_name
        if hp.n_expert <= 0:
            raise UnsupportedModelError(
                f"the GGUF ({arch}) has no {arch}.expert_count: edgemoe exports "
                "mixture-of-experts models")
        if not 0 < hp.n_expert_used <= hp.n_expert:
            raise UnsupportedModelError(f"expert_used_count {hp.n_expert_used} for "
                                        f"{hp.n_expert} experts")

    # ---- GGUF tensors: the file's own, the expert axis resized when pruning
    def _is_expert_axis(self, name: str, shape: tuple[int, ...]) -> bool:
        kind = parse_tensor_name(name)[0]
        return bool(shape) and shape[0] == self.hp.n_expert and (
            kind.endswith("_exps") or kind in _EXPERT_ROW_KINDS)

    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        E = n_experts_kept or self.hp.n_expert
        specs = []
        for name, shape in self.shapes.items():
            kind, layer = parse_tensor_name(name)
            stacked = kind.endswith("_exps") and len(shape) == 3
            if self._is_expert_axis(name, shape):
                shape = (E, *shape[1:])
            # what llama.cpp's converter and llama-quantize keep in F32
            quantizable = (len(shape) >= 2 and name.endswith(".weight")
                           and not kind.startswith("ffn_gate_inp") and not kind.endswith("norm")
                           and kind != "ssm_conv1d")
            specs.append(TensorSpec(name, shape, kind, layer, n_experts=E if stacked else 0,
                                    quantizable=quantizable))
        return specs

    def kv_bytes(self, ctx: int, kv_type: str = "f16") -> int:
        """With `{arch}.attention.recurrent_layers` (hybrid models such as qwen35moe): the KV
        cache of the other blocks plus the recurrent blocks' F32 state for one sequence, sized
        as llama_hparams::n_embd_r / n_embd_s do from the ssm.* keys."""
        values = {k: v.value for k, v in self.metadata.items()}
        recurrent = values.get(f"{self.arch_name}.attention.recurrent_layers")
        if recurrent is None:
            return super().kv_bytes(ctx, kv_type)
        ssm = {k: int(values[f"{self.arch_name}.ssm.{k}"])
               for k in ("conv_kernel", "inner_size", "state_size", "group_count")}
        conv = (ssm["conv_kernel"] - 1) * (ssm["inner_size"]
                                           + 2 * ssm["group_count"] * ssm["state_size"])
        state = sum(map(bool, recurrent)) * (conv + ssm["state_size"] * ssm["inner_size"]) * 4
        hp = self.hp
        n_attn = len(recurrent) - sum(map(bool, recurrent))
        kv = n_attn * hp.n_head_kv * (hp.head_dim + hp.value_dim) * ctx
        return int(round(kv * kv_bytes_per_element(kv_type))) + state

    def moe_layers(self) -> list[int]:
        names = (parse_tensor_name(n) for n in self.shapes)
        return sorted({n.layer for n in names if n.kind == "ffn_gate_inp"})

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

    # ---- metadata: copied through
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """Every key of the source but those the exporter writes, expert counts updated."""
        E = n_experts_kept or self.hp.n_expert
        rewrite = {f"{self.arch_name}.expert_count": E,
                   f"{self.arch_name}.expert_used_count": min(self.hp.n_expert_used, E)}
        for key, v in self.metadata.items():
            if key.startswith(_NOT_COPIED_PREFIXES):
                continue
            w.add_key_value(key, rewrite.get(key, v.value), v.type, v.sub_type)

    def add_tokenizer(self, w: gguf.GGUFWriter, source) -> None:
        """The source's tokenizer.* keys, verbatim."""
        for key, v in self.metadata.items():
            if key.startswith("tokenizer."):
                w.add_key_value(key, v.value, v.type, v.sub_type)
