"""DeepSeek-V3 / V2 weights: tiny random checkpoints exported and run in llama.cpp.

The V3 model exercises everything llama.cpp's deepseek2 graph does differently: MLA with
kv_b_proj split into attn_k_b / attn_v_b, a leading dense block, a shared expert, sigmoid
scores with a selection-only correction bias, group-limited routing (4 groups, 2 used),
renormalised top-k and a routed scaling factor of 2.5. The V2 model is V2-Lite-shaped
(full-rank Q, softmax, greedy top-k, no renormalisation, scaling 1.5). V2's group-limited
routing is not tested against transformers: transformers ranks V2 groups by their best
score, llama.cpp by the sum of the top two (V3's rule), so the two disagree by design.
"""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.llamacpp import eval_logits, open_llama
from export.arch import adapter_for
from tests import arch_fixtures as af
from tests.helpers import export_planned, hf_logits, hf_tokens, q8_0_agreement

YARN = {"type": "yarn", "factor": 4.0, "original_max_position_embeddings": 128,
        "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0}
VARIANTS = {
    "v3": lambda out, tok: af.build_deepseek_v3(out, tok),
    "v2-lite": lambda out, tok: af.build_deepseek_v2(out, tok),
    # V3's own rope scaling, written as llama.cpp's converter writes it
    "v3-yarn": lambda out, tok: af.build_deepseek_v3(out, tok, rope_scaling=YARN),
    # transformers' rotate-half rope layout: rope rows reordered into pairs on export
    "v3-rotate-half": lambda out, tok: af.build_deepseek_v3(out, tok, rope_interleave=False),
}
# 12 of 16 experts (3 of each routing group, in order) and 6 of 8: different ones per layer
KEPT = {
    "v3": {1: (0, 1, 3, 4, 5, 6, 8, 10, 11, 12, 13, 15),
           2: (1, 2, 3, 4, 6, 7, 8, 9, 11, 13, 14, 15)},
    "v2-lite": {1: (0, 2, 3, 4, 5, 7), 2: (1, 2, 3, 5, 6, 7)},
}


@pytest.fixture(scope="module")
def deepseek(tmp_path_factory, bpe_tokenizer_dir):
    """Each variant's checkpoint, built on first use."""
    built = {}

    def get(name):
        if name not in built:
            built[name] = VARIANTS[name](tmp_path_factory.mktemp(name), bpe_tokenizer_dir)
        return built[name]

    return get


def _max_diff(gguf_path, model_dir, tokens, reference_dir=None) -> float:
    llm = open_llama(gguf_path, n_ctx=64, f32_kv=True)
    got = eval_logits(llm, tokens)
    want = hf_logits(reference_dir or model_dir, tokens)
    assert np.abs(want).max() > 1.0, "logits too small for the comparison to mean anything"
    return float(np.abs(got - want).max())


def test_kv_b_split_is_llama_cpp_converter_layout(deepseek):
    """attn_k_b / attn_v_b hold kv_b_proj as llama.cpp's converter writes them:
    view(n_head, nope + v, rank), split [nope, v] on dim 1, k_b transposed (1, 2)."""
    import torch

    model = pipeline.open_model(deepseek("v3"))
    a = model.adapter.hp
    by_name = {r.spec.name: r for r in model.recipes}
    kv_b = torch.from_numpy(model.source.load("model.layers.1.self_attn.kv_b_proj.weight"))
    view = kv_b.view(a.n_head, a.qk_nope_dim + a.v_head_dim, kv_b.shape[-1])
    k_b, v_b = torch.split(view, [a.qk_nope_dim, a.v_head_dim], dim=1)
    got_k = by_name["blk.1.attn_k_b.weight"].load(model.source)
    got_v = by_name["blk.1.attn_v_b.weight"].load(model.source)
    assert np.array_equal(got_k, k_b.transpose(1, 2).numpy())
    assert np.array_equal(got_v, v_b.numpy())
    # ggml shapes llama.cpp asks for: k_b {qk_nope, kv_lora_rank, n_head}
    assert got_k.shape[::-1] == (a.qk_nope_dim, a.kv_lora_rank, a.n_head)
    assert got_v.shape[::-1] == (a.kv_lora_rank, a.v_head_dim, a.n_head)
    assert "blk.1.attn_kv_b.weight" not in by_name  # only the split halves are written


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_f32_export_matches_transformers(deepseek, variant, tmp_path):
    model_dir = deepseek(variant)
    tokens = hf_tokens(model_dir)
    export_planned(model_dir, tmp_path / "f32.gguf", "F32")
    diff = _max_diff(tmp_path / "f32.gguf", model_dir, tokens)
    assert diff < 1e-3, f"max |llama.cpp - transformers| = {diff}"


@pytest.mark.parametrize("variant", ["v3", "v2-lite"])
def test_q8_0_export_is_llama_cpps_own_q8_0(deepseek, variant, tmp_path):
    """The Q8_0 file holds, byte for byte, what llama.cpp's quantizer makes of the F32 file,
    and its top-1 agrees with transformers (F32) on 95% of 1024 tokens of real text.

    The logits are 1024 near-Gaussian values (top1 - top2: median 1.0-1.4, 0.2 standard
    deviations, before and after), so agreement is set by how far off Q8_0 leaves them; the
    Q8_0 output head alone (weights and input rounded, in numpy) loses 23 (v3) and 13
    (v2-lite) of these 1024 argmaxes. Measured on these windows, llama.cpp Q8_0 against
    transformers: with every matrix at 0.08 (logits 4-5% off) 885 (v3) and 903 (v2-lite) of
    1024; with the residual-stream init of conftest (1.2% off) 993 and 1001. A Q4_0
    export of the same fixtures gets 729 and 713.
    """
    from edgemoe.llamacpp import llama_quantize

    model_dir = deepseek(variant)
    agree = q8_0_agreement(model_dir, tmp_path / "q8.gguf")
    assert agree >= 0.95, f"top-1 agreement {agree:.3f}"

    export_planned(model_dir, tmp_path / "f32.gguf", "F32")
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "ref.gguf", "Q8_0", pure=True)
    assert af.tensor_differences(tmp_path / "q8.gguf", tmp_path / "ref.gguf") == []


