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

from .nodes import NAME_OFFSET, HookError, Node, ggml, shifted, split_name

log = logging.getLogger(__name__)

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
        # the first block of the model run within the whole model (a layer segment): node
        # names and layers are shifted by it, so handlers see the whole model's
        self.layer_offset = 0
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
        name = shifted(raw.decode(errors="replace"), self.layer_offset)
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
                node = Node(t, name, self.layer_offset)
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
def signals_held():
    """Ctrl-C and SIGTERM wait until the block ends: a decode (raised inside an eval
    callback, as a signal is handled at the next Python bytecode, which may be the
    callback's first, the KeyboardInterrupt would end in ctypes, which prints and drops
    it), a checkpoint's save (`collect`)."""
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
                with signals_held():
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
