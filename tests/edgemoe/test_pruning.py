"""Expert pruning: the exported file is the model with those experts removed."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.llamacpp import eval_logits, open_llama
from tests.arch_fixtures import prune_hf_checkpoint
from tests.helpers import hf_logits, hf_tokens

KEPT = {0: (0, 2, 3), 1: (1, 2, 3)}  # 3 of 4 experts, different ones per layer


def test_pruned_f32_export_matches_pruned_transformers(tiny_model, tmp_path):
    model = pipeline.open_model(tiny_model)
    budget = pipeline.make_budget(model.adapter, "1GB", ctx=64)
    plan = mp.uniform_plan(model.adapter.tensor_specs(3), "F32", budget)
    plan = replace(plan, n_experts=4, n_experts_kept=3,
                   kept_experts={str(k): v for k, v in KEPT.items()})
    out = pipeline.export(model, plan, tmp_path / "pruned.gguf", progress=False)

    llm = open_llama(out, n_ctx=64, f32_kv=True)
    import llama_cpp

    assert llama_cpp.llama_model_n_params(llm.model) > 0
    assert llm.metadata[f"{model.adapter.arch_name}.expert_count"] == "3"
    tokens = hf_tokens(tiny_model)
    got = eval_logits(llm, tokens)
    want = hf_logits(prune_hf_checkpoint(tiny_model, tmp_path / "hf_pruned", KEPT), tokens)
    full = hf_logits(tiny_model, tokens)
    assert np.abs(full - want).max() > 0.1, "pruning these experts should change the logits"
    diff = np.abs(got - want).max()
    assert diff < 1e-3, f"max |llama.cpp pruned - transformers pruned| = {diff}"
