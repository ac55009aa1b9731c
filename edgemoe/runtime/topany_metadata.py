"""Top-any thresholds in GGUF metadata: one float32 per block (0 for dense blocks) under
`THRESHOLDS_KEY`, how they were found (JSON) under `INFO_KEY`; and the user's spec of them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

from export.gguf_io import copy_with_metadata, read_metadata

THRESHOLDS_KEY = "edgemoe.top_any.thresholds"
INFO_KEY = "edgemoe.top_any.info"  # JSON: how the thresholds were calibrated


def add_top_any_metadata(writer: gguf.GGUFWriter, thresholds: Sequence[float],
                         info: dict | None = None) -> None:
    """Store per-block thresholds (and how they were found) in a GGUF being written."""
    tau = [float(x) for x in np.asarray(thresholds, dtype=np.float32)]
    if any(not 0.0 <= x <= 1.0 for x in tau):
        raise ValueError(f"top-any thresholds must be in [0, 1], got {tau}")
    writer.add_array(THRESHOLDS_KEY, tau)
    if info is not None:
        writer.add_string(INFO_KEY, json.dumps(info))


def read_top_any(path: str | Path) -> tuple[np.ndarray | None, dict]:
    """The thresholds stored in a GGUF file (None if there are none) and their info."""
    stored = read_metadata(path, [THRESHOLDS_KEY, INFO_KEY])
    tau = stored.get(THRESHOLDS_KEY)
    tau = None if tau is None else np.asarray(tau, dtype=np.float32)
    info = stored.get(INFO_KEY)
    return tau, (json.loads(info) if info is not None else {})


def write_top_any(src: str | Path, dst: str | Path, thresholds: Sequence[float],
                  info: dict | None = None) -> Path:
    """Copy GGUF `src` to `dst` with the thresholds in its metadata (replacing old ones).

    `dst` may be `src`: the copy is written under a temporary name and renamed at the end.
    """
    return copy_with_metadata(src, dst, lambda w: add_top_any_metadata(w, thresholds, info),
                              drop=(THRESHOLDS_KEY, INFO_KEY))


def parse_spec(spec: str | float | Sequence[float] | None, n_layer: int,
               stored: np.ndarray | None) -> np.ndarray | None:
    """Thresholds from a user spec: None/"file" (stored ones), "off"/0, one tau for all
    layers ("0.3"), one per block ("0,0.2,0.3"), or a JSON file from calibrate-top-any."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "file")):
        return stored
    if isinstance(spec, str):
        s = spec.strip()
        if s.lower() in ("off", "none"):
            return np.zeros(n_layer, np.float32)
        if s.endswith(".json") or Path(s).is_file():
            return parse_spec(json.loads(Path(s).read_text())["thresholds"], n_layer, stored)
        try:
            values = [float(x) for x in s.split(",")]
        except ValueError:
            raise ValueError(f"cannot read top-any spec {spec!r}: use 'file', 'off', a tau "
                             "like 0.3, one tau per block 0,0.2,... or a JSON file") from None
        return parse_spec(values[0] if len(values) == 1 else values, n_layer, stored)
    tau = np.asarray(spec, dtype=np.float32)
    if tau.ndim == 0:
        tau = np.full(n_layer, float(tau), np.float32)
    if tau.shape != (n_layer,):
        raise ValueError(f"{tau.size} top-any thresholds given, the model has {n_layer} blocks")
    if (tau < 0).any() or (tau > 1).any():
        raise ValueError(f"top-any thresholds must be in [0, 1], got {tau.tolist()}")
    return tau
