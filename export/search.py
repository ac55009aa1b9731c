"""The output-error search: the same GGUF type, better bytes.

ggml's quantizers treat a row's input columns as independent. `quantize_rows_searched`
feeds each row's rounding errors back through the inputs' measured covariance (GPTQ's error
feedback): on the scalar K-quants' and IQ4_XS's grids it rounds the row again on the grid
ggml chose and writes those codes into ggml's blocks; on other types ggml quantizes the
corrected row again. Per row (per super-block) whichever has the least output error is
kept. The bytes are of the same type, with ggml's scales, and never have more output error
than llama-quantize's.
"""

from __future__ import annotations

import ctypes
import functools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import numpy as np
import scipy
from gguf import GGML_QUANT_SIZES
from gguf.quants import IQ4_NL
from scipy.linalg import lapack

from .ggml import QuantizeError, checked_type, to_float
from .quantize import _as_rows, _check_imatrix, quantize_rows

COV_BLOCK = 256  # covariance is kept in diagonal blocks of this many columns (a super-block)
DEFAULT_SEARCH = 2
STRATEGIES = ("feedback", "shift", "weightings")

# At search 2, a row whose output error is at most this many times what it would be with
# independent input columns keeps ggml's bytes: its rounding errors do not line up with the
# inputs' correlations, and a second candidate would gain little. About 70% of the rows
# get one (benchmarks/search_cost.py).
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


def select_ratio(type_name: str) -> float:
    """The ratio above which search 2 gives a row of this type a second candidate."""
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
    product. Returns the rounded values, float64, shaped like `w`, and their level indices
    (uint8)."""
    order, f = fb
    x = np.ascontiguousarray(w[:, order].T)  # (columns, rows): a column is contiguous
    off = np.ascontiguousarray(offset[:, order].T)
    st = np.ascontiguousarray(step[:, order].T)
    inv = np.divide(1.0, st, out=np.zeros_like(st), where=st != 0)
    linear = np.array_equal(levels, np.arange(len(levels)))
    mids = (levels[1:] + levels[:-1]) / 2
    target, q, err = x.copy(), np.empty_like(x), np.empty_like(x)  # err = w - q
    code = np.empty(x.shape, np.uint8)
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
                code[k0:k1] = zk
            else:
                code[k0:k1] = j = np.searchsorted(mids, zk)
                zk[:] = levels[j]
            np.multiply(zk, st[k0:k1], out=qk)
            qk += off[k0:k1]
            np.subtract(x[k0:k1], qk, out=err[k0:k1])
    out, codes = np.empty_like(q), np.empty_like(code)
    out[order], codes[order] = q, code
    return out.T, codes.T


def _all_codes(raw: np.ndarray, type_name: str, code: int) -> np.ndarray:
    """A copy of one-super-block rows `raw` with every code set to `code` (0 or 1), the
    scales kept."""
    out = raw.copy()
    for start, stop, *fill in _GRIDS[type_name].regions:
        out[:, start:stop] = fill[code]
    return out


def _grid(raw: np.ndarray, type_name: str) -> tuple[np.ndarray, np.ndarray]:
    """Offset and step of every weight of one-super-block rows `raw`, read back by ggml from
    copies of the blocks with every code set to 0, and to 1."""
    g = _GRIDS[type_name]
    zero, one = _all_codes(raw, type_name, 0), _all_codes(raw, type_name, 1)
    n = len(raw) * COV_BLOCK
    v0 = to_float(type_name, zero, n).reshape(len(raw), -1).astype(np.float64)
    v1 = to_float(type_name, one, n).reshape(len(raw), -1).astype(np.float64)
    step = (v1 - v0) / (g.levels[1] - g.levels[0])
    return v0 - step * g.levels[0], step


@functools.cache
def _code_bits(type_name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Where a super-block of `type_name` keeps its codes, found through ggml's dequantizer:
    for each bit of the code regions (byte, then bit, least significant first), the byte,
    the weight whose level index it belongs to, and the power of two it adds there. Each
    bit is flipped alone in a block whose codes are all 0; the one value that moves tells
    which weight and how far."""
    g = _GRIDS[type_name]
    w = np.random.default_rng(0).standard_normal((1, COV_BLOCK)).astype(np.float32) + 3.0
    base = _all_codes(quantize_rows(w, type_name).reshape(1, -1), type_name, 0)
    offset, step = (x[0] for x in _grid(base, type_name))
    at = np.concatenate([np.arange(start, stop) for start, stop, _, _ in g.regions])
    n = 8 * len(at)
    flipped = np.repeat(base, n, axis=0)
    bit = np.tile(np.arange(8), len(at))
    flipped[np.arange(n), np.repeat(at, 8)] ^= (1 << bit).astype(np.uint8)
    v0 = to_float(type_name, base, COV_BLOCK).astype(np.float64)
    moved = to_float(type_name, flipped, n * COV_BLOCK).reshape(n, COV_BLOCK) - v0
    weight = np.argmax(moved != 0, axis=1)
    level = (v0[weight] + moved[np.arange(n), weight] - offset[weight]) / step[weight]
    index = np.abs(level[:, None] - g.levels).argmin(axis=1)
    power = np.round(np.log2(np.maximum(index, 1))).astype(np.int64)
    n_pow = int(round(np.log2(len(g.levels))))
    each = np.zeros((COV_BLOCK, n_pow), np.int64)
    np.add.at(each, (weight, np.minimum(power, n_pow - 1)), 1)
    if (((moved != 0).sum(axis=1) != 1).any() or (2 ** power != index).any()
            or not np.allclose(g.levels[index], level, atol=1e-3) or (each != 1).any()):
        raise QuantizeError(f"{type_name}: the code layout read through ggml's dequantizer "
                            "is not one bit per level power of one weight; ggml changed")
    return at, weight, power.astype(np.uint8)


