"""Thin helpers over llama-cpp-python: open a GGUF, get logits, read llama.cpp's own numbers."""

from __future__ import annotations

import ctypes
import functools
import importlib.metadata
import logging
import os
import re
import tempfile
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

GGML_TYPE_F32 = 0  # ggml_type value, for an exact (F32) KV cache
# the pin's one home is pyproject.toml: `llama-cpp-python==X` in the project's dependencies
_PIN = re.compile(r"^\s*llama[-_.]cpp[-_.]python\s*==\s*([^\s;,\"']+)", re.IGNORECASE)
_PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"


@functools.cache
def pinned_version() -> str | None:
    """The llama-cpp-python version edgemoe is pinned to: from the installed edgemoe
    distribution's requirements, else from the pyproject.toml of a source checkout run
    without installing; None when neither is found."""
    try:
        requirements = importlib.metadata.requires("edgemoe") or []
    except importlib.metadata.PackageNotFoundError:
        requirements = _PYPROJECT.read_text().splitlines() if _PYPROJECT.is_file() else []
    for line in requirements:
        m = _PIN.match(line.strip().lstrip("\"'"))
        if m:
            return m.group(1)
    return None


def check_version() -> None:
    """Fail loudly if llama-cpp-python is not the version whose internals we rely on."""
    import llama_cpp

    pinned = pinned_version()
    if pinned is None:
        log.warning("no llama-cpp-python pin found (edgemoe is not installed and no "
                    "pyproject.toml is beside it): version %s is not checked",
                    llama_cpp.__version__)
    elif llama_cpp.__version__ != pinned:
        raise RuntimeError(
            f"llama-cpp-python {llama_cpp.__version__} is installed; edgemoe is pinned to "
            f"{pinned} (pip install llama-cpp-python=={pinned})"
        )


# -- extra buffer types (weight repacking) and the AMX crash ----------------------------------
# On CPUs with AMX, a natively built ggml includes the AMX extra buffer type, and decode then
# segfaults in ggml_backend_amx_mul_mat on many quantized models (llama.cpp issue 20824).
# llama.cpp's `--no-repack` (llama_model_params.use_extra_bufts = False) avoids it.
# BENCHMARKS.md ("AMX") has the measured cost; EXTRA_BUFTS_ENV = 1 or 0 overrides the choice.
EXTRA_BUFTS_ENV = "EDGEMOE_EXTRA_BUFTS"
_params_lock = threading.Lock()


@functools.cache
def cpu_features() -> frozenset[str]:
    """The CPU backend's features that llama.cpp was built with and found (AVX2, AMX_INT8,
    REPACK, ...), from llama_print_system_info."""
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    # "CPU : SSE3 = 1 | AVX2 = 1 | ... | AMX_INT8 = 1 | REPACK = 1 | " (one run per backend)
    return frozenset(part.split("=")[0].split(":")[-1].strip() for part in info.split("|")
                     if part.strip().endswith("= 1"))


