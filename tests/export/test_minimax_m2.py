"""MiniMax-M2 (minimax_m2 -> minimax-m2): a tiny checkpoint exported and run in llama.cpp.

What MiniMax-M2 has: every block MoE, sigmoid routing with a non-zero correction bias,
renormalised top-k, Q/K RMS norms over all heads at once, NEOX rope over `rotary_dim` (half
of each head), grouped-query attention.
"""

from __future__ import annotations

import json

import gguf
import numpy as np
import pytest

from edgemoe import cli
from edgemoe.calibration.hooks import EvalHooks, attach
from edgemoe.calibration.nodes import graph_nodes
from edgemoe.llamacpp import open_llama
from export.arch import UnsupportedModelError, adapter_for
from tests import arch_fixtures as af
from tests.export import family_checks as fc
from tests.helpers import TEXT, export_planned, q8_0_agreement

KEPT = {0: (0, 2, 3, 4, 5, 7), 1: (1, 2, 3, 4, 6, 7)}
# the test tokenizer names no BOS: edgemoe then names EOS as BOS (GPT-2's convention; add_bos
# stays false) so that llama.cpp does not fall back to token 11, where the converter writes
# no key. MiniMax-M2's own tokenizer has a BOS, and both write it.
KEPT_DIFFERENCES = ("key tokenizer.ggml.bos_token_id only in ours",)


@pytest.fixture(scope="module")
def mm_dir(tmp_path_factory, bpe_tokenizer_dir):
    return af.build_minimax_m2(tmp_path_factory.mktemp("minimax-m2"), bpe_tokenizer_dir)


@pytest.fixture(scope="module")
def mm_f32(mm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("mm-f32") / "f32.gguf"
    export_planned(mm_dir, out, "F32")
    return out


def test_f32_export_matches_transformers(mm_dir, mm_f32):
    diff = fc.f32_logit_difference(mm_dir, mm_f32)
    assert diff < 1e-3, f"max |llama.cpp - transformers| = {diff}"


def test_same_layout_as_llama_cpp_converter(mm_dir, mm_f32, tmp_path):
    assert fc.converter_differences(mm_dir, mm_f32, tmp_path / "theirs.gguf",
                                    kept=KEPT_DIFFERENCES) == []
    r = gguf.GGUFReader(mm_f32)
    shapes = {t.name: t.shape.tolist() for t in r.tensors}
    assert shapes["blk.1.attn_q_norm.weight"] == [128]  # 4 heads of 32, normalised together
    assert shapes["blk.1.exp_probs_b.bias"] == [8]
    assert r.get_field("minimax-m2.rope.dimension_count").contents() == 16


def test_q8_0_export_agrees_on_top1(mm_dir, tmp_path):
    """Top-1 of a Q8_0 file (router, norms F32) vs transformers over 1024 tokens of real
    text. Measured: 1000 of 1024 (0.977)."""
    agree = q8_0_agreement(mm_dir, tmp_path / "q8.gguf")
    assert agree >= 0.95, f"top-1 agreement {agree:.3f}"


def test_pruned_export_matches_pruned_transformers(mm_dir, tmp_path):
    """Router rows and correction-bias entries follow the kept experts."""
    diff = fc.pruned_difference(mm_dir, KEPT, tmp_path)
    assert diff < 1e-3, f"max |llama.cpp pruned - transformers pruned| = {diff}"


@pytest.mark.parametrize("ctx", [512, 4096])
def test_kv_cache_is_what_llama_cpp_allocates(mm_dir, mm_f32, ctx):
    measured, planned = fc.kv_bytes_measured_and_planned(mm_f32, mm_dir, ctx)
    assert abs(measured - planned) <= 0.01 * measured, (measured, planned)


def test_node_names_calibrate_and_top_any(mm_dir, mm_f32, tmp_path):
    """The nodes calibration and top-any read exist under the names edgemoe expects;
    `edgemoe calibrate` and `validate --top-any` run."""
    hooks = EvalHooks()
    hooks.record_names = True
    llm = attach(open_llama(mm_f32, n_ctx=64, threads=1), hooks)
    llm.eval(llm.tokenize(TEXT.encode(), add_bos=False)[:32])
    for name in (graph_nodes("minimax-m2").ffn_input, "ffn_moe_weights", "ffn_moe_topk",
                 "ffn_moe_down", "ffn_moe_weights_norm", "attn_norm", "kqv_out"):
        assert {f"{name}-0", f"{name}-1"} <= hooks.names_seen, f"llama.cpp renamed {name}"
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    stats = tmp_path / "mm.stats.gguf"
    assert cli.main(["calibrate", str(mm_dir), "--text", str(text), "-o", str(stats),
                     "--no-sensitivity", "--max-tokens", "512", "--ctx", "256"]) == 0
    imatrix = {t.name for t in gguf.GGUFReader(stats).tensors}
    assert {"blk.1.ffn_gate_exps.weight.in_sum2", "blk.0.attn_q.weight.in_sum2"} <= imatrix
    assert cli.main(["validate", str(mm_f32), "--reference", str(mm_dir), "--text", str(text),
                     "--top-any", "0.3", "--json", str(tmp_path / "v.json")]) == 0
    q = json.loads((tmp_path / "v.json").read_text())["quality"]
    assert q["removed_share"] > 0 and q["experts_per_token"] < 2


@pytest.mark.parametrize("change, match", [
    ({"scoring_func": "softmax"}, "sigmoid"),
    ({"hidden_act": "gelu"}, "silu"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok"),
])
def test_options_llama_cpp_cannot_run_are_refused(change, match):
    cfg = af.minimax_m2_config(1000).to_dict()
    assert adapter_for(cfg).rope_dim == 16
    with pytest.raises(UnsupportedModelError, match=match):
        adapter_for({**cfg, **change})


def test_published_minimax_shapes():
    """MiniMax-M2.7's config.json (M2's shapes): 228.7e9 parameters (a 5.00 bpw file of it is
    133.1 GiB), KV for 62 layers x 8 KV heads x (128 + 128), 64 rotated dimensions."""
    from edgemoe.planning.from_config import read_config
    from tests.conftest import ROOT

    a = adapter_for(read_config(ROOT / "tests" / "fixtures" / "configs" / "minimax-m2.7.json"))
    n = sum(int(np.prod(s.shape)) for s in a.tensor_specs())
    assert n == 228_689_764_864 and abs(n * 5.0 / 8 / 2**30 - 133.1) < 0.05
    assert a.kv_bytes(8192) == 62 * 8 * (128 + 128) * 8192 * 2
    assert a.rope_dim == 64
