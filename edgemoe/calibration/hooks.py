"""Read and rewrite llama.cpp graph nodes while a model runs: a layer over `cb_eval`.

llama.cpp calls a context's eval callback for every node of its compute graph, first to ask
whether the node is wanted and, for the wanted ones, again once the node is computed and
before any later node runs. A handler can then read the node, or write it back and so change
everything computed after it. This module turns that into handlers registered by node name.

Usage::

    from edgemoe.calibration.hooks import EvalHooks, attach, moe_routing

    counts = np.zeros((n_layer, n_expert), np.int64)

    def on_weights(node):                      # node: a Node, valid during the call only
        r = moe_routing(node)                  # ids and weights, (n_tokens, k) each
        np.add.at(counts[node.layer], r.ids.ravel(), 1)

    hooks = EvalHooks()
    hooks.add("ffn_moe_weights", on_weights)           # every layer
    hooks.add("ffn_moe_probs", on_probs, layers=[3])   # (n_tokens, n_expert) via node.matrix()
    hooks.add("ffn_norm", on_input)                    # the experts' input rows (imatrix)
    hooks.add("ffn_moe_down", on_out)                  # expert outputs [n_embd, k, n_tokens]
    llm = attach(open_llama(path, logits_all=True), hooks)   # any llama_cpp.Llama
    llm.eval(tokens)                                   # handlers run inside; errors re-raised

Names are llama.cpp's own (src/llama-graph.cpp `build_moe_ffn`, the model builders in
src/models/): a layer's node is `<name>-<layer>`; nodes without a layer (`result_output`)
are matched by the bare name. Matching is exact: `ffn_moe_weights-5 (reshaped)` is another
node. `hooks.record_names = True` collects every name seen, to discover what a model offers.
A registered name that never occurs raises HookError after the first decode (unless added
with `required=False`), so a llama.cpp that renames its nodes fails loudly. `add(...,
when=pred)` asks `pred(layer)` just before the node runs (False: no handler, no graph split);
`add_cleanup(fn)` runs `fn()` after every decode (to undo edits to graph structures).

`Node` gives `name`, `kind`, `layer`, ggml `type`/`type_name`, `ne` (ggml order),
`read()` (a 4-D numpy copy in numpy order, `ne[::-1]`, respecting strides), `matrix()`
(the same as rows of `ne[0]`), `write(values)` (back into the graph, strides respected) and
`src(i)` (the node's i-th operand, e.g. `ffn_moe_weights`' src(1) is `ffn_moe_topk`).
During a decode through an attached context, `hooks.batch` is (position of the batch's first
token, number of tokens), so rows can be mapped to positions.

Things to know when collecting statistics:
- In the last layer llama.cpp drops the rows of tokens whose logits are not requested before
  the FFN, so run with `logits_all=True` (every token an output) to see every token there.
- `ffn_moe_weights` holds router probabilities gathered at the selected experts *before*
  renormalisation; `ffn_moe_topk` is an I32 strided view of `ffn_moe_argsort`.
- Each wanted node splits the graph computation there: a few wanted nodes per layer cost
  little, but asking for a node between two ops ggml fuses (RMS_NORM + MUL) unfuses them.
- Handlers run on the thread calling `llama_decode`, between graph pieces; an exception is
  kept and re-raised when the decode returns (the rest of that graph is computed unchanged).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import gguf
import numpy as np

log = logging.getLogger(__name__)

GGML_MAX_DIMS = 4
GGML_MAX_SRC = 10
GGML_MAX_OP_PARAMS = 64
GGML_MAX_NAME = 64
GGML_OBJECT_SIZE = 32  # struct ggml_object: offs, size, next, type + 4 bytes padding


class GGMLTensor(ctypes.Structure):
    """`struct ggml_tensor` (ggml/include/ggml.h); checked against ggml at first use."""

    _fields_ = [
        ("type", ctypes.c_int),
        ("buffer", ctypes.c_void_p),
        ("ne", ctypes.c_int64 * GGML_MAX_DIMS),
        ("nb", ctypes.c_size_t * GGML_MAX_DIMS),
        ("op", ctypes.c_int),
        ("op_params", ctypes.c_int32 * (GGML_MAX_OP_PARAMS // 4)),
        ("flags", ctypes.c_int32),
        ("src", ctypes.c_void_p * GGML_MAX_SRC),
        ("view_src", ctypes.c_void_p),
        ("view_offs", ctypes.c_size_t),
        ("data", ctypes.c_void_p),
        ("name", ctypes.c_char * GGML_MAX_NAME),
        ("extra", ctypes.c_void_p),
        ("padding", ctypes.c_char * 8),
    ]


NAME_OFFSET = GGMLTensor.name.offset

# element types a node can be read as; quantized nodes are only available as raw bytes
_DTYPES: dict[gguf.GGMLQuantizationType, type] = {
    gguf.GGMLQuantizationType.F32: np.float32,
    gguf.GGMLQuantizationType.F16: np.float16,
    gguf.GGMLQuantizationType.F64: np.float64,
    gguf.GGMLQuantizationType.I8: np.int8,
    gguf.GGMLQuantizationType.I16: np.int16,
    gguf.GGMLQuantizationType.I32: np.int32,
    gguf.GGMLQuantizationType.I64: np.int64,
    gguf.GGMLQuantizationType.BF16: np.uint16,  # bit patterns; read() widens to float32
}
_NP_DTYPES = {int(t): np.dtype(d) for t, d in _DTYPES.items()}


class HookError(RuntimeError):
    """A handler failed, or llama.cpp's structures are not what this module was written for."""