def use_extra_bufts() -> bool:
    """Whether llama.cpp may use its extra buffer types: not where the AMX one is built in."""
    forced = os.environ.get(EXTRA_BUFTS_ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return "AMX_INT8" not in cpu_features()


def server_flags() -> list[str]:
    """Flags llama-server and llama-cli need on this machine to run a GGUF safely."""
    return [] if use_extra_bufts() else ["--no-repack"]


def model_params(**fields):
    """llama.cpp's default model parameters with edgemoe's load policy and `fields` set."""
    params = _library_default_params()()
    params.use_extra_bufts = use_extra_bufts()
    for k, v in fields.items():
        setattr(params, k, v)
    return params


@functools.cache
def _library_default_params():
    """llama-cpp-python's own `llama_model_default_params` (taken before any swap)."""
    import llama_cpp

    return llama_cpp.llama_cpp.llama_model_default_params


@contextmanager
def load_policy(**fields) -> Iterator[None]:
    """Within it, every model llama-cpp-python opens gets `model_params(**fields)`.

    `llama_cpp.Llama` builds its model parameters inside its constructor, from
    `llama_model_default_params`, with no argument for `use_extra_bufts`: that function is
    swapped for the duration of the constructor, under a lock."""
    import llama_cpp

    original = _library_default_params()
    with _params_lock:
        llama_cpp.llama_cpp.llama_model_default_params = lambda: model_params(**fields)
        try:
            yield
        finally:
            llama_cpp.llama_cpp.llama_model_default_params = original


def open_llama(path: str | Path, n_ctx: int = 512, f32_kv: bool = False,
               logits_all: bool = True, threads: int | None = None, llama_class=None,
               **kwargs):
    """A `llama_cpp.Llama` (or `llama_class`) on the CPU, opened with edgemoe's load policy;
    `f32_kv` for comparisons with transformers. Every llama.cpp model edgemoe runs is
    opened here."""
    import llama_cpp

    check_version()
    if f32_kv:
        kwargs.setdefault("type_k", GGML_TYPE_F32)
        kwargs.setdefault("type_v", GGML_TYPE_F32)
    kwargs.setdefault("verbose", False)
    kwargs.setdefault("n_gpu_layers", 0)
    with load_policy():
        return (llama_class or llama_cpp.Llama)(
            model_path=str(path), n_ctx=n_ctx, logits_all=logits_all,
            n_threads=threads or os.cpu_count(), **kwargs,
        )


class SimulationError(RuntimeError):
    """llama.cpp could not load a header (its architecture or a key it needs) or refused the
    context; the message has llama.cpp's own last log lines."""


class ContextRefusedError(SimulationError):
    """llama.cpp loads the model but refuses the context asked (a quantized V cache without
    flash attention, different K and V types with MLA, ...): the file would not run so."""


@contextmanager
def simulated_context(path: str | Path, **context_fields) -> Iterator[tuple[int, int]]:
    """(model, context) pointers of a GGUF opened with `no_alloc`: llama.cpp reads the
    header, plans every buffer (weights, KV cache, recurrent state, compute) as it would for
    a real load with edgemoe's load policy, and allocates none; tensor data is never read
    (common/fit.cpp measures memory the same way). `context_fields` set
    llama_context_params fields (n_ctx, n_batch, n_ubatch, flash_attn_type, type_k, ...)."""
    import ctypes

    import llama_cpp

    check_version()
    llama_cpp.llama_backend_init()
    logs: list[str] = []
    kept = [False]

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):  # keep llama.cpp's reasons for a refusal
        if level != 5:  # GGML_LOG_LEVEL_CONT continues the previous line
            kept[0] = level == 4  # GGML_LOG_LEVEL_ERROR (ggml.h: WARN 3, ERROR 4)
        if kept[0]:
            logs.append(text.decode(errors="replace"))

    params = model_params(no_alloc=True, n_gpu_layers=0,
                          load_mode=llama_cpp.LLAMA_LOAD_MODE_NONE)
    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    model = ctx = None
    try:
        model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not model:
            raise SimulationError("llama.cpp cannot load it: " + _last(logs))
        cparams = llama_cpp.llama_context_default_params()
        for k, v in context_fields.items():
            setattr(cparams, k, v)
        ctx = llama_cpp.llama_init_from_model(model, cparams)
        if not ctx:
            raise ContextRefusedError("llama.cpp refuses this context: " + _last(logs))
        yield model, ctx
    finally:
        if ctx:
            llama_cpp.llama_free(ctx)
        if model:
            llama_cpp.llama_model_free(model)
        from llama_cpp._logger import llama_log_callback

        llama_cpp.llama_log_set(llama_log_callback, ctypes.c_void_p(0))


def _last(logs: list[str], n: int = 3) -> str:
    lines = [x.strip() for x in "".join(logs).splitlines() if x.strip()]
    return " | ".join(lines[-n:]) or "no message"


def tokenize(model, text: str, max_tokens: int | None = None) -> list[int]:
    """llama.cpp's tokens for `text` (no BOS, special tokens as text), the first `max_tokens`
    if given. `model`: an open `llama_cpp.Llama`, a GGUF file (its vocabulary alone is
    loaded) or a Hugging Face directory (its tokenizer as export writes it, loaded so: the
    tokens of the exported model, with no transformers or torch to import)."""
    if isinstance(model, (str, Path)):
        tokens = _tokenize_file(Path(model), text)
    else:
        tokens = model.tokenize(text.encode(), add_bos=False, special=False)
    return tokens[:max_tokens] if max_tokens else tokens


def _tokenize_file(path: Path, text: str) -> list[int]:
    if path.is_dir():
        from export.tokenizer import write_vocab_gguf

        with tempfile.TemporaryDirectory(prefix="edgemoe-vocab-") as tmp:
            vocab = Path(tmp) / "vocab.gguf"
            write_vocab_gguf(path, vocab)
            return _tokenize_file(vocab, text)
    llm = open_llama(path, n_ctx=8, logits_all=False, vocab_only=True)
    try:
        return tokenize(llm, text)
    finally:
        llm.close()


