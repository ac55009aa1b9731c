"""Read a model one tensor at a time: a Hugging Face directory or a GGUF file.

Never loads the whole model: `load(name)` reads one tensor (or a few rows of its first axis)
and returns float32. `HFSource` reads F32/F16/BF16 safetensors and FP8 (e4m3) weights with
block scales (`weight_scale_inv`, as DeepSeek-V3 ships), dequantized on the fly;
`GGUFSource` reads F32/F16/BF16/Q8_0 GGUF files, the precisions model pages publish.
`open_source(path)` picks one from the path.

Tensor data is read with positioned reads (`os.preadv`) into fresh buffers, not through a
memory map: pages of a mapped checkpoint stay in the process's resident set once touched, so
an export's RSS would grow towards the checkpoint's size. Half-precision data is widened to
float32 in small chunks, so a load costs its float32 result and little more.
"""

from __future__ import annotations

import json
import logging
import math
import operator
import os
import struct
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_writer import GGUFValue

from .gguf_check import check_gguf

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The source directory cannot be read as a model."""


class MissingFileError(SourceError):
    """A file the model needs (config, shard) is not there."""


_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_FP8_DTYPES = {"F8_E4M3"}
_SCALE_SUFFIX = "_scale_inv"  # FP8 block scales: "<weight name>_scale_inv"

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


def open_source(path: str | Path) -> HFSource | GGUFSource:
    """A GGUF file or a Hugging Face checkpoint directory, by what `path` is."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return GGUFSource(p)
    return HFSource(p)


# ---------------------------------------------------------------------------------------------
# Positioned reads
# ---------------------------------------------------------------------------------------------


class _File:
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


def _runs(rows: Rows, n: int) -> tuple[list[tuple[int, int]], bool]:
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


def _row_ids(runs: list[tuple[int, int]]) -> np.ndarray:
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
class _Entry:
    """One tensor of a .safetensors file: where its bytes are."""

    dtype: str
    shape: tuple[int, ...]
    offset: int  # of the first byte, from the start of the file


class _Safetensors:
    """A .safetensors file: an 8-byte little-endian header length, a JSON header naming each
    tensor's dtype, shape and data_offsets, then the raw little-endian data."""

    def __init__(self, path: Path):
        self.path = path
        self.file = _File(path)
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
        self.entries: dict[str, _Entry] = {}
        for name, dtype, shape, begin, end in listed:
            want = math.prod(shape) * _ITEMSIZE.get(dtype, 0)
            if not 0 <= begin <= end <= data_size or (want and end - begin != want):
                raise SourceError(f"{path}: tensor {name} {dtype} {list(shape)} has "
                                  f"data_offsets [{begin}, {end}] in {data_size} bytes of data; "
                                  "the file is truncated or damaged")
            self.entries[name] = _Entry(dtype, shape, start + begin)
        spans = sorted((begin, end, name) for name, _, _, begin, end in listed if end > begin)
        for (_, end_a, a), (begin_b, _, b) in zip(spans, spans[1:]):
            if begin_b < end_a:
                raise SourceError(f"{path}: tensors {a} and {b} overlap (data_offsets "
                                  f"{begin_b} < {end_a}); the file is damaged")

    def read_f32(self, e: _Entry, first: int, count: int, out: np.ndarray) -> None:
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


