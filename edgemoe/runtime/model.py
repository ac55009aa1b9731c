"""The edgemoe runtime: llama-cpp-python's `Llama` with top-any thresholds active.

    from edgemoe.runtime.model import load
    llm = load("model.gguf")                        # thresholds from the file's metadata
    llm = load("model.gguf", top_any=0.3)           # one tau for every MoE layer
    llm = load("model.gguf", top_any=0)             # plain llama.cpp, no callback at all
    llm("def fib(n):", max_tokens=32)               # completion, as llama_cpp.Llama
    llm.create_chat_completion(messages=[...], stream=True)
    llm.expert_use.experts_per_token                # experts computed per token and layer
    llm("def fib(n):")["usage"]["experts_per_token"]  # the same, for one completion

`EdgeLlama` is a `llama_cpp.Llama`: completion, chat (the GGUF's chat template), streaming,
sampling and tokenization are llama-cpp-python's. Only the context differs: when any
threshold is above 0 it is built with an eval callback that applies them
(`edgemoe.runtime.topany`, `edgemoe.calibration.hooks`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np

import memory_planner as mp
from export.gguf_io import read_plan
from memory_planner.types import DEFAULT_CTX, DEFAULT_KV_TYPE

from ..calibration.hooks import EvalHooks, attach
from ..llamacpp import open_llama
from . import topany, topany_metadata


def _llama_class():
    import llama_cpp

    class EdgeLlama(llama_cpp.Llama):
        """A `llama_cpp.Llama` applying top-any thresholds; see `load`."""

        def __init__(self, *, model_path: str, top_any=None, hooks: EvalHooks | None = None,
                     skip_dropped: bool = True, **kwargs):
            super().__init__(model_path=model_path, **kwargs)
            n_layer = int(llama_cpp.llama_model_n_layer(self.model))
            stored, self.top_any_info = topany_metadata.read_top_any(model_path)
            tau = topany_metadata.parse_spec(top_any, n_layer, stored)
            self.thresholds = np.zeros(n_layer, np.float32) if tau is None else tau
            arch = self.metadata.get("general.architecture", "")
            topany.check_supported(arch, self.thresholds)
            self.dropper = None
            if self.thresholds.any() or hooks is not None:
                hooks = hooks or EvalHooks()
                self.dropper = topany.TopAny(
                    self.thresholds, skip=skip_dropped,
                    logits=arch in topany.LOGIT_WEIGHT_ARCHS).install(hooks)
                attach(self, hooks)

        @property
        def expert_use(self) -> topany.ExpertUse:
            """Experts seen and kept since load (empty for plain llama.cpp, tau = 0)."""
            return self.dropper.use if self.dropper is not None else topany.ExpertUse()

        def create_completion(self, *args, **kwargs):
            """`llama_cpp.Llama.create_completion`; a non-streamed result's `usage` also
            holds `experts_per_token`: experts computed per token and MoE layer over the
            tokens this call evaluated (when expert use is counted: see `expert_use`)."""
            before = self.expert_use.snapshot()
            result = super().create_completion(*args, **kwargs)
            if self.dropper is not None and isinstance(result, dict):  # not a stream
                used = self.expert_use.since(before)
                result["usage"]["experts_per_token"] = round(used.experts_per_token, 4)
            return result

    return EdgeLlama


_EdgeLlama = None


def kv_type_id(kv_type: str) -> int:
    """ggml type of a KV cache type name (f16, q8_0, ...)."""
    try:
        return int(gguf.GGMLQuantizationType[mp.quant_types.KV_TYPES[kv_type.lower()]])
    except KeyError:
        raise ValueError(f"unknown KV cache type {kv_type!r}: "
                         f"{', '.join(mp.quant_types.KV_TYPES)}") from None


@dataclass(frozen=True)
class RunSettings:
    """How a file runs: context length, KV cache type, and the batch sizes and flash
    attention its plan's compute buffers are for (None: llama-cpp-python's defaults)."""

    ctx: int
    kv_type: str
    batches: dict | None = None  # n_batch, n_ubatch, flash_attn

    def llama_kwargs(self) -> dict:
        """`load`'s keyword arguments (`llama_cpp.Llama`'s) for these settings."""
        t = kv_type_id(self.kv_type)
        return {"n_ctx": self.ctx, "type_k": t, "type_v": t, **(self.batches or {})}


def planned_settings(path: str | Path, ctx: int | None = None, kv_type: str | None = None,
                     plan: mp.MemoryPlan | None = None) -> RunSettings:
    """The settings that run `path` within the memory its plan was made for (edgemoe's
    export stores the plan in the file; `plan`: that plan, already read): its context
    length and KV cache type unless `ctx` or `kv_type` are given, its batch sizes and flash
    attention. A file without a plan runs at `ctx` (default `DEFAULT_CTX`) and `kv_type`
    (default f16)."""
    plan = plan or read_plan(path)
    b = plan.budget if plan is not None else None
    if b is None:
        return RunSettings(ctx or DEFAULT_CTX, kv_type or DEFAULT_KV_TYPE)
    return RunSettings(ctx or b.ctx, kv_type or b.kv_type,
                       {"n_batch": b.n_batch, "n_ubatch": b.n_ubatch,
                        "flash_attn": b.flash_attn})


def load(path: str | Path, top_any: str | float | Sequence[float] | None = None,
         n_ctx: int = DEFAULT_CTX, threads: int | None = None, hooks: EvalHooks | None = None,
         skip_dropped: bool = True, **kwargs):
    """Open a GGUF on the CPU as an `EdgeLlama` (a `llama_cpp.Llama`).

    `top_any`: None uses the thresholds stored in the file (none: plain llama.cpp); a float
    is one tau for every MoE layer, a sequence one per block, 0 or "off" plain llama.cpp.
    `hooks` adds your own eval handlers (the callback is then installed even at tau = 0).
    `skip_dropped=False` keeps dropped slots in the expert matmuls (pointing at the top
    expert: no weight bytes read, but their FLOPs spent); the results are identical.
    Other keyword arguments go to `llama_cpp.Llama`.
    """
    global _EdgeLlama
    if _EdgeLlama is None:
        _EdgeLlama = _llama_class()
    kwargs.setdefault("logits_all", False)
    # window layers (gpt-oss) cache their window, as planned and as llama-server runs them
    kwargs.setdefault("swa_full", False)
    return open_llama(path, n_ctx=n_ctx, threads=threads, llama_class=_EdgeLlama,
                      top_any=top_any, hooks=hooks, skip_dropped=skip_dropped, **kwargs)
