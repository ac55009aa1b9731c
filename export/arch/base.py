"""What every architecture adapter shares: HF names to GGUF names, expert stacking, specs.

An adapter is built from a config.json dict alone, so that it can list the GGUF tensors
(shapes included) before any weight is read; `recipes()` then binds those tensors to the
HF tensors of a real checkpoint, checking that every expert of every layer is there.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import ClassVar

import gguf
import numpy as np

from memory_planner.quant_types import kv_bytes_per_element
from memory_planner.types import TensorSpec

from ..tokenizer import add_tokenizer

log = logging.getLogger(__name__)


class UnsupportedModelError(ValueError):
    """The checkpoint uses an architecture or an option edgemoe cannot export."""


class IncompleteCheckpointError(ValueError):
    """Tensors the architecture needs are missing from the checkpoint."""


Transform = Callable[[np.ndarray], np.ndarray]


@dataclass(frozen=True)
class TensorRecipe:
    """How to build one GGUF tensor from source tensors.

    Stacked expert tensors come either from one source tensor per output expert (`hf_names`
    holds one name per expert, in output order: HF checkpoints) or, with `stacked`, from one
    stacked source tensor whose first axis is the expert (a GGUF source); `rows` then names
    the source expert of each output expert. For other tensors `hf_names` is a single name
    and `rows` selects rows of its first axis (router rows, correction-bias entries of kept
    experts). `transform` is applied to each loaded slice (rope permutation, the split of a
    fused tensor); `hf_shape` is the shape the source tensor must have when it is not the
    GGUF tensor's own.
    """

    spec: TensorSpec
    hf_names: tuple[str, ...]
    rows: tuple[int, ...] | None = None
    transform: Transform | None = None
    hf_shape: tuple[int, ...] | None = None
    stacked: bool = False

    @property
    def source_shape(self) -> tuple[int, ...]:
        """The shape each source tensor named in `hf_names` must have."""
        if self.hf_shape is not None:
            return tuple(self.hf_shape)
        if self.spec.n_experts and not self.stacked:
            return tuple(self.spec.shape[1:])
        return tuple(self.spec.shape)

    def load(self, source) -> np.ndarray:
        """The whole GGUF tensor as float32, in GGUF (numpy) orientation."""
        if self.spec.n_experts:
            return np.stack([self.load_expert(source, e) for e in range(self.spec.n_experts)])
        a = source.load(self.hf_names[0], self.rows)
        if self.transform is not None:
            a = self.transform(a)
        return np.ascontiguousarray(a, dtype=np.float32)

    def load_rows(self, source, rows: np.ndarray) -> np.ndarray:
        """Rows `rows` (sorted) of a non-expert GGUF tensor as float32; only those are read
        from disk unless a transform needs the whole tensor."""
        if self.spec.n_experts or self.transform is not None:
            return self.load(source)[rows]
        picked = rows if self.rows is None else np.asarray(self.rows)[rows]
        a = source.load(self.hf_names[0], tuple(int(i) for i in picked))
        return np.ascontiguousarray(a, dtype=np.float32)

    def load_expert(self, source, e: int) -> np.ndarray:
        """Expert slice `e` (output numbering) of a stacked tensor, 2-D float32."""
        if self.stacked:
            a = source.load(self.hf_names[0], e if self.rows is None else self.rows[e])
        else:
            a = source.load(self.hf_names[e])
        if self.transform is not None:
            a = self.transform(a)
        return np.ascontiguousarray(a, dtype=np.float32)


def blk_spec(i: int, kind: str, shape: tuple[int, ...], quantizable: bool = True,
             suffix: str = "weight", n_experts: int = 0) -> TensorSpec:
    """The spec of tensor `kind` of block i: "blk.{i}.{kind}.{suffix}"."""
    return TensorSpec(f"blk.{i}.{kind}.{suffix}", tuple(shape), kind, i, n_experts=n_experts,
                      quantizable=quantizable)


_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(.+?)(\.weight)?$")


class Adapter:
    """Base class: one subclass per HF `model_type`, in a module of its own."""

    model_type: ClassVar[str]
    arch: ClassVar[gguf.MODEL_ARCH]
    # HF tensors that carry no weights llama.cpp needs (e.g. cached rotary tables)
    ignored_tensors: ClassVar[tuple[str, ...]] = (r".*rotary_emb\.inv_freq$",)
    # non-stacked tensors whose first axis is the expert: their rows follow the kept experts
    expert_row_kinds: ClassVar[tuple[str, ...]] = ("ffn_gate_inp",)

    def __init__(self, config: dict):
        self.config = config
        self.check_supported()

    # ---- hyperparameters; subclasses override where the config spells things differently
    def cfg(self, *keys: str, default=None):
        """The first of `keys` present in the config (or its text_config)."""
        for src in (self.config, self.config.get("text_config") or {}):
            for k in keys:
                if k in src and src[k] is not None:
                    return src[k]
        if default is not None:
            return default
        raise UnsupportedModelError(f"config.json has none of {', '.join(keys)}")

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    @property
    def n_layer(self) -> int:
        return int(self.cfg("num_hidden_layers"))

    @property
    def n_embd(self) -> int:
        return int(self.cfg("hidden_size"))

    @property
    def n_head(self) -> int:
        return int(self.cfg("num_attention_heads"))

    @property
    def n_head_kv(self) -> int:
        return int(self.cfg("num_key_value_heads", default=self.n_head))

    @property
    def head_dim(self) -> int:
        return int(self.cfg("head_dim", default=self.n_embd // self.n_head))

    @property
    def n_vocab(self) -> int:
        return int(self.cfg("vocab_size"))

    @property
    def n_expert(self) -> int:
        return int(self.cfg("num_experts", "num_local_experts", "n_routed_experts"))

    @property
    def n_expert_used(self) -> int:
        return int(self.cfg("num_experts_per_tok"))

    @property
    def rope_theta(self) -> float:
        params = self.config.get("rope_parameters") or {}
        return float(params.get("rope_theta") or self.cfg("rope_theta", default=10000.0))

    @property
    def rms_eps(self) -> float:
        return float(self.cfg("rms_norm_eps"))

    @property
    def n_expert_groups(self) -> int:
        """Routing groups of group-limited routing (DeepSeek-V3: 8); 1 when there are none.
        llama.cpp splits the experts of a file into this many equal groups, in order, so a
        pruned file must keep a multiple of it, ideally the same number from each group."""
        return 1

    @property
    def shared_ff(self) -> int:
        """Width of the always-active shared expert(s) beside the routed ones (0: none)."""
        return 0

    @property
    def tied_embeddings(self) -> bool:
        return bool(self.config.get("tie_word_embeddings", False))

    def check_supported(self) -> None:
        """Raise UnsupportedModelError for config options llama.cpp cannot reproduce."""
        params = self.config.get("rope_parameters") or self.config.get("rope_scaling") or {}
        rope_type = params.get("rope_type") or params.get("type") or "default"
        if rope_type != "default":
            raise UnsupportedModelError(
                f"rope scaling {rope_type!r} is not supported yet by edgemoe's {self.model_type} "
                "adapter"
            )
        if self.n_expert_used > self.n_expert:
            raise UnsupportedModelError(
                f"num_experts_per_tok {self.n_expert_used} > number of experts {self.n_expert}"
            )

    # ---- GGUF tensors
    def expert_ff(self) -> int:
        raise NotImplementedError

    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        """Every GGUF tensor, from the config alone, in file order."""
        E = n_experts_kept or self.n_expert
        d, hd, ff = self.n_embd, self.head_dim, self.expert_ff()
        specs = [TensorSpec("token_embd.weight", (self.n_vocab, d), "token_embd")]
        for i in range(self.n_layer):
            specs += [
                TensorSpec(f"blk.{i}.{kind}.weight", shape, kind, i, quantizable=q)
                for kind, shape, q in self.layer_tensors(i, d, hd, ff, E)
            ]
            specs += [
                TensorSpec(f"blk.{i}.{kind}.weight", (E, *shape), kind, i, n_experts=E)
                for kind, shape in (
                    ("ffn_gate_exps", (ff, d)), ("ffn_up_exps", (ff, d)), ("ffn_down_exps", (d, ff))
                )
            ]
        specs.append(TensorSpec("output_norm.weight", (d,), "output_norm", quantizable=False))
        if not self.tied_embeddings:
            specs.append(TensorSpec("output.weight", (self.n_vocab, d), "output"))
        return specs

    def layer_tensors(self, i: int, d: int, hd: int, ff: int, n_expert: int):
        """(kind, shape, quantizable) of the non-expert tensors of block i."""
        qd, kvd = self.n_head * hd, self.n_head_kv * hd
        return [
            ("attn_norm", (d,), False),
            ("attn_q", (qd, d), True),
            ("attn_k", (kvd, d), True),
            ("attn_v", (kvd, d), True),
            ("attn_output", (d, qd), True),
            ("ffn_norm", (d,), False),
            ("ffn_gate_inp", (n_expert, d), False),  # the router stays F32, as in llama.cpp
        ]

    def transform_for(self, gguf_name: str) -> Transform | None:
        """A per-slice transform of the HF weights for this GGUF tensor (default: none)."""
        return None

    def ignores(self, hf_name: str) -> bool:
        """True for HF tensors that are not exported (cached tables, extra prediction heads)."""
        return any(re.match(p, hf_name) for p in self.ignored_tensors)

    def gguf_name(self, tmap: gguf.TensorNameMap, hf_name: str) -> str | None:
        """The GGUF name of a (non-expert) HF tensor; subclasses add spellings gguf-py lacks."""
        return tmap.get_name(hf_name, try_suffixes=(".weight", ".bias"))

    def derived_recipe(self, spec: TensorSpec, direct: dict[str, str]) -> TensorRecipe | None:
        """A recipe for a GGUF tensor that no HF tensor is named after (e.g. one half of a
        fused HF tensor); `direct` maps GGUF names to HF names. Default: none."""
        return None

    def recipes(self, hf_names: Iterable[str],
                kept_experts: dict[int, Sequence[int]] | None = None) -> list[TensorRecipe]:
        """Bind every GGUF tensor to its HF tensors; raise if anything is missing.

        `kept_experts` maps a layer to the source expert ids it keeps (pruning); layers not
        named keep all experts.
        """
        tmap = gguf.get_tensor_name_map(self.arch, self.n_layer)
        direct: dict[str, str] = {}  # gguf name -> hf name
        experts: dict[str, dict[int, str]] = {}  # gguf stacked name -> expert id -> hf name
        unknown = []
        for name in hf_names:
            if self.ignores(name):
                continue
            m = _EXPERT_RE.match(name)
            if m:
                base = f"{m.group(1)}.{m.group(3)}"
                gname = tmap.get_name(base)
                if gname is not None:
                    experts.setdefault(gname + ".weight", {})[int(m.group(2))] = name
                    continue
            gname = self.gguf_name(tmap, name)
            if gname is None:
                unknown.append(name)
            else:
                direct[gname] = name
        if unknown:
            raise UnsupportedModelError(
                f"{len(unknown)} tensors have no GGUF name for {self.arch_name}: "
                + ", ".join(unknown[:8]) + (" ..." if len(unknown) > 8 else "")
            )

        kept, E_out = self._kept(kept_experts)
        out, missing = [], []
        for spec in self.tensor_specs(E_out):
            ids = kept.get(spec.layer, tuple(range(self.n_expert))) if spec.layer is not None \
                else None
            if spec.n_experts:
                have = experts.get(spec.name, {})
                lack = [e for e in range(self.n_expert) if e not in have]
                if lack:
                    missing.append(f"{spec.name} experts {_ranges(lack)}")
                    continue
                names = tuple(have[e] for e in ids)
                out.append(TensorRecipe(spec, names, transform=self.transform_for(spec.name)))
            elif spec.name in direct:
                rows = hf_shape = None
                if spec.kind in self.expert_row_kinds and E_out != self.n_expert:
                    rows, hf_shape = ids, (self.n_expert, *spec.shape[1:])
                out.append(TensorRecipe(spec, (direct[spec.name],), rows=rows,
                                        transform=self.transform_for(spec.name),
                                        hf_shape=hf_shape))
            elif (derived := self.derived_recipe(spec, direct)) is not None:
                out.append(derived)
            else:
                missing.append(spec.name)
        if missing:
            raise IncompleteCheckpointError(
                f"the checkpoint lacks {len(missing)} tensors {self.arch_name} needs: "
                + "; ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
            )
        return out

    def _kept(self, kept_experts: dict[int, Sequence[int]] | None
              ) -> tuple[dict[int, tuple[int, ...]], int]:
        """Kept expert ids per layer (checked) and the number of experts the file will have."""
        kept = {int(i): tuple(int(e) for e in kept_experts[i]) for i in (kept_experts or {})}
        n_kept = {len(v) for v in kept.values()}
        if len(n_kept) > 1 or (n_kept and len(kept) != len(self.moe_layers())):
            raise ValueError("pruning must keep the same number of experts in every MoE layer")
        for i, ids in kept.items():
            if i not in self.moe_layers():
                raise ValueError(f"layer {i} has no experts to prune")
            bad = [e for e in ids if not 0 <= e < self.n_expert]
            if bad or len(set(ids)) != len(ids):
                raise ValueError(f"layer {i}: kept experts {list(ids)} must be distinct ids "
                                 f"below {self.n_expert}")
        E = n_kept.pop() if n_kept else self.n_expert
        G = self.n_expert_groups
        if kept and E % G:
            raise ValueError(f"{E} experts per layer cannot be split into the model's {G} "
                             f"routing groups: keep a multiple of {G}")
        if kept and G > 1:
            size = self.n_expert // G
            for i, ids in kept.items():
                per_group = [sum(1 for e in ids if e // size == g) for g in range(G)]
                if set(per_group) != {E // G} or list(ids) != sorted(ids):
                    # llama.cpp regroups the kept experts in order: the groups change
                    log.warning("layer %d keeps %s experts of its %d routing groups (or out of "
                                "order): group-limited routing will see other groups", i,
                                per_group, G)
        return kept, E

    def moe_layers(self) -> list[int]:
        """Blocks with routed experts (all of them, unless the architecture has dense ones)."""
        return list(range(self.n_layer))

    # ---- memory the runtime needs besides weights
    def kv_bytes(self, ctx: int, kv_type: str = "f16") -> int:
        """llama.cpp's KV cache for `ctx` tokens: K and V rows of every layer."""
        per_token = self.n_layer * self.n_head_kv * (self.head_dim + self.head_dim)
        return int(round(per_token * ctx * kv_bytes_per_element(kv_type)))

    def compute_bytes(self, ctx: int, n_ubatch: int = 512) -> int:
        """A generous estimate of llama.cpp's CPU compute buffer for one micro-batch.

        The largest live tensors of a forward pass: F32 logits, the attention score matrix
        (no flash attention), the expert FFN activations and a few residual-stream copies.
        """
        ub = min(n_ubatch, ctx)
        logits = ub * self.n_vocab * 4
        scores = ub * ctx * self.n_head * 4
        ffn = ub * (self.n_expert_used * self.expert_ff() + self.shared_ff) * 4 * 3 \
            + ub * self.n_expert * 4 * 4
        stream = ub * max(self.n_embd, self.n_head * self.head_dim) * 4 * 8
        return logits + scores + ffn + stream

    # ---- metadata
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """Hyperparameter keys llama.cpp reads for this architecture."""
        raise NotImplementedError

    def add_common_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """The keys every MoE architecture here writes alike: sizes, heads, rope base, norm
        epsilon, and the expert counts (after pruning)."""
        E = n_experts_kept or self.n_expert
        w.add_context_length(int(self.cfg("max_position_embeddings")))
        w.add_embedding_length(self.n_embd)
        w.add_block_count(self.n_layer)
        w.add_head_count(self.n_head)
        w.add_head_count_kv(self.n_head_kv)
        w.add_rope_freq_base(self.rope_theta)
        w.add_layer_norm_rms_eps(self.rms_eps)
        w.add_expert_count(E)
        w.add_expert_used_count(min(self.n_expert_used, E))

    def add_tokenizer(self, w: gguf.GGUFWriter, source) -> None:
        """The tokenizer keys: from the HF checkpoint's tokenizer files by default."""
        add_tokenizer(w, source.path, vocab_size=self.n_vocab)


def _ranges(ids: list[int]) -> str:
    """[0,1,2,5] -> "0-2, 5"."""
    parts, start = [], None
    for k, e in enumerate(ids):
        if start is None:
            start = e
        if k + 1 == len(ids) or ids[k + 1] != e + 1:
            parts.append(f"{start}-{e}" if e != start else f"{e}")
            start = None
    return ", ".join(parts)
