"""GGUF files on disk, beside the writer: atomic and resumable output, metadata read and
rewritten.

Every file edgemoe writes appears at its path only when complete: it is written as
`<name>.part` and renamed into place (`atomic_output`), so a failed or interrupted run
leaves nothing at the output path. A model export (`resumable_output`) also keeps its
`.part` when it is interrupted or killed, with a `.part.json` fingerprint beside it; the
same command run again continues after the last complete tensor.
"""

from __future__ import annotations

import fcntl
import io
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any, BinaryIO

import gguf
from gguf.gguf_writer import WriterState

from memory_planner.quant_types import format_size
from memory_planner.types import MemoryPlan

log = logging.getLogger(__name__)


class OutputError(ValueError):
    """The output cannot be written: no such folder, the source itself, no room, busy."""


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields the `.part` path to write `path` under; renames it to `path` when the block
    ends normally, removes it when the block (or the rename) raises."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        yield part
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def read_metadata(path: str | Path, keys: Sequence[str]) -> dict[str, Any]:
    """The values of those of `keys` that the GGUF file `path` holds (absent keys left out)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key in keys:
        f = reader.get_field(key)
        if f is not None:
            out[key] = f.contents()
    return out


def read_plan(path: str | Path) -> MemoryPlan | None:
    """The plan stored in an edgemoe GGUF (None for other files)."""
    from .writer import PLAN_KEY  # the writer imports this module

    stored = read_metadata(path, [PLAN_KEY]).get(PLAN_KEY)
    return MemoryPlan.from_json(stored) if stored is not None else None


def copy_with_metadata(src: str | Path, dst: str | Path,
                       add: Callable[[gguf.GGUFWriter], None],
                       drop: Iterable[str] = ()) -> Path:
    """Copy GGUF `src` to `dst`, tensors byte for byte, without the metadata keys `drop` and
    with those `add(writer)` writes (after the copied ones).

    `dst` may be `src`: the copy is written under a temporary name and renamed at the end.
    """
    src, dst = Path(src), Path(dst)
    skip = {gguf.Keys.General.ARCHITECTURE, *drop}
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    with atomic_output(dst) as part:
        writer = gguf.GGUFWriter(part, arch=arch, endianess=reader.endianess)
        with closing(writer):
            for f in reader.fields.values():
                if f.name in skip or f.name.startswith("GGUF."):
                    continue
                vtype = f.types[0]
                sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
            add(writer)
            for t in reader.tensors:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                       t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in reader.tensors:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        del reader  # release the memory map before replacing src
    return dst


def check_output(path: str | Path, sources: Iterable[Path] = ()) -> Path:
    """Fail before any work when `path` cannot be an output: its folder is missing, or it
    is one of the `sources` (the input would be destroyed)."""
    path = Path(path)
    parent = path.parent if str(path.parent) else Path(".")
    if not parent.is_dir():
        raise OutputError(f"{parent}: the output folder does not exist")
    if path.is_dir():
        raise OutputError(f"{path} is a folder; give a file name for the GGUF")
    target = path.resolve()
    for s in sources:
        if Path(s).resolve() == target:
            raise OutputError(f"{path} is the source file itself; choose another output path")
    return path


def header_bytes(w: gguf.GGUFWriter) -> bytes:
    """The header (KV data and tensor infos) `w` would write, built in memory: compared with
    a `.part` file before resuming it. (gguf-py writes only to its own file list, so that list
    is swapped for a buffer; gguf is pinned, see pyproject.toml.)"""
    buf = io.BytesIO()
    w.fout, w.path, w.state = [buf], None, WriterState.EMPTY
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.fout, w.state = None, WriterState.NO_FILE
    return buf.getvalue()


def _aligned(n: int, alignment: int) -> int:
    return -(-n // alignment) * alignment


@contextmanager
def resumable_output(path: str | Path, header: bytes, fingerprint: dict[str, str],
                     sizes: Sequence[int], alignment: int, overwrite: Path | None = None
                     ) -> Iterator[tuple[BinaryIO, int]]:
    """Write a GGUF of `header` then tensors of `sizes` bytes (each padded to `alignment`):
    yields the open `.part` file, positioned after the last complete tensor of an earlier
    run with the same `header` and `fingerprint`, and the index of the next tensor to write.

    One process at a time: a second one fails at once (OutputError). Free disk is checked for
    what remains to be written. On success the `.part` becomes `path`; on Ctrl-C or SIGTERM it
    is kept to resume (the KeyboardInterrupt says so); on any other error it is removed.

    `overwrite`: a finished file nobody needs any more (the layer segment calibration ran
    before this one). Where no `.part` exists it becomes the `.part` and is written over in
    place, then cut to size, so the page cache keeps its pages: on a VM that hands free memory
    back to its host a new page costs a fault there (1.3 GB written into a new file took
    1.8-3.4 s of kernel time, over a cached one 0.1 s; BENCHMARKS.md). Such a `.part` holds
    the old file's bytes past those written, so it has no note until Ctrl-C cuts it there:
    killed, it is started over.
    """
    path = Path(path)
    part = path.with_name(path.name + ".part")
    note = part.with_name(part.name + ".json")
    reused = 0  # bytes of `overwrite`'s that this file is written over
    if overwrite is not None and overwrite.is_file() and not part.exists():
        reused = overwrite.stat().st_size
        os.replace(overwrite, part)
    fd = os.open(part, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise OutputError(f"{path} is being written by another edgemoe process right now "
                          f"(it holds the lock on {part.name})") from None
    fout = os.fdopen(fd, "r+b")
    ends = [_aligned(len(header), alignment)]  # where each tensor's padded data ends
    for n in sizes:
        ends.append(ends[-1] + _aligned(n, alignment))
    first = 0
    try:
        if not reused:
            first = _resume_point(part, note, header, fingerprint, ends, fout)
        need = ends[-1] - max(ends[first], reused)
        free = shutil.disk_usage(part.parent).free
        if need > free:
            raise OutputError(f"{path}: {format_size(need)} more to write but only "
                              f"{format_size(free)} free on {part.parent}; free some disk")
        if first == 0:
            fout.seek(0)
            if not reused:
                fout.truncate()
            fout.write(header)
        if not reused:
            note.write_text(json.dumps(fingerprint, indent=1))
        yield fout, first
        fout.flush()
        fout.truncate()  # an overwritten file's bytes past the end
        os.replace(part, path)
        note.unlink(missing_ok=True)
    except KeyboardInterrupt as e:
        fout.flush()
        if reused:  # resumable from here on: the old bytes cut, the note written
            fout.truncate()
            note.write_text(json.dumps(fingerprint, indent=1))
        done = sum(1 for end in ends[1:] if end <= fout.tell())
        raise type(e)(f"the {done} of {len(sizes)} tensors written are kept in {part}: run "
                      "the same command again to resume") from None
    except BaseException as e:
        part.unlink(missing_ok=True)
        note.unlink(missing_ok=True)
        if isinstance(e, OSError) and e.filename is None and e.strerror:  # name the file
            raise OSError(e.errno, f"{e.strerror} while writing it", str(part)) from e
        raise
    finally:
        fout.close()  # releases the lock


def _resume_point(part: Path, note: Path, header: bytes, fingerprint: dict[str, str],
                  ends: list[int], fout: BinaryIO) -> int:
    """How many tensors an earlier run left complete in `part` (0: start over, saying why)."""
    size = os.fstat(fout.fileno()).st_size
    if size == 0:
        return 0
    try:
        old = json.loads(note.read_text())
    except (OSError, ValueError):
        old = None
    fout.seek(0)
    why = None
    if not isinstance(old, dict):
        why = f"{note.name} is missing or unreadable"
    else:
        changed = [k for k in fingerprint if old.get(k) != fingerprint[k]]
        if changed:
            why = "the " + ", ".join(changed) + " changed"
        elif fout.read(len(header)) != header:
            why = "its header differs"
    if why is not None:
        log.warning("%s is from an earlier, different export (%s): starting over", part, why)
        return 0
    done = sum(1 for e in ends[1:] if e <= size)
    fout.seek(ends[done])
    fout.truncate()
    if done:
        print(f"resuming {part.name}: {done} of {len(ends) - 1} tensors "
              f"({format_size(ends[done])}) were written by an earlier run", flush=True)
    return done
