"""Qwen3.5-MoE: a tiny random checkpoint laid out like the release (vision-language wrapper,
MTP block), exported and run in llama.cpp, against transformers and llama.cpp's converter.

Hybrid blocks (three Gated DeltaNet linear-attention blocks, then gated full attention),
2 key heads for 4 value heads (llama.cpp's value-head reordering), 8 experts of which 2 are
used, plus a shared expert behind a sigmoid gate.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
import pytest

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.llamacpp import eval_logits, open_llama
from edgemoe.runtime.memory import memory_breakdown
from export.arch import UnsupportedModelError, adapter_for
from tests import arch_fixtures as af
from tests.export.family_checks import export_pruned, pruned_difference
from tests.helpers import export_planned, export_uniform, hf_logits, hf_tokens, q8_0_agreement

# 6 of 8 experts, other ones per block; each block drops experts the prompt's tokens use
KEPT = {0: (0, 1, 2, 4, 5, 7), 1: (1, 2, 3, 4, 6, 7), 2: (0, 2, 3, 5, 6, 7),
        3: (0, 1, 3, 4, 5, 6)}
FIXTURES = Path(__file__).parents[1] / "fixtures" / "configs"


@pytest.fixture(scope="module")
def qwen35_dir(tmp_path_factory, bpe_tokenizer_dir):
    return af.build_qwen3_5_moe(tmp_path_factory.mktemp("qwen3_5_moe"), bpe_tokenizer_dir)


@pytest.fixture(scope="module")
def f32_gguf(qwen35_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("qwen35_f32") / "f32.gguf"
    export_planned(qwen35_dir, out, "F32")
    return out


def _logits(path, tokens) -> np.ndarray:
    return eval_logits(open_llama(path, n_ctx=64, f32_kv=True), tokens)


def test_f32_export_matches_transformers(qwen35_dir, f32_gguf):
    """Measured: 3.8e-5 at logits up to 37."""
    tokens = hf_tokens(qwen35_dir)
    want = hf_logits(qwen35_dir, tokens)
    assert np.abs(want).max() > 1.0, "logits too small for the comparison to mean anything"
    diff = np.abs(_logits(f32_gguf, tokens) - want).max()
    assert diff < 1e-3, f"max |llama.cpp - transformers| = {diff}"


def test_q8_0_export_agrees_on_top1(qwen35_dir, tmp_path):
    """Measured: 1000 of 1024 tokens (97.7%); a Q4_0 export, 687 (67.1%)."""
    agree = q8_0_agreement(qwen35_dir, tmp_path / "q8.gguf")
    assert agree >= 0.95, f"top-1 agreement {agree:.3f}"


def test_pruned_export_matches_pruned_transformers(qwen35_dir, tmp_path):
    """Pruning keeps the shared expert and its gate and slices the router's rows."""
    out = export_pruned(qwen35_dir, KEPT, tmp_path / "pruned.gguf")
    r = gguf.GGUFReader(out)
    assert r.get_field("qwen35moe.expert_count").contents() == 6
    shapes = {t.name: tuple(int(x) for x in t.shape) for t in r.tensors}
    assert shapes["blk.0.ffn_gate_inp.weight"] == (128, 6)
    assert shapes["blk.0.ffn_gate_inp_shexp.weight"] == (128, 1)
    assert shapes["blk.0.ffn_up_shexp.weight"] == (128, 96)

    diff = pruned_difference(qwen35_dir, KEPT, tmp_path, out)
    assert diff < 1e-3, f"max |llama.cpp pruned - transformers pruned| = {diff}"


# Differences from llama.cpp's converter that are kept, and why:
KEPT_DIFFERENCES = {
    # edgemoe stores its plan in the file it writes
    "key edgemoe.plan only in ours",
    # edgemoe names a BPE vocabulary's BOS as its EOS when the tokenizer has none (GPT-2's
    # convention; add_bos stays false): llama.cpp otherwise falls back to token id 11
    "key tokenizer.ggml.bos_token_id only in ours",
}
# general.* naming keys each tool derives its own way (the directory name, a size label)
IGNORED_KEYS = ("general.name", "general.size_label", "general.type")


