"""Expert pruning: the exported file is the model with those experts removed."""

from __future__ import annotations

import json
import re
import shutil
from dataclasses import replace

import numpy as np

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.llamacpp import eval_logits, open_llama
from tests.edgemoe.test_export_llamacpp import _hf_logits, _tokens

KEPT = {0: (0, 2, 3), 1: (1, 2, 3)}  # 3 of 4 experts, different ones per layer


def _pruned_hf_checkpoint(src, out, kept):
    """The HF checkpoint with experts removed and router rows dropped, renumbered."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    tensors = load_file(src / "model.safetensors")
    new = {}
    for name, t in tensors.items():
        m = re.match(r"model\.layers\.(\d+)\.(.*)\.experts\.(\d+)\.(.*)", name)
        if m:
            layer, e = int(m.group(1)), int(m.group(3))
            if e in kept[layer]:
                i = kept[layer].index(e)
                new[f"model.layers.{layer}.{m.group(2)}.experts.{i}.{m.group(4)}"] = t
            continue
        m = re.match(r"model\.layers\.(\d+)\.(mlp|block_sparse_moe)\.gate\.weight", name)
        if m:
            t = t[list(kept[int(m.group(1))])].clone()
        new[name] = t
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    n = len(next(iter(kept.values())))
    for key in ("num_experts", "num_local_experts"):
        if key in cfg:
            cfg[key] = n
    (out / "config.json").write_text(json.dumps(cfg))
    return out


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
    tokens = _tokens(tiny_model)
    got = eval_logits(llm, tokens)
    want = _hf_logits(_pruned_hf_checkpoint(tiny_model, tmp_path / "hf_pruned", KEPT), tokens)
    full = _hf_logits(tiny_model, tokens)
    assert np.abs(full - want).max() > 0.1, "pruning these experts should change the logits"
    diff = np.abs(got - want).max()
    assert diff < 1e-3, f"max |llama.cpp pruned - transformers pruned| = {diff}"
