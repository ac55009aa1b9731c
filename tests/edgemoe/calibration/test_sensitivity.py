"""Sensitivity probes within a time budget, and the calibrated, pruning-aware plan end to end."""

from __future__ import annotations

import numpy as np

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.calibration.collect import calibrate
from edgemoe.calibration.sensitivity import ProbeLog, _probe_tensors, _spread, measure_scales
from edgemoe.llamacpp import model_weight_bytes, open_llama, tokenize
from export.imatrix import read_stats, write_stats
from tests.helpers import PROMPT


class _Passes:
    """A probe budget of exactly `n` passes."""

    def __init__(self, n: int):
        self.n = n

    def fits(self, k: int = 1) -> bool:
        return k <= self.n


def test_budget_probes_kinds_first_then_layers_spread_over_depth():
    specs = [mp.TensorSpec(f"blk.{i}.{k}.weight", (256, 256), k, i) for i in range(8)
             for k in ("attn_q", "ffn_down_exps")]
    # a kind no probe reaches in the graph
    specs.append(mp.TensorSpec("blk.0.ffn_gate_shexp.weight", (256, 256), "ffn_gate_shexp", 0))
    calls = []

    def one(label, names):
        clock.n -= 1
        calls.append((label, tuple(names)))
        return float(len(calls))

    clock, report = _Passes(5), ProbeLog()
    scales = _probe_tensors(specs, one, clock, report, progress=False)
    # two kind probes on four layers each, then three single tensors, kinds in turn
    assert calls[0] == ("attn_q in 4 layers", tuple(f"blk.{i}.attn_q.weight"
                                                    for i in (0, 3, 4, 7)))
    assert calls[1][0] == "ffn_down_exps in 4 layers"
    assert [c[0] for c in calls[2:]] == ["blk.3.attn_q.weight", "blk.3.ffn_down_exps.weight",
                                         "blk.0.attn_q.weight"]
    assert scales["blk.3.attn_q.weight"] == 3.0 and scales["blk.0.attn_q.weight"] == 5.0
    assert scales["blk.6.attn_q.weight"] == 1.0  # carried from the kind probe
    assert scales["blk.6.ffn_down_exps.weight"] == 2.0
    assert set(scales) == {s.name for s in specs}  # the shared expert takes the median
    assert "carried" in report.summary() and "attn_q's kind probe" in report.summary()

    calls.clear()
    clock = _Passes(100)  # everything fits: every tensor alone, no kind probe
    scales = _probe_tensors(specs, one, clock, ProbeLog(), progress=False)
    assert len(calls) == 16 and all(len(c[1]) == 1 for c in calls)

    calls.clear()  # a kind of one tensor is not probed twice
    one_each = [mp.TensorSpec("output.weight", (256, 256), "output"), specs[0]]
    clock = _Passes(1)
    scales = _probe_tensors(one_each, one, clock, ProbeLog(), progress=False)
    assert calls == [("output in 1 layers", ("output.weight",))] and scales["output.weight"] == 1
    calls.clear()
    clock = _Passes(3)
    scales = _probe_tensors(one_each, one, clock, ProbeLog(), progress=False)
    assert [c[0] for c in calls] == ["output.weight", "blk.0.attn_q.weight"]


def test_spread_orders_layers_from_the_middle_outwards():
    assert _spread(list(range(61)), 4) == [30, 0, 60, 15]
    assert sorted(_spread(list(range(10)))) == list(range(10))


def test_probes_and_calibrated_plan(qwen3_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 20)
    stats = calibrate(str(qwen3_dir), text=str(text), n_ctx=128, calib_type="F32",
                      progress=False)
    model = pipeline.open_model(qwen3_dir)
    gguf = pipeline.export(model, mp.uniform_plan(model.specs, "F32", mp.Budget(2**62),
                                                  check_budget=False), tmp_path / "f32.gguf",
                           progress=False)
    tokens = tokenize(qwen3_dir, text.read_text())[:256]
    before = set(tmp_path.iterdir())
    probed = measure_scales(model, stats, tokens, gguf, n_ctx=128, seconds=1e9,
                            progress=False)
    assert set(tmp_path.iterdir()) == before  # no file written
    quantizable = {s.name for s in model.specs if s.quantizable}
    assert set(probed.scales) == quantizable
    assert all(v > 0 for v in probed.scales.values())
    assert len(set(np.round(list(probed.scales.values()), 6))) > 5  # each tensor alone
    assert probed.prune_scale is not None and probed.prune_scale > 0
    # no time at all: no probe, nothing invented
    none = measure_scales(model, stats, tokens, gguf, n_ctx=128, seconds=0, progress=False)
    assert none.scales == {} and none.prune_scale is None

    write_stats(probed, tmp_path / "s.gguf")
    back = read_stats(tmp_path / "s.gguf")
    assert back.scales.keys() == probed.scales.keys() and back.prune_scale is not None

    # a tight cap: the calibrated program may trade experts for bits; the file is exact
    lo = mp.uniform_plan(model.specs, "Q2_K", mp.Budget(2**62)).weight_bytes
    budget = pipeline.make_budget(model.adapter, 1, ctx=128)
    cap = budget.runtime_bytes + int(lo * 1.1)
    budget = pipeline.make_budget(model.adapter, cap, ctx=128)
    plan, tradeoff = pipeline.make_plan(model, budget, stats=back, progress=False)
    assert plan.damage_model.endswith("+probed")
    assert len(tradeoff) >= 2 and any(r.feasible for r in tradeoff)
    assert plan.total_bytes <= cap
    out = pipeline.export(model, plan, tmp_path / "m.gguf", stats=back, progress=False)
    llm = open_llama(out, n_ctx=128, logits_all=False)
    assert model_weight_bytes(llm) == plan.weight_bytes
    assert llm.metadata["qwen3moe.expert_count"] == str(plan.n_experts_kept)


def test_a_probe_that_fails_in_the_graph_leaves_its_tensors_to_the_median():
    specs = [mp.TensorSpec(f"blk.{i}.{k}.weight", (256, 256), k, i) for i in range(2)
             for k in ("attn_q", "attn_k")]

    def one(label, names):
        return None if "attn_k" in label else 2.0  # attn_k's probe raised in llama.cpp

    report = ProbeLog()
    scales = _probe_tensors(specs, one, _Passes(100), report, progress=False)
    assert scales == dict.fromkeys((s.name for s in specs), 2.0)
    assert "blk.0.attn_k.weight" in report.skipped


def test_calibrate_probes_against_its_own_run(qwen3_dir, tmp_path, monkeypatch):
    """`calibrate` with probes: the reference is the calibration run's own logits (no base
    pass), on whole windows of the calibration text; every tensor gets a scale."""
    from edgemoe.calibration import perturb

    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 20)
    passes = []
    real = perturb.ProbeRunner.logprobs
    monkeypatch.setattr(perturb.ProbeRunner, "logprobs",
                        lambda self, probe=None: passes.append(probe) or real(self, probe))
    stats = calibrate(str(qwen3_dir), text=str(text), n_ctx=128, calib_type="F32",
                      sensitivity=True, probe_seconds=1e9, progress=False)
    assert passes and None not in passes  # every pass a probe: no base pass
    model = pipeline.open_model(qwen3_dir)
    assert set(stats.scales) == {s.name for s in model.specs if s.quantizable}
    assert all(v > 0 for v in stats.scales.values()) and stats.prune_scale > 0
    assert len(passes) == len(stats.scales) + 1  # each tensor alone, and pruning
