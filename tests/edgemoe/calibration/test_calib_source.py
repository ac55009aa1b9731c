"""What calibration runs: a GGUF source as it is, an HF source within a disk budget; the
statistics say which, and they do not depend on the number of threads."""

from __future__ import annotations

import re
import threading
import time
from pathlib import Path

import numpy as np
import pytest

from edgemoe import pipeline
from edgemoe.calibration import intermediate, segments
from edgemoe.calibration.collect import calibrate
from edgemoe.llamacpp import tokenize
from export.imatrix import read_stats
from tests.helpers import PROMPT

N_CTX = 64


def _same(a, b) -> None:
    assert a.n_tokens == b.n_tokens
    assert set(a.in_sum2) == set(b.in_sum2) and set(a.in_cov) == set(b.in_cov)
    for name in a.in_sum2:
        np.testing.assert_array_equal(a.in_sum2[name], b.in_sum2[name])
        np.testing.assert_array_equal(a.counts[name], b.counts[name])
    for name in a.in_cov:
        np.testing.assert_array_equal(a.in_cov[name], b.in_cov[name])
    for layer, e in a.experts.items():
        np.testing.assert_array_equal(e.saliency_sum, b.experts[layer].saliency_sum)
        np.testing.assert_array_equal(e.selected, b.experts[layer].selected)


def test_a_gguf_source_runs_as_it_is(ggufs, qwen3_dir, tmp_path, monkeypatch):
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 6)
    given = calibrate(str(qwen3_dir), text=str(text), n_ctx=N_CTX, progress=False,
                      calib_model=str(ggufs["qwen3"]))

    def no_export(*args, **kwargs):
        raise AssertionError("calibrating a GGUF source wrote a model")

    monkeypatch.setattr(pipeline, "export", no_export)
    out = tmp_path / "out"
    out.mkdir()
    stats = calibrate(str(ggufs["qwen3"]), text=str(text), output=str(out / "s.gguf"),
                      n_ctx=N_CTX, progress=False)
    assert [p.name for p in out.iterdir()] == ["s.gguf"]  # nothing else, nothing left
    _same(stats, given)  # the same model run: the same statistics
    assert stats.source.fidelity == "exact" and "source GGUF itself (F32)" in stats.source.types
    assert read_stats(out / "s.gguf").source == stats.source
    # the plan says what the statistics were measured on
    from edgemoe.report.tables import plan_table

    model = pipeline.open_model(ggufs["qwen3"])
    budget = pipeline.make_budget(model.adapter, "10GB", ctx=256)
    plan, _ = pipeline.make_plan(model, budget, stats=stats, progress=False)
    assert plan.calibration == stats.source.describe()
    assert "statistics measured on the source GGUF itself (F32)" in plan_table(plan)
    assert type(plan).from_json(plan.to_json()).calibration == plan.calibration


def _peak_extra_disk(folder, output, fn):
    """fn() while a thread polls the bytes of every file in `folder` but `output`."""
    peak, done = [0], threading.Event()

    def poll():
        while not done.is_set():
            try:
                size = sum(p.stat().st_size for p in folder.iterdir() if p != output)
            except FileNotFoundError:  # renamed between listing and stat
                continue
            peak[0] = max(peak[0], size)
            time.sleep(0.002)

    t = threading.Thread(target=poll)
    t.start()
    try:
        result = fn()
    finally:
        done.set()
        t.join()
    return result, peak[0]


