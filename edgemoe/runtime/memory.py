"""Memory: what llama.cpp allocated for a context, by buffer kind, and the process's own.

`memory_breakdown` reads llama.cpp's own numbers (`llama_get_memory_breakdown`, behind its
memory report); `peak_rss_bytes` and `rss_bytes` read the kernel's.
"""

from __future__ import annotations

import ctypes
from pathlib import Path


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


def _breakdown(ctx) -> list[_MapNode]:
    """The entries of `llama_get_memory_breakdown` for a context (a llama_context pointer):
    one per buffer type.

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
    fn(ctypes.byref(m), ctx)  # the map's nodes are leaked: a few dozen bytes per call
    if not 0 < m.count < 64:
        raise RuntimeError(f"llama_get_memory_breakdown: {m.count} buffer types? layout changed")
    nodes, todo = [], [m.root]
    while todo:
        p = todo.pop()
        if p:
            nodes.append(_MapNode.from_address(p))
            todo += [nodes[-1].left, nodes[-1].right]
    return nodes


def buffer_sums(ctx) -> dict[str, int]:
    """llama_get_memory_breakdown of a context pointer summed over buffer types: bytes of
    "model" (weights), "context" (KV cache, recurrent state) and "compute" buffers."""
    out = {"model": 0, "context": 0, "compute": 0}
    for node in _breakdown(ctx):
        out["model"] += node.model
        out["context"] += node.context
        out["compute"] += node.compute
    return out


HOST_BUFFERS = ("CPU", "CPU_Mapped")  # weight buffers that are not repacked copies


def memory_breakdown(llm) -> dict[str, int]:
    """Bytes llama.cpp allocated for a context: model buffers, context (KV cache) and compute
    buffers, summed over buffer types, plus the logits output buffer: "model" counts the
    weights once, "repacked" the copies beside them.

    Where llama.cpp repacks some weights for this CPU (CPU_REPACK: Q4_K on an AMD EPYC
    with AVX2, say) and maps the file, the mapped buffer spans every tensor and the
    repacked ones are copied into a buffer of their own: model buffers = weights +
    repacked. The mapped pages of the repacked tensors are read once while loading and
    never again: the page cache's to drop."""
    import llama_cpp

    out = buffer_sums(llm.ctx)
    weights = int(llama_cpp.llama_model_size(llm.model))
    extra = sum(n for name, n in model_buffer_types(llm).items() if name not in HOST_BUFFERS)
    # copies when the host buffers span every weight (a mapped file), else a part of them
    repacked = extra if out["model"] - extra >= weights else 0
    if not weights <= out["model"] - repacked < weights + (64 << 20) + weights // 8:
        raise RuntimeError(f"llama_get_memory_breakdown: model buffers {out['model']} bytes "
                           f"({extra} in extra buffer types) for {weights} bytes of "
                           "weights; layout changed?")
    out.update(model=out["model"] - repacked, repacked=repacked,
               output=output_buffer_bytes(llm))
    return out


def model_buffer_types(llm) -> dict[str, int]:
    """The buffer types holding the model's weights ("CPU", "CPU_REPACK", "AMX", ...) and
    their bytes."""
    from ..calibration.nodes import ggml

    name = ggml().ggml_backend_buft_name
    return {name(n.key).decode(): n.model for n in _breakdown(llm.ctx) if n.model}


def output_buffer_bytes(llm, n_outputs: int = 1) -> int:
    """The logits buffer llama.cpp keeps for `n_outputs` tokens (llama_context::
    output_reserve: n_vocab floats per output; `logits_all` contexts grow it to n_batch)."""
    rows = llm.n_batch if llm._logits_all else n_outputs
    return logits_bytes(llm.n_vocab(), rows)


def logits_bytes(n_vocab: int, rows: int = 1) -> int:
    """llama.cpp's output buffer for `rows` outputs: n_vocab F32 logits each (at least one
    row: output_reserve sizes it for max(n_outputs, n_seq_max))."""
    return 4 * n_vocab * max(rows, 1)


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