class HFSource:
    """A Hugging Face checkpoint directory: config.json plus one or many .safetensors.

    FP8 weights (safetensors F8_E4M3, `quantization_config.weight_block_size` in config.json)
    are multiplied by their `<name>_scale_inv` block scales when loaded, exactly as llama.cpp's
    converter does; the scale tensors themselves are not listed in `names`.
    """

    kind = "hf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingFileError(f"{self.path} is not a directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise MissingFileError(f"{self.path} has no config.json: not a Hugging Face model")
        self.config: dict = read_json(config_path)
        self._files: dict[Path, _Safetensors] = {}  # headers read so far
        self._lock = threading.Lock()
        self._where = self._index_tensors()  # tensor name -> shard file
        self._names = [n for n in self._where if not n.endswith(_SCALE_SUFFIX)]

    @property
    def name(self) -> str:
        """The model's name for general.name: the directory name."""
        return self.path.name

    def _index_tensors(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise SourceError(f"{index} has no weight_map")
            shards = sorted(set(weight_map.values()))
            missing = [s for s in shards if not (self.path / s).is_file()]
            if missing:
                raise MissingFileError(
                    f"{self.path}: {len(missing)} of {len(shards)} shards named in "
                    f"{index.name} are missing: {', '.join(missing)}"
                )
            return {name: self.path / shard for name, shard in weight_map.items()}
        files = sorted(self.path.glob("*.safetensors"))
        if not files:
            found = ", ".join(sorted(p.name for p in self.path.iterdir())) or "nothing"
            raise MissingFileError(
                f"{self.path} has no .safetensors weights (found: {found}); "
                "edgemoe reads safetensors checkpoints"
            )
        where: dict[str, Path] = {}
        for f in files:
            st = self._files[f] = _Safetensors(f)
            where.update(dict.fromkeys(st.entries, f))
        return where

    @property
    def names(self) -> list[str]:
        """Weight tensors; FP8 scale tensors are folded into their weights, not listed."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._where and not name.endswith(_SCALE_SUFFIX)

    def _locate(self, name: str) -> tuple[_Safetensors, _Entry]:
        try:
            f = self._where[name]
        except KeyError:
            raise MissingFileError(f"tensor {name} is not in {self.path}") from None
        with self._lock:
            st = self._files.get(f)
            if st is None:
                st = self._files[f] = _Safetensors(f)
        try:
            return st, st.entries[name]
        except KeyError:
            raise SourceError(f"model.safetensors.index.json puts {name} in {f.name}, "
                              "which does not hold it") from None

    def shape(self, name: str) -> tuple[int, ...]:
        return self._locate(name)[1].shape

    def dtype(self, name: str) -> str:
        return self._locate(name)[1].dtype

    def load(self, name: str, rows: Rows = None) -> np.ndarray:
        """One tensor as a float32 numpy array; `rows` picks indices of its first axis, and
        only those rows are read from disk."""
        st, e = self._locate(name)
        if e.dtype not in _FLOAT_DTYPES | _FP8_DTYPES:
            raise SourceError(f"{st.path}: tensor {name} is {e.dtype}; edgemoe reads F32, F16, "
                              "BF16 and block-scaled FP8 (e4m3) checkpoints")
        if not e.shape:  # a scalar
            out = np.empty(1, np.float32)
            st.read_f32(e, 0, 1, out)
            return out.reshape(())
        runs, drop = _runs(rows, e.shape[0])
        per_row = math.prod(e.shape[1:])
        out = np.empty((sum(c for _, c in runs), *e.shape[1:]), np.float32)
        flat, pos = out.reshape(-1), 0
        for first, count in runs:
            st.read_f32(e, first * per_row, count * per_row, flat[pos:pos + count * per_row])
            pos += count * per_row
        if e.dtype in _FP8_DTYPES:
            out = self._dequantize_fp8(name, out, None if rows is None else _row_ids(runs))
        return out[0] if drop else out

    def _dequantize_fp8(self, name: str, weight: np.ndarray,
                        rows: np.ndarray | None) -> np.ndarray:
        """weight * scale_inv, each scale covering one block (128 x 128 in DeepSeek-V3);
        `weight` holds the tensor's rows `rows` (all of them if None) and is scaled in place."""
        scale_name = name + _SCALE_SUFFIX
        if scale_name not in self._where:
            raise SourceError(f"FP8 tensor {name} has no {scale_name}: edgemoe reads FP8 "
                              "checkpoints with block scales (weight_scale_inv) only")
        scale = self.load(scale_name)
        quant = self.config.get("quantization_config") or {}
        block = [int(b) for b in quant.get("weight_block_size") or [128, 128]]
        full = self.shape(name)
        reps = [1] * (scale.ndim - len(block)) + block  # leading axes (experts) unblocked
        if len(reps) != len(full) or any(s * r < n for s, r, n in zip(scale.shape, reps, full,
                                                                       strict=True)):
            raise SourceError(f"{scale_name} {tuple(scale.shape)} does not cover {name} "
                              f"{full} in blocks of {block}")
        if rows is not None:
            scale, reps[0] = scale[rows // reps[0]], 1
        for axis, r in enumerate(reps):
            if r > 1:
                scale = np.repeat(scale, r, axis=axis)
        weight *= scale[tuple(slice(0, n) for n in weight.shape)]  # the last blocks may be partial
        return weight

    def json_file(self, filename: str) -> dict | None:
        p = self.path / filename
        return read_json(p) if p.is_file() else None


# GGUF tensor types a source may hold: exact (F32, F16, BF16) or near-lossless (Q8_0).
# Re-quantizing an already low-bit file would compound two rounding errors.
GGUF_SOURCE_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0"})


class GGUFSource:
    """A single-file GGUF model (F32, F16, BF16 or Q8_0 tensors).

    gguf-py parses the header; tensor data is read with positioned reads, like `HFSource`.

    `names` are the GGUF tensor names and `shape` is in numpy order (ggml's ne reversed), so
    an adapter built from the file's own metadata maps names one to one. `metadata` holds
    every key-value pair with its GGUF type, for copying into the new file.
    """

    kind = "gguf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"{self.path} is not a file")
        check_gguf(self.path)  # a damaged or hostile header fails here, bounded
        try:
            self._reader = gguf.GGUFReader(self.path, "r")
        except (ValueError, OSError) as e:
            raise SourceError(f"{self.path} is not a readable GGUF file: {e}") from e
        self.metadata: dict[str, GGUFValue] = {}
        for key, field in self._reader.fields.items():
            if key.startswith("GGUF."):  # header counts, not key-value pairs
                continue
            sub = field.types[-1] if field.types[0] == gguf.GGUFValueType.ARRAY else None
            self.metadata[key] = GGUFValue(field.contents(), field.types[0], sub)
        self.config = {k: v.value for k, v in self.metadata.items()}  # config-like access
        n_split = int(self.config.get(gguf.Keys.Split.LLM_KV_SPLIT_COUNT, 1))
        if n_split > 1:
            raise SourceError(f"{self.path} is one of {n_split} split GGUF files; merge them "
                              "first (llama-gguf-split --merge)")
        self._tensors = {t.name: t for t in self._reader.tensors}
        self._file = _File(self.path)
        bad = [f"{t.name} ({t.tensor_type.name})" for t in self._reader.tensors
               if t.tensor_type.name not in GGUF_SOURCE_TYPES]
        if bad:
            raise SourceError(
                f"{self.path} holds {len(bad)} tensors in types edgemoe does not re-quantize "
                f"from: {', '.join(bad[:5])}{' ...' if len(bad) > 5 else ''}; use an F32, F16, "
                "BF16 or Q8_0 GGUF (re-quantizing a low-bit file adds a second rounding error)")

    @property
    def name(self) -> str:
        """general.name of the file, else its stem."""
        return str(self.config.get(gguf.Keys.General.NAME) or self.path.stem)

    @property
    def arch(self) -> str:
        try:
            return str(self.config[gguf.Keys.General.ARCHITECTURE])
        except KeyError:
            raise SourceError(f"{self.path} has no general.architecture") from None

    @property
    def names(self) -> list[str]:
        return list(self._tensors)

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def _tensor(self, name: str):
        try:
            return self._tensors[name]
        except KeyError:
            raise MissingFileError(f"tensor {name} is not in {self.path}") from None

    def shape(self, name: str) -> tuple[int, ...]:
        """Numpy order: ggml's ne reversed."""
        return tuple(int(n) for n in reversed(self._tensor(name).shape))

    def dtype(self, name: str) -> str:
        return self._tensor(name).tensor_type.name

    def load(self, name: str, rows: Rows = None) -> np.ndarray:
        """One tensor as float32; `rows` picks indices of its first axis (e.g. experts of a
        stacked expert tensor), and only those are read and dequantized."""
        t = self._tensor(name)
        # t.data is a view of gguf-py's memory map: only its shape and dtype are used here,
        # so no page of it is touched
        shape, dtype = t.data.shape, t.data.dtype
        runs, drop = _runs(rows, shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        data = np.empty((sum(c for _, c in runs), *shape[1:]), dtype)
        flat, pos = data.reshape(-1).view(np.uint8), 0
        for first, count in runs:
            self._file.read_into(flat[pos:pos + count * row_bytes],
                                 t.data_offset + first * row_bytes)
            pos += count * row_bytes
        out = np.asarray(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32)
        return out[0] if drop else out