def test_a_gguf_source_within_no_disk_at_all(ggufs, tmp_path, monkeypatch):
    """`--max-disk 0` for a GGUF source: no checkpoint either, nothing but the stats file
    (written under a temporary name, then renamed) is ever written beside it; the checkpoint
    is saved after every window otherwise."""
    monkeypatch.setenv("EDGEMOE_CHECKPOINT_SECONDS", "0")
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 6)
    out = tmp_path / "out"
    out.mkdir()

    def run(max_disk):
        return _peak_extra_disk(out, out / "s.gguf", lambda: calibrate(
            str(ggufs["qwen3"]), text=str(text), output=str(out / "s.gguf"), n_ctx=N_CTX,
            progress=False, max_disk=max_disk))

    saved, peak = run(None)
    assert peak > (out / "s.gguf").stat().st_size  # the checkpoint, between windows
    from edgemoe.calibration import checkpoint

    def no_save(*args, **kwargs):
        raise AssertionError("a checkpoint was saved within --max-disk 0")

    monkeypatch.setattr(checkpoint, "save", no_save)
    stats, peak = run(0)
    assert peak <= (out / "s.gguf").stat().st_size
    assert [p.name for p in out.iterdir()] == ["s.gguf"]
    _same(stats, saved)


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="no /dev/full to fill the disk")
def test_a_full_disk_at_the_checkpoint_does_not_end_calibration(ggufs, tmp_path, monkeypatch,
                                                                  caplog):
    """The checkpoint cannot be written (its file is /dev/full, which fails every write
    with ENOSPC): calibration warns and runs on without one, to the same statistics."""
    monkeypatch.setenv("EDGEMOE_CHECKPOINT_SECONDS", "0")  # a save after the first window
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 6)
    given = calibrate(str(ggufs["qwen3"]), text=str(text), n_ctx=N_CTX, progress=False,
                      max_disk=0)
    out = tmp_path / "out"
    out.mkdir()
    (out / "s.gguf.checkpoint.npz.tmp").symlink_to("/dev/full")
    with caplog.at_level("WARNING"):
        stats = calibrate(str(ggufs["qwen3"]), text=str(text), output=str(out / "s.gguf"),
                          n_ctx=N_CTX, progress=False)
    assert "checkpoint of the sums cannot be written" in caplog.text
    assert "No space left on device" in caplog.text
    assert [p.name for p in out.iterdir()] == ["s.gguf"]
    _same(stats, given)


def test_an_hf_source_within_a_disk_budget(qwen3_dir, tmp_path):
    model = pipeline.open_model(qwen3_dir)
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 6)
    q8 = intermediate.candidate_plan(model.specs, intermediate.CANDIDATES[0])
    cov = 1 << 20
    from edgemoe.calibration.collect import checkpoint_bytes, cov_plan

    ckpt = checkpoint_bytes(model.specs, cov_plan(model.specs, cov))
    # room for a little less than the Q8_0 copy, whole or in layer segments (test_segments):
    # a smaller intermediate runs
    stream = segments.stream_bytes(len(tokenize(qwen3_dir, PROMPT * 6)), model.adapter.hp.n_embd)
    budget = min(intermediate.file_bytes(model, q8) + ckpt,
                 segments.smallest_segment(model, q8) + ckpt + stream) - 1
    out = tmp_path / "o"
    out.mkdir()
    stats, peak = _peak_extra_disk(out, out / "s.gguf", lambda: calibrate(
        str(qwen3_dir), text=str(text), output=str(out / "s.gguf"), n_ctx=N_CTX,
        progress=False, max_disk=budget, cov_budget=cov))
    assert 0 < peak <= budget
    assert not stats.source.types.startswith("Q8_0") and stats.source.bpw < q8.bits_per_weight
    assert re.sub(r", run in \d+ layer segments$", "", stats.source.types) in {
        c.label for c in intermediate.CANDIDATES}
    assert [p.name for p in out.iterdir()] == ["s.gguf"]
    assert "fidelity" in read_stats(out / "s.gguf").source.describe()

    with pytest.raises(intermediate.DiskBudgetError, match="need at least"):
        calibrate(str(qwen3_dir), text=str(text), output=str(out / "t.gguf"), n_ctx=N_CTX,
                  progress=False, max_disk=ckpt + 1000, cov_budget=cov)
    assert [p.name for p in out.iterdir()] == ["s.gguf"]


def test_threads_give_the_same_bits(ggufs, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 6)
    one, two = (calibrate(str(ggufs["qwen3"]), text=str(text), n_ctx=N_CTX, progress=False,
                          threads=t) for t in (1, 2))
    _same(one, two)
