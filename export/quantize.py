"""Quantize numpy arrays with ggml's own quantizer, byte for byte what llama-quantize writes.

gguf-py can produce only a few types, so we call `ggml_quantize_chunk` in the
`libggml-base` that llama-cpp-python ships (the same code llama-quantize runs) through
ctypes (`export.ggml` loads it). ctypes releases the GIL during the call, so a
ThreadPoolExecutor quantizes row chunks and expert slices in parallel. `dequantize` reads
back through `gguf.quants.dequantize`; the search reads back with ggml's own dequantizer.

Every quantizer in ggml works row by row (each row sees only its own values and the
imatrix), so splitting a matrix into row chunks never changes the bytes.

`quantize_rows_searched` goes one step further than llama-quantize: ggml's quantizers treat
the input columns as independent, and the search feeds each row's rounding errors back
through the inputs' measured covariance (GPTQ's error feedback) and lets ggml quantize the
corrected row again, keeping per row (per super-block) whichever has the least output error.
The bytes are still ggml's, of the same type.
"""

from __future__ import annotations

import ctypes
import functools
import os
from collections.abc import Callable, Iterator
from concurrent.futures import Executor, Future, ProcessPoolExecutor
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import IQ4_NL
from gguf.quants import dequantize as _gguf_dequantize
from scipy.linalg import lapack

from memory_planner.quant_types import qtype, tensor_nbytes

from .ggml import (
    GGMLLibraryError,
    QuantizeError,
    checked_type,
    ggml_library_path,  # noqa: F401  (edgemoe.hooks finds the library here)
    init_type,
    library,
    to_float,
)

# Rows are handed to threads in chunks of at least this many weights, so that the Python
# overhead per task (~20 us) stays small next to even the fastest type (Q8_0, ~1 ns/weight).
MIN_CHUNK_ELEMENTS = 1 << 18


def default_threads() -> int:
    """Worker threads to use: $EDGEMOE_THREADS, else the CPUs this process may run on."""
    env = os.environ.get("EDGEMOE_THREADS", "").strip()
    if env:
        try:
            n = int(env)
        except ValueError:
            n = 0
        if n < 1:
            raise ValueError(f"EDGEMOE_THREADS={env!r} is not a positive integer")
        return n
    if hasattr(os, "sched_getaffinity"):  # respects taskset / container CPU sets
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


# ---------------------------------------------------------------------------------------------
# Quantization
# ---------------------------------------------------------------------------------------------


def _as_rows(data: np.ndarray, ndim: int) -> np.ndarray:
    data = np.ascontiguousarray(data, dtype=np.float32)
    if data.ndim != ndim:
        raise QuantizeError(f"expected a {ndim}-D float32 array, got shape {data.shape}")
    return data


def _check_imatrix(imatrix: np.ndarray, n_per_row: int, what: str) -> np.ndarray:
    imatrix = np.ascontiguousarray(imatrix, dtype=np.float32)
    if imatrix.shape != (n_per_row,):
        raise QuantizeError(f"{what}: imatrix shape {imatrix.shape}, expected ({n_per_row},)")
    if not np.isfinite(imatrix).all():  # llama-quantize rejects these too
        raise QuantizeError(f"{what}: imatrix contains non-finite values")
    return imatrix


def _validate(t: GGMLQuantizationType, n_per_row: int, has_imatrix: bool) -> None:
    # ggml aborts the whole process on these, so they must be caught here
    blck = GGML_QUANT_SIZES[t][0]
    if n_per_row % blck:
        raise QuantizeError(
            f"row length {n_per_row} is not a multiple of {t.name}'s block size {blck}; "
            "pick a legal type first (memory_planner.quant_types.legal_type)"
        )
    if not has_imatrix and library().ggml_quantize_requires_imatrix(t.value):
        raise QuantizeError(f"{t.name} requires an importance matrix (imatrix); none was given")


def _check_executor(executor: Executor | None) -> None:
    if isinstance(executor, ProcessPoolExecutor):
        raise TypeError("quantization writes into a shared buffer: use a ThreadPoolExecutor")


