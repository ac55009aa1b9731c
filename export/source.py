"""Read a Hugging Face model directory one tensor at a time, memory-mapped.

Never loads the whole model: `HFSource.load(name)` reads one tensor (F32/F16/BF16) through
safetensors' memory map and returns float32.
"""

from __future__ import annotations

import json
import logging
import threading
from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

log = logging.getLogger(__name__)


class SourceError(ValueError):
    """The source directory cannot be read as a model."""


class MissingFileError(SourceError):
    """A file the model needs (config, shard) is not there."""


_FLOAT_DTYPES = {"F32", "F16", "BF16"}


class HFSource:
    """A Hugging Face checkpoint directory: config.json plus one or many .safetensors."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if not self.path.is_dir():
            raise MissingFileError(f"{self.path} is not a directory")
        config_path = self.path / "config.json"
        if not config_path.is_file():
            raise MissingFileError(f"{self.path} has no config.json: not a Hugging Face model")
        self.config: dict = json.loads(config_path.read_text())
        self._where = self._index_tensors()  # tensor name -> shard file
        self._handles: dict[Path, object] = {}
        self._lock = threading.Lock()

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
        return list(self._where)

    def __contains__(self, name: str) -> bool:
        return name in self._where

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

    def load(self, name: str) -> np.ndarray:
        """One tensor as a float32 numpy array."""
        h = self._handle(name)
        dtype = h.get_slice(name).get_dtype()
        if dtype not in _FLOAT_DTYPES:
            raise SourceError(
                f"tensor {name} is {dtype}; edgemoe reads F32, F16 and BF16 checkpoints"
            )
        t = h.get_tensor(name)
        return t.to(torch.float32).numpy()

    def json_file(self, filename: str) -> dict | None:
        p = self.path / filename
        return json.loads(p.read_text()) if p.is_file() else None
