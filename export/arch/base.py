"""What every architecture adapter shares: HF names to GGUF names, expert stacking, specs.

An adapter is built from a config.json dict alone, so that it can list the GGUF tensors
(shapes included) before any weight is read; `recipes()` then binds those tensors to the
HF tensors of a real checkpoint, checking that every expert of every layer is there. The
config is parsed once, into `adapter.hp` (export.arch.hparams.HParams); the refusals of
config options llama.cpp cannot reproduce read the config itself.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import re
from collections.abc import Iterable, Sequence
from typing import ClassVar

import gguf
import numpy as np

from memory_planner.quant_types import kv_bytes_per_element
from memory_planner.types import TensorSpec

from ..tokenizer import add_tokenizer
from .hparams import HParams, UnsupportedModelError, hparams_from_config, rope_type
from .recipe import TensorRecipe, Transform

log = logging.getLogger(__name__)


class IncompleteCheckpointError(ValueError):
    """Tensors the architecture needs are missing from the checkpoint."""


def blk_spec(i: int, kind: str, shape: tuple[int, ...], quantizable: bool = True,
             suffix: str = "weight", n_experts: int = 0) -> TensorSpec:
    """The spec of tensor `kind` of block i: "blk.{i}.{kind}.{suffix}"."""
    return TensorSpec(f"blk.{i}.{kind}.{suffix}", tuple(shape), kind, i, n_experts=n_experts,
                      quantizable=quantizable)


def expert_specs(i: int, n_expert: int, expert_ff: int, d: int) -> list[TensorSpec]:
    """Block i's stacked routed experts: gate, up (n_expert, expert_ff, d) and down."""
    E, ff = n_expert, expert_ff
    return [blk_spec(i, "ffn_gate_exps", (E, ff, d), n_experts=E),
            blk_spec(i, "ffn_up_exps", (E, ff, d), n_experts=E),
            blk_spec(i, "ffn_down_exps", (E, d, ff), n_experts=E)]


def shared_expert_specs(i: int, shared_ff: int, d: int) -> list[TensorSpec]:
    """Block i's shared expert: gate, up (shared_ff, d) and down."""
    return [blk_spec(i, "ffn_gate_shexp", (shared_ff, d)),
            blk_spec(i, "ffn_up_shexp", (shared_ff, d)),
            blk_spec(i, "ffn_down_shexp", (d, shared_ff))]


