"""Quantize numpy arrays with ggml's own quantizer, byte for byte what llama-quantize writes.

gguf-py can produce only a few types, so we call `ggml_quantize_chunk` in the
`libggml-base` that llama-cpp-python ships (the same code llama-quantize runs) through
ctypes (`export.ggml` loads it). ctypes releases the GIL during the call, so a
ThreadPoolExecutor quantizes row chunks and expert slices in parallel. `dequantize` reads
back with ggml's own dequantizer (`export.ggml.to_float`).

Every quantizer in ggml works row by row (each row sees only its own values and the
imatrix), so splitting a matrix into row chunks never changes the bytes.

The output-error search that improves these bytes lives in export/search.py.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from concurrent.futures import Executor, Future, ProcessPoolExecutor

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from memory_planner.quant_types import qtype, tensor_nbytes

from .ggml import (
    GGMLLibraryError,
    QuantizeError,
    checked_type,
    cpu_row_quantizer,
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
    the same rows of a contiguous output buffer: by ggml's file quantizer, or by `rows_fn`
    (`export.ggml.cpu_row_quantizer`)."""

    def __init__(self, t: GGMLQuantizationType, src: np.ndarray, dst: np.ndarray,
                 imatrix: np.ndarray | None, row0: int, nrows: int,
                 rows_fn: Callable | None = None) -> None:
        self.t, self.src, self.dst, self.imatrix = t, src, dst, imatrix
        self.row0, self.nrows, self.rows_fn = row0, nrows, rows_fn

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
        size = self.nrows * row_size
        out = self.dst.ctypes.data + self.row0 * row_size
        if self.rows_fn is not None:  # writes exactly `size` bytes at `out`
            self.rows_fn(self.src.ctypes.data + self.row0 * n_per_row * 4, out,
                         self.nrows * n_per_row)
        else:
            im = self.imatrix.ctypes.data if self.imatrix is not None else None
            # ggml offsets both pointers itself from `start` (in elements)
            got = lib.ggml_quantize_chunk(self.t.value, self.src.ctypes.data,
                                          self.dst.ctypes.data, self.row0 * n_per_row,
                                          self.nrows, n_per_row, im)
            if got != size:
                raise GGMLLibraryError(
                    f"{self.t.name}: ggml wrote {got} bytes for {self.nrows} rows, "
                    f"expected {size}"
                )
        if not lib.ggml_validate_row_data(self.t.value, out, size):
            raise QuantizeError(
                f"{self.t.name}: quantized rows {self.row0}..{self.row0 + self.nrows} failed "
                "ggml's validation"
            )


def _row_jobs(t: GGMLQuantizationType, src: np.ndarray, dst: np.ndarray,
              imatrix: np.ndarray | None, split: bool,
              rows_fn: Callable | None = None) -> list[_Job]:
    n_rows, n_per_row = src.shape
    step = n_rows
    if split:
        step = max(1, -(-MIN_CHUNK_ELEMENTS // n_per_row))
    return [_Job(t, src, dst, imatrix, r, min(step, n_rows - r), rows_fn)
            for r in range(0, n_rows, step)]


def _run(jobs: list[_Job], executor: Executor | None) -> None:
    if executor is None or len(jobs) == 1:
        for job in jobs:
            job()
        return
    futures: list[Future] = [executor.submit(job) for job in jobs]
    for f in futures:
        f.result()  # re-raises the first error; the others still finish writing


def quantize_rows(data: np.ndarray, type_name: str, imatrix: np.ndarray | None = None,
                  executor: Executor | None = None, cpu_rows: bool = False) -> np.ndarray:
    """Quantize a 2-D (n_rows, n_per_row) matrix to `type_name` with ggml.

    Returns the tensor's bytes as a flat uint8 array, exactly as llama.cpp stores them.
    `imatrix` (n_per_row,) weighs the columns. With a thread `executor`, row chunks run in
    parallel; the bytes are the same either way. Do not call this from a task running on
    that same executor: waiting for its own pool could deadlock.
    `cpu_rows`, for files edgemoe alone runs (calibration intermediates): without an imatrix,
    Q8_0 by ggml-cpu's row quantizer (`export.ggml.cpu_row_quantizer`: 8x faster, other
    bytes at rounding ties); other types as without it.
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
    rows_fn = cpu_row_quantizer(t.name) if cpu_rows and imatrix is None else None
    if n_rows:
        _run(_row_jobs(t, src, out, imatrix, executor is not None, rows_fn), executor)
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
    if t.name == "F32":
        return raw.view(np.float32).reshape(shape).copy()
    # ggml's own dequantizer: the values gguf-py's numpy one gives (tests/export/test_ggml.py),
    # in C and without the GIL, so threads read back in parallel
    return to_float(t.name, raw, n).reshape(shape)


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
        n, d = error_sums(w, dequantize(raw, type_name, w.shape), im_e)
        num += n
        den += d
    return error_ratio(num, den)


def error_sums(w: np.ndarray, q: np.ndarray, imatrix: np.ndarray | None
               ) -> tuple[float, float]:
    """(||Q(W) - W||^2, ||W||^2) of rows `w` read back as `q`, weighted per column by
    `imatrix`: `relative_error`'s sums. ggml quantizes row by row, so the rows
    `sample_rows` picks of a tensor quantized whole give the sums of quantizing them alone."""
    weight = (np.ones(w.shape[-1]) if imatrix is None
              else np.asarray(imatrix, np.float32).astype(np.float64))
    num = float(np.square(q - w, dtype=np.float64).sum(axis=0) @ weight)
    den = float(np.square(w, dtype=np.float64).sum(axis=0) @ weight)
    return num, den


def error_ratio(num: float, den: float) -> float:
    if den == 0.0:
        return 0.0 if num == 0.0 else float("inf")
    return num / den
