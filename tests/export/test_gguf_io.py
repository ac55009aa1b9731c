"""GGUF file I/O: outputs appear only when complete; metadata read and rewritten."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from export.gguf_io import atomic_output, copy_with_metadata, read_metadata, read_plan


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
