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


def resume(collector, checkpoint: Path | None, fingerprint: str) -> tuple[int, int]:
    """Load `checkpoint` into `collector` (its `load_state`) if it is of this run; the
    layer segment it stopped in and the windows it covers there ((0, 0): start over)."""
    if checkpoint is None or not checkpoint.is_file():
        return 0, 0
    try:
        with np.load(checkpoint) as state:
            if str(state["fingerprint"]) != fingerprint:
                log.warning("%s is from a calibration with other inputs: starting over",
                            checkpoint)
                return 0, 0
            collector.load_state(state)
            done = int(state["windows_done"])
            segment = int(state["segment"]) if "segment" in state.files else 0
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s cannot be read (%s): starting over", checkpoint, e)
        return 0, 0
    where = f" of layer segment {segment + 1}" if segment else ""
    print(f"resuming calibration from {checkpoint.name}: {done} windows{where} were run "
          "before", flush=True)
    return segment, done


def save(state: dict[str, np.ndarray], checkpoint: Path, fingerprint: str,
         windows_done: int, segment: int = 0) -> bool:
    """Write `state` (name -> array) with the run's fingerprint and position (`segment`: the
    layer segment being run, 0 for a whole model); atomic. False, with a warning, when it
    cannot be written (a full disk): the previous checkpoint is removed as well (the run
    has moved past it: a segmented run has replaced the stream it would resume from), and
    the run goes on without one."""
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            np.savez(f, fingerprint=np.array(fingerprint), windows_done=np.array(windows_done),
                     segment=np.array(segment), **state)
        os.replace(tmp, checkpoint)  # a kill mid-save keeps the previous checkpoint
    except OSError as e:
        tmp.unlink(missing_ok=True)
        checkpoint.unlink(missing_ok=True)
        log.warning("the checkpoint of the sums cannot be written to %s (%s): calibration goes "
                    "on without one, and an interruption will start it over", checkpoint, e)
        return False
    return True
