"""Sensitivity probes of a run in layer segments (edgemoe.calibration.segment_probes): the
scales a whole run's probes measure, every block probed, resumable."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe import pipeline
from edgemoe.calibration import intermediate
from edgemoe.calibration import segment_probes as sp
from edgemoe.calibration.accumulate import cov_plan
from edgemoe.calibration.collect import collect
from edgemoe.calibration.nodes import graph_nodes
from edgemoe.calibration.perturb import BasePass
from edgemoe.calibration.segments import Segments
from edgemoe.calibration.sensitivity import measure_scales
from tests.conftest import build_qwen3_moe
from tests.helpers import PROMPT

N_CTX = 64
TEXT = PROMPT * 4
N_PROBE = 2 * N_CTX
RANGES = [(0, 1), (1, 3), (3, 4)]  # a first, a middle (no vocabulary) and a last segment


@pytest.fixture(scope="module")
def four_blocks(tmp_path_factory, bpe_tokenizer_dir):
    root = tmp_path_factory.mktemp("four")
    model = pipeline.open_model(build_qwen3_moe(root / "hf", bpe_tokenizer_dir, n_layers=4))
    plan = intermediate.candidate_plan(model.specs, intermediate.CANDIDATES[0])  # Q8_0
    whole = pipeline.export(model, plan, root / "whole.gguf", progress=False, cpu_rows=True)
    return model, plan, whole


def _run(model, segs, probes, ref, **kw):
    a = model.adapter
    blocks = cov_plan(model.specs, 1 << 20, graph_nodes(a.arch_name))
    return collect(None, TEXT, model.specs, a.n_layer, a.n_expert, n_ctx=N_CTX,
                   progress=False, cov_blocks=blocks, segs=segs, on_window=ref,
                   on_segment=probes, **kw)


def _segmented(model, plan, out, **kw):
    segs = Segments(model, plan, RANGES, out / "s.gguf", progress=False)
    ref = BasePass(N_PROBE, N_CTX)
    probes = sp.SegmentProbes(model, segs, ref, room=1 << 30, fingerprint="x", seconds=1e9,
                              progress=False)
    return segs, ref, probes


def test_probes_in_segments_measure_what_a_whole_run_measures(four_blocks, tmp_path):
    model, plan, whole = four_blocks
    segs, ref, probes = _segmented(model, plan, tmp_path)
    stats = _run(model, segs, probes, ref)
    # every probe ran its course: streams through the first and middle segments, KLD at
    # the head of the last
    assert probes.flights and all(f.kld is not None and f.failed is None
                                  for f in probes.flights)
    starts = {f.start for f in probes.flights}
    assert starts == {0, 1, 2}
    got = probes.finish(stats)
    probes.remove()
    segs.remove()
    assert not list(tmp_path.iterdir())

    a = model.adapter
    base = BasePass(N_PROBE, N_CTX)
    blocks = cov_plan(model.specs, 1 << 20, graph_nodes(a.arch_name))
    whole_stats = collect(whole, TEXT, model.specs, a.n_layer, a.n_expert, n_ctx=N_CTX,
                          progress=False, cov_blocks=blocks, on_window=base)
    want = measure_scales(model, whole_stats, [], whole, n_ctx=N_CTX, seconds=1e9,
                          progress=False, base=base)
    assert set(got.scales) == set(want.scales) == {s.name for s in model.specs
                                                     if s.quantizable}
    names = sorted(want.scales)
    g = np.array([got.scales[n] for n in names])
    w = np.array([want.scales[n] for n in names])
    assert len(set(np.round(w, 6))) > 10  # every tensor alone, each its own
    # the same passes on the same float32 stream: the same scales
    np.testing.assert_allclose(g, w, rtol=1e-6)
    assert got.prune_scale == pytest.approx(want.prune_scale, rel=1e-6)
    # a tensor of the first segment is a probe's own, not carried from a later block
    assert got.scales["blk.0.attn_q.weight"] != got.scales["blk.3.attn_q.weight"]


def test_the_budget_and_the_disk_room_bound_the_probes(four_blocks, tmp_path):
    model, plan, _ = four_blocks
    segs = Segments(model, plan, RANGES, tmp_path / "s.gguf", progress=False)
    ref = BasePass(N_PROBE, N_CTX)
    n_embd = model.adapter.hp.n_embd
    # room for two streams under way (and the one being written): the rest start in the
    # last segment
    room = 3 * sp.probe_bytes(N_PROBE, n_embd)
    probes = sp.SegmentProbes(model, segs, ref, room=room, fingerprint="x", seconds=1e9,
                              progress=False)
    stats = _run(model, segs, probes, ref)
    moving = [f for f in probes.flights if f.start < len(RANGES) - 1]
    assert len(moving) == 2 and len(probes.flights) > 2
    got = probes.finish(stats)
    assert len(got.scales) == sum(s.quantizable for s in model.specs)
    probes.remove()
    segs.remove()

    # no time: nothing probed, nothing invented
    probes = sp.SegmentProbes(model, segs, BasePass(N_PROBE, N_CTX), room=1 << 30,
                              fingerprint="y", seconds=1e-9, progress=False)
    stats = _run(model, segs, probes, probes.ref)
    assert probes.flights == []
    none = probes.finish(stats)
    assert none.scales == {} and none.prune_scale is None
    probes.remove()
    segs.remove()


def test_probes_resume_where_they_were(four_blocks, tmp_path, monkeypatch):
    model, plan, _ = four_blocks
    segs, ref, probes = _segmented(model, plan, tmp_path / "a")
    (tmp_path / "a").mkdir()
    full = probes.finish(_run(model, segs, probes, ref))
    probes.remove()
    segs.remove()

    monkeypatch.setenv("EDGEMOE_CHECKPOINT_SECONDS", "0")
    (tmp_path / "b").mkdir()
    segs, ref, probes = _segmented(model, plan, tmp_path / "b")
    real = sp.SegmentProbes._run
    calls = []

    def stop_in_the_middle(self, f, *args):  # Ctrl-C in the middle segment's probes
        if args[2] == 1:
            calls.append(f.label)
            if len(calls) == 3:
                raise KeyboardInterrupt
        return real(self, f, *args)

    monkeypatch.setattr(sp.SegmentProbes, "_run", stop_in_the_middle)
    ckpt = tmp_path / "b" / "ckpt.npz"
    with pytest.raises(KeyboardInterrupt, match="run the same command again"):
        _run(model, segs, probes, ref, checkpoint_path=ckpt, fingerprint="x")
    assert probes.state_path.is_file()
    monkeypatch.setattr(sp.SegmentProbes, "_run", real)
    ref = BasePass(N_PROBE, N_CTX)
    again = sp.SegmentProbes(model, segs, ref, room=1 << 30, fingerprint="x", seconds=1e9,
                             progress=False)
    assert again.flights is not None  # the plan, and where each probe was, read back
    done = [f.label for f in again.flights if f.start < 2 == f.at]
    assert len(done) == 2  # two probes had gone through the middle segment
    resumed = again.finish(_run(model, segs, again, ref, checkpoint_path=ckpt,
                                fingerprint="x"))
    assert resumed.scales == pytest.approx(full.scales, rel=1e-6)
    assert resumed.prune_scale == pytest.approx(full.prune_scale, rel=1e-6)
    # another budget asked: the saved plan is not this run's, and its files go
    assert again.state_path.is_file()
    other = sp.SegmentProbes(model, segs, ref, room=1 << 30, fingerprint="x", seconds=5e8,
                             progress=False)
    assert other.flights is None and not other.state_path.is_file()
    assert not list((tmp_path / "b").glob("*.probe-*.npy"))


def test_probes_not_started_are_dropped_when_passes_cost_more_than_priced(four_blocks,
                                                                          tmp_path):
    model, plan, _ = four_blocks
    segs = Segments(model, plan, RANGES, tmp_path / "s.gguf", progress=False)
    probes = sp.SegmentProbes(model, segs, BasePass(N_PROBE, N_CTX), room=1 << 30,
                              fingerprint="x", progress=False)
    probes.budget, probes.pass_seconds = 12.0, [1.0, 1.0, 1.0]
    probes.flights = [sp.Flight(f"p{i}", (), None, start, start)
                      for i, start in enumerate([0, 0, 1, 2, 2])]  # priced at 10 s in all
    for f in probes.flights[:2]:  # the first segment's two passes took 3 s, priced at 2
        f.at = 1
    probes.spent, probes.priced = 3.0, 2.0
    probes._trim(0)
    # at 1.5x: 3 s spent + 6 s for the two under way + 3 + 1.5 + 1.5 for the rest = 15 s;
    # the last planned go first until 12 s fit
    assert [f.failed for f in probes.flights] == [None, None, None, sp.OUT_OF_TIME,
                                                  sp.OUT_OF_TIME]
    probes.spent = 20.0  # far over: what is under way still finishes
    probes._trim(0)
    assert [f.failed for f in probes.flights[:2]] == [None, None]
    assert probes.flights[2].failed == sp.OUT_OF_TIME
