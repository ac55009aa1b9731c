"""Positioned reads of model files, safe from many threads at once, and the safetensors
layout: what `export.source` reads tensors with.

Tensor data is read with `os.preadv` into fresh buffers, not through a memory map (pages of
a mapped checkpoint stay in the process's resident set once touched). A read of at least
`DIRECT_MIN` bytes bypasses the page cache (`O_DIRECT`, where the file system allows it), a
piece of `DIRECT_PIECE` bytes at a time into a page-aligned buffer each thread keeps: each
pass reads a model once, so caching it only takes memory from everything else, and costs
a copy (llama.cpp's loader has such a mode too, `LLAMA_LOAD_MODE_DIRECT_IO`). On a virtual
machine whose host takes back the guest's free memory, every fresh page-cache page also
costs a host fault: one layer segment of `benchmarks/scale.py`'s 8gb checkpoint (2.5 GB of
BF16 read, 1.33 GB of Q8_0 written) took 6.4 s, 8.1 s of it kernel time, through the cache
and 3.6 s (3.3 s) direct. Half-precision and FP8 data are widened to float32 a piece at a
time.
"""

from __future__ import annotations

import json
import math
import operator
import os
import struct
import sys
import threading
from collections.abc import Iterator, Sequence
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


DIRECT_MIN = 1 << 20  # bytes: reads at least this big bypass the page cache
DIRECT_PIECE = 8 << 20  # bytes read at a time (a multiple of every element size)
_ALIGN = 4096  # O_DIRECT's offset, length and buffer alignment (any block size up to 4 KiB)
_scratch = threading.local()  # each thread's aligned buffer (its pages stay warm)


class PositionedFile:
    """A file read at explicit offsets, safe from many threads at once."""

    def __init__(self, path: Path):
        self.path = path
        self._fh = None
        self._direct: int | None = None  # the O_DIRECT descriptor, -1 where there is none
        self._lock = threading.Lock()

    def _open(self):
        with self._lock:
            if self._fh is None:
                self._fh = open(self.path, "rb", buffering=0)  # noqa: SIM115  # lives with us
        return self._fh

    def _direct_fd(self) -> int:
        """A descriptor reading past the page cache, or -1 (no O_DIRECT here, or the file
        system refuses it: tmpfs, some network and FUSE file systems)."""
        with self._lock:
            if self._direct is None:
                try:
                    self._direct = os.open(self.path, os.O_RDONLY | os.O_DIRECT)
                except (AttributeError, OSError):
                    self._direct = -1
            return self._direct

    def _no_direct(self) -> None:
        """Read through the page cache from now on (the O_DIRECT descriptor stays open, as
        the other does: another thread may be reading with it)."""
        with self._lock:
            self._direct = -1

    def read_into(self, out: np.ndarray, offset: int) -> None:
        """Fill the C-contiguous array `out` with the file's bytes from `offset` on."""
        flat = out.reshape(-1).view(np.uint8)
        if flat.nbytes >= DIRECT_MIN and self._direct_fd() >= 0:
            pos = 0
            for piece in self.pieces(offset, flat.nbytes):
                flat[pos:pos + piece.nbytes] = piece
                pos += piece.nbytes
            return
        self._read_cached(memoryview(flat), offset)

    def pieces(self, offset: int, nbytes: int) -> Iterator[np.ndarray]:
        """The bytes [offset, offset + nbytes) as consecutive uint8 arrays of DIRECT_PIECE
        bytes (the last shorter), each valid until the next is asked for: views of this
        thread's buffer, filled past the page cache where the reads are large enough."""
        busy = getattr(_scratch, "busy", False)  # a piece of another read is still in use
        buf = None if busy else getattr(_scratch, "buf", None)
        if buf is None or buf.nbytes < DIRECT_PIECE + _ALIGN:
            raw = np.empty(DIRECT_PIECE + 2 * _ALIGN, np.uint8)
            buf = raw[-raw.ctypes.data % _ALIGN:][:DIRECT_PIECE + _ALIGN]
            if not busy:
                _scratch.buf = buf
        _scratch.busy = True
        try:
            for first in range(offset, offset + nbytes, DIRECT_PIECE):
                n = min(DIRECT_PIECE, offset + nbytes - first)
                yield self._piece(buf, first, n, direct=nbytes >= DIRECT_MIN)
        finally:
            _scratch.busy = busy

    def _piece(self, buf: np.ndarray, first: int, n: int, direct: bool) -> np.ndarray:
        """Bytes [first, first + n) of the file, read into `buf`."""
        fd = self._direct_fd() if direct else -1
        if fd >= 0:
            lo = first - first % _ALIGN
            hi = -(-(first + n) // _ALIGN) * _ALIGN
            try:
                got = self._read_direct(fd, buf[:hi - lo], lo)
            except OSError:  # refused after all (an alignment this file system wants)
                self._no_direct()
            else:
                if got < first - lo + n:
                    raise SourceError(f"{self.path} ends at byte {lo + got}, before the data "
                                      "its header announces: is the file truncated?")
                return buf[first - lo:first - lo + n]
        self._read_cached(memoryview(buf[:n]), first)
        return buf[:n]

    @staticmethod
    def _read_direct(fd: int, view: np.ndarray, offset: int) -> int:
        got = 0
        while got < view.nbytes:
            n = os.preadv(fd, [memoryview(view[got:])], offset + got)
            if not n:  # the end of the file
                break
            got += n
        return got

    def _read_cached(self, view: memoryview, offset: int) -> None:
        fh = self._open()
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
        pos = 0
        for piece in self.file.pieces(offset, count * raw.itemsize):
            src = piece.view(raw)
            dst = out[pos:pos + src.size]
            if e.dtype == "BF16":  # bfloat16 is the top half of a float32: exact
                np.left_shift(src, 16, out=dst.view(np.uint32), dtype=np.uint32)
            elif e.dtype == "F8_E4M3":
                np.take(_E4M3, src, out=dst)
            else:  # F16 (or big-endian F32): numpy's cast is exact
                dst[...] = src
            pos += src.size