def _pack(raw: np.ndarray, codes: np.ndarray, type_name: str) -> np.ndarray:
    """One-super-block rows `raw` with their codes replaced by `codes` (level indices,
    uint8, rows x COV_BLOCK); the scales stay."""
    at, weight, power = _code_bits(type_name)
    out = _all_codes(raw, type_name, 0)
    bits = (codes[:, weight] >> power) & 1
    out[:, at] ^= np.packbits(bits.reshape(len(raw), -1, 8), axis=2, bitorder="little")[..., 0]
    return out


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
    """Like `quantize_rows`, but rows get up to `tries` candidate quantizations and keep the
    one with the least output error under the inputs' measured covariance `cov` (n_blocks, B, B).

    ggml's quantizers weigh the input columns as if they were independent. The first
    quantization is exactly `quantize_rows`'s; the bytes stay ggml's, of the same type, and
    never have more output error than it. `strategy`:

    - "feedback": GPTQ-style error feedback through ggml's quantizer. For the scalar
      K-quants and IQ4_XS, GPTQ rounds each row on the grid ggml's first quantization chose,
      and its codes are written into those blocks (`_pack`: ggml's scales, GPTQ's codes);
      for the other types the row's target moves against the correlated part of its errors
      and ggml quantizes it again. With `tries` 2 only rows whose error exceeds `select`
      (`select_ratio`) times their error with independent columns get the second
      candidate; with more, every row gets it, then target shifts from its best so far
      while they improve it, up to `tries` candidates in all.
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
        if i == 0 and ldlq is not None:  # GPTQ's codes on ggml's grid, written in place
            first = raw[rows]
            offset, step = _grid(first, type_name)
            levels = _GRIDS[type_name].levels
            cand, codes = _ldlq(w.astype(np.float64), offset, step, levels, ldlq)
            cand_raw = _pack(first, codes, type_name)
            cand = cand.astype(np.float32)
        else:
            shifts = shifts or [_shift_feedback(ck) for ck in c]
            if all(s is None for s in shifts) or not active.size:
                break
            cand = _shifted(target[active], err[active], shifts)
            cand_raw = quantize_rows(cand, type_name, imatrix).reshape(len(cand), -1)
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
