"""The streaming writer: header order, announced sizes, nothing left behind on failure."""

from __future__ import annotations

import io

import numpy as np
import pytest

import export.writer as writer
from edgemoe import pipeline
from export.writer import WriterStateError, _DataStream


def test_stream_checks_order_and_sizes():
    s = _DataStream(io.BytesIO(), [("a", 8), ("b", 4)], alignment=32)
    with pytest.raises(WriterStateError, match="out of order.*expects a"):
        s.begin("b")
    s.begin("a")
    s.write(np.zeros(1, dtype=np.float32))
    with pytest.raises(WriterStateError, match="wrote 4 bytes, header says 8"):
        s.end()
    s = _DataStream(io.BytesIO(), [("a", 4), ("b", 4)], alignment=32)
    s.begin("a")
    s.write(np.zeros(1, dtype=np.float32))
    s.end()
    with pytest.raises(WriterStateError, match="1 tensors were never written"):
        s.close_check()


def test_data_is_aligned():
    buf = io.BytesIO()
    s = _DataStream(buf, [("a", 4), ("b", 4)], alignment=32)
    for name in "ab":
        s.begin(name)
        s.write(np.ones(1, dtype=np.float32))
        s.end()
    raw = buf.getvalue()
    assert len(raw) == 64 and raw[32:36] == np.ones(1, np.float32).tobytes()


def test_failure_midway_leaves_nothing(qwen3_dir, tmp_path, monkeypatch):
    model = pipeline.open_model(qwen3_dir)
    plan, _ = pipeline.make_plan(model, pipeline.make_budget(model.adapter, "1GB", ctx=128),
                              "Q8_0", progress=False)
    calls = {"n": 0}
    real = writer.quantize_rows

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 20:
            raise OSError("disk full (simulated)")
        return real(*args, **kwargs)

    monkeypatch.setattr(writer, "quantize_rows", failing)
    out = tmp_path / "m.gguf"
    with pytest.raises(OSError, match="disk full"):
        pipeline.export(model, plan, out, progress=False)
    assert calls["n"] >= 20
    assert list(tmp_path.iterdir()) == []


def test_reuse_copies_unchanged_tensors_and_quantizes_the_rest(qwen3_dir, tmp_path,
                                                              monkeypatch):
    """A probe-like plan (one tensor's type changed) written with `reuse`: byte-identical to
    writing it from the source, and only the changed tensor is quantized."""
    from dataclasses import replace

    import memory_planner as mp

    model = pipeline.open_model(qwen3_dir)
    base = mp.uniform_plan(model.specs, "Q4_K", mp.Budget(2**62), check_budget=False)
    base_path = pipeline.export(model, base, tmp_path / "base.gguf", progress=False)
    changed = "blk.0.attn_q.weight"
    q8 = mp.uniform_plan(model.specs, "Q8_0", mp.Budget(2**62), check_budget=False).by_name()
    plan = replace(base, tensors=tuple(q8[t.name] if t.name == changed else t
                                       for t in base.tensors))
    want = pipeline.export(model, plan, tmp_path / "want.gguf", progress=False)

    quantized = []
    quantize_rows = writer.quantize_rows

    def spy(rows, type_name, imatrix=None, **kw):
        quantized.append(type_name)
        return quantize_rows(rows, type_name, imatrix, **kw)

    monkeypatch.setattr(writer, "quantize_rows", spy)
    got = pipeline.export(model, plan, tmp_path / "got.gguf", progress=False, reuse=base_path)
    assert got.read_bytes() == want.read_bytes()
    assert set(quantized) == {"Q8_0"}  # F32 norms and Q4_K tensors were copied


def test_searched_export_does_not_depend_on_threads(qwen3_dir, tmp_path):
    """The output-error search inside the writer: the same bytes with 1 and 3 workers (which
    split dense tensors into other row blocks), and not the bytes of search 0."""
    from dataclasses import replace

    import memory_planner as mp
    from export.options import ExportOptions
    from export.search import cov_block

    model = pipeline.open_model(qwen3_dir)
    plan = mp.uniform_plan(model.specs, "Q4_K", mp.Budget(2**62), check_budget=False)
    iq3 = mp.uniform_plan(model.specs, "IQ3_S", mp.Budget(2**62), check_budget=False).by_name()
    plan = replace(plan, tensors=tuple(iq3[t.name] if "down" in t.name else t
                                       for t in plan.tensors))
    rng = np.random.default_rng(0)
    imatrix, covariance = {}, {}
    for r in model.recipes:
        s = r.spec
        if not s.quantizable or s.name == "token_embd.weight":
            continue
        b = cov_block(s.row_length)
        a = rng.standard_normal((s.row_length // b, b, b // 4))
        covariance[s.name] = (a @ a.transpose(0, 2, 1) / b + 0.05 * np.eye(b)).astype(np.float32)
        im = np.diagonal(covariance[s.name], axis1=1, axis2=2).reshape(-1)
        imatrix[s.name] = np.tile(im, (s.n_experts, 1)) if s.n_experts else im

    def write(name: str, **kw) -> bytes:
        options = ExportOptions(imatrix, covariance, progress=False, **kw)
        return writer.write_gguf(
            tmp_path / name, arch_name=model.adapter.arch_name, recipes=model.recipes,
            source=model.source, plan=plan, add_metadata=lambda w: None,
            options=options).read_bytes()

    one = write("t1.gguf", threads=1)
    assert write("t3.gguf", threads=3) == one
    assert write("s0.gguf", threads=3, search=0) != one