def eval_logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """Logits (n_tokens x n_vocab, float32) of one sequence, from a fresh context."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def eval_embeddings(llm, x: np.ndarray) -> np.ndarray:
    """Logits (n_tokens x n_vocab, float32) of one sequence whose input is `x` (n_tokens x
    n_embd), the residual stream before the first block (llama.cpp's `llama_batch.embd`,
    which replaces the token embeddings), from a fresh context, in one decode. The context
    must compute every position's logits (`logits_all`) and take `n_tokens` in a batch.
    The logits are llama.cpp's own buffer, valid until the context decodes again or closes
    (copy them to keep them): a copy of a window's took 0.1-0.2 s in fresh pages."""
    import llama_cpp
    from llama_cpp._internals import LlamaBatch

    x = np.ascontiguousarray(x, dtype=np.float32)
    n, d = x.shape
    if n > llm.n_batch:
        raise ValueError(f"{n} positions do not fit a batch of {llm.n_batch}")
    # M-RoPE models take 4 positions per embedding, section-major; text has the position in
    # the first three and 0 in the last (llama.cpp's llm_graph_input_pos for tokens)
    mrope = llama_cpp.llama_model_rope_type(llm.model) in (llama_cpp.LLAMA_ROPE_TYPE_MROPE,
                                                           llama_cpp.LLAMA_ROPE_TYPE_IMROPE)
    batch = LlamaBatch(n_tokens=4 * n if mrope else n, embd=d, n_seq_max=1, verbose=False)
    try:
        b = batch.batch
        ctypes.memmove(b.embd, x.ctypes.data, x.nbytes)
        for i in range(n):
            b.n_seq_id[i], b.logits[i] = 1, True
            b.seq_id[i][0] = 0
            b.pos[i] = i
            if mrope:
                b.pos[n + i], b.pos[2 * n + i], b.pos[3 * n + i] = i, i, 0
        b.n_tokens = n
        llm.reset()
        llm._ctx.kv_cache_seq_rm(-1, 0, -1)  # as Llama.eval does before its first batch
        llm._ctx.decode(batch)
        ptr = llama_cpp.llama_get_logits(llm._ctx.ctx)
        return np.ctypeslib.as_array(ptr, shape=(n, llm.n_vocab()))
    finally:
        batch.close()


def model_weight_bytes(llm) -> int:
    """llama.cpp's own count of the model's weight bytes (llama_model_size)."""
    import llama_cpp

    return int(llama_cpp.llama_model_size(llm.model))


def llama_quantize(src: str | Path, dst: str | Path, ftype: str = "Q8_0",
                   overrides: dict[str, str] | None = None,
                   imatrix: dict[str, np.ndarray] | None = None, threads: int | None = None,
                   pure: bool = False) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`), the side-by-side baseline.

    `ftype` is a llama_ftype name without MOSTLY_ ("Q4_K_M", "IQ2_XXS", ...); `overrides`
    maps a regex (searched in tensor names, first match wins) to a GGUF type; `imatrix`
    maps a tensor name to its mean squared inputs (n_expert * n_per_row for `_exps`).
    """
    import ctypes

    import gguf
    import llama_cpp

    check_version()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{ftype.upper()}"])
    params.pure = pure
    keep: list = []  # ctypes buffers must outlive the call
    if overrides:
        tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, type_name) in enumerate(overrides.items()):
            tt[i].pattern = pattern.encode()
            tt[i].type = int(gguf.GGMLQuantizationType[type_name.upper()])
        tt[len(overrides)].pattern = None
        params.tt_overrides = tt
        keep.append(tt)
    if imatrix:
        im = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            keep.append(values)
            im[i].name = name.encode()
            im[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            im[i].size = values.size
        im[len(imatrix)].name = None
        params.imatrix = im
        keep.append(im)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype}) failed with {rc}")


class _BuftOverride(ctypes.Structure):
    """`struct llama_model_tensor_buft_override` (llama.h; the binding types the field as
    a bare pointer)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def tensors_moved_to_cpu(path: str | Path, patterns: Sequence[str]) -> set[str]:
    """The tensors llama.cpp moves to the CPU when `path` is loaded with these
    `--override-tensor PATTERN=CPU` patterns: read from llama.cpp's own loader (its
    "buffer type overridden" log lines), with no weights allocated (`no_alloc`)."""
    import llama_cpp
    from llama_cpp import _logger

    lib = Path(llama_cpp.__file__).parent / "lib" / "libggml-cpu.so"
    cpu = ctypes.CDLL(str(lib))
    cpu.ggml_backend_cpu_buffer_type.restype = ctypes.c_void_p
    buft = cpu.ggml_backend_cpu_buffer_type()
    encoded = [p.encode() for p in patterns]  # kept alive while llama.cpp reads them
    overrides = (_BuftOverride * (len(encoded) + 1))()  # NULL-terminated
    for i, p in enumerate(encoded):
        overrides[i].pattern = p
        overrides[i].buft = buft
    moved: set[str] = set()

    @llama_cpp.llama_log_callback
    def log(level, text, user_data):
        m = re.match(rb"tensor (\S+) \(.*\) buffer type overridden to", text or b"")
        if m:
            moved.add(m.group(1).decode())

    with _params_lock:
        llama_cpp.llama_log_set(log, ctypes.c_void_p(0))
        try:
            params = model_params(tensor_buft_overrides=ctypes.cast(overrides, ctypes.c_void_p),
                                  no_alloc=True, load_mode=0)  # as common/fit.cpp: LOAD_MODE_NONE
            model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
            if not model:
                raise RuntimeError(f"{path}: llama.cpp could not load it with the overrides")
            llama_cpp.llama_model_free(model)
        finally:
            llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    return moved
