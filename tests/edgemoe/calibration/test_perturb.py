"""Probes inside the eval callback against real files: a tensor at the probe type, a pruned
model. The callback's KL divergence must be what llama.cpp gives for the real file."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

import memory_planner as mp
from edgemoe import damage, pipeline
from edgemoe.calibration import perturb, sensitivity
from edgemoe.calibration.collect import calibrate, collect
from edgemoe.calibration.nodes import HookError
from edgemoe.calibration.perturb import (
    BasePass,
    ProbeError,
    ProbeRunner,
    PruneProbe,
    RunWeights,
    TensorProbe,
    WeightErrors,
    kld,
)
from edgemoe.calibration.sensitivity import Predictions
from edgemoe.damage import SAMPLED_ROWS, expert_shares, measure_damage
from edgemoe.llamacpp import tokenize
from memory_planner.joint import kept_by_saliency
from tests.helpers import PROMPT

N_CTX = 128
# one tensor of every kind the callback perturbs, and how far the callback's KLD may be from
# the real file's: the real Q2_K matmul also rounds its input to Q8_K (ggml's vec_dot type),
# which the callback's float product does not
CASES = {"blk.1.attn_q.weight": 0.15, "blk.1.attn_k.weight": 0.15,
         "blk.1.attn_v.weight": 0.15, "blk.1.attn_output.weight": 0.15,
         "blk.0.ffn_gate_exps.weight": 0.15, "blk.1.ffn_up_exps.weight": 0.15,
         "blk.1.ffn_down_exps.weight": 0.15, "output.weight": 0.05,
         "token_embd.weight": 0.01}


@pytest.fixture(scope="module")
def setup(qwen3_dir, ggufs, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("perturb")
    text = tmp / "calib.txt"
    text.write_text(PROMPT * 30)
    stats = calibrate(str(qwen3_dir), text=str(text), n_ctx=N_CTX, calib_type="F32",
                      calib_model=str(ggufs["qwen3"]), progress=False)
    model = pipeline.open_model(qwen3_dir)
    tokens = tokenize(qwen3_dir, text.read_text())[:512]
    runner = ProbeRunner(ggufs["qwen3"], tokens, N_CTX)
    ref = runner.logprobs()
    types = {t.name: t.type for t in mp.uniform_plan(model.specs, "Q2_K", mp.Budget(2**62),
                                                     check_budget=False).tensors}
    errors = WeightErrors(model, stats, RunWeights(ggufs["qwen3"]), types)
    yield model, stats, tokens, runner, ref, errors, tmp
    runner.close()


def _real_kld(model, stats, plan, tokens, ref, path) -> float:
    out = pipeline.export(model, plan, path, stats=stats, progress=False, search=0)
    runner = ProbeRunner(out, tokens, N_CTX)  # llama.cpp's settings of the probes' reference
    try:
        return kld(ref, runner.logprobs())
    finally:
        runner.close()


@pytest.mark.parametrize("name", list(CASES))
def test_callback_probe_matches_a_real_file_with_that_tensor_at_q2_k(setup, name):
    model, stats, tokens, runner, ref, errors, tmp = setup
    probe = TensorProbe(errors, [name])
    got = kld(ref, runner.logprobs(probe))
    assert probe.applied[name] >= len(runner.windows)  # once per window (per layer node)
    base = mp.uniform_plan(model.specs, "F32", mp.Budget(2**62), check_budget=False)
    q2 = mp.uniform_plan(model.specs, "Q2_K", mp.Budget(2**62), check_budget=False).by_name()
    plan = replace(base, tensors=tuple(q2[t.name] if t.name == name else t
                                       for t in base.tensors))
    assert q2[name].type == "Q2_K"
    want = _real_kld(model, stats, plan, tokens, ref, tmp / "probe.gguf")
    assert want > 1e-5  # the probe type really damages the model
    assert abs(got - want) <= CASES[name] * want, (got, want)


def test_pruning_probe_matches_a_real_pruned_file(setup):
    model, stats, tokens, runner, ref, errors, tmp = setup
    kept = kept_by_saliency(stats, 3, 1)
    probe = PruneProbe(kept)
    got = kld(ref, runner.logprobs(probe))
    plan = mp.uniform_plan(model.adapter.tensor_specs(3), "F32", mp.Budget(2**62),
                           check_budget=False)
    plan = replace(plan, n_experts=4, n_experts_kept=3,
                   kept_experts={str(k): v for k, v in kept.items()})
    want = _real_kld(model, stats, plan, tokens, ref, tmp / "pruned.gguf")
    assert want > 1e-4
    assert abs(got - want) <= 1e-3 * want, (got, want)


def test_a_renamed_node_fails_loudly(setup, monkeypatch):
    *_, runner, ref, errors, _ = setup
    monkeypatch.setitem(perturb._MATMUL, "attn_q", "Qcur_renamed")
    with pytest.raises(HookError, match="no node named Qcur_renamed"):
        runner.logprobs(TensorProbe(errors, ["blk.0.attn_q.weight"]))
    # a node of the right name that never multiplies the tensor is caught after the pass
    monkeypatch.setitem(perturb._MATMUL, "attn_q", "Kcur")
    with pytest.raises(HookError, match="expected blk.0.attn_q.weight"):
        runner.logprobs(TensorProbe(errors, ["blk.0.attn_q.weight"]))


def test_unsupported_kinds_are_refused(setup):
    *_, runner, ref, errors, _ = setup
    with pytest.raises(ProbeError, match="no probe"):
        TensorProbe(errors, ["blk.0.ffn_gate_shexp.weight"]).install(perturb.EvalHooks())


def test_the_calibration_run_is_the_probes_reference(setup, ggufs):
    """The probes' reference comes from calibration's own run: a probe pass without a probe
    gives the same log-probabilities, to the bit, so a probe's KLD is the probe's alone."""
    model, stats, tokens, runner, ref, errors, tmp = setup
    a = model.adapter
    base = BasePass(3 * N_CTX, N_CTX)
    again = collect(ggufs["qwen3"], (tmp / "calib.txt").read_text(), model.specs, a.n_layer,
                    a.n_expert, n_ctx=N_CTX, progress=False, on_window=base)
    assert again.n_tokens > 3 * N_CTX and len(base.windows) == 3 and base.seconds > 0
    assert all(len(w) == N_CTX for w in base.windows)
    probes = ProbeRunner(ggufs["qwen3"], base.tokens, N_CTX)
    try:
        unprobed = probes.logprobs()
    finally:
        probes.close()
    assert len(unprobed) == 3
    for x, y in zip(base.logprobs, unprobed):
        assert np.array_equal(x, y)
    assert kld(base.logprobs, unprobed) == 0.0


def test_an_expert_probe_perturbs_only_the_experts_asked(setup):
    """Probes of big expert tensors quantize a subset of experts (those measure_damage
    measures): only those slots are perturbed, and only their errors are computed."""
    model, stats, tokens, runner, ref, errors, tmp = setup
    name = "blk.1.ffn_up_exps.weight"
    n_expert = model.adapter.n_expert
    full = kld(ref, runner.logprobs(TensorProbe(errors, [name])))
    every = kld(ref, runner.logprobs(TensorProbe(errors, [name], {name: np.arange(n_expert)})))
    assert every == full > 0
    none = TensorProbe(errors, [name], {name: np.array([], dtype=int)})
    assert kld(ref, runner.logprobs(none)) == 0.0
    fresh = WeightErrors(model, stats, errors.run, errors.types)
    some = kld(ref, runner.logprobs(TensorProbe(fresh, [name], {name: np.array([0, 2])})))
    assert 0 < some < full
    assert {e for n, e in fresh._cache if n == name} <= {0, 2}


def test_a_probes_weight_errors_give_measure_damages_predictions(setup):
    """The errors a probe quantizes whole give, on the rows measure_damage samples, the
    damage measure_damage measures (to the bit): predictions need no second quantization."""
    model, stats, tokens, runner, ref, errors, tmp = setup
    names = ["blk.1.ffn_up_exps.weight", "blk.0.ffn_down_exps.weight", "blk.1.attn_q.weight",
             "output.weight"]
    for rows in (7, SAMPLED_ROWS):  # a sample of the rows, and (this model) all of them
        sampled: dict = {}
        fresh = WeightErrors(model, stats, errors.run, errors.types, sampled=sampled,
                             sampled_rows=rows)
        for n in names:
            spec = next(s for s in model.specs if s.name == n)
            if spec.n_experts:
                fresh.experts(n, range(spec.n_experts))
            else:
                fresh.get(n)
        d = measure_damage(model, ladder=("Q2_K",), stats=stats, max_rows=rows,
                           progress=False, only=set(names))
        for n in names:
            t = errors.types[n]
            if n in d.per_expert:
                share = expert_shares(stats, next(s for s in model.specs if s.name == n))
                got = np.array([sampled[n, e] for e in range(len(share))]) * share
                assert np.array_equal(got, d.per_expert[n][t]), n
            else:
                assert sampled[n, None] == d.dense[n][t], n
    measured = [Predictions(model, stats)([n]) for n in names]
    predict = Predictions(model, stats)
    fresh = WeightErrors(model, stats, errors.run, predict.types, sampled=predict.sampled)
    for n in names:  # the slices a probe of n computes
        if n in predict.subset:
            fresh.experts(n, predict.subset[n])
        else:
            fresh.get(n)

    def refuse(*a, **k):
        raise AssertionError("quantized again")

    with pytest.MonkeyPatch.context() as m:
        m.setattr(sensitivity, "measure_damage", refuse)
        assert [predict([n]) for n in names] == measured
    assert min(measured) > 0

    # a probe whose tokens chose some experts only: the others alone are quantized, on the
    # same rows, to the same predictions
    predict = Predictions(model, stats)
    fresh = WeightErrors(model, stats, errors.run, predict.types, sampled=predict.sampled)
    experts = [n for n in names if n in predict.subset]
    for n in experts:
        fresh.experts(n, predict.subset[n][::2])
    quantized = []
    real_error = damage._error

    def counted(data, imatrix, max_rows, type_name):
        quantized.append(type_name)
        return real_error(data, imatrix, max_rows, type_name)

    with pytest.MonkeyPatch.context() as m:
        m.setattr(damage, "_error", counted)
        m.setattr(sensitivity, "measure_damage", refuse)
        assert [predict([n]) for n in experts] == [measured[names.index(n)] for n in experts]
    assert len(quantized) == sum(len(predict.subset[n][1::2]) for n in experts) > 0
