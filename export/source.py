"""Read a model one tensor at a time: a Hugging Face directory or a GGUF file.

Never loads the whole model: `load(name)` reads one tensor (or a few rows of its first axis)
and returns float32. `HFSource` reads F32/F16/BF16 safetensors, FP8 (e4m3) weights with
block scales (`weight_scale_inv`, as DeepSeek-V3 ships) and MXFP4 blocks with E8M0 scales
(`_blocks` / `_scales`, as gpt-oss ships its experts), dequantized on the fly;
`GGUFSource` reads F32/F16/BF16/Q8_0 GGUF files, the precisions model pages publish.
`open_source(path)` picks one from the path.

Tensor data is read with positioned reads (`os.preadv`, export.reads) into fresh buffers,
not through a memory map: pages of a mapped checkpoint stay in the process's resident set
once touched, so an export's RSS would grow towards the checkpoint's size. Half-precision
data is widened to float32 in small chunks, so a load costs its float32 result and little
more.
"""

from __future__ import annotations

import logging
import math
import threading
from pathlib import Path

import gguf
import numpy as np
from gguf.gguf_writer import GGUFValue

from .gguf_check import check_gguf
from .reads import (
    PositionedFile,
    Rows,
    SafetensorsEntry,
    SafetensorsFile,
    SourceError,
    read_json,
    row_ids,
    row_runs,
)

log = logging.getLogger(__name__)


class MissingFileError(SourceError):
    """A file the model needs (config, shard) is not there."""


_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_FP8_DTYPES = {"F8_E4M3"}
_SCALE_SUFFIX = "_scale_inv"  # FP8 block scales: "<weight name>_scale_inv"
# MXFP4 (gpt-oss): "<name>_blocks" U8 [..., rows, n_blocks, 16] holds two 4-bit e2m1 codes a
# byte (element 2i in the low nibble), "<name>_scales" U8 [..., rows, n_blocks] one E8M0
# exponent (bias 127) per block of 32 along the row
_MXFP4_BLOCKS, _MXFP4_SCALES = "_blocks", "_scales"
_E2M1 = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                  -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0], np.float32)


def open_source(path: str | Path) -> HFSource | GGUFSource:
    """A GGUF file or a Hugging Face checkpoint directory, by what `path` is."""
    p = Path(path)
    if p.is_file() and p.suffix == ".gguf":
        return GGUFSource(p)
    return HFSource(p)


