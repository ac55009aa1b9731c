"""Calibration in llama.cpp measures what transformers says the model does."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.calibration.collect import calibrate
from export.imatrix import read_stats
from export.source import HFSource
from tests.helpers import PROMPT

N_CTX = 64


def _reference(model_dir, tokens):
    """Per layer: expert counts, saliency sums, the MoE input squares and second moments
    (per expert), from transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    src = HFSource(model_dir)
    cfg = model.config
    E, k = cfg.num_experts, cfg.num_experts_per_tok
    inputs = {}
    hooks = [layer.mlp.register_forward_pre_hook(
        lambda m, a, i=i: inputs.setdefault(i, []).append(a[0][0].detach().numpy()))
        for i, layer in enumerate(model.model.layers)]
    with torch.no_grad():
        for s in range(0, len(tokens), N_CTX):
            model(torch.tensor([tokens[s:s + N_CTX]]))
    for h in hooks:
        h.remove()
    out = {}
    for i, xs in inputs.items():
        x = np.concatenate(xs).astype(np.float64)
        router = src.load(f"model.layers.{i}.mlp.gate.weight").astype(np.float64)
        logits = x @ router.T
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        ids = np.argsort(-p, axis=-1)[:, :k]
        w = np.take_along_axis(p, ids, -1)
        w /= w.sum(-1, keepdims=True)
        counts, sal, sums = np.zeros(E), np.zeros(E), np.zeros((E, x.shape[1]))
        covs = np.zeros((E, x.shape[1], x.shape[1]))
        for e in range(E):
            g = src.load(f"model.layers.{i}.mlp.experts.{e}.gate_proj.weight")
            u = src.load(f"model.layers.{i}.mlp.experts.{e}.up_proj.weight")
            d = src.load(f"model.layers.{i}.mlp.experts.{e}.down_proj.weight")
            rows, slot = np.nonzero(ids == e)
            h = x[rows] @ g.T
            f = ((h / (1 + np.exp(-h))) * (x[rows] @ u.T)) @ d.T
            counts[e] = len(rows)
            sal[e] = (w[rows, slot] * np.linalg.norm(f, axis=-1)).sum()
            sums[e] = np.square(x[rows]).sum(0)
            covs[e] = x[rows].T @ x[rows]
        out[i] = (counts, sal, sums, covs)
    return out


def test_stats_match_transformers(qwen3_dir, tmp_path):
    from transformers import AutoTokenizer

    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 12)
    tokens = AutoTokenizer.from_pretrained(qwen3_dir)(text.read_text())["input_ids"]
    stats = calibrate(str(qwen3_dir), text=str(text), output=str(tmp_path / "s.gguf"),
                      n_ctx=N_CTX, calib_type="F32", progress=False)
    assert stats.n_tokens == len(tokens)
    ref = _reference(qwen3_dir, tokens)
    for layer, (counts, sal, sums, covs) in ref.items():
        e = stats.experts[layer]
        np.testing.assert_array_equal(e.selected, counts)
        np.testing.assert_allclose(e.saliency_sum, sal, rtol=1e-3)
        name = f"blk.{layer}.ffn_up_exps.weight"
        np.testing.assert_array_equal(stats.counts[name], counts)
        np.testing.assert_allclose(stats.in_sum2[name], sums, rtol=1e-3, atol=1e-6)
        # rows of 256 columns: one covariance block, the whole row
        # (off-diagonal sums cancel: their tolerance is relative to the largest entry)
        np.testing.assert_allclose(stats.in_cov[name][:, 0], covs, rtol=1e-3,
                                   atol=1e-4 * np.abs(covs).max())
    # the file on disk is the same statistics
    back = read_stats(tmp_path / "s.gguf")
    np.testing.assert_allclose(back.experts[1].saliency, stats.experts[1].saliency, rtol=1e-6)
    assert set(back.in_sum2) == set(stats.in_sum2) == set(back.in_cov)
    for name, cov in back.in_cov.items():
        np.testing.assert_array_equal(cov, stats.in_cov[name])
        diag = np.diagonal(cov, axis1=-2, axis2=-1).reshape(cov.shape[0], -1)
        np.testing.assert_allclose(diag, back.in_sum2[name], rtol=1e-4, atol=1e-5)
    assert {"blk.0.attn_q.weight", "blk.1.attn_output.weight", "output.weight"} <= set(
        stats.in_sum2)


def test_empty_text_is_an_error(qwen3_dir, tmp_path):
    (tmp_path / "e.txt").write_text("")
    with pytest.raises(ValueError, match="too short"):
        calibrate(str(qwen3_dir), text=str(tmp_path / "e.txt"), calib_type="F32",
                  progress=False)