class _Job:
    """Quantize rows [row0, row0 + nrows) of a contiguous (rows, n_per_row) f32 block into
    the same rows of a contiguous output buffer."""

    def __init__(self, t: GGMLQuantizationType, src: np.ndarray, dst: np.ndarray,
                 imatrix: np.ndarray | None, row0: int, nrows: int) -> None:
        self.t, self.src, self.dst, self.imatrix = t, src, dst, imatrix
        self.row0, self.nrows = row0, nrows

    def __call__(self) -> None:
        lib = library()
        n_per_row = self.src.shape[-1]
        row_size = self.dst.shape[-1]
        # some IQ searches GGML_ASSERT on NaN and would abort the process; llama-quantize
        # refuses such input too (its loader checks tensors)
        if not np.isfinite(self.src[self.row0:self.row0 + self.nrows]).all():
            raise QuantizeError(
                f"{self.t.name}: rows {self.row0}..{self.row0 + self.nrows} hold non-finite "
                "weights"
            )
        im = self.imatrix.ctypes.data if self.imatrix is not None else None
        # ggml offsets both pointers itself from `start` (in elements)
        got = lib.ggml_quantize_chunk(self.t.value, self.src.ctypes.data, self.dst.ctypes.data,
                                      self.row0 * n_per_row, self.nrows, n_per_row, im)
        if got != self.nrows * row_size:
            raise GGMLLibraryError(
                f"{self.t.name}: ggml wrote {got} bytes for {self.nrows} rows, "
                f"expected {self.nrows * row_size}"
            )
        out = self.dst.ctypes.data + self.row0 * row_size
        if not lib.ggml_validate_row_data(self.t.value, out, got):
            raise QuantizeError(
                f"{self.t.name}: quantized rows {self.row0}..{self.row0 + self.nrows} failed "
                "ggml's validation"
            )