class HFSource:
    """A Hugging Face checkpoint directory: config.json plus one or many .safetensors.

    FP8 weights (safetensors F8_E4M3, `quantization_config.weight_block_size` in config.json)
    are multiplied by their `<name>_scale_inv` block scales when loaded, exactly as llama.cpp's
    converter does; the scale tensors themselves are not listed in `names`. An MXFP4 pair is
    listed under its `<name>_blocks` name and loads as float32 [..., rows, n_blocks * 32],
    the checkpoint's own (out x in) orientation; `<name>_scales` is not listed.
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
        self._files: dict[Path, SafetensorsFile] = {}  # headers read so far
        self._lock = threading.Lock()
        self._where = self._index_tensors()  # tensor name -> shard file
        self._names = [n for n in self._where if not self._folded(n)]

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
            st = self._files[f] = SafetensorsFile(f)
            where.update(dict.fromkeys(st.entries, f))
        return where

    @property
    def names(self) -> list[str]:
        """Weight tensors; FP8 scale tensors are folded into their weights, not listed."""
        return list(self._names)

    def file_of(self, name: str) -> Path:
        """The file holding tensor `name`."""
        return self._where.get(name, self.path)

    @property
    def files(self) -> list[Path]:
        """Every file the model is read from (the weights and the JSON beside them)."""
        return sorted({*self._where.values(), *self.path.glob("*.json"),
                       *self.path.glob("tokenizer.model")})

    def __contains__(self, name: str) -> bool:
        return name in self._where and not self._folded(name)

    def _folded(self, name: str) -> bool:
        """Scale tensors, read with the weights they scale (FP8 block scales, MXFP4 scales)."""
        return name.endswith(_SCALE_SUFFIX) or (
            name.endswith(_MXFP4_SCALES)
            and name.removesuffix(_MXFP4_SCALES) + _MXFP4_BLOCKS in self._where)

    def _is_mxfp4(self, name: str) -> bool:
        return name.endswith(_MXFP4_BLOCKS) and (
            name.removesuffix(_MXFP4_BLOCKS) + _MXFP4_SCALES in self._where)

    def _locate(self, name: str) -> tuple[SafetensorsFile, SafetensorsEntry]:
        try:
            f = self._where[name]
        except KeyError:
            raise MissingFileError(f"tensor {name} is not in {self.path}") from None
        with self._lock:
            st = self._files.get(f)
            if st is None:
                st = self._files[f] = SafetensorsFile(f)
        try:
            return st, st.entries[name]
        except KeyError:
            raise SourceError(f"model.safetensors.index.json puts {name} in {f.name}, "
                              "which does not hold it") from None

    def shape(self, name: str) -> tuple[int, ...]:
        shape = self._locate(name)[1].shape
        if self._is_mxfp4(name):  # [..., rows, n_blocks, 16 bytes] -> [..., rows, 32 n_blocks]
            return (*shape[:-2], shape[-2] * 32)
        return shape

    def dtype(self, name: str) -> str:
        return "MXFP4" if self._is_mxfp4(name) else self._locate(name)[1].dtype

    def load(self, name: str, rows: Rows = None) -> np.ndarray:
        """One tensor as a float32 numpy array; `rows` picks indices of its first axis, and
        only those rows are read from disk."""
        st, e = self._locate(name)
        if self._is_mxfp4(name):
            return self._load_mxfp4(name, rows)
        if e.dtype not in _FLOAT_DTYPES | _FP8_DTYPES:
            raise SourceError(f"{st.path}: tensor {name} is {e.dtype}; edgemoe reads F32, F16, "
                              "BF16 and block-scaled FP8 (e4m3) checkpoints")
        if not e.shape:  # a scalar
            out = np.empty(1, np.float32)
            st.read_f32(e, 0, 1, out)
            return out.reshape(())
        runs, drop = row_runs(rows, e.shape[0])
        per_row = math.prod(e.shape[1:])
        out = np.empty((sum(c for _, c in runs), *e.shape[1:]), np.float32)
        flat, pos = out.reshape(-1), 0
        for first, count in runs:
            st.read_f32(e, first * per_row, count * per_row, flat[pos:pos + count * per_row])
            pos += count * per_row
        if e.dtype in _FP8_DTYPES:
            out = self._dequantize_fp8(name, out, None if rows is None else row_ids(runs))
        return out[0] if drop else out

    def _raw_rows(self, name: str, rows: Rows) -> tuple[np.ndarray, bool]:
        """Rows of the first axis of a U8 tensor, as stored."""
        st, e = self._locate(name)
        if e.dtype != "U8":
            raise SourceError(f"{st.path}: MXFP4 tensor {name} is {e.dtype}, not U8")
        runs, drop = row_runs(rows, e.shape[0])
        per_row = math.prod(e.shape[1:])
        out = np.empty((sum(c for _, c in runs), *e.shape[1:]), np.uint8)
        flat, pos = out.reshape(-1), 0
        for first, count in runs:
            st.file.read_into(flat[pos:pos + count * per_row], e.offset + first * per_row)
            pos += count * per_row
        return out, drop

    def _load_mxfp4(self, name: str, rows: Rows) -> np.ndarray:
        """code value * 2^(scale - 127) for every 4-bit code: exact in float32."""
        base = name.removesuffix(_MXFP4_BLOCKS)
        blocks, drop = self._raw_rows(name, rows)
        scales, _ = self._raw_rows(base + _MXFP4_SCALES, rows)
        if blocks.shape[:-1] != scales.shape or blocks.shape[-1] != 16:
            raise SourceError(f"MXFP4 {name} {blocks.shape[1:]} and {base}{_MXFP4_SCALES} "
                              f"{scales.shape[1:]} do not pair as [..., n_blocks, 16] blocks "
                              "and [..., n_blocks] scales")
        out = np.empty((*blocks.shape[:-1], 32), np.float32)
        out[..., 0::2] = _E2M1[blocks & 0x0F]
        out[..., 1::2] = _E2M1[blocks >> 4]
        out *= np.ldexp(np.float32(1), scales.astype(np.int32) - 127)[..., None]
        out = out.reshape(*blocks.shape[:-2], -1)
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
        self._file = PositionedFile(self.path)
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

    def file_of(self, name: str) -> Path:
        return self.path

    @property
    def files(self) -> list[Path]:
        return [self.path]

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    @property
    def tensors(self) -> dict[str, gguf.ReaderTensor]:
        """gguf-py's view of each tensor (type, sizes, memory-mapped data), by name: for
        callers that would otherwise parse the header again (seconds for a large
        vocabulary)."""
        return self._tensors

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
        runs, drop = row_runs(rows, shape[0])
        row_bytes = math.prod(shape[1:]) * dtype.itemsize
        data = np.empty((sum(c for _, c in runs), *shape[1:]), dtype)
        flat, pos = data.reshape(-1).view(np.uint8), 0
        for first, count in runs:
            self._file.read_into(flat[pos:pos + count * row_bytes],
                                 t.data_offset + first * row_bytes)
            pos += count * row_bytes
        out = np.asarray(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32)
        return out[0] if drop else out
