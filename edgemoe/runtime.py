"""The edgemoe runtime: llama-cpp-python's `Llama` with top-any thresholds active.

    from edgemoe import runtime
    llm = runtime.load("model.gguf")                # thresholds from the file's metadata
    llm = runtime.load("model.gguf", top_any=0.3)   # one tau for every MoE layer
    llm = runtime.load("model.gguf", top_any=0)     # plain llama.cpp, no callback at all
    llm("def fib(n):", max_tokens=32)               # completion, as llama_cpp.Llama
    llm.create_chat_completion(messages=[...], stream=True)
    llm.expert_use.experts_per_token                # experts computed per token and layer

`EdgeLlama` is a `llama_cpp.Llama`: completion, chat (the GGUF's chat template), streaming,
sampling and tokenization are llama-cpp-python's. Only the context differs: when any
threshold is above 0 it is built with an eval callback that applies them
(`edgemoe.topany`, `edgemoe.hooks`).
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from . import topany
from .hooks import EvalHooks, attach
from .llamacpp import open_llama


def _llama_class():
    import llama_cpp

    class EdgeLlama(llama_cpp.Llama):
        """A `llama_cpp.Llama` applying top-any thresholds; see `load`."""

        def __init__(self, *, model_path: str, top_any=None, hooks: EvalHooks | None = None,
                     skip_dropped: bool = True, **kwargs):
            super().__init__(model_path=model_path, **kwargs)
            n_layer = int(llama_cpp.llama_model_n_layer(self.model))
            stored, self.top_any_info = topany.read_top_any(model_path)
            tau = topany.parse_spec(top_any, n_layer, stored)
            self.thresholds = np.zeros(n_layer, np.float32) if tau is None else tau
            arch = self.metadata.get("general.architecture", "")
            if self.thresholds.any() and arch in topany.UNSUPPORTED_ARCHS:
                raise ValueError(f"top-any thresholds are not supported for {arch}")
            self.dropper = None
            if self.thresholds.any() or hooks is not None:
                hooks = hooks or EvalHooks()
                self.dropper = topany.TopAny(self.thresholds,
                                             skip=skip_dropped).install(hooks)
                attach(self, hooks)

        @property
        def expert_use(self) -> topany.ExpertUse:
            """Experts seen and kept since load (empty for plain llama.cpp, tau = 0)."""
            return self.dropper.use if self.dropper is not None else topany.ExpertUse()

    return EdgeLlama


_EdgeLlama = None


def load(path: str | Path, top_any: str | float | Sequence[float] | None = None,
         n_ctx: int = 4096, threads: int | None = None, hooks: EvalHooks | None = None,
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
    return open_llama(path, n_ctx=n_ctx, threads=threads, llama_class=_EdgeLlama,
                      top_any=top_any, hooks=hooks, skip_dropped=skip_dropped, **kwargs)


# -- what llama.cpp allocated ----------------------------------------------------------------

class _MapNode(ctypes.Structure):
    """A libstdc++ red-black tree node of std::map<ggml_backend_buffer_type_t,
    llama_memory_breakdown_data> (src/llama-ext.h)."""

    _fields_ = [("color", ctypes.c_int), ("parent", ctypes.c_void_p),
                ("left", ctypes.c_void_p), ("right", ctypes.c_void_p),
                ("key", ctypes.c_void_p), ("model", ctypes.c_size_t),
                ("context", ctypes.c_size_t), ("compute", ctypes.c_size_t)]


class _Map(ctypes.Structure):
    _fields_ = [("compare", ctypes.c_void_p), ("header", ctypes.c_int),
                ("root", ctypes.c_void_p), ("leftmost", ctypes.c_void_p),
                ("rightmost", ctypes.c_void_p), ("count", ctypes.c_size_t)]


def _breakdown(llm) -> list[_MapNode]:
    """The entries of `llama_get_memory_breakdown` for a context: one per buffer type.

    It returns a std::map<ggml_backend_buffer_type_t, llama_memory_breakdown_data> by value
    (llama.cpp's src/llama-ext.h, the numbers behind its own memory report), walked here
    with libstdc++'s layout; `memory_breakdown` checks the sums against llama_model_size, so
    a layout change fails loudly."""
    import llama_cpp

    lib = llama_cpp.llama_cpp._lib
    fn = lib._Z26llama_get_memory_breakdownPK13llama_context
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p]  # hidden return slot, then ctx
    m = _Map()
    fn(ctypes.byref(m), llm.ctx)  # the map's nodes are leaked: a few dozen bytes per call
    if not 0 < m.count < 64:
        raise RuntimeError(f"llama_get_memory_breakdown: {m.count} buffer types? layout changed")
    nodes, todo = [], [m.root]
    while todo:
        p = todo.pop()
        if p:
            nodes.append(_MapNode.from_address(p))
            todo += [nodes[-1].left, nodes[-1].right]
    return nodes


def memory_breakdown(llm) -> dict[str, int]:
    """Bytes llama.cpp allocated for a context: model buffers, context (KV cache) and compute
    buffers, summed over buffer types, plus the logits output buffer."""
    import llama_cpp

    out = {"model": 0, "context": 0, "compute": 0}
    for node in _breakdown(llm):
        out["model"] += node.model
        out["context"] += node.context
        out["compute"] += node.compute
    weights = int(llama_cpp.llama_model_size(llm.model))
    if not weights <= out["model"] < weights + (64 << 20) + weights // 8:
        raise RuntimeError(f"llama_get_memory_breakdown: model buffers {out['model']} bytes "
                           f"for {weights} bytes of weights; layout changed?")
    out["output"] = output_buffer_bytes(llm)
    return out


def model_buffer_types(llm) -> dict[str, int]:
    """The buffer types holding the model's weights ("CPU", "CPU_REPACK", "AMX", ...) and
    their bytes."""
    from .hooks import ggml

    name = ggml().ggml_backend_buft_name
    return {name(n.key).decode(): n.model for n in _breakdown(llm) if n.model}


def output_buffer_bytes(llm, n_outputs: int = 1) -> int:
    """The logits buffer llama.cpp keeps for `n_outputs` tokens (llama_context::
    output_reserve: n_vocab floats per output; `logits_all` contexts grow it to n_batch)."""
    rows = llm.n_batch if llm._logits_all else n_outputs
    return 4 * llm.n_vocab() * max(rows, 1)


def peak_rss_bytes() -> int:
    """The process's peak resident set size (VmHWM)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0
