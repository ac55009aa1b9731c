"""Positioned reads of model files, safe from many threads at once, and the safetensors
layout: what `export.source` reads tensors with.

Tensor data is read with `os.preadv` into fresh buffers, not through a memory map (pages of
a mapped checkpoint stay in the process's resident set once touched). Half-precision and
FP8 data are widened to float32 in chunks of `_CHUNK` elements.
"""

from __future__ import annotations

import json
import math
import operator
import os
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


class SourceError(ValueError):
    """The source directory cannot be read as a model."""


Rows = int | Sequence[int] | None  # an index or indices along a tensor's first axis


def read_json(path: Path) -> dict:
    """A JSON file, or a SourceError that names it and where it stops being JSON."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise SourceError(f"{path} is not UTF-8 text: {e}") from e
    except json.JSONDecodeError as e:
        raise SourceError(f"{path} is not valid JSON: {e.msg} at line {e.lineno} column "
                          f"{e.colno}") from e


def check_finite(data: np.ndarray, name: str, path: Path) -> np.ndarray:
    """`data`, unless it holds NaN or infinite values: llama.cpp would compute garbage."""
    if not np.isfinite(data).all():
        bad = ~np.isfinite(data)
        first = tuple(int(i) for i in np.argwhere(bad)[0])
        raise SourceError(f"{path}: tensor {name} has {int(bad.sum())} NaN or infinite "
                          f"values (the first at index {first}); the checkpoint is damaged")
    return data


class PositionedFile:
    """A file read at explicit offsets, safe from many threads at once."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None
        self._lock = threading.Lock()

    def _open(self):
        with self._lock:
            if self._fh is None:
                self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115  # lives with us
        return self._fh

    def read_into(self, out: np.ndarray, offset: int) -> None:
        """Fill the C-contiguous array `out` with the file's bytes from `offset` on."""
        fh = self._open()
        view = memoryview(out.reshape(-1).view(np.uint8))
        while view:
            if hasattr(os, "preadv"):
                n = os.preadv(fh.fileno(), [view], offset)
            else:  # no positioned reads here: one reader at a time
                with self._lock:
                    fh.seek(offset)
                    n = fh.readinto(view)
            if not n:
                raise SourceError(f"{self.path} ends at byte {offset}, before the data its "
                                  "header announces: is the file truncated?")
            view, offset = view[n:], offset + n


def row_runs(rows: Rows, n: int) -> tuple[list[tuple[int, int]], bool]:
    """The rows `rows` selects of an axis of length n, as (first, count) runs of consecutive
    rows in output order, and whether the axis is dropped (a single int, as numpy does)."""
    if rows is None:
        return [(0, n)], False
    if isinstance(rows, (int, np.integer)):
        i = operator.index(rows)
        if not -n <= i < n:
            raise IndexError(f"row {i} is out of range for an axis of length {n}")
        return [(i % n, 1)], True
    idx = np.asarray(list(rows), dtype=np.int64).reshape(-1)
    if not idx.size:
        return [], False
    if idx.min() < -n or idx.max() >= n:
        raise IndexError(f"rows {idx.min()}..{idx.max()} are out of range for an axis of "
                         f"length {n}")
    idx = np.where(idx < 0, idx + n, idx)
    cuts = np.flatnonzero(np.diff(idx) != 1) + 1
    starts, ends = np.r_[0, cuts], np.r_[cuts, idx.size]
    return [(int(idx[a]), int(b - a)) for a, b in zip(starts, ends, strict=True)], False


def row_ids(runs: list[tuple[int, int]]) -> np.ndarray:
    """The row indices `runs` name, in order."""
    return np.concatenate([np.arange(f, f + c) for f, c in runs] or [np.zeros(0, np.int64)])


