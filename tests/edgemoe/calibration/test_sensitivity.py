"""Sensitivity probes and the calibrated, pruning-aware plan end to end."""

from __future__ import annotations

import numpy as np

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.calibration.collect import calibrate
from edgemoe.calibration.sensitivity import measure_scales
from edgemoe.llamacpp import model_weight_bytes, open_llama, tokenize
from export.imatrix import read_stats, write_stats
from tests.helpers import PROMPT


def test_probes_and_calibrated_plan(qwen3_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 20)
    stats = calibrate(str(qwen3_dir), text=str(text), n_ctx=128, calib_type="F32",
                      progress=False)
    model = pipeline.open_model(qwen3_dir)
    tokens = tokenize(qwen3_dir, text.read_text())[:256]
    probed = measure_scales(model, stats, tokens, n_ctx=128, per_tensor=False, progress=False)
    quantizable = {s.name for s in model.specs if s.quantizable}
    assert set(probed.scales) == quantizable
    assert all(v > 0 for v in probed.scales.values())
    # per kind: all tensors of one kind share a scale, and kinds differ
    by_kind = {n.split(".")[-2]: v for n, v in probed.scales.items()}
    assert len(set(np.round(list(by_kind.values()), 6))) > 2
    assert probed.prune_scale is not None and probed.prune_scale > 0

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
