"""ggml's library through ctypes: found, loaded and checked once.

The `libggml-base` that llama-cpp-python ships holds `ggml_quantize_chunk`, the code
llama-quantize runs. It is loaded lazily and thread-safely, its symbols typed, and each type
checked against gguf-py's table before first use (`checked_type`, `init_type`).
"""

from __future__ import annotations

import ctypes
import importlib.util
import logging
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from memory_planner.quant_types import qtype

log = logging.getLogger(__name__)

PINNED_RUNTIME = "llama-cpp-python==0.3.36"

# The target types `ggml_quantize_chunk` handles (its switch in ggml/src/ggml.c) that gguf-py
# also knows. Q8_1 and Q8_K exist only as matmul scratch types: ggml aborts on them.
QUANTIZABLE: frozenset[str] = frozenset({
    "F32", "F16", "BF16",
    "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q1_0", "MXFP4", "NVFP4",
    "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K", "TQ1_0", "TQ2_0",
    "IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS", "IQ3_S", "IQ4_NL", "IQ4_XS",
})


class GGMLLibraryError(RuntimeError):
    """libggml-base is missing, lacks a symbol, or disagrees with gguf-py's type table."""


class QuantizeError(ValueError):
    """Input that ggml cannot quantize: unsupported type, bad row length, missing imatrix."""


# Prefer the soname libllama links against: llama-cpp-python's wheel ships the library as
# separate file copies, and loading another copy would give a second ggml with its own IQ
# tables (seconds to build) instead of sharing llama_model_quantize's.
_LIB_NAMES = {
    "linux": ("libggml-base.so.0", "libggml-base.so"),
    "darwin": ("libggml-base.0.dylib", "libggml-base.dylib"),
    "win32": ("ggml-base.dll",),
}
# the CPU backend beside it, for its row quantizers (`cpu_row_quantizer`)
_CPU_LIB_NAMES = {
    "linux": ("libggml-cpu.so.0", "libggml-cpu.so"),
    "darwin": ("libggml-cpu.0.dylib", "libggml-cpu.dylib"),
    "win32": ("ggml-cpu.dll",),
}
# the types whose CPU row quantizer is not the file quantizer: Q8_0's is SIMD (the one
# llama.cpp quantizes a matmul's activations with); the others call the file quantizer's code
CPU_ROW_TYPES = frozenset({"Q8_0"})

# name -> (restype, argtypes)
_SIGNATURES = {
    "ggml_quantize_chunk": (ctypes.c_size_t, [
        ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p,
    ]),
    "ggml_quantize_init": (None, [ctypes.c_int]),
    "ggml_quantize_requires_imatrix": (ctypes.c_bool, [ctypes.c_int]),
    "ggml_validate_row_data": (ctypes.c_bool, [ctypes.c_int, ctypes.c_void_p, ctypes.c_size_t]),
    "ggml_row_size": (ctypes.c_size_t, [ctypes.c_int, ctypes.c_int64]),
    "ggml_blck_size": (ctypes.c_int64, [ctypes.c_int]),
    "ggml_get_type_traits": (ctypes.c_void_p, [ctypes.c_int]),
    # graph nodes and buffers, for the eval-callback hooks (edgemoe.calibration.hooks)
    "ggml_backend_tensor_get": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                       ctypes.c_size_t]),
    "ggml_backend_tensor_set": (None, [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                       ctypes.c_size_t]),
    "ggml_backend_tensor_memset": (None, [ctypes.c_void_p, ctypes.c_uint8, ctypes.c_size_t,
                                          ctypes.c_size_t]),
    "ggml_nbytes": (ctypes.c_size_t, [ctypes.c_void_p]),
    "ggml_tensor_overhead": (ctypes.c_size_t, []),
    "ggml_get_name": (ctypes.c_void_p, [ctypes.c_void_p]),
    "ggml_op_name": (ctypes.c_char_p, [ctypes.c_int]),
    "ggml_backend_buft_name": (ctypes.c_char_p, [ctypes.c_void_p]),
}


class _TypeTraits(ctypes.Structure):
    """`struct ggml_type_traits` of the pinned ggml.h (`to_float` checked by the sizes)."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]


class _CpuTypeTraits(ctypes.Structure):
    """`struct ggml_type_traits_cpu` of the pinned ggml-cpu.h."""

    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


# void to_float(const void * x, float * y, int64_t k); from_float(const float *, void *, k)
_ToFloat = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64)

_lib: ctypes.CDLL | None = None
_lib_lock = threading.Lock()
_checked_types: set[int] = set()  # sizes agree between gguf-py and ggml
_ready_types: set[int] = set()  # ggml_quantize_init done
_init_lock = threading.Lock()
_to_float: dict[int, Callable] = {}  # type -> ggml's dequantizer, filled by to_float()
_cpu_rows: dict[int, Callable | None] = {}  # type -> ggml-cpu's row quantizer, or None


def ggml_library_path(names: dict[str, tuple[str, ...]] = _LIB_NAMES) -> Path:
    """Where llama-cpp-python keeps libggml-base (or another of its libraries, by `names`),
    found without importing llama_cpp."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise GGMLLibraryError(
            f"llama_cpp is not installed; edgemoe needs `pip install {PINNED_RUNTIME}` "
            "for ggml's quantizer"
        )
    lib_dir = Path(next(iter(spec.submodule_search_locations))) / "lib"
    names = names.get(sys.platform, names["linux"])
    return next((lib_dir / n for n in names if (lib_dir / n).is_file()), lib_dir / names[-1])


def library() -> ctypes.CDLL:
    """libggml-base, loaded on first use."""
    global _lib
    if _lib is not None:
        return _lib
    with _lib_lock:
        if _lib is None:
            _lib = _load(ggml_library_path())
    return _lib


