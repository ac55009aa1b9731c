"""gpt-oss: tiny random checkpoints exported and run in llama.cpp, against transformers and
against llama.cpp's own converter.

gpt-oss brings attention sinks, sliding-window layers (8 tokens here, so that the 32-token
prompt crosses the window), biases everywhere (Q/K/V/O, router, every expert projection),
experts stacked per projection with gate and up interleaved, softmax over the top-k router
logits, and MXFP4 experts in the release.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np
import pytest

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.llamacpp import eval_logits, open_llama
from export.arch import UnsupportedModelError, adapter_for
from tests import arch_fixtures as af
from tests.export.family_checks import export_pruned, pruned_difference
from tests.helpers import export_planned, hf_logits, hf_tokens, q8_0_agreement
from tests.llama_converter import convert_hf, layout_differences

# 6 of 8 experts, different ones per layer; each layer drops experts these tokens use
KEPT = {0: (0, 1, 2, 4, 5, 7), 1: (1, 2, 3, 4, 6, 7), 2: (0, 2, 3, 5, 6, 7)}
# what each tool derives in its own way: general.name (directory vs. title case), llama.cpp's
# general.size_label and general.type, edgemoe's plan
OWN_KEYS = ("general.name", "general.size_label", "general.type", "edgemoe.plan")


@pytest.fixture(scope="module")
def gpt_oss_dir(tmp_path_factory, bpe_tokenizer_dir):
    return af.build_gpt_oss(tmp_path_factory.mktemp("gpt_oss"), bpe_tokenizer_dir)


@pytest.fixture(scope="module")
def mxfp4_twins(gpt_oss_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt_oss_mxfp4")
    return af.make_mxfp4_twins(gpt_oss_dir, root / "mxfp4", root / "bf16")


def _logits(path, tokens) -> np.ndarray:
    return eval_logits(open_llama(path, n_ctx=64, f32_kv=True), tokens)


def test_f32_export_matches_transformers(gpt_oss_dir, tmp_path):
    """Measured: 9.5e-6 (with the release's YaRN `truncate: false`, 2.7e-3: llama.cpp's
    YaRN always truncates; its own converter's file gives the same 2.7e-3)."""
    tokens = hf_tokens(gpt_oss_dir)
    export_planned(gpt_oss_dir, tmp_path / "f32.gguf", "F32")
    want = hf_logits(gpt_oss_dir, tokens)
    assert np.abs(want).max() > 1.0, "logits too small for the comparison to mean anything"
    diff = np.abs(_logits(tmp_path / "f32.gguf", tokens) - want).max()
    assert diff < 1e-3, f"max |llama.cpp - transformers| = {diff}"


def test_q8_0_export_agrees_on_top1(gpt_oss_dir, tmp_path):
    agree = q8_0_agreement(gpt_oss_dir, tmp_path / "q8.gguf")
    assert agree >= 0.95, f"top-1 agreement {agree:.3f}"


def test_pruned_export_matches_pruned_transformers(gpt_oss_dir, tmp_path):
    """Router rows and bias, and the gate/up/down biases, follow the kept experts."""
    out = export_pruned(gpt_oss_dir, KEPT, tmp_path / "pruned.gguf")
    r = gguf.GGUFReader(out)
    assert r.get_field("gpt-oss.expert_count").contents() == 6
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.1.ffn_gate_exps.bias"] == (96, 6)  # ggml order: {n_ff, n_expert}
    assert shapes["blk.1.ffn_gate_inp.bias"] == (6,)

    diff = pruned_difference(gpt_oss_dir, KEPT, tmp_path, out)
    assert diff < 1e-3, f"max |llama.cpp pruned - transformers pruned| = {diff}"


def test_layout_matches_llama_cpp_converter(gpt_oss_dir, tmp_path):
    """Same tensor names, shapes and types and the same metadata as convert_hf_to_gguf.py.

    Kept difference: tokenizer.ggml.bos_token_id, which edgemoe writes for a BPE vocabulary
    without a BOS token (= EOS, GPT-2's convention; add_bos stays false) where llama.cpp
    would fall back to id 11. The gpt-oss release has a BOS token, so both write it there."""
    export_planned(gpt_oss_dir, tmp_path / "ours.gguf", "F32")
    theirs = convert_hf(gpt_oss_dir, tmp_path / "theirs.gguf", pre="qwen2")
    diffs = layout_differences(tmp_path / "ours.gguf", theirs, ignore_keys=OWN_KEYS)
    assert diffs == ["key tokenizer.ggml.bos_token_id only in ours"], diffs


def test_mxfp4_checkpoint_reads_as_its_dequantized_twin(mxfp4_twins, tmp_path):
    """The release's layout: experts as MXFP4 blocks + E8M0 scales in (out x in) order.
    Read, it is exactly the BF16 twin holding the dequantized values; exported with MXFP4
    experts it is, byte for byte, what llama.cpp's converter repacks from the blocks."""
    mxfp4, bf16 = mxfp4_twins
    a, b = pipeline.open_model(mxfp4), pipeline.open_model(bf16)
    assert a.source.dtype("model.layers.0.mlp.experts.gate_up_proj_blocks") == "MXFP4"
    for ra, rb in zip(a.recipes, b.recipes, strict=True):
        assert ra.spec == rb.spec
        assert np.array_equal(ra.load(a.source), rb.load(b.source)), ra.spec.name

    plan = mp.uniform_plan(a.specs, "F32", mp.Budget(10**12))
    as_shipped = replace(plan, tensors=tuple(
        replace(t, type="MXFP4", nbytes=t.n_elements // 32 * 17) if "_exps.weight" in t.name
        else t for t in plan.tensors))
    ours = pipeline.export(a, as_shipped, tmp_path / "ours.gguf", progress=False)
    theirs = convert_hf(mxfp4, tmp_path / "theirs.gguf", pre="qwen2")
    diffs = layout_differences(ours, theirs, ignore_keys=OWN_KEYS)
    # general.file_type: the converter says MOSTLY_MXFP4_MOE (38) whenever the experts are
    # MXFP4; edgemoe names the type holding most bytes, here the F32 embeddings of this
    # tiny model (for gpt-oss-120b, MXFP4: 38 as well)
    assert diffs == ["key tokenizer.ggml.bos_token_id only in ours",
                     "key general.file_type: ours 0, llama.cpp's 38"], diffs
    ta = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    tb = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    for name in (n for n in ta if "_exps.weight" in n):
        assert ta[name].tensor_type == gguf.GGMLQuantizationType.MXFP4
        assert np.array_equal(np.asarray(ta[name].data), np.asarray(tb[name].data)), name


@pytest.mark.parametrize("ctx", [1024, 4096])
def test_kv_cache_is_what_llama_cpp_allocates(gpt_oss_dir, tmp_path_factory, ctx):
    """Full layers cache the context, window layers n_swa + n_ubatch cells padded to 256
    (768 here): 2 window layers and 1 full one."""
    from edgemoe.runtime.memory import memory_breakdown

    out = tmp_path_factory.getbasetemp() / "gpt_oss_kv.gguf"
    if not out.exists():
        export_planned(gpt_oss_dir, out, "Q8_0")
    adapter = pipeline.open_model(gpt_oss_dir).adapter
    llm = open_llama(out, n_ctx=ctx, swa_full=False, logits_all=False)
    got = memory_breakdown(llm)["context"]
    assert got == adapter.kv_bytes(ctx), (got, adapter.kv_bytes(ctx))
    assert adapter.kv_bytes(ctx) == (2 * 768 + ctx) * 2 * 32 * 2 * 2  # cells * heads * K+V f16
    if ctx == 1024:  # `edgemoe validate` measures what the plan counts
        from edgemoe.runtime.validate import measure_runtime

        assert measure_runtime(out, top_any=0, ctx=ctx, n_prompt=16, n_decode=4,
                               threads=1)["kv_bytes"] == adapter.kv_bytes(ctx)


@pytest.mark.parametrize("change, match", [
    ({"layer_types": ["full_attention"] * 36}, "layer_types"),
    ({"swiglu_limit": 10.0}, "swiglu_limit"),
    ({"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1.5e5}},
     "rope scaling"),
])
def test_options_llama_cpp_cannot_run_are_refused(change, match):
    """transformers' default config (gpt-oss-120b's shape) is accepted."""
    from transformers import GptOssConfig

    cfg = GptOssConfig().to_dict()
    adapter_for(cfg)
    with pytest.raises(UnsupportedModelError, match=match):
        adapter_for({**cfg, **change})


def test_calibrate_reads_gpt_oss_nodes(gpt_oss_dir, tmp_path):
    """The collector finds gpt-oss's own node names (attn_post_norm, ffn_moe_swiglu_oai,
    ffn_moe_down_biased: a renamed node fails the run) and takes the routing weights after
    the softmax over the top-k logits: a token's weights sum to 1, so each layer's weight
    sums add up to the tokens seen (the raw logits of ffn_moe_weights would not)."""
    from edgemoe.calibration.collect import calibrate

    stats = calibrate(str(gpt_oss_dir), output=str(tmp_path / "s.gguf"), n_ctx=128,
                      max_tokens=512, progress=False)
    assert sorted(stats.experts) == [0, 1, 2]
    for e in stats.experts.values():
        assert e.selected.sum() == 2 * stats.n_tokens
        assert e.weight_sum.sum() == pytest.approx(stats.n_tokens, rel=1e-4)
    for kind in ("ffn_gate_exps", "ffn_down_exps", "attn_q", "attn_output"):
        assert f"blk.1.{kind}.weight" in stats.in_sum2


def test_top_any_keeps_the_top_expert_exactly(gpt_oss_dir, tmp_path):
    """gpt-oss soft-maxes the selected router logits after `ffn_moe_weights`: top-any judges
    their softmax and drops a slot with a logit of -inf (a 0 would still weigh exp(0)).
    With tau = 1 every token keeps only its top expert at weight 1: exactly transformers'
    model with num_experts_per_tok = 1 (dropped slots skipped in the matmuls or not)."""
    import json
    import shutil

    from edgemoe.runtime import topany_calibrate
    from edgemoe.runtime.model import load

    out = tmp_path / "f32.gguf"
    export_planned(gpt_oss_dir, out, "F32")
    top1 = tmp_path / "hf_top1"
    shutil.copytree(gpt_oss_dir, top1)
    cfg = json.loads((top1 / "config.json").read_text())
    (top1 / "config.json").write_text(json.dumps({**cfg, "num_experts_per_tok": 1}))
    tokens = hf_tokens(gpt_oss_dir)
    want = hf_logits(top1, tokens)
    assert np.abs(hf_logits(gpt_oss_dir, tokens) - want).max() > 0.1, "top-1 should differ"
    for skip in (True, False):
        llm = load(out, top_any=1.0, n_ctx=64, type_k=0, type_v=0, logits_all=True,
                   skip_dropped=skip)
        diff = np.abs(eval_logits(llm, tokens) - want).max()
        assert diff < 1e-3, f"skip={skip}: max |top-any tau=1 - transformers top-1| = {diff}"
        assert llm.expert_use.experts_per_token == 1.0
    # calibrate-top-any measures the softmax weights' ratios: a share is removed
    cal = topany_calibrate.calibrate(out, tokens * 4, share=0.25, n_ctx=64, method="uniform",
                                     progress=False)
    assert 0.15 < cal.removed_share < 0.35, cal.to_dict()


GPT_OSS_120B = Path(__file__).resolve().parents[1] / "fixtures" / "configs" / "gpt-oss-120b.json"


def test_gpt_oss_120b_from_its_public_config():
    """Counted from the release config.json: 116.83e9 parameters (the model card's 116.8B);
    uniform Q8_0 (1-D tensors, router and biases F32) 124.29 GB of weights; as shipped (MXFP4
    experts, the rest 16-bit) 65.36 GB = 60.87 GiB. The KV cache at 8192 tokens: 18 full
    layers of 8192 cells and 18 window layers of 768 (128 + 512 padded to 256)."""
    from edgemoe.planning.from_config import plan_from_config, read_config

    a = adapter_for(read_config(GPT_OSS_120B))
    specs = a.tensor_specs()
    assert sum(s.n_elements for s in specs) == 116_829_156_672
    q8 = mp.uniform_plan(specs, "Q8_0", mp.Budget(10**15))
    assert q8.weight_bytes == 124_288_397_568
    shipped = sum(mp.quant_types.tensor_nbytes(
        s.n_elements, s.row_length,
        "F32" if not s.quantizable else "MXFP4" if s.n_experts else "F16") for s in specs)
    assert shipped == 65_355_994_368
    assert a.kv_bytes(8192) == 18 * (8192 + 768) * 8 * (64 + 64) * 2
    assert a.shipped_types()["ffn_down_exps"] == "MXFP4"

    # rows of 2880 take no K- or IQ-quant: below MXFP4 (4.25 bpw) every type falls back to
    # 4.5 bpw, so at 64 GB the plan keeps MXFP4 experts and lowers the rest (with llama.cpp's
    # own buffer sizes, 1.13 GB of compute at 8K, every expert fits; with the old formula's
    # 1.62 GB it pruned to 112); at 128 GB it is the release as shipped (MXFP4 loses nothing
    # on the shipped experts)
    small = plan_from_config(GPT_OSS_120B, "64GB", ctx=8192)
    assert small.budget.memory_source == "llama.cpp"
    assert small.total_bytes <= 64 * 10**9 and small.weight_bytes < shipped
    big = plan_from_config(GPT_OSS_120B, "128GB", ctx=8192)
    assert big.n_experts_kept == 128 and big.weight_bytes == shipped
    for plan in (small, big):
        assert {t.type for t in plan.tensors if "_exps.weight" in t.name} == {"MXFP4"}


def test_q8_0_types_are_llama_quantizes(gpt_oss_dir, tmp_path):
    """What stays F32 follows llama.cpp: llama-quantize's pure Q8_0 of our F32 file gives
    every tensor the type our Q8_0 plan gives it (sinks, norms, router, every bias F32)."""
    from edgemoe.llamacpp import llama_quantize

    export_planned(gpt_oss_dir, tmp_path / "f32.gguf", "F32")
    export_planned(gpt_oss_dir, tmp_path / "ours.gguf", "Q8_0")
    llama_quantize(tmp_path / "f32.gguf", tmp_path / "theirs.gguf", "Q8_0", pure=True, threads=1)
    ours = {t.name: t.tensor_type.name for t in gguf.GGUFReader(tmp_path / "ours.gguf").tensors}
    theirs = {t.name: t.tensor_type.name
              for t in gguf.GGUFReader(tmp_path / "theirs.gguf").tensors}
    assert ours == theirs
    assert ours["blk.0.attn_sinks.weight"] == ours["blk.0.ffn_down_exps.bias"] == "F32"


def test_gpt_oss_20b_from_its_public_config():
    """20,914,757,184 parameters (the model card's 20.9B); llama-quantize's MXFP4_MOE layout
    (experts MXFP4, every other matrix Q8_0) predicted at 12.10 GB: bartowski's
    gpt-oss-20b MXFP4 file is listed at 12.1 GB. At 16 GB the plan is the release as
    shipped, all experts kept."""
    from edgemoe.planning.from_config import plan_from_config, read_config

    path = GPT_OSS_120B.with_name("gpt-oss-20b.json")
    specs = adapter_for(read_config(path)).tensor_specs()
    assert sum(s.n_elements for s in specs) == 20_914_757_184
    mxfp4_moe = sum(mp.quant_types.tensor_nbytes(
        s.n_elements, s.row_length,
        "F32" if not s.quantizable else "MXFP4" if s.n_experts else "Q8_0") for s in specs)
    assert round(mxfp4_moe / 1e9, 2) == 12.10
    plan = plan_from_config(path, "16GB", ctx=8192)
    assert plan.n_experts_kept == 32
    assert {t.type for t in plan.tensors if "_exps.weight" in t.name} == {"MXFP4"}