_checked_layout = False


def ggml() -> ctypes.CDLL:
    """libggml-base (`export.ggml.library`: the copy libllama links, one ggml in the
    process), after checking that `GGMLTensor` matches this ggml's struct ggml_tensor."""
    global _checked_layout
    from export.ggml import library

    lib = library()
    if not _checked_layout:
        got = lib.ggml_tensor_overhead() - GGML_OBJECT_SIZE
        if got != ctypes.sizeof(GGMLTensor):
            raise HookError(f"struct ggml_tensor is {got} bytes in this ggml, "
                            f"{ctypes.sizeof(GGMLTensor)} in edgemoe.calibration.hooks: "
                            "layout changed")
        _checked_layout = True
    return lib


def split_name(name: str) -> tuple[str, int | None]:
    """`ffn_moe_topk-5` -> ("ffn_moe_topk", 5); a name without a layer suffix -> (name, None)."""
    base, sep, tail = name.rpartition("-")
    if sep and tail.isdigit():
        return base, int(tail)
    return name, None


class Node:
    """A graph node seen from a handler. Valid only during the handler call."""

    def __init__(self, ptr: int, name: str | None = None):
        self.ptr = ptr
        self.t = t = GGMLTensor.from_address(ptr)
        self.name = t.name.decode(errors="replace") if name is None else name
        self.kind, self.layer = split_name(self.name)
        self.type = t.type
        self.ne = tuple(t.ne)  # element counts in ggml order (ne[0] is the row length)
        self.nb = tuple(t.nb)
        self.shape = self.ne[::-1]  # what read() returns: (ne[3], ne[2], ne[1], ne[0])
        self._dtype = _NP_DTYPES.get(self.type)

    def memset(self, value: int, offset: int, size: int) -> None:
        """Set `size` bytes at byte `offset` of the node's data to `value` (no read)."""
        ggml().ggml_backend_tensor_memset(self.ptr, value, offset, size)

    @property
    def type_name(self) -> str:
        return gguf.GGMLQuantizationType(self.type).name

    @property
    def nbytes(self) -> int:
        """Bytes spanned by the node's data (with the gaps of a strided view)."""
        return int(ggml().ggml_nbytes(self.ptr))

    def src(self, i: int) -> Node | None:
        p = self.t.src[i]
        return Node(p) if p else None

    def read_raw(self) -> np.ndarray:
        """The bytes the node spans, as uint8 (any type, quantized included)."""
        buf = np.empty(self.nbytes, np.uint8)
        ggml().ggml_backend_tensor_get(self.ptr, buf.ctypes.data, 0, buf.nbytes)
        return buf

    def _strided(self, raw: np.ndarray) -> np.ndarray:
        if self._dtype is None:
            raise HookError(f"{self.name} is {self.type_name}; only read_raw() reads it")
        return np.ndarray(self.shape, self._dtype, buffer=raw, strides=self.nb[::-1])

    @property
    def contiguous(self) -> bool:
        """Elements packed in ggml order, no gaps (not a strided or permuted view)."""
        if self._dtype is None:
            return False
        step = self._dtype.itemsize
        for n, b in zip(self.ne, self.nb):
            if n > 1 and b != step:
                return False
            step *= n
        return True

    def read(self) -> np.ndarray:
        """A copy of the node, shape (ne[3], ne[2], ne[1], ne[0]); BF16 comes as float32."""
        raw = self.read_raw()
        if self.contiguous:
            out = raw.view(self._dtype).reshape(self.shape)
        else:
            out = np.array(self._strided(raw))
        if self.type == gguf.GGMLQuantizationType.BF16:
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def matrix(self) -> np.ndarray:
        """The node as rows of ne[0] elements: (ne[1] * ne[2] * ne[3], ne[0])."""
        return self.read().reshape(-1, self.ne[0])

    def write(self, values) -> None:
        """Write `values` (broadcast to read()'s shape) into the node; strides respected."""
        if self._dtype is None or self.type == gguf.GGMLQuantizationType.BF16:
            raise HookError(f"{self.name}: writing {self.type_name} nodes is not supported")
        nbytes = self.nbytes
        if self.contiguous:
            raw = np.ascontiguousarray(np.broadcast_to(values, self.shape), self._dtype)
        else:  # a strided view spans gaps that belong to other data: keep them as they are
            raw = self.read_raw()
            self._strided(raw)[...] = values
        ggml().ggml_backend_tensor_set(self.ptr, raw.ctypes.data, 0, nbytes)

    def __repr__(self) -> str:
        return f"Node({self.name!r}, {self.type_name}, ne={self.ne})"


