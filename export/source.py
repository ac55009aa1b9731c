"""Read a model one tensor at a time, memory-mapped: a Hugging Face directory or a GGUF file.

Never loads the whole model: `load(name)` reads one tensor (or a few rows of its first axis)
and returns float32. `HFSource` reads F32/F16/BF16 safetensors and FP8 (e4m3) weights with
block scales (`weight_scale_inv`, as DeepSeek-V3 ships), dequantized on the fly;
`GGUFSource` reads F32/F16/BF16/Q8_0 GGUF files, the precisions model pages publish.
`open_source(path)` picks one from the path.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np
import torch
from gguf.gguf_writer import GGUFValue
from safetensors import safe_open

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The source directory cannot be read as a model."""


class MissingFileError(SourceError):
    """A file the model needs (config, shard) is not there."""


_FLOAT_DTYPES = {"F32", "F16", "BF16"}
_FP8_DTYPES = {"F8_E4M3"}
_SCALE_SUFFIX = "_scale_inv"  # FP8 block scales: "<weight name>_scale_inv"

Rows = int | Sequence[int] | None  # an index or indices along a tensor's first axis


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
        self.config: dict = json.loads(config_path.read_text())
        self._where = self._index_tensors()  # tensor name -> shard file
        self._names = [n for n in self._where if not n.endswith(_SCALE_SUFFIX)]
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """The model's name for general.name: the directory name."""
        return self.path.name

    def _index_tensors(self) -> dict[str, Path]:
        index = self.path / "model.safetensors.index.json"
        if index.is_file():
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
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
            with safe_open(f, framework="pt") as h:
                for name in h.keys():
                    where[name] = f
        return where

    @property
    def names(self) -> list[str]:
        """Weight tensors; FP8 scale tensors are folded into their weights, not listed."""
        return list(self._names)

    def __contains__(self, name: str) -> bool:
        return name in self._where and not name.endswith(_SCALE_SUFFIX)

    def _handle(self, name: str):
        try:
            f = self._where[name]
        except KeyError:
            raise MissingFileError(f"tensor {name} is not in {self.path}") from None
        with self._lock:
            h = self._handles.get(f)
            if h is None:
                h = self._handles[f] = safe_open(f, framework="pt")
        return h

    def shape(self, name: str) -> tuple[int, ...]:
        return tuple(self._handle(name).get_slice(name).get_shape())

    def dtype(self, name: str) -> str:
        return self._handle(name).get_slice(name).get_dtype()

    def load(self, name: str, rows: Rows = None) -> np.ndarray:
        """One tensor as a float32 numpy array; `rows` picks indices of its first axis."""
        h = self._handle(name)
        dtype = h.get_slice(name).get_dtype()
        if dtype in _FP8_DTYPES:
            t = self._dequantize_fp8(name, h.get_tensor(name))
        elif dtype in _FLOAT_DTYPES:
            t = h.get_tensor(name).to(torch.float32)
        else:
            raise SourceError(f"tensor {name} is {dtype}; edgemoe reads F32, F16, BF16 and "
                              "block-scaled FP8 (e4m3) checkpoints")
        a = t.numpy()
        return a if rows is None else a[rows if isinstance(rows, int) else list(rows)]

    def _dequantize_fp8(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        """weight * scale_inv, each scale covering one block (128 x 128 in DeepSeek-V3)."""
        scale_name = name + _SCALE_SUFFIX
        if scale_name not in self._where:
            raise SourceError(f"FP8 tensor {name} has no {scale_name}: edgemoe reads FP8 "
                              "checkpoints with block scales (weight_scale_inv) only")
        scale = self._handle(scale_name).get_tensor(scale_name).to(torch.float32)
        quant = self.config.get("quantization_config") or {}
        block = quant.get("weight_block_size") or [128, 128]
        lead = scale.ndim - len(block)
        for i, size in enumerate(block):
            scale = scale.repeat_interleave(int(size), lead + i)
        scale = scale[tuple(slice(0, n) for n in weight.shape)]  # the last blocks may be partial
        if scale.shape != weight.shape:
            raise SourceError(f"{scale_name} {tuple(scale.shape)} does not cover {name} "
                              f"{tuple(weight.shape)} in blocks of {block}")
        return weight.to(torch.float32) * scale

    def json_file(self, filename: str) -> dict | None:
        p = self.path / filename
        return json.loads(p.read_text()) if p.is_file() else None


# GGUF tensor types a source may hold: exact (F32, F16, BF16) or near-lossless (Q8_0).
# Re-quantizing an already low-bit file would compound two rounding errors.
GGUF_SOURCE_TYPES = frozenset({"F32", "F16", "BF16", "Q8_0"})


class GGUFSource:
    """A single-file GGUF model (F32, F16, BF16 or Q8_0 tensors) read through a memory map.

    `names` are the GGUF tensor names and `shape` is in numpy order (ggml's ne reversed), so
    an adapter built from the file's own metadata maps names one to one. `metadata` holds
    every key-value pair with its GGUF type, for copying into the new file.
    """

    kind = "gguf"

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_file():
            raise MissingFileError(f"{self.path} is not a file")
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
        data = t.data if rows is None else t.data[rows if isinstance(rows, int) else list(rows)]
        return np.asarray(gguf.quants.dequantize(data, t.tensor_type), dtype=np.float32)