def _e4m3_table() -> np.ndarray:
    """float32 value of each FP8 e4m3 ("fn": no infinities) byte: sign, 4 exponent bits
    (bias 7), 3 mantissa bits; exponent 0 is subnormal, S.1111.111 is NaN."""
    b = np.arange(256)
    sign = np.where(b & 0x80, -1.0, 1.0)
    exp, man = (b >> 3) & 0xF, b & 0x7
    value = np.where(exp == 0, man / 8 * 2.0**-6, (1 + man / 8) * 2.0 ** (exp - 7.0))
    value = np.where((b & 0x7F) == 0x7F, np.nan, sign * value)
    return value.astype(np.float32)


_E4M3 = _e4m3_table()

# safetensors dtypes: bytes per element (to check headers), and how we read them
_ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2,
             "F16": 2, "BF16": 2, "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
_RAW = {"F32": np.dtype("<f4"), "F16": np.dtype("<f2"), "BF16": np.dtype("<u2"),
        "F8_E4M3": np.dtype("u1")}
_CHUNK = 1 << 20  # elements widened at a time: the only buffer beside the float32 result
_MAX_HEADER = 100_000_000  # safetensors' own limit


@dataclass(frozen=True)
class SafetensorsEntry:
    """One tensor of a .safetensors file: where its bytes are."""

    dtype: str
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file


class SafetensorsFile:
    """A .safetensors file: an 8-byte little-endian header length, a JSON header naming each
    tensor's dtype, shape and data_offsets, then the raw little-endian data."""

    def __init__(self, path: Path):
        self.path = path
        self.file = PositionedFile(path)
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            n = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < n <= min(_MAX_HEADER, size - 8):
                raise SourceError(f"{path} is not a safetensors file (header length {n}, "
                                  f"file size {size})")
            try:
                header = json.loads(fh.read(n))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                raise SourceError(f"{path}: unreadable safetensors header: {e}") from e
        start, data_size = 8 + n, size - 8 - n
        try:
            listed = [(name, info["dtype"], tuple(int(d) for d in info["shape"]),
                       *(int(x) for x in info["data_offsets"]))
                      for name, info in header.items() if name != "__metadata__"]
        except (AttributeError, KeyError, TypeError, ValueError) as e:
            raise SourceError(f"{path}: malformed safetensors header ({e!r})") from e
        self.entries: dict[str, SafetensorsEntry] = {}
        for name, dtype, shape, begin, end in listed:
            want = math.prod(shape) * _ITEMSIZE.get(dtype, 0)
            if not 0 <= begin <= end <= data_size or (want and end - begin != want):
                raise SourceError(f"{path}: tensor {name} {dtype} {list(shape)} has "
                                  f"data_offsets [{begin}, {end}] in {data_size} bytes of data; "
                                  "the file is truncated or damaged")
            self.entries[name] = SafetensorsEntry(dtype, shape, start + begin)
        spans = sorted((begin, end, name) for name, _, _, begin, end in listed if end > begin)
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise SourceError(f"{path}: tensors {a} and {b} overlap (data_offsets "
                                  f"{begin_b} < {end_a}); the file is damaged")

    def read_f32(self, e: SafetensorsEntry, first: int, count: int, out: np.ndarray) -> None:
        """Elements [first, first + count) of tensor `e`, widened into float32 `out` (1-D)."""
        raw = _RAW[e.dtype]
        offset = e.offset + first * raw.itemsize
        if e.dtype == "F32" and sys.byteorder == "little":
            self.file.read_into(out, offset)
            return
        buf = np.empty(min(_CHUNK, count), raw)
        for s in range(0, count, _CHUNK):
            m = min(_CHUNK, count - s)
            self.file.read_into(buf[:m], offset + s * raw.itemsize)
            dst = out[s:s + m]
            if e.dtype == "BF16":  # bfloat16 is the top half of a float32: exact
                np.left_shift(buf[:m], 16, out=dst.view(np.uint32), dtype=np.uint32)
            elif e.dtype == "F8_E4M3":
                np.take(_E4M3, buf[:m], out=dst)
            else:  # F16 (or big-endian F32): numpy's cast is exact
                dst[...] = buf[:m]