@dataclass
class Routing:
    """The experts chosen for a batch at one layer: ids and router weights, (n_tokens, k)."""

    layer: int
    ids: np.ndarray  # int32, column 0 is the top choice of the router
    weights: np.ndarray  # float32, before renormalisation


def moe_routing(weights_node: Node) -> Routing:
    """Routing of an `ffn_moe_weights` node (F32 [1, k, n_tokens]) and its `ffn_moe_topk`."""
    topk = weights_node.src(1)
    if topk is None or split_name(topk.name)[0] != "ffn_moe_topk":
        got = None if topk is None else topk.name
        raise HookError(f"{weights_node.name}: src[1] is {got}, expected ffn_moe_topk")
    k, n = weights_node.ne[1], weights_node.ne[2]
    return Routing(weights_node.layer, topk.read().reshape(n, k),
                   weights_node.read().reshape(n, k))


Handler = Callable[[Node], None]


class EvalHooks:
    """Handlers by node name and layer, exposed to llama.cpp as one `cb_eval` callback."""

    def __init__(self):
        import llama_cpp

        self._handlers: dict[str, list[tuple[frozenset[int] | None, Handler]]] = {}
        self._routes: dict[bytes, list[Handler] | None] = {}
        self.required: set[str] = set()  # names that must occur in the first graph run
        self.matched: set[str] = set()
        self.checked = False
        self.errors: list[BaseException] = []
        self._cleanups: list[Callable[[], None]] = []
        self.record_names = False
        self.names_seen: set[str] = set()
        # (position of the first token, number of tokens) of the batch being decoded, when
        # the context is an `attach`ed one; in the last layer only output rows remain
        self.batch: tuple[int, int] | None = None
        ggml()  # fail now, not inside llama_decode, if the struct layout is wrong
        # keep the ctypes object referenced for the life of the hooks: llama.cpp holds its
        # address only
        self.c_callback = llama_cpp.ggml_backend_sched_eval_callback(self._callback)

    def add(self, name: str, fn: Handler, layers: Iterable[int] | None = None,
            required: bool = True, when: Callable[[int | None], bool] | None = None) -> None:
        """Call `fn(node)` after every node named `name-<layer>` (layers=None: all layers;
        a node without layer suffix matches when its whole name is `name`).

        `required`: the first decode raises HookError if no node of that name was computed,
        so that a llama.cpp that renamed its nodes fails loudly instead of silently.
        `when(layer)`: asked just before the node is computed; False skips the handler and
        spares the graph split (for handlers needed only some of the time).
        """
        sel = None if layers is None else frozenset(int(x) for x in layers)
        self._handlers.setdefault(name, []).append((sel, fn, when))
        if required:
            self.required.add(name)
        self._routes.clear()
        self.matched.clear()

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        """Call `fn()` when each decode returns, normally or not (to undo graph edits)."""
        self._cleanups.append(fn)

    def end_decode(self) -> None:
        for fn in self._cleanups:
            try:
                fn()
            except BaseException as exc:  # noqa: B036 - reported by raise_errors
                self.errors.append(exc)

    def _route(self, raw: bytes) -> tuple[int | None, list, bool, str] | None:
        """(layer, [(fn, when)], any when, name) of the handlers for a node name, or None."""
        name = raw.decode(errors="replace")
        if self.record_names:
            self.names_seen.add(name)
        base, layer = split_name(name)
        found = [(fn, when) for sel, fn, when in self._handlers.get(base, ())
                 if sel is None or (layer is not None and layer in sel)]
        if found:
            self.matched.add(base)
        if base != name:  # an exact registration of the full name (e.g. "foo-3") also counts
            exact = [(fn, when) for sel, fn, when in self._handlers.get(name, ()) if sel is None]
            if exact:
                self.matched.add(name)
            found += exact
        if not found:
            return None
        return layer, found, any(when is not None for _, when in found), name

    def _callback(self, t: int, ask: bool, user_data) -> bool:
        # called for every graph node: keep the common path (an unwanted node) short. Nothing
        # may unwind through C, not even Ctrl-C's KeyboardInterrupt (raised here when the
        # signal lands during a callback): errors are kept and re-raised after the decode.
        try:
            raw = ctypes.string_at(t + NAME_OFFSET)
            try:
                route = self._routes[raw]
            except KeyError:
                route = self._routes[raw] = self._route(raw)
            if route is None:
                return not ask
            layer, entries, conditional, name = route
            if ask:
                return not conditional or any(w is None or w(layer) for _, w in entries)
            if not self.errors:
                node = Node(t, name)
                for fn, when in entries:
                    if when is None or when(layer):
                        fn(node)
        except BaseException as exc:  # noqa: B036 - must not unwind through C
            self.errors.append(exc)
        return True

    def raise_errors(self) -> None:
        """Re-raise the first handler error since the last call, if any; after the first
        decode, fail if a required node name never occurred in the graph."""
        if self.errors:
            exc, self.errors = self.errors[0], []
            if isinstance(exc, KeyboardInterrupt):  # Ctrl-C or SIGTERM during the decode
                raise exc
            raise HookError(f"an eval handler failed: {exc!r}") from exc
        if not self.checked:
            self.checked = True
            missing = sorted(self.required - self.matched)
            if missing:
                raise HookError(
                    f"llama.cpp computed no node named {', '.join(missing)} (with or without a "
                    "layer suffix): the graph was renamed, or the model has no such node. "
                    "Set hooks.record_names = True to list the names it has.")