def _rope_permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Reorder each head's rows from [first half | second half] (HF's rotate-half rope) to
    interleaved pairs (llama.cpp's normal rope), as llama.cpp's converter does."""
    rows = w.shape[0]
    return (w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:])
             .swapaxes(1, 2).reshape(w.shape))


_EXPERT_RE = re.compile(r"^(.*\.experts)\.(\d+)\.(.+?)(\.weight)?$")


class Adapter:
    """Base class: one subclass per HF `model_type`, in a module of its own."""

    model_type: ClassVar[str]
    arch: ClassVar[gguf.MODEL_ARCH]
    # HF tensors that carry no weights llama.cpp needs (e.g. cached rotary tables)
    ignored_tensors: ClassVar[tuple[str, ...]] = (r".*rotary_emb\.inv_freq$",)
    # non-stacked tensors whose first axis is the expert: their rows follow the kept experts
    expert_row_kinds: ClassVar[tuple[str, ...]] = ("ffn_gate_inp",)
    # the config key of the routed experts' FFN width
    expert_ff_key: ClassVar[str] = "moe_intermediate_size"
    # candidate types beside the planner's ladder (gpt-oss: MXFP4, its experts' own type)
    extra_types: ClassVar[tuple[str, ...]] = ()
    # hyperparameters holding one entry per block (`blocks` slices them)
    per_block_fields: ClassVar[tuple[str, ...]] = ()
    # llama.cpp derives a block's structure from its index modulo this (gpt-oss: window
    # attention at even indices): a model of some blocks only starts at a multiple of it
    block_period: ClassVar[int] = 1
    # llama.cpp's graph runs on input embeddings (llama_batch.embd) instead of tokens: a
    # model of later blocks can then run on the residual stream of earlier ones
    takes_input_embeddings: ClassVar[bool] = True

    def __init__(self, config: dict):
        self.config = config
        self.hp = self.parse(config)
        self.check_supported()

    @classmethod
    def parse(cls, config: dict) -> HParams:
        """The hyperparameters from config.json; families add or override fields."""
        return HParams(**hparams_from_config(config, cls.expert_ff_key))

    # the hyperparameters the pipeline reads from an adapter (all of them: `hp`)
    n_layer = property(lambda self: self.hp.n_layer)
    n_vocab = property(lambda self: self.hp.n_vocab)
    n_expert = property(lambda self: self.hp.n_expert)
    n_expert_used = property(lambda self: self.hp.n_expert_used)
    n_expert_groups = property(lambda self: self.hp.n_expert_groups)

    @property
    def arch_name(self) -> str:
        return gguf.MODEL_ARCH_NAMES[self.arch]

    # ---- refusals of config options llama.cpp cannot reproduce
    def check_supported(self) -> None:
        """Raise UnsupportedModelError for config options llama.cpp cannot reproduce."""
        self.refuse_rope_scaling()
        self.refuse_more_used_than_experts()

    def refuse_rope_scaling(self, allowed: tuple[str, ...] = ("default",), why: str = "") -> None:
        """Refuse rope scaling other than `allowed`; `why` says what llama.cpp takes."""
        kind = rope_type(self.config)
        if kind not in allowed:
            said = f"by edgemoe's {self.model_type} adapter"
            raise UnsupportedModelError(f"rope scaling {kind!r} is not supported "
                                        + (f"{said} ({why})" if why else f"yet {said}"))

    def refuse_more_used_than_experts(self) -> None:
        if self.hp.n_expert_used > self.hp.n_expert:
            raise UnsupportedModelError(f"num_experts_per_tok {self.hp.n_expert_used} > number "
                                        f"of experts {self.hp.n_expert}")

    def refuse_topk_norm(self, llama_renormalises: bool) -> None:
        """Refuse a `norm_topk_prob` that is not what llama.cpp hard-codes for the arch."""
        if bool(self.config.get("norm_topk_prob", False)) != llama_renormalises:
            raise UnsupportedModelError(
                f"{self.model_type} with norm_topk_prob={str(not llama_renormalises).lower()}: "
                f"llama.cpp's {self.arch_name} {'always' if llama_renormalises else 'never'} "
                "renormalises the top-k routing weights, so its output would differ from the "
                "checkpoint")

    def refuse_dense_layers(self) -> None:
        """Refuse dense blocks between MoE ones (Qwen's mlp_only_layers / decoder_sparse_step)."""
        if self.config.get("mlp_only_layers") or self.config.get("decoder_sparse_step", 1) != 1:
            raise UnsupportedModelError(
                f"{self.model_type} with dense layers (mlp_only_layers / decoder_sparse_step) "
                "has no llama.cpp equivalent")

    # ---- GGUF tensors
    def tensor_specs(self, n_experts_kept: int | None = None) -> list[TensorSpec]:
        """Every GGUF tensor, from the config alone, in file order."""
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        d, hd, ff = hp.n_embd, hp.head_dim, hp.expert_ff
        specs = [TensorSpec("token_embd.weight", (hp.n_vocab, d), "token_embd")]
        for i in range(hp.n_layer):
            specs += [
                TensorSpec(f"blk.{i}.{kind}.weight", shape, kind, i, quantizable=q)
                for kind, shape, q in self.layer_tensors(i, d, hd, ff, E)
            ]
            specs += expert_specs(i, E, ff, d)
        specs += self.head_specs()
        return specs

    def head_specs(self) -> list[TensorSpec]:
        """The output norm and, unless the embeddings are tied, the output head."""
        hp = self.hp
        out = [TensorSpec("output_norm.weight", (hp.n_embd,), "output_norm", quantizable=False)]
        if not hp.tied_embeddings:
            out.append(TensorSpec("output.weight", (hp.n_vocab, hp.n_embd), "output"))
        return out

    def layer_tensors(self, i: int, d: int, hd: int, ff: int, n_expert: int):
        """(kind, shape, quantizable) of the non-expert tensors of block i."""
        qd, kvd = self.hp.n_head * hd, self.hp.n_head_kv * hd
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
        """The GGUF name of a (non-expert) HF tensor; subclasses add spellings gguf-py lacks.
        The routers' correction bias (DeepSeek-V3, GLM-4.x, MiniMax-M2) gguf-py knows as
        "...e_score_correction" + ".bias"."""
        if hf_name.endswith(".e_score_correction_bias"):
            hf_name = hf_name.removesuffix("_bias") + ".bias"
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
        tmap = gguf.get_tensor_name_map(self.arch, self.hp.n_layer + self.hp.n_nextn)
        direct: dict[str, str] = {}  # gguf name -> hf name
        experts: dict[str, dict[int, str]] = {}  # gguf stacked name -> expert id -> hf name
        unknown = []
        for name in hf_names:
            if self.ignores(name):
                continue
            m = _EXPERT_RE.match(name)
            if m:
                base = f"{m.group(1)}.{m.group(3)}"
                gname = self.gguf_name(tmap, base)
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
            ids = kept.get(spec.layer, tuple(range(self.hp.n_expert))) if spec.layer is not None \
                else None
            if (derived := self.derived_recipe(spec, direct)) is not None:
                out.append(derived)  # e.g. one half of a fused HF tensor
            elif spec.n_experts:
                have = experts.get(spec.name, {})
                lack = [e for e in range(self.hp.n_expert) if e not in have]
                if lack:
                    missing.append(f"{spec.name} experts {_ranges(lack)}")
                    continue
                names = tuple(have[e] for e in ids)
                out.append(TensorRecipe(spec, names, transform=self.transform_for(spec.name)))
            elif spec.name in direct:
                rows = hf_shape = None
                if spec.kind in self.expert_row_kinds and E_out != self.hp.n_expert:
                    rows, hf_shape = ids, (self.hp.n_expert, *spec.shape[1:])
                out.append(TensorRecipe(spec, (direct[spec.name],), rows=rows,
                                        transform=self.transform_for(spec.name),
                                        hf_shape=hf_shape))
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
            bad = [e for e in ids if not 0 <= e < self.hp.n_expert]
            if bad or len(set(ids)) != len(ids):
                raise ValueError(f"layer {i}: kept experts {list(ids)} must be distinct ids "
                                 f"below {self.hp.n_expert}")
        E = n_kept.pop() if n_kept else self.hp.n_expert
        G = self.hp.n_expert_groups
        if kept and E % G:
            raise ValueError(f"{E} experts per layer cannot be split into the model's {G} "
                             f"routing groups: keep a multiple of {G}")
        if kept and G > 1:
            size = self.hp.n_expert // G
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
        return list(range(self.hp.n_layer))

    def blocks(self, start: int, stop: int) -> Adapter:
        """This adapter for a model of blocks [start, stop) only, renumbered from 0 (a
        calibration segment, `edgemoe.calibration.segments`): per-block hyperparameters
        sliced, leading dense blocks counted within the segment, no NextN blocks."""
        hp = self.hp
        if not 0 <= start < stop <= hp.n_layer or start % self.block_period:
            raise ValueError(f"blocks [{start}, {stop}) of {hp.n_layer}: a segment starts at "
                             f"a multiple of {self.block_period}")
        changes = {"n_layer": stop - start, "n_nextn": 0}
        changes.update({f: getattr(hp, f)[start:stop] for f in self.per_block_fields})
        if hasattr(hp, "n_dense_lead"):
            changes["n_dense_lead"] = min(max(hp.n_dense_lead - start, 0), stop - start)
        seg = copy.copy(self)
        seg.hp = dataclasses.replace(hp, **changes)
        return seg

    def shipped_types(self) -> dict[str, str]:
        """Tensor kinds the checkpoint ships in a GGUF type, losslessly re-quantizable to it
        (gpt-oss's MXFP4 experts): their damage at that type is zero. Default: none."""
        return {}

    # ---- memory the runtime needs besides weights: fallback formulas. pipeline.make_budget
    # asks llama.cpp itself (edgemoe.runtime.simulate, exact for every architecture the
    # pinned llama.cpp loads) and uses these only where it cannot.
    def kv_bytes(self, ctx: int, kv_type: str = "f16") -> int:
        """llama.cpp's KV cache for `ctx` tokens: K and V rows of every layer.

        With latent attention (MLA: one KV head of kv_lora_rank + qk_rope_dim) the cache is
        K-only (llama_kv_cache allocates no V tensor when is_mla()); V is a view of the first
        kv_lora_rank columns of K.
        """
        hp = self.hp
        v = 0 if hp.is_mla else hp.value_dim
        per_token = hp.n_layer * hp.n_head_kv * (hp.head_dim + v)
        return int(round(per_token * ctx * kv_bytes_per_element(kv_type)))

    def compute_bytes(self, ctx: int, n_ubatch: int = 512) -> int:
        """A generous estimate of llama.cpp's CPU compute buffer for one micro-batch, without
        flash attention.

        The largest live tensors of a forward pass: F32 logits, the attention score matrix,
        the expert FFN activations and a few residual-stream copies. Absorbed MLA attends
        with n_head rows of kv_lora_rank + qk_rope (576 for V3) per token, so its attention
        peak is the score matrix and its mask (n_head + 1 rows of ctx per token) plus about
        three latent-width activations (Q, the absorbed q_nope and the attention output over
        the latent); the logits and FFN come after the attention buffers are freed, so the
        peak is the larger of the two, plus residual-stream copies. Measured for a V3-width
        model (2 layers) in llama-cpp-python 0.3.36: 969 MB at ctx 2048 and 2.59 GB at ctx
        8192, where this gives 1.11 GB and 2.74 GB.
        """
        hp = self.hp
        ub = min(n_ubatch, ctx)
        logits = ub * hp.n_vocab * 4
        moe = hp.n_expert_used * hp.expert_ff + hp.shared_ff
        if hp.is_mla:
            latent = hp.n_head * (hp.kv_lora_rank + hp.qk_rope_dim)
            attention = ub * ctx * (hp.n_head + 1) * 4 + ub * latent * 4 * 3
            ffn = ub * max(hp.dense_ff, moe) * 4 * 3 + ub * hp.n_expert * 4 * 4
            return max(attention, logits + ffn) + ub * hp.n_embd * 4 * 8
        scores = ub * ctx * hp.n_head * 4
        ffn = ub * moe * 4 * 3 + ub * hp.n_expert * 4 * 4
        stream = ub * max(hp.n_embd, hp.n_head * hp.head_dim) * 4 * 8
        return logits + scores + ffn + stream

    # ---- metadata
    def add_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None) -> None:
        """Hyperparameter keys llama.cpp reads for this architecture."""
        raise NotImplementedError

    def add_common_metadata(self, w: gguf.GGUFWriter, n_experts_kept: int | None = None,
                            n_blocks: int | None = None) -> None:
        """The keys every MoE architecture here writes alike: sizes, heads, rope base, norm
        epsilon, and the expert counts (after pruning). `n_blocks`: the block count, when
        the file has blocks beyond the trunk's `n_layer` (NextN)."""
        hp = self.hp
        E = n_experts_kept or hp.n_expert
        w.add_context_length(hp.context_length)
        w.add_embedding_length(hp.n_embd)
        w.add_block_count(n_blocks or hp.n_layer)
        w.add_head_count(hp.n_head)
        w.add_head_count_kv(hp.n_head_kv)
        w.add_rope_freq_base(hp.rope_theta)
        w.add_layer_norm_rms_eps(hp.rms_eps)
        w.add_expert_count(E)
        w.add_expert_used_count(min(hp.n_expert_used, E))

    def add_tokenizer(self, w: gguf.GGUFWriter, source) -> None:
        """The tokenizer keys: from the HF checkpoint's tokenizer files by default."""
        add_tokenizer(w, source.path, vocab_size=self.hp.n_vocab)


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
