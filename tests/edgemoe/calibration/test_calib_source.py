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
from edgemoe.calibration.collect import calibrate, collect
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
    """A GGUF source's calibration never has more on disk than its output: the checkpoint,
    saved after every window here, is float32 and rewritten in place, and it goes before the
    stats file is written (under a temporary name, then renamed). `--max-disk 0`: no
    checkpoint at all, the same statistics."""
    monkeypatch.setenv("EDGEMOE_CHECKPOINT_SECONDS", "0")
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 6)
    out = tmp_path / "out"
    out.mkdir()
    from edgemoe.calibration import checkpoint

    def run(max_disk):
        return _peak_extra_disk(out, out / "s.gguf", lambda: calibrate(
            str(ggufs["qwen3"]), text=str(text), output=str(out / "s.gguf"), n_ctx=N_CTX,
            progress=False, max_disk=max_disk))

    real, saves = checkpoint.save, []
    monkeypatch.setattr(checkpoint, "save", lambda *a, **kw: saves.append(a[1]) or real(*a, **kw))
    saved, peak = run(None)
    assert len(saves) >= 2 and {p.name for p in saves} == {"s.gguf.checkpoint.npz"}
    # the checkpoint or the stats file under its temporary name, never both
    assert 0 < peak <= (out / "s.gguf").stat().st_size

    def no_save(*args, **kwargs):
        raise AssertionError("a checkpoint was saved within --max-disk 0")

    monkeypatch.setattr(checkpoint, "save", no_save)
    stats, peak = run(0)
    assert peak <= (out / "s.gguf").stat().st_size
    assert [p.name for p in out.iterdir()] == ["s.gguf"]
    _same(stats, saved)


def test_a_resumed_gguf_run_has_the_uninterrupted_runs_bits(ggufs, tmp_path, monkeypatch,
                                                           caplog):
    """Stopped after its second window with a checkpoint after every window, resumed: the
    statistics of a run without any checkpoint, to the bit (float32 checkpoints, sums rounded
    to float32 after every window in both). A torn checkpoint is read as none: starting over,
    the same statistics."""
    from edgemoe.calibration.collect import cov_plan

    model = pipeline.open_model(ggufs["qwen3"])
    blocks = cov_plan(model.specs, 1 << 20)
    a = model.adapter
    text = PROMPT * 6

    def run(ckpt=None, stop_at=None):
        seen = []

        def on_window(*args):
            seen.append(1)
            if len(seen) == stop_at:
                raise KeyboardInterrupt

        return collect(ggufs["qwen3"], text, model.specs, a.n_layer, a.n_expert, n_ctx=N_CTX,
                       progress=False, cov_blocks=blocks, checkpoint_path=ckpt,
                       fingerprint="f", on_window=on_window)

    whole = run()
    monkeypatch.setenv("EDGEMOE_CHECKPOINT_SECONDS", "0")
    ckpt = tmp_path / "c.npz"
    with pytest.raises(KeyboardInterrupt, match="first 2 of"):
        run(ckpt, stop_at=3)
    with np.load(ckpt) as state:
        assert int(state["windows_done"]) == 2
        assert {state[k].dtype for k in state.files if state[k].dtype.kind == "f"} \
            == {np.dtype(np.float32)}
    _same(run(ckpt), whole)

    ckpt.unlink()  # (it holds the resumed run's last save)
    with pytest.raises(KeyboardInterrupt):
        run(ckpt, stop_at=3)
    ckpt.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])  # a kill mid-save
    with caplog.at_level("WARNING"):
        again = run(ckpt)
    assert "cannot be read" in caplog.text and "starting over" in caplog.text
    _same(again, whole)


def test_ctrl_c_waits_for_a_save():
    """SIGINT inside `signals_held` is raised when the block ends, not in it."""
    import os
    import signal

    from edgemoe.calibration.hooks import signals_held

    done = []
    # Python's own Ctrl-C handler (a background job, as in CI, starts with SIGINT ignored)
    before = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        with pytest.raises(KeyboardInterrupt):
            with signals_held():
                os.kill(os.getpid(), signal.SIGINT)
                time.sleep(0.05)  # the handler has run by now
                done.append(1)
    finally:
        signal.signal(signal.SIGINT, before)
    assert done == [1]


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
    (out / "s.gguf.checkpoint.npz").symlink_to("/dev/full")
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