@contextlib.contextmanager
def _signals_held():
    """Ctrl-C and SIGTERM wait until the decode returns. Raised inside an eval callback (a
    signal is handled at the next Python bytecode, which may be the callback's first), the
    KeyboardInterrupt would end in ctypes, which prints and drops it."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held: list[int] = []
    sigs = (signal.SIGINT, signal.SIGTERM)
    old = {s: signal.signal(s, lambda sig, _frame: held.append(sig)) for s in sigs}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        for sig in dict.fromkeys(held):  # replayed to the handlers that were in place
            h = old[sig]
            if callable(h):
                h(sig, None)
            elif h == signal.SIG_DFL:
                os.kill(os.getpid(), sig)


def _hooked_context_class():
    from llama_cpp import _internals

    class HookedContext(_internals.LlamaContext):
        """A llama_cpp LlamaContext whose decode re-raises handler errors."""

        def __init__(self, *, hooks: EvalHooks, **kwargs):
            super().__init__(**kwargs)
            self.hooks = hooks

        def decode(self, batch) -> None:
            b = batch.batch
            self.hooks.batch = (int(b.pos[0]), int(b.n_tokens)) if b.n_tokens else None
            try:
                with _signals_held():
                    super().decode(batch)
            finally:
                self.hooks.batch = None
                self.hooks.end_decode()
                self.hooks.raise_errors()

    return HookedContext


def context_params(llm, hooks: EvalHooks):
    """A copy of `llm`'s context parameters with `hooks` as eval callback."""
    import llama_cpp

    params = llama_cpp.llama_context_params()
    ctypes.pointer(params)[0] = llm.context_params
    params.cb_eval = hooks.c_callback
    params.cb_eval_user_data = None
    return params


def attach(llm, hooks: EvalHooks):
    """Give a `llama_cpp.Llama` a fresh context that runs `hooks`; returns `llm`.

    The Llama keeps its model, tokenizer, sampler and chat handling; its KV cache starts
    empty. The old context is freed first, so memory does not double.
    """
    old = llm._ctx
    old.close()
    ctx = _hooked_context_class()(model=llm._model, params=context_params(llm, hooks),
                                  verbose=llm.verbose, hooks=hooks)
    llm._stack.enter_context(contextlib.closing(ctx))
    llm._ctx = ctx
    llm._hooks = hooks  # the callback must live as long as the context
    llm.n_tokens = 0
    return llm
