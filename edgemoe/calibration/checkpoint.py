"""Calibration's checkpoint: the sums saved between windows, so that an interrupted or killed
calibration resumes where it stopped with the same statistics to the bit.

The sums are float64 while a window runs and rounded to float32 after it
(`Collector.end_window`), so the float32 checkpoint holds them exactly at half the size. It is
rewritten in place, never beside a second copy, and removed before the statistics file is
written: a GGUF source's calibration holds no more on disk than its output at any time.
Ctrl-C and SIGTERM wait for a save to end (`collect`); a SIGKILL during one (a fraction of a
second a minute) leaves a torn file, which the next run finds unreadable and starts over
from."""

from __future__ import annotations

import hashlib
import logging
import os
import zipfile
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

# the sums are saved between windows at most this often (EDGEMOE_CHECKPOINT_SECONDS
# overrides it)
CHECKPOINT_SECONDS = 60.0
# what reading a torn or foreign file raises
_UNREADABLE = (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile)


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
    except _UNREADABLE:
        return False


def resume(collector, checkpoint: Path | None, fingerprint: str) -> tuple[int, int]:
    """Load `checkpoint` into `collector` (its `load_state`) if it is of this run; the
    layer segment it stopped in and the windows it covers there ((0, 0): start over)."""
    if checkpoint is None or not checkpoint.is_file():
        return 0, 0
    try:
        with np.load(checkpoint) as npz:
            if str(npz["fingerprint"]) != fingerprint:
                log.warning("%s is from a calibration with other inputs: starting over",
                            checkpoint)
                return 0, 0
            state = {k: npz[k] for k in npz.files}  # all read before any is used
        collector.load_state(state)
        done = int(state["windows_done"])
        segment = int(state.get("segment", 0))
    except _UNREADABLE as e:
        log.warning("%s cannot be read (%s): starting over", checkpoint, e)
        return 0, 0
    where = f" of layer segment {segment + 1}" if segment else ""
    print(f"resuming calibration from {checkpoint.name}: {done} windows{where} were run "
          "before", flush=True)
    return segment, done


def save(state: dict[str, np.ndarray], checkpoint: Path, fingerprint: str,
         windows_done: int, segment: int = 0) -> bool:
    """Write `state` (name -> array; float64 arrays hold float32 values, and are stored as
    float32) with the run's fingerprint and position (`segment`: the layer segment being
    run, 0 for a whole model) over `checkpoint`, in place, one array at a time (the npz
    format). False, with a warning, when it cannot be written (a full disk): the file is
    removed (the run has moved past the previous checkpoint: a segmented run has replaced
    the stream it would resume from), and the run goes on without one."""
    head = {"fingerprint": np.array(fingerprint), "windows_done": np.array(windows_done),
            "segment": np.array(segment)}
    try:
        with open(checkpoint, "wb") as f, zipfile.ZipFile(f, "w") as z:
            for name, value in (*head.items(), *state.items()):
                value = np.asarray(value)
                if value.dtype == np.float64:
                    value = value.astype(np.float32)
                with z.open(f"{name}.npy", "w", force_zip64=True) as member:
                    np.lib.format.write_array(member, value)
    except OSError as e:
        checkpoint.unlink(missing_ok=True)
        log.warning("the checkpoint of the sums cannot be written to %s (%s): calibration goes "
                    "on without one, and an interruption will start it over", checkpoint, e)
        return False
    return True