def test_layout_matches_llama_cpp_converter(qwen35_dir, f32_gguf, tmp_path):
    """Same tensors (names, shapes, types) and metadata as llama.cpp's own converter run on
    the same checkpoint with --no-mtp (edgemoe does not export the MTP block either)."""
    from tests.llama_converter import convert_hf, layout_differences

    theirs = convert_hf(qwen35_dir, tmp_path / "theirs.gguf", pre="qwen2", args=("--no-mtp",))
    diffs = set(layout_differences(f32_gguf, theirs, ignore_keys=IGNORED_KEYS))
    assert diffs == KEPT_DIFFERENCES, sorted(diffs ^ KEPT_DIFFERENCES)


def test_kv_and_recurrent_state_are_what_llama_cpp_allocates(qwen35_dir, f32_gguf):
    """The KV cache of the full-attention block and the DeltaNet blocks' fixed state, against
    llama.cpp's memory breakdown, at two contexts and both cache types. Measured: equal to
    the byte (147968 B at 512 f16: 16896 of it the state of the 3 DeltaNet blocks)."""
    adapter = pipeline.open_model(qwen35_dir).adapter
    from_file = pipeline.open_model(f32_gguf).adapter  # a qwen35moe GGUF as the source
    state = adapter.kv_bytes(0)
    assert state == 3 * (3 * (2 * 2 * 16 + 4 * 16) + 16 * 64) * 4  # conv window + S, F32
    for ctx in (512, 2048):
        for kv_type in ("f16", "f32"):
            llm = open_llama(f32_gguf, n_ctx=ctx, f32_kv=kv_type == "f32")
            got = memory_breakdown(llm)["context"]
            del llm
            want = adapter.kv_bytes(ctx, kv_type)
            assert abs(got - want) <= 0.01 * got, (ctx, kv_type, got, want)
            assert from_file.kv_bytes(ctx, kv_type) == want
    budget = pipeline.make_budget(adapter, "1GB", ctx=2048)
    assert budget.kv_bytes == adapter.kv_bytes(2048) > 1 * 2 * 32 * 2 * 2048 * 2


def test_planner_keeps_ssm_tensors_f32(qwen35_dir, f32_gguf):
    """llama.cpp never quantizes the conv kernel, A, the dt bias, norms, the router or the
    shared expert's one-row gate: a Q4_K plan leaves them F32."""
    model = pipeline.open_model(qwen35_dir)
    plan = mp.uniform_plan(model.specs, "Q4_K", mp.Budget(10**12))
    types = {t.name: t.type for t in plan.tensors}
    for name in ("blk.0.ssm_conv1d.weight", "blk.0.ssm_a", "blk.0.ssm_dt.bias",
                 "blk.0.ssm_norm.weight", "blk.0.ffn_gate_inp.weight",
                 "blk.0.ffn_gate_inp_shexp.weight", "blk.3.attn_q_norm.weight"):
        assert types[name] == "F32", name
    assert types["blk.0.attn_qkv.weight"] != "F32"
    assert types["blk.0.ffn_gate_shexp.weight"] != "F32"
    # and the same from a qwen35moe GGUF as the source
    gguf_specs = {s.name: s for s in pipeline.open_model(f32_gguf).specs}
    assert {n for n, s in gguf_specs.items() if not s.quantizable} == {
        s.name for s in model.specs if not s.quantizable}


