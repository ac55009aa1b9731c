"""GGUF file I/O: outputs appear only when complete (an export's resumable, or written over
an old file); metadata read and rewritten."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest

from export.gguf_io import (
    atomic_output,
    copy_with_metadata,
    read_metadata,
    read_plan,
    resumable_output,
)


def test_atomic_output_renames_when_done_and_removes_on_failure(tmp_path):
    out = tmp_path / "f.bin"
    with atomic_output(out) as part:
        assert part == tmp_path / "f.bin.part"
        part.write_bytes(b"new")
        assert not out.exists()
    assert out.read_bytes() == b"new" and not part.exists()
    with pytest.raises(KeyboardInterrupt):
        with atomic_output(out) as part:
            part.write_bytes(b"half")
            raise KeyboardInterrupt
    assert out.read_bytes() == b"new" and not part.exists()  # the old file untouched


def _write(path, **kv) -> None:
    w = gguf.GGUFWriter(path, arch="qwen3moe")
    for k, v in kv.items():
        w.add_string(k, v)
    w.add_array("test.values", [1.0, 2.5])
    w.add_tensor("blk.0.ffn_down_exps.weight", np.arange(24, dtype=np.float32).reshape(2, 3, 4))
    w.add_tensor("output.weight", np.ones((3, 8), np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_copy_with_metadata_drops_adds_and_keeps_the_tensors(tmp_path):
    src = tmp_path / "a.gguf"
    _write(src, **{"test.old": "x", "test.kept": "y"})
    dst = copy_with_metadata(src, tmp_path / "b.gguf", lambda w: w.add_string("test.new", "z"),
                             drop=("test.old",))
    got = read_metadata(dst, ["test.old", "test.kept", "test.new", "test.values",
                              "general.architecture"])
    assert got == {"test.kept": "y", "test.new": "z", "test.values": [1.0, 2.5],
                   "general.architecture": "qwen3moe"}
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert [(t.name, t.tensor_type, t.data.tobytes()) for t in a.tensors] == [
        (t.name, t.tensor_type, t.data.tobytes()) for t in b.tensors]
    # in place, and a failure leaves the file as it was
    copy_with_metadata(dst, dst, lambda w: w.add_string("test.more", "w"))
    assert read_metadata(dst, ["test.new", "test.more"]) == {"test.new": "z", "test.more": "w"}
    before = dst.read_bytes()

    def fail(w):
        raise ValueError("no")

    with pytest.raises(ValueError, match="no"):
        copy_with_metadata(dst, dst, fail)
    assert dst.read_bytes() == before and not (tmp_path / "b.gguf.part").exists()
    assert read_plan(dst) is None  # not an edgemoe export


HEADER, SIZES, ALIGN = b"GGUF header" * 3, [100, 64, 250], 32
FINGERPRINT = {"source": "s", "options": "o"}


def _tensors() -> list[bytes]:
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, n, dtype=np.uint8).tobytes() for n in SIZES]


def _export(path, overwrite=None, stop_after: int | None = None, kill: bool = False) -> None:
    """Write HEADER and the tensors as an export does (each padded to ALIGN), starting where
    an earlier run stopped; Ctrl-C after tensor `stop_after` (or, with `kill`, the process
    dies there without cleaning up)."""
    data = _tensors()
    with resumable_output(path, HEADER, FINGERPRINT, SIZES, ALIGN, overwrite) as (f, first):
        for i in range(first, len(SIZES)):
            f.write(b"\0" * (-f.tell() % ALIGN) + data[i])
            f.write(b"\0" * (-f.tell() % ALIGN))
            if i == stop_after:
                f.flush()
                if kill:
                    os._exit(0)
                raise KeyboardInterrupt


def test_an_output_written_over_an_old_file_is_the_same_and_reuses_its_inode(tmp_path):
    _export(tmp_path / "plain.gguf")
    want = (tmp_path / "plain.gguf").read_bytes()
    old = tmp_path / "old.gguf"
    old.write_bytes(b"x" * 5000)  # longer than the new file: its tail must go
    inode = old.stat().st_ino
    _export(tmp_path / "new.gguf", overwrite=old)
    new = tmp_path / "new.gguf"
    assert new.read_bytes() == want
    assert new.stat().st_ino == inode and not old.exists()  # the same file, written over
    assert sorted(p.name for p in tmp_path.iterdir()) == ["new.gguf", "plain.gguf"]


def test_an_interrupted_overwrite_resumes_and_a_killed_one_starts_over(tmp_path):
    _export(tmp_path / "plain.gguf")
    want = (tmp_path / "plain.gguf").read_bytes()
    out, old = tmp_path / "new.gguf", tmp_path / "old.gguf"
    part, note = tmp_path / "new.gguf.part", tmp_path / "new.gguf.part.json"
    # Ctrl-C after the first tensor: the old bytes past it are cut, the note says whose
    old.write_bytes(b"x" * 5000)
    with pytest.raises(KeyboardInterrupt, match="the 1 of 3 tensors written are kept"):
        _export(out, overwrite=old, stop_after=0)
    assert part.stat().st_size == 64 + 128  # the header and the first tensor, padded
    assert note.is_file() and not old.exists()
    _export(out)
    assert out.read_bytes() == want
    # killed after the first tensor: the old bytes are still there and there is no note, so
    # the next run starts over instead of taking them for tensors
    out.unlink()
    old.write_bytes(b"x" * 5000)
    pid = os.fork()
    if pid == 0:
        _export(out, overwrite=old, stop_after=0, kill=True)
    os.waitpid(pid, 0)
    assert part.stat().st_size == 5000 and not note.exists()
    _export(out)
    assert out.read_bytes() == want and not part.exists()