@pytest.mark.parametrize("variant", ["v3", "v2-lite"])
def test_pruned_export_matches_pruned_transformers(deepseek, variant, tmp_path):
    model_dir = deepseek(variant)
    kept = KEPT[variant]
    model = pipeline.open_model(model_dir)
    a = model.adapter
    n_kept = len(kept[1])
    plan = mp.uniform_plan(a.tensor_specs(n_kept), "F32", mp.Budget(10**12))
    plan = replace(plan, n_experts=a.n_expert, n_experts_kept=n_kept,
                   kept_experts={str(k): v for k, v in kept.items()})
    out = pipeline.export(model, plan, tmp_path / "pruned.gguf", progress=False)

    r = gguf.GGUFReader(out)
    tensors = {t.name: t for t in r.tensors}
    assert r.get_field("deepseek2.expert_count").contents() == n_kept
    assert tensors["blk.2.ffn_up_exps.weight"].data.shape[0] == n_kept
    if variant == "v3":  # the correction bias follows the kept experts
        bias = model.source.load("model.layers.2.mlp.gate.e_score_correction_bias")
        assert np.array_equal(np.asarray(tensors["blk.2.exp_probs_b.bias"].data),
                              bias[list(kept[2])])
    tokens = hf_tokens(model_dir)
    reference = af.prune_hf_checkpoint(model_dir, tmp_path / "hf_pruned", kept)
    assert np.abs(hf_logits(model_dir, tokens) - hf_logits(reference, tokens)).max() > 0.1, \
        "pruning these experts should change the logits"
    diff = _max_diff(out, reference, tokens)
    assert diff < 1e-3, f"max |llama.cpp pruned - transformers pruned| = {diff}"


def test_pruning_must_keep_whole_routing_groups(deepseek):
    model = pipeline.open_model(deepseek("v3"))
    names = model.source.names
    with pytest.raises(ValueError, match="4 routing groups"):
        model.adapter.recipes(names, {1: tuple(range(10)), 2: tuple(range(10))})
    with pytest.raises(ValueError, match="same number of experts"):
        model.adapter.recipes(names, {1: tuple(range(12))})  # layer 2 not named


def test_fp8_checkpoint_converts_like_its_bf16_twin(deepseek, tmp_path):
    """FP8 e4m3 weights with 128x128 block scales (and an MTP block to skip) give the same
    GGUF as a BF16 checkpoint holding the dequantized values, byte for byte."""
    fp8, bf16 = af.make_fp8_twins(deepseek("v3"), tmp_path / "fp8", tmp_path / "bf16")
    src = pipeline.open_model(fp8).source
    assert src.dtype("model.layers.1.self_attn.kv_b_proj.weight") == "F8_E4M3"
    assert "model.layers.1.self_attn.kv_b_proj.weight_scale_inv" not in src.names
    assert any(n.startswith("model.layers.3.") for n in src.names)  # the MTP block is there

    files = {}
    for name, d in (("fp8", fp8), ("bf16", bf16)):
        files[name] = tmp_path / f"{name}.gguf"
        export_planned(d, files[name], "F32")
    a, b = gguf.GGUFReader(files["fp8"]), gguf.GGUFReader(files["bf16"])
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert not any(t.name.startswith("blk.3.") for t in a.tensors)  # MTP block not exported
    for ta, tb in zip(a.tensors, b.tensors):
        assert ta.tensor_type == tb.tensor_type and np.array_equal(ta.data, tb.data), ta.name
    # and the file is the model: logits of the BF16 twin in transformers (run in float32)
    tokens = hf_tokens(bf16)
    diff = _max_diff(files["fp8"], bf16, tokens)
    assert diff < 1e-3, f"max |llama.cpp FP8 export - transformers BF16 twin| = {diff}"


def test_unsupported_options_are_refused():
    from export.arch import UnsupportedModelError

    cfg = af.deepseek_v3_config(300).to_dict()
    adapter_for(cfg)
    for key in ("attention_bias", "mlp_bias"):
        with pytest.raises(UnsupportedModelError, match=key):
            adapter_for({**cfg, key: True})