def test_calibrate_and_validate_top_any(qwen35_dir, tmp_path):
    """`edgemoe calibrate` finds this architecture's graph nodes (they differ from
    qwen3moe's: attn_post_norm, attn_gated, final_output; a renamed node fails the run) and
    `validate --top-any` drops experts (measured: 1.19 experts per token of 2 at tau 0.2)."""
    from edgemoe.cli import main
    from export.imatrix import read_stats
    from tests.helpers import PROMPT

    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 12)
    stats = tmp_path / "s.gguf"
    assert main(["calibrate", str(qwen35_dir), "--text", str(text), "--ctx", "64",
                 "--no-sensitivity", "-o", str(stats)]) == 0
    s = read_stats(stats)
    for name in ("blk.0.attn_qkv.weight", "blk.0.ssm_alpha.weight", "blk.0.ssm_out.weight",
                 "blk.3.attn_q.weight", "blk.3.attn_output.weight",
                 "blk.2.ffn_up_exps.weight", "blk.2.ffn_down_exps.weight"):
        assert name in s.in_sum2 and s.counts[name].sum() > 0, name
    assert "blk.0.attn_q.weight" not in s.in_sum2  # a DeltaNet block has no attn_q
    assert set(s.experts) == {0, 1, 2, 3}

    out = export_uniform(qwen35_dir, tmp_path / "q8.gguf", "Q8_0")
    report = tmp_path / "r.json"
    assert main(["validate", str(out), "--text", str(text), "--top-any", "0.2",
                 "--json", str(report)]) == 0
    r = json.loads(report.read_text())
    assert r["top_any"]["thresholds"] == pytest.approx([0.2] * 4)
    # the rule drops second choices below 0.2 of the renormalised weight: some, not all
    assert 1.0 < r["quality"]["experts_per_token"] < 2.0, r["quality"]["experts_per_token"]


@pytest.mark.parametrize("change, match", [
    ({"norm_topk_prob": False}, "norm_topk_prob"),
    ({"attention_bias": True}, "attention_bias"),
    ({"linear_num_value_heads": 3}, "multiple"),
])
def test_options_llama_cpp_cannot_run_are_refused(change, match):
    cfg = json.loads((FIXTURES / "qwen3.5-397b-a17b.json").read_text())
    adapter_for(cfg)
    with pytest.raises(UnsupportedModelError, match=match):
        adapter_for({**cfg, "text_config": {**cfg["text_config"], **change}})


def test_release_config_plans_from_shapes():
    """The released Qwen3.5-397B-A17B config.json (the vision-language wrapper, text settings
    in text_config): 396.3e9 GGUF parameters; uniform Q8_0 predicts 421.50 GB of weights
    where bartowski's published Q8_0 GGUF is 421.58 GB (it keeps ssm_alpha/ssm_beta F32,
    +69 MB, and carries the tokenizer); the DeltaNet state is 195.4 MB whatever the context."""
    cfg = json.loads((FIXTURES / "qwen3.5-397b-a17b.json").read_text())
    a = adapter_for(cfg)
    hp = a.hp
    assert (hp.n_layer, hp.n_embd, hp.n_expert, hp.n_expert_used, hp.shared_ff) == (
        60, 4096, 512, 10, 1024)
    assert hp.rope_theta == 1e7 and hp.rope_dim == 64 and hp.rope_sections == (11, 11, 10, 0)
    assert hp.recurrent.count(True) == 45 and not hp.recurrent[3]
    specs = a.tensor_specs()
    assert sum(int(np.prod(s.shape)) for s in specs) == 396_346_350_336
    # the text model saved on its own (Qwen3_5MoeForCausalLM) has the same tensors
    assert adapter_for(cfg["text_config"]).tensor_specs() == specs
    q8 = mp.uniform_plan(specs, "Q8_0", mp.Budget(10**15), check_budget=False)
    assert abs(q8.weight_bytes / 421.58e9 - 1) < 0.001
    state = a.kv_bytes(0)
    assert state == 45 * (3 * (2 * 16 * 128 + 64 * 128) + 128 * 64 * 128) * 4
    assert a.kv_bytes(8192) == state + 15 * 2 * 2 * 256 * 8192 * 2
    w = gguf.GGUFWriter(None, "qwen35moe")
    a.add_metadata(w)
    kv = {k: v.value for k, v in w.kv_data[0].items()}
    assert "qwen35moe.feed_forward_length" not in kv  # the release names no intermediate_size
    assert kv["qwen35moe.ssm.inner_size"] == 8192 and kv["qwen35moe.ssm.time_step_rank"] == 64
