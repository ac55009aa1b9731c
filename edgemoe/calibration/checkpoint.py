"""Calibration's checkpoint: the float64 sums saved between windows, so that an interrupted
or killed calibration resumes where it stopped with the same statistics to the bit."""

from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# the sums are saved between windows at most this often (EDGEMOE_CHECKPOINT_SECONDS
# overrides it)
CHECKPOINT_SECONDS = 60.0


def every() -> float:
    """Seconds between checkpoints."""
    return float(os.environ.get("EDGEMOE_CHECKPOINT_SECONDS", CHECKPOINT_SECONDS))


def fingerprint(source_files, body: str, **settings) -> str:
    """What decides the statistics: the source files, the text, the settings."""
    h = hashlib.sha256(body.encode())
    for p in source_files:
        st = Path(p).stat()
        h.update(repr((str(Path(p).resolve()), st.st_size, st.st_mtime_ns)).encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def resumable(checkpoint: Path, fingerprint: str) -> bool:
    """Whether `checkpoint` holds sums of a run with this fingerprint."""
    try:
        with np.load(checkpoint) as state:
            return str(state["fingerprint"]) == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def resume(collector, checkpoint: Path | None, fingerprint: str) -> int:
    """Load `checkpoint` into `collector` (its `load_state`) if it is of this run; the
    windows it covers (0: start over)."""
    if checkpoint is None or not checkpoint.is_file():
        return 0
    try:
        with np.load(checkpoint) as state:
            if str(state["fingerprint"]) != fingerprint:
                log.warning("%s is from a calibration with other inputs: starting over",
                            checkpoint)
                return 0
            collector.load_state(state)
            done = int(state["windows_done"])
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s cannot be read (%s): starting over", checkpoint, e)
        return 0
    print(f"resuming calibration from {checkpoint.name}: {done} windows were run before",
          flush=True)
    return done


def save(state: dict[str, np.ndarray], checkpoint: Path, fingerprint: str,
         windows_done: int) -> None:
    """Write `state` (name -> array) with the run's fingerprint; atomic."""
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, fingerprint=np.array(fingerprint), windows_done=np.array(windows_done),
                 **state)
    os.replace(tmp, checkpoint)  # a kill mid-save keeps the previous checkpoint