def _load(path: Path) -> ctypes.CDLL:
    if not path.is_file():
        raise GGMLLibraryError(f"{path} not found; reinstall {PINNED_RUNTIME}")
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        raise GGMLLibraryError(f"cannot load {path} ({e}); reinstall {PINNED_RUNTIME}") from e
    for name, (restype, argtypes) in _SIGNATURES.items():
        try:
            fn = getattr(lib, name)
        except AttributeError:
            raise GGMLLibraryError(
                f"{path} does not export {name}; edgemoe is pinned to {PINNED_RUNTIME}"
            ) from None
        fn.restype, fn.argtypes = restype, argtypes
    log.debug("loaded %s", path)
    return lib


def checked_type(type_name: str) -> GGMLQuantizationType:
    """The type, after checking ggml can quantize it and agrees with gguf-py on its layout."""
    t = qtype(type_name)
    if t.name not in QUANTIZABLE:
        raise QuantizeError(
            f"ggml cannot quantize to {t.name}; quantizable: {', '.join(sorted(QUANTIZABLE))}"
        )
    if t.value in _checked_types:
        return t
    lib = library()
    # gguf-py and ggml must agree on the enum value and the block layout, or every size we
    # compute (and every file we write) would be wrong
    blck, size = GGML_QUANT_SIZES[t]
    got = (lib.ggml_blck_size(t.value), lib.ggml_row_size(t.value, blck))
    if got != (blck, size):
        raise GGMLLibraryError(
            f"{t.name}: gguf-py says block {blck} / {size} bytes, ggml says "
            f"{got[0]} / {got[1]}; install matching gguf and {PINNED_RUNTIME}"
        )
    _checked_types.add(t.value)
    return t


def init_type(t: GGMLQuantizationType) -> None:
    """Ready ggml to quantize `t`: builds its lattice tables for IQ types (seconds for
    IQ1_*/IQ2_*), once per process."""
    if t.value in _ready_types:
        return
    with _init_lock:
        if t.value not in _ready_types:
            library().ggml_quantize_init(t.value)
            _ready_types.add(t.value)


def requires_imatrix(type_name: str) -> bool:
    """True when ggml refuses to quantize this type without an importance matrix."""
    t = checked_type(type_name)
    return bool(library().ggml_quantize_requires_imatrix(t.value))


def to_float(type_name: str, raw: np.ndarray, n: int) -> np.ndarray:
    """The `n` float32 values that `raw` (contiguous blocks of `type_name`) holds, by ggml's
    own dequantizer, the code llama.cpp runs (faster than gguf-py's numpy one)."""
    t = checked_type(type_name)
    fn = _to_float.get(t.value)
    if fn is None:
        traits = _TypeTraits.from_address(library().ggml_get_type_traits(t.value))
        blck, size = GGML_QUANT_SIZES[t]
        if (traits.blck_size, traits.type_size) != (blck, size):
            raise GGMLLibraryError(f"{t.name}: ggml's type traits disagree with gguf-py's table")
        if not traits.to_float:  # F32: nothing to convert
            raise QuantizeError(f"ggml has no dequantizer for {t.name}")
        fn = _to_float.setdefault(t.value, _ToFloat(traits.to_float))
    raw = np.ascontiguousarray(raw, dtype=np.uint8)
    blck, size = GGML_QUANT_SIZES[t]
    if n % blck or raw.size != n // blck * size:
        raise QuantizeError(f"{raw.size} bytes do not hold {n} {t.name} values")
    out = np.empty(n, dtype=np.float32)
    if n:
        fn(raw.ctypes.data, out.ctypes.data, n)
    return out


def cpu_row_quantizer(type_name: str) -> Callable | None:
    """ggml-cpu's row quantizer of a `CPU_ROW_TYPES` type, `fn(src, dst, n)` on pointers to
    `n` float32 values and their blocks: the `from_float` of its CPU type traits, the code
    llama.cpp quantizes a matmul's activations with. For Q8_0 it is SIMD, about 8x
    `ggml_quantize_chunk` here, and it rounds other ties than the file quantizer (127/max,
    half to even): about 0.06% of the values land one step away, with the same error. So
    it is only for files edgemoe alone runs (`quantize_rows(cpu_rows=True)`). None for other
    types, or where llama-cpp-python has no separate ggml-cpu library (a build whose CPU
    backends load at run time)."""
    t = checked_type(type_name)
    if t.name not in CPU_ROW_TYPES:
        return None
    if t.value in _cpu_rows:
        return _cpu_rows[t.value]
    with _init_lock:
        if t.value not in _cpu_rows:
            _cpu_rows[t.value] = _load_cpu_rows(t)
    return _cpu_rows[t.value]


def _load_cpu_rows(t: GGMLQuantizationType) -> Callable | None:
    path = ggml_library_path(_CPU_LIB_NAMES)
    try:
        lib = ctypes.CDLL(str(path))
        init, traits_of = lib.ggml_cpu_init, lib.ggml_get_type_traits_cpu
    except (OSError, AttributeError) as e:
        log.info("no ggml-cpu row quantizer (%s): %s by the file quantizer", e, t.name)
        return None
    init.restype, init.argtypes = None, []
    traits_of.restype, traits_of.argtypes = ctypes.c_void_p, [ctypes.c_int]
    init()  # its fp16 tables, on builds that use them (once; llama.cpp calls it too)
    traits = _CpuTypeTraits.from_address(traits_of(t.value))
    if not traits.from_float or traits.vec_dot_type != t.value:
        raise GGMLLibraryError(f"{path}: {t.name}'s CPU type traits are not the pinned ones")
    return _ToFloat(traits.from_float)