def test_stats_file_drives_llama_cpps_own_quantizer(qwen3_dir, tmp_path):
    """Our stats file, read back as llama-quantize reads an imatrix (sums / counts per
    expert), makes llama_model_quantize accept types that need an imatrix, and it quantizes
    each expert slice exactly as our exporter does with the same statistics."""
    from dataclasses import replace

    import gguf

    import memory_planner as mp
    from edgemoe import pipeline
    from edgemoe.damage import importance
    from edgemoe.llamacpp import llama_quantize

    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 12)
    calibrate(str(qwen3_dir), text=str(text), output=str(tmp_path / "s.gguf"), n_ctx=N_CTX,
              calib_type="F32", progress=False)
    stats = read_stats(tmp_path / "s.gguf")
    model = pipeline.open_model(qwen3_dir)
    f32 = pipeline.export(model, mp.uniform_plan(model.specs, "F32", mp.Budget(2**62)),
                          tmp_path / "f32.gguf", progress=False)
    imatrix = {s.name: importance(stats, s).reshape(-1) for s in model.specs
               if s.quantizable and stats.importance(s.name) is not None}
    assert "blk.0.ffn_down_exps.weight" in imatrix
    llama_quantize(f32, tmp_path / "iq2.gguf", "IQ2_XXS", imatrix=imatrix)

    ours = mp.uniform_plan(model.specs, "IQ2_XXS", mp.Budget(2**62)).by_name()
    name = "blk.1.ffn_down_exps.weight"
    theirs = {t.name: t for t in gguf.GGUFReader(tmp_path / "iq2.gguf").tensors}[name]
    assert theirs.tensor_type.name == "IQ2_XXS" == ours[name].type
    plan = mp.uniform_plan(model.specs, "Q8_0", mp.Budget(2**62))
    plan = replace(plan, tensors=tuple(ours[name] if t.name == name else t
                                       for t in plan.tensors))
    mine = pipeline.export(model, plan, tmp_path / "ours.gguf", stats=stats, progress=False,
                           search=0)
    mine_t = {t.name: t for t in gguf.GGUFReader(mine).tensors}[name]
    assert bytes(mine_t.data.tobytes()) == bytes(theirs.data.tobytes())


def test_shared_expert_covariances_when_per_expert_ones_do_not_fit(qwen3_dir, tmp_path):
    from edgemoe import pipeline
    from edgemoe.calibration.collect import cov_bytes, cov_plan

    specs = pipeline.open_model(qwen3_dir).specs
    full = cov_plan(specs, 2**40)
    need = cov_bytes(specs, full)
    shared = cov_plan(specs, need - 1)
    assert all(c.per_expert for n, c in full.items() if "_exps" in n)
    assert not any(c.per_expert for c in shared.values())
    assert not any("ffn_down_exps" in n for n in shared)  # each expert's own units
    assert cov_plan(specs, 1000) == {}

    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 12)
    kw = dict(text=str(text), n_ctx=N_CTX, calib_type="F32", progress=False)
    per = calibrate(str(qwen3_dir), cov_budget=need, **kw)
    one = calibrate(str(qwen3_dir), cov_budget=need - 1, **kw)
    name = "blk.1.ffn_gate_exps.weight"
    assert per.in_cov[name].shape[0] == 4 and one.in_cov[name].shape[0] == 1
    assert "blk.1.ffn_down_exps.weight" not in one.in_cov
    # every token reaches k = 2 experts: the experts' sums add up to twice the shared one
    np.testing.assert_allclose(per.in_cov[name].sum(0), 2 * one.in_cov[name][0], rtol=1e-4,
                               atol=1e-4 * np.abs(one.in_cov[name]).max())
    np.testing.assert_array_equal(per.in_cov["blk.0.attn_q.weight"],
                                  one.in_cov["blk.0.attn_q.weight"])

    # export scales the shared correlations by each expert's imatrix: measured with each
    # expert's own covariance, the searched rows still have less output error
    import gguf

    import memory_planner as mp
    from export.search import output_error

    model = pipeline.open_model(qwen3_dir)

    def tensor(plan_type: str, stats, search: int):
        plan = mp.uniform_plan(model.specs, plan_type, mp.Budget(2**62))
        path = pipeline.export(model, plan, tmp_path / f"{plan_type}-{search}.gguf", stats=stats,
                               progress=False, search=search)
        return {t.name: t for t in gguf.GGUFReader(path).tensors}[name].data

    w = tensor("F32", None, 0)
    own = per.covariance(name)
    searched, plain = (sum(output_error(w[e], raw[e].reshape(len(w[e]), -1), "IQ3_S",
                                        own[e]).sum() for e in range(len(w)))
                       for raw in (tensor("IQ3_S", one, 16), tensor("IQ3_S", one, 0)))
    assert searched < 0.95 * plain, (searched, plain)