def _row_jobs(t: GGMLQuantizationType, src: np.ndarray, dst: np.ndarray,
              imatrix: np.ndarray | None, split: bool) -> list[_Job]:
    n_rows, n_per_row = src.shape
    step = n_rows
    if split:
        step = max(1, -(-MIN_CHUNK_ELEMENTS // n_per_row))
    return [_Job(t, src, dst, imatrix, r, min(step, n_rows - r)) for r in range(0, n_rows, step)]


def _run(jobs: list[_Job], executor: Executor | None) -> None:
    if executor is None or len(jobs) == 1:
        for job in jobs:
            job()
        return
    futures: list[Future] = [executor.submit(job) for job in jobs]
    for f in futures:
        f.result()  # re-raises the first error; the others still finish writing


def quantize_rows(data: np.ndarray, type_name: str, imatrix: np.ndarray | None = None,
                  executor: Executor | None = None) -> np.ndarray:
    """Quantize a 2-D (n_rows, n_per_row) matrix to `type_name` with ggml.

    Returns the tensor's bytes as a flat uint8 array, exactly as llama.cpp stores them.
    `imatrix` (n_per_row,) weighs the columns. With a thread `executor`, row chunks run in
    parallel; the bytes are the same either way. Do not call this from a task running on
    that same executor: waiting for its own pool could deadlock.
    """
    _check_executor(executor)
    t = checked_type(type_name)
    src = _as_rows(data, 2)
    n_rows, n_per_row = src.shape
    if imatrix is not None:
        imatrix = _check_imatrix(imatrix, n_per_row, t.name)
    _validate(t, n_per_row, imatrix is not None)
    init_type(t)
    nbytes = tensor_nbytes(src.size, n_per_row, t.name)
    out = np.empty((n_rows, nbytes // max(n_rows, 1)), dtype=np.uint8)
    if n_rows:
        _run(_row_jobs(t, src, out, imatrix, split=executor is not None), executor)
    return out.reshape(-1)


def quantize_expert_slices(data: np.ndarray, type_name: str, imatrix: np.ndarray | None = None,
                           executor: Executor | None = None) -> np.ndarray:
    """Quantize a stacked expert tensor (n_expert, n_rows, n_per_row), one slice at a time.

    As llama-quantize does, expert e uses imatrix row e when `imatrix` is
    (n_expert, n_per_row); a 1-D (n_per_row,) imatrix is shared by all experts. The result
    is the experts' bytes concatenated in order (flat uint8).
    """
    _check_executor(executor)
    t = checked_type(type_name)
    src = _as_rows(data, 3)
    n_expert, n_rows, n_per_row = src.shape
    rows: list[np.ndarray | None] = [None] * n_expert
    if imatrix is not None:
        im = np.asarray(imatrix)
        if im.ndim == 1:
            rows = [_check_imatrix(im, n_per_row, t.name)] * n_expert
        elif im.shape == (n_expert, n_per_row):
            rows = [_check_imatrix(r, n_per_row, f"{t.name} expert {e}") for e, r in enumerate(im)]
        else:
            raise QuantizeError(
                f"imatrix shape {im.shape} does not fit experts {src.shape}: "
                f"expected ({n_expert}, {n_per_row}) or ({n_per_row},)"
            )
    _validate(t, n_per_row, imatrix is not None)
    init_type(t)
    nbytes = tensor_nbytes(src.size, n_per_row, t.name)
    row_size = nbytes // max(n_expert * n_rows, 1)
    out = np.empty((n_expert, n_rows, row_size), dtype=np.uint8)
    jobs = [
        job
        for e in range(n_expert) if n_rows
        for job in _row_jobs(t, src[e], out[e], rows[e], split=executor is not None)
    ]
    _run(jobs, executor)
    return out.reshape(-1)


def dequantize(raw: np.ndarray, type_name: str, shape: tuple[int, ...]) -> np.ndarray:
    """Float32 values of raw tensor bytes; `shape` in numpy order, row length last."""
    t = qtype(type_name)
    shape = tuple(int(s) for s in shape)
    n = int(np.prod(shape))
    raw = np.ascontiguousarray(raw, dtype=np.uint8).reshape(-1)
    expected = tensor_nbytes(n, shape[-1], t.name)
    if raw.size != expected:
        raise QuantizeError(f"{raw.size} bytes do not hold {shape} {t.name} ({expected} bytes)")
    if n == 0:
        return np.zeros(shape, dtype=np.float32)
    # gguf-py dequantizes along the last axis: give it one row per line
    try:
        values = _gguf_dequantize(raw.reshape(n // shape[-1], -1), t)
    except NotImplementedError:
        raise QuantizeError(f"gguf-py cannot dequantize {t.name}") from None
    return np.asarray(values, dtype=np.float32).reshape(shape)


def sample_rows(total: int, max_rows: int, seed: int = 0) -> np.ndarray:
    """The sorted row indices `relative_error` measures out of `total` rows."""
    k = min(max_rows, total)
    if k <= 0:
        return np.arange(0)
    if k == total:
        return np.arange(total)
    return np.sort(np.random.default_rng(seed).choice(total, size=k, replace=False))


def relative_error(data: np.ndarray, type_name: str, imatrix: np.ndarray | None = None,
                   max_rows: int = 512, seed: int = 0) -> float:
    """Relative quantization error ||W - Q(W)||^2 / ||W||^2 on a sample of rows.

    The planner's damage proxy: at most `max_rows` rows, chosen by `seed`, are quantized
    and read back. For 3-D expert tensors the sample spans all experts and each row keeps
    its expert's imatrix row. With an imatrix both sums are weighted per column by it.
    Only the sampled rows are read, so `data` may be a memory map.
    """
    if data.ndim not in (2, 3):
        raise QuantizeError(f"expected a 2-D or 3-D tensor, got shape {data.shape}")
    n_per_row = data.shape[-1]
    rows3 = data if data.ndim == 3 else data[None]
    n_expert, n_rows = rows3.shape[:2]
    im = None
    if imatrix is not None:
        im = np.asarray(imatrix, dtype=np.float32)
        im = np.broadcast_to(im, (n_expert, n_per_row)) if im.ndim == 1 else im
        if im.shape != (n_expert, n_per_row):
            raise QuantizeError(f"imatrix shape {im.shape} does not fit tensor {data.shape}")

    picked = sample_rows(n_expert * n_rows, max_rows, seed)
    if not len(picked):
        return 0.0

    num = den = 0.0
    experts = picked // n_rows
    for e in np.unique(experts):
        w = np.asarray(rows3[e][picked[experts == e] % n_rows], dtype=np.float32)
        im_e = None if im is None else im[e]
        raw = quantize_rows(w, type_name, im_e)
        err = dequantize(raw, type_name, w.shape) - w
        weight = np.ones(n_per_row) if im_e is None else im_e.astype(np.float64)
        num += float(np.square(err, dtype=np.float64).sum(axis=0) @ weight)
        den += float(np.square(w, dtype=np.float64).sum(axis=0) @ weight)
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den


# ---------------------------------------------------------------------------------------------
# Output-error search: the same format, better bytes
# ---------------------------------------------------------------------------------------------

COV_BLOCK = 256  # covariance is kept in diagonal blocks of this many columns (a super-block)
DEFAULT_SEARCH = 2
STRATEGIES = ("feedback", "shift", "weightings")

# At search 2, a row whose output error is at most this many times what it would be with
# independent input columns keeps ggml's bytes: its rounding errors do not line up with the
# inputs' correlations, and a second quantization would gain little. About 70% of the rows
# get one, for about twice the time of ggml's quantization (benchmarks/search_cost.py).
DEFAULT_SELECT = 0.8
# Q3_K's quantizer is 4-8 times faster than the other types': the search's fixed work
# (reading the errors back, factoring the covariance) leaves room for fewer second ones
_SELECT = {"Q3_K": 1.25}
_GPTQ_DAMP = 0.01  # GPTQ's dampening of the covariance, a share of its mean diagonal
_SHIFT_DAMP = 1.0  # the same for the one-shot target shift, whose errors are a step stale
_SHIFT_STEP = 0.55  # how far the target moves along the feedback of the last errors
_GPTQ_GROUP = 8  # columns rounded together between error updates (1: GPTQ exactly, slower)
_GPTQ_BATCH = 32  # columns between updates of the whole block (GPTQ's lazy batch)


class _Grid(NamedTuple):
    """Where a super-block of a scalar K-quant keeps its per-weight codes (byte ranges and
    the byte that sets every code there to 0, and to 1), and the level each code stands for:
    weight = offset + step * level, offset and step set by the block's scales."""
    regions: tuple[tuple[int, int, int, int], ...]
    levels: np.ndarray


# The block layouts of ggml-common.h (block_q2_K ... block_iq4_xs). The lattice IQ types
# (IQ2_*, IQ3_*) code groups of weights together and get the target shift instead.
_GRIDS = {
    "Q2_K": _Grid(((16, 80, 0x00, 0x55),), np.arange(4.0)),
    "Q3_K": _Grid(((0, 32, 0x00, 0x00), (32, 96, 0x00, 0x55)), np.arange(8.0)),
    "Q4_K": _Grid(((16, 144, 0x00, 0x11),), np.arange(16.0)),
    "Q5_K": _Grid(((16, 48, 0x00, 0x00), (48, 176, 0x00, 0x11)), np.arange(32.0)),
    "Q6_K": _Grid(((0, 128, 0x00, 0x11), (128, 192, 0x00, 0x00)), np.arange(64.0)),
    "IQ4_XS": _Grid(((8, 136, 0x00, 0x11),), np.array(IQ4_NL.kvalues, np.float64)),
}
# ggml finds the GPTQ values as well without the imatrix, in 40-60% of the time
_PLAIN_REQUANT = frozenset({"Q2_K", "Q4_K"})


def select_ratio(type_name: str) -> float:
    """The ratio above which search 2 gives a row of this type a second quantization."""
    return _SELECT.get(type_name, DEFAULT_SELECT)


def cov_block(n_per_row: int) -> int | None:
    """The covariance block for rows of this length, None when none is kept."""
    if n_per_row % COV_BLOCK == 0:
        return COV_BLOCK
    return n_per_row if n_per_row < COV_BLOCK else None


@functools.cache
def _openblas_threads_local() -> tuple[Callable[[int], int], ...]:
    """`openblas_set_num_threads_local` (OpenBLAS >= 0.3.27: the calling thread's BLAS threads)
    of the OpenBLAS copies numpy and scipy ship; none for other BLAS libraries."""
    found = []
    for package in (np, scipy):
        root = Path(package.__file__).parent
        for lib in sorted([*root.parent.glob(f"{root.name}.libs/*openblas*"),
                           *root.glob(".dylibs/*openblas*")]):
            try:
                fn = ctypes.CDLL(str(lib)).openblas_set_num_threads_local
            except (OSError, AttributeError):
                continue
            fn.restype, fn.argtypes = ctypes.c_int, [ctypes.c_int]
            found.append(fn)
    return tuple(found)


@contextmanager
def _one_blas_thread() -> Iterator[None]:
    """numpy's and scipy's BLAS on one thread in this thread. The search runs on export's
    workers, as many as there are CPUs: BLAS threads of their own would compete with them
    (a 256-wide product ran 7 times slower that way on a busy 2-CPU machine)."""
    fns = _openblas_threads_local()
    old = [fn(1) for fn in fns]
    try:
        yield
    finally:
        for fn, n in zip(fns, old):
            fn(n)


def output_error(data: np.ndarray, raw: np.ndarray, type_name: str,
                 cov: np.ndarray) -> np.ndarray:
    """Per row, the mean squared output error (w - q)^T C (w - q) of quantized `raw`.

    `cov` (n_blocks, B, B) is the inputs' second moment in diagonal blocks of B columns.
    Computed in float32, each block's term as the search computes it, so that a row the
    search kept has exactly no more error here than ggml's own quantization.
    """
    w = _as_rows(data, 2)
    with _one_blas_thread():
        return _errors(w, raw, type_name, np.asarray(cov, np.float32))[1].astype(np.float64)


# rows per matrix product: every row goes through the same BLAS kernel whatever the others
# are, so that its numbers, and the search's choices, do not depend on the rows in the call
_TILE = 48


def _tiled(x: np.ndarray, m: np.ndarray) -> np.ndarray:
    """x @ m, _TILE rows of x at a time (the last tile zero-padded)."""
    n = len(x)
    xp = np.zeros((n + -n % _TILE, x.shape[1]), x.dtype)
    xp[:n] = x
    out = np.empty((len(xp), m.shape[1]), np.result_type(x, m))
    for i in range(0, len(xp), _TILE):
        np.matmul(xp[i:i + _TILE], m, out=out[i:i + _TILE])
    return out[:n]


def _errors(w: np.ndarray, raw: np.ndarray, type_name: str,
            cov: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """For float32 rows `w` and blocks `cov`: the errors q - w of `raw` (read back by ggml),
    each row's output error, and what that error would be with independent input columns,
    all float32."""
    err = to_float(type_name, raw, w.size).reshape(w.shape)
    err -= w
    b = cov.shape[-1]
    out, diag = np.zeros(len(w), np.float32), np.zeros(len(w), np.float32)
    for k, ck in enumerate(cov):  # a sum of per-block terms, each computed the same way
        e = np.ascontiguousarray(err[:, k * b:(k + 1) * b])
        out += (_tiled(e, ck) * e).sum(axis=1)
        diag += (np.square(e) * np.diagonal(ck)).sum(axis=1)
    return err, out, diag


def scaled_correlation(cov: np.ndarray, imatrix: np.ndarray) -> np.ndarray:
    """One expert's covariance estimated from the experts' shared one (n_blocks, B, B): its
    correlations, scaled by this expert's mean squared inputs (`imatrix`, one per column)."""
    nb, b = cov.shape[0], cov.shape[-1]
    c = cov.astype(np.float64)
    d = np.sqrt(np.maximum(np.diagonal(c, axis1=1, axis2=2), 1e-30))  # (nb, B)
    s = np.sqrt(np.maximum(np.asarray(imatrix, np.float64), 0.0)).reshape(nb, b) / d
    return (c * s[:, :, None] * s[:, None, :]).astype(np.float32)


def _ordered_cholesky(cov: np.ndarray, damp: float) -> tuple[np.ndarray, np.ndarray] | None:
    """GPTQ's column order (largest input energy first) and the upper-triangular R with
    R R^T = H, H the covariance in that order dampened by `damp` times its mean diagonal.
    R is H's lower Cholesky factor in the reverse order, reversed. None when the block has
    no input energy."""
    d = np.diagonal(cov)
    if not d.mean() > 0:
        return None
    order = np.argsort(-d, kind="stable")
    rev = order[::-1]
    h = cov.take(rev, 0).take(rev, 1).astype(np.float64)
    h[np.diag_indices_from(h)] += damp * d.astype(np.float64).mean()
    low, info = lapack.dpotrf(h, lower=1, clean=1)
    return None if info else (order, low)


def _ldl_feedback(cov: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """LDLQ's feedback (Chee et al. 2023; the same rounding as GPTQ): the column order and
    the strictly upper-triangular F with H = (I + F) D (I + F)^T. Rounding the columns in
    order, column k's target is w_k + sum over j < k of F[j, k] (w_j - q_j)."""
    chol = _ordered_cholesky(cov, _GPTQ_DAMP)
    if chol is None:
        return None
    order, low = chol
    f = low / np.diagonal(low)  # H = (I + F) D (I + F)^T, reversed: scale R's columns
    np.fill_diagonal(f, 0.0)
    return order, np.ascontiguousarray(f[::-1, ::-1])


def _shift_feedback(cov: np.ndarray) -> np.ndarray | None:
    """S, in the columns' own order, with which w + e S is the next target after a
    quantization left errors e (q - w): GPTQ's update (H^-1 = U^T U, U's rows scaled to a
    unit diagonal) from every column's error at once, damped by _SHIFT_STEP."""
    chol = _ordered_cholesky(cov, _SHIFT_DAMP)
    if chol is None:
        return None
    order, low = chol
    inv, info = lapack.dtrtri(low, lower=1)  # H^-1 = R^-T R^-1: U = R^-1, reversed
    if info:
        return None
    u = inv / np.diagonal(inv)[:, None]
    np.fill_diagonal(u, 0.0)
    s = np.empty(u.shape, np.float32)
    s[np.ix_(order, order)] = _SHIFT_STEP * u[::-1, ::-1]
    return s


def _shifted(target: np.ndarray, err: np.ndarray, shifts: list) -> np.ndarray:
    """`target` moved by the feedback of the errors `err` its quantization left, block by
    covariance block."""
    out = target.copy()
    b = target.shape[1] // len(shifts)
    for k, s in enumerate(shifts):
        if s is not None:
            out[:, k * b:(k + 1) * b] += _tiled(np.ascontiguousarray(err[:, k * b:(k + 1) * b]), s)
    return out


def _ldlq(w: np.ndarray, offset: np.ndarray, step: np.ndarray, levels: np.ndarray,
          fb: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """GPTQ/LDLQ rounding on the grid ggml chose for each weight (offset + step * level):
    the columns in `fb`'s order, each rounded after the errors of the ones before moved its
    target; _GPTQ_GROUP columns at a time, whole batches of columns updated by one matrix
    product. Returns the rounded values, float64, shaped like `w`."""
    order, f = fb
    x = np.ascontiguousarray(w[:, order].T)  # (columns, rows): a column is contiguous
    off = np.ascontiguousarray(offset[:, order].T)
    st = np.ascontiguousarray(step[:, order].T)
    inv = np.divide(1.0, st, out=np.zeros_like(st), where=st != 0)
    linear = np.array_equal(levels, np.arange(len(levels)))
    mids = (levels[1:] + levels[:-1]) / 2
    target, q, err = x.copy(), np.empty_like(x), np.empty_like(x)  # err = w - q
    z = np.empty((_GPTQ_GROUP, x.shape[1]))
    top = len(levels) - 1
    n = len(x)
    for b0 in range(0, n, _GPTQ_BATCH):
        b1 = min(b0 + _GPTQ_BATCH, n)
        if b0:
            target[b0:b1] += f[:b0, b0:b1].T @ err[:b0]
        for k0 in range(b0, b1, _GPTQ_GROUP):
            k1 = min(k0 + _GPTQ_GROUP, b1)
            t, zk, qk = target[k0:k1], z[:k1 - k0], q[k0:k1]
            if k0 > b0:
                t += f[b0:k0, k0:k1].T @ err[b0:k0]
            np.subtract(t, off[k0:k1], out=zk)
            zk *= inv[k0:k1]
            if linear:  # np.minimum/maximum: np.clip costs more per call
                np.maximum(np.minimum(np.rint(zk, out=zk), top, out=zk), 0, out=zk)
            else:
                zk[:] = levels[np.searchsorted(mids, zk)]
            np.multiply(zk, st[k0:k1], out=qk)
            qk += off[k0:k1]
            np.subtract(x[k0:k1], qk, out=err[k0:k1])
    out = np.empty_like(q)
    out[order] = q
    return out.T


def _grid(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Offset and step of every weight of one-super-block rows `raw`, read back by ggml from
    copies of the blocks with every code set to 0, and to 1."""
    g = _GRIDS[type_name]
    zero, one = raw.copy(), raw.copy()
    for start, stop, c0, c1 in g.regions:
        zero[:, start:stop] = c0
        one[:, start:stop] = c1
    n = len(raw) * COV_BLOCK
    v0 = to_float(type_name, zero, n).reshape(len(raw), -1).astype(np.float64)
    v1 = to_float(type_name, one, n).reshape(len(raw), -1).astype(np.float64)
    step = (v1 - v0) / (g.levels[1] - g.levels[0])
    return v0 - step * g.levels[0], step


def _search_weights(imatrix: np.ndarray, tries: int, seed: int) -> list[np.ndarray]:
    """The `tries - 1` column weightings for ggml's quantizer tried after the imatrix
    itself: powers of it, flat and smoothed versions, then random log-normal perturbations
    (fixed by `seed`)."""
    im = np.maximum(imatrix.astype(np.float64), 1e-30)
    im = im / im.mean()
    out = [im ** a for a in (0.5, 0.75, 1.25, 1.5, 2.0)] + [np.ones_like(im), im + 1.0]
    rng = np.random.default_rng(seed)
    while len(out) < tries - 1:
        out.append(im * np.exp(rng.normal(0.0, 0.5, im.shape)))
    return [np.ascontiguousarray(x, dtype=np.float32) for x in out[:max(0, tries - 1)]]


def quantize_rows_searched(data: np.ndarray, type_name: str, imatrix: np.ndarray | None,
                           cov: np.ndarray, tries: int = DEFAULT_SEARCH, seed: int = 0, *,
                           strategy: str = "feedback",
                           select: float | None = None) -> np.ndarray:
    """Like `quantize_rows`, but rows get up to `tries` ggml quantizations and keep the one
    with the least output error under the inputs' measured covariance `cov` (n_blocks, B, B).

    ggml's quantizers weigh the input columns as if they were independent. The first
    quantization is exactly `quantize_rows`'s; the bytes stay ggml's, of the same type, and
    never have more output error than it. `strategy`:

    - "feedback": GPTQ-style error feedback through ggml's quantizer. For the scalar
      K-quants and IQ4_XS, GPTQ rounds each row on the grid ggml's first quantization chose,
      and ggml quantizes those values (finding that grid again); for the other types the
      row's target moves against the correlated part of its errors and ggml quantizes it
      again. With `tries` 2 only rows whose error exceeds `select` (`select_ratio`) times
      their error with independent columns get the second quantization; with more, every
      row gets it, then target shifts from its best so far while they improve it, up to
      `tries` quantizations in all.
    - "shift": "feedback" with the target shift for every type (no GPTQ rounding).
    - "weightings": each row the best of `tries` quantizations with other column weightings
      (powers of the imatrix, flat, random ones fixed by `seed`): the search before issue 11.

    Super-blocks of the K and IQ types are quantized independently of each other and are
    chosen one by one; no choice depends on other rows, so the bytes do not depend on how
    rows are split into calls.
    """
    t = checked_type(type_name)
    src = _as_rows(data, 2)
    n_rows, n_per_row = src.shape
    b = cov_block(n_per_row)
    if b is None or cov.shape != (n_per_row // b, b, b):
        raise QuantizeError(f"covariance shape {cov.shape} does not fit rows of {n_per_row}")
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown search strategy {strategy!r}; one of {STRATEGIES}")
    if imatrix is not None:
        imatrix = _check_imatrix(imatrix, n_per_row, t.name)
    if tries < 2 or not n_rows:
        return quantize_rows(src, t.name, imatrix)
    if select is None:
        select = select_ratio(t.name)
    c = np.asarray(cov, np.float32)
    with _one_blas_thread():
        if strategy == "weightings":
            return _best_of_weightings(src, t.name, imatrix, c, tries, seed).reshape(-1)
        if GGML_QUANT_SIZES[t][0] != COV_BLOCK:  # ggml's choices span the row: search rows
            return _feedback_search(src, t.name, imatrix, c, tries, select, False).reshape(-1)
        gptq = strategy == "feedback"
        parts = [_feedback_search(np.ascontiguousarray(src[:, k * b:(k + 1) * b]), t.name,
                                  None if imatrix is None else imatrix[k * b:(k + 1) * b],
                                  c[k:k + 1], tries, select, gptq)
                 for k in range(len(c))]
    return np.concatenate(parts, axis=1).reshape(-1)


def _feedback_search(src: np.ndarray, type_name: str, imatrix: np.ndarray | None,
                     c: np.ndarray, tries: int, select: float, gptq: bool) -> np.ndarray:
    """The "feedback" strategy on rows `src` whose quantization spans covariance blocks `c`
    (one block for super-block types, searched block by block), GPTQ on the grid first
    where `gptq` and the type has one. Returns (rows, row bytes)."""
    raw = quantize_rows(src, type_name, imatrix).reshape(len(src), -1)
    err, out, diag = _errors(src, raw, type_name, c)
    rows = np.flatnonzero(out > select * diag if tries == 2 else out > 0)
    if not rows.size:
        return raw
    w, err, out = src[rows], err[rows], out[rows]
    target = w.copy()
    grid = gptq and type_name in _GRIDS and len(c) == 1
    ldlq = _ldl_feedback(c[0]) if grid else None
    shifts = None
    active = np.arange(len(rows))  # rows whose next candidate would be new
    for i in range(tries - 1):
        im = imatrix
        if i == 0 and ldlq is not None:
            offset, step = _grid(raw[rows], type_name)
            cand = _ldlq(w.astype(np.float64), offset, step, _GRIDS[type_name].levels, ldlq)
            cand = cand.astype(np.float32)
            if type_name in _PLAIN_REQUANT:
                im = None
        else:
            shifts = shifts or [_shift_feedback(ck) for ck in c]
            if all(s is None for s in shifts) or not active.size:
                break
            cand = _shifted(target[active], err[active], shifts)
        cand_raw = quantize_rows(cand, type_name, im).reshape(len(cand), -1)
        e, o, _ = _errors(w[active], cand_raw, type_name, c)
        better = o < out[active]
        won = active[better]
        raw[rows[won]] = cand_raw[better]
        target[won], err[won], out[won] = cand[better], e[better], o[better]
        # a row that did not improve would get the same shift again
        active = np.arange(len(rows)) if i == 0 and ldlq is not None else won
    return raw


def _best_of_weightings(src: np.ndarray, type_name: str, imatrix: np.ndarray | None,
                        c: np.ndarray, tries: int, seed: int) -> np.ndarray:
    """The "weightings" strategy: per row, the best of the imatrix and `tries - 1` other
    column weightings."""
    n_rows, n_per_row = src.shape
    base = np.ones(n_per_row, np.float32) if imatrix is None else imatrix
    best_raw = quantize_rows(src, type_name, imatrix).reshape(n_rows, -1)
    best_err = _errors(src, best_raw, type_name, c)[1]
    for weights in _search_weights(base, tries, seed):
        raw = quantize_rows(src, type_name, weights).reshape(n_rows, -1)
        err = _errors(src, raw, type_name, c)[1]
        better = err < best_err
        best_raw[better] = raw[better]
        best_err = np.where(better, err, best_err)
    return best_raw
