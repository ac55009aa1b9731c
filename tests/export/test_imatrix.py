"""Stats files: llama.cpp's importance-matrix formats, both ways."""

from __future__ import annotations

import struct

import gguf
import numpy as np
import pytest

from export.imatrix import ImatrixError, read_stats, write_legacy, write_stats
from memory_planner.stats import CalibStats, ExpertStats


def _stats() -> CalibStats:
    rng = np.random.default_rng(0)
    E, d = 4, 256
    return CalibStats(
        in_sum2={
            "blk.0.attn_q.weight": rng.uniform(1, 2, (1, d)),
            "blk.0.ffn_down_exps.weight": rng.uniform(1, 2, (E, d)),
        },
        counts={
            "blk.0.attn_q.weight": np.array([100.0]),
            "blk.0.ffn_down_exps.weight": np.array([60.0, 0.0, 90.0, 50.0]),
        },
        experts={0: ExpertStats(selected=np.array([60.0, 0, 90, 50]),
                                weight_sum=np.array([30.0, 0, 50, 20]),
                                saliency_sum=np.array([12.0, 0, 40, 9]),
                                energy_sum=np.array([5.0, 0, 30, 2]),
                                output_energy=50.0)},
        n_tokens=100,
        datasets=("calib.txt",),
    )


def test_gguf_round_trip(tmp_path):
    s = _stats()
    write_stats(s, tmp_path / "s.gguf", chunk_size=50)
    back = read_stats(tmp_path / "s.gguf")
    assert back.n_tokens == 100 and back.datasets == ("calib.txt",)
    for name in s.in_sum2:
        np.testing.assert_allclose(back.in_sum2[name], s.in_sum2[name], rtol=1e-6)
        np.testing.assert_array_equal(back.counts[name], s.counts[name])
    e = back.experts[0]
    np.testing.assert_allclose(e.saliency, [0.2, 0, 40 / 90, 9 / 50], rtol=1e-6)
    assert e.output_energy == 50.0


def test_file_is_a_llama_cpp_imatrix(tmp_path):
    """The layout llama.cpp's loader expects: general.type, F32 {ne0, n_mat} and {1, n_mat}."""
    write_stats(_stats(), tmp_path / "s.gguf", chunk_size=50)
    r = gguf.GGUFReader(tmp_path / "s.gguf")
    assert r.get_field("general.type").contents() == "imatrix"
    assert r.get_field("imatrix.chunk_count").contents() == 2
    assert r.get_field("imatrix.chunk_size").contents() == 50
    t = {x.name: x for x in r.tensors}
    sums = t["blk.0.ffn_down_exps.weight.in_sum2"]
    counts = t["blk.0.ffn_down_exps.weight.counts"]
    assert sums.tensor_type == gguf.GGMLQuantizationType.F32
    assert list(sums.shape) == [256, 4] and list(counts.shape) == [1, 4]
    # our extras must not end in .in_sum2 / .counts, or llama.cpp would take them as matrices
    extras = [n for n in t if n.startswith("edgemoe.")]
    assert extras and not any(n.endswith((".in_sum2", ".counts")) for n in extras)


def test_importance_is_llama_quantize_normalisation():
    s = _stats()
    im = s.importance("blk.0.ffn_down_exps.weight")
    np.testing.assert_allclose(im[0], s.in_sum2["blk.0.ffn_down_exps.weight"][0] / 60, rtol=1e-6)
    np.testing.assert_array_equal(im[1], np.ones(256))  # an expert nobody picked: ones


def test_legacy_dat_round_trip(tmp_path):
    s = _stats()
    write_legacy(s, tmp_path / "s.dat")
    back = read_stats(tmp_path / "s.dat")
    for name in s.in_sum2:
        want = s.importance(name).reshape(-1)
        got = back.importance(name).reshape(-1)
        np.testing.assert_allclose(got, want, rtol=1e-5)
    assert back.datasets == ("calib.txt",)


def test_legacy_dat_of_an_unreached_tensor_is_ones(tmp_path):
    """No token reached it: ones, as the GGUF format gives, and a positive ncall, which
    llama.cpp's reader divides by (with 0 it would take the stored values as they are)."""
    s = _stats()
    s.counts["blk.0.attn_q.weight"] = np.array([0.0])
    write_legacy(s, tmp_path / "s.dat")
    raw = (tmp_path / "s.dat").read_bytes()
    name = b"blk.0.attn_q.weight"
    at = raw.index(name) + len(name)
    ncall, nval = struct.unpack_from("<ii", raw, at)
    vals = np.frombuffer(raw, "<f4", nval, at + 8)
    assert ncall >= 1 and np.array_equal(vals / ncall, np.ones(nval))
    np.testing.assert_array_equal(read_stats(tmp_path / "s.dat").importance(name.decode()),
                                  np.ones((1, nval)))


def test_not_an_imatrix(tmp_path):
    (tmp_path / "junk.dat").write_bytes(struct.pack("<i", -5))
    with pytest.raises(ImatrixError):
        read_stats(tmp_path / "junk.dat")
    w = gguf.GGUFWriter(tmp_path / "model.gguf", arch="llama")
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(ImatrixError, match="not an imatrix"):
        read_stats(tmp_path / "model.gguf")
    with pytest.raises(ImatrixError, match="no such file"):
        read_stats(tmp_path / "missing.gguf")
