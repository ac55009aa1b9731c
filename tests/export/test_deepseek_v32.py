"""DeepSeek-V3.2 (deepseek_v32 -> deepseek32): a tiny checkpoint exported and run in llama.cpp.

V3's MLA (q/kv LoRA, absorbed k_b/v_b), a leading dense block, two routing groups, sigmoid
routing with a non-zero correction bias and renormalised top-k times 2.5, a shared expert,
plus DeepSeek Sparse Attention: a lightning indexer keeping 8 keys per query, so that on the
32-token prompt it decides what most queries attend. A NextN block with its own embedding and
head follows the trunk, as in the release.
"""

from __future__ import annotations

import json
import shutil

import gguf
import numpy as np
import pytest

from edgemoe import cli, pipeline
from edgemoe.calibration.hooks import EvalHooks, attach
from edgemoe.calibration.nodes import graph_nodes
from edgemoe.llamacpp import open_llama
from export.arch import UnsupportedModelError, adapter_for
from tests import arch_fixtures as af
from tests.export import family_checks as fc
from tests.helpers import TEXT, export_planned, hf_logits, hf_tokens, q8_0_agreement

# 6 of 8 experts, 3 from each routing group of 4
KEPT = {1: (0, 1, 3, 4, 5, 7), 2: (1, 2, 3, 4, 6, 7)}
# edgemoe writes add_eos_token (false) for every tokenizer; the converter only where the
# tokenizer files say it. llama.cpp's default is false: the same behaviour.
KEPT_DIFFERENCES = ("key tokenizer.ggml.add_eos_token only in ours",)


@pytest.fixture(scope="module")
def ds_dir(tmp_path_factory, bpe_tokenizer_dir):
    return af.build_deepseek_v32(tmp_path_factory.mktemp("deepseek-v32"), bpe_tokenizer_dir)


@pytest.fixture(scope="module")
def ds_f32(ds_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("ds-f32") / "f32.gguf"
    export_planned(ds_dir, out, "F32")
    return out


def test_f32_export_matches_transformers_with_sparse_attention(ds_dir, ds_f32, tmp_path):
    diff = fc.f32_logit_difference(ds_dir, ds_f32)
    assert diff < 1e-3, f"max |llama.cpp - transformers| = {diff}"
    # the indexer's choice matters: attending to every key gives other logits
    dense = tmp_path / "dense"
    shutil.copytree(ds_dir, dense)
    cfg = json.loads((dense / "config.json").read_text())
    (dense / "config.json").write_text(json.dumps({**cfg, "index_topk": 2048}))
    tokens = hf_tokens(ds_dir)
    assert np.abs(hf_logits(dense, tokens) - hf_logits(ds_dir, tokens)).max() > 0.1


def test_same_layout_as_llama_cpp_converter(ds_dir, ds_f32, tmp_path):
    """Indexer tensors and keys, the NextN block with its embedding and head, the BOS."""
    assert fc.converter_differences(ds_dir, ds_f32, tmp_path / "theirs.gguf",
                                    kept=KEPT_DIFFERENCES, restore_add_bos=True) == []
    r = gguf.GGUFReader(ds_f32)
    names = {t.name for t in r.tensors}
    assert {"blk.1.indexer.attn_q_b.weight", "blk.2.indexer.k_norm.bias",
            "blk.3.nextn.shared_head_head.weight", "blk.3.ffn_up_exps.weight"} <= names
    assert r.get_field("deepseek32.attention.indexer.top_k").contents() == 8


def test_q8_0_export_agrees_on_top1(ds_dir, tmp_path):
    """Top-1 of a Q8_0 file (router, norms F32) vs transformers over 1024 tokens of real
    text. Measured: 983 of 1024 (0.960)."""
    agree = q8_0_agreement(ds_dir, tmp_path / "q8.gguf")
    assert agree >= 0.95, f"top-1 agreement {agree:.3f}"


def test_pruned_export_matches_pruned_transformers(ds_dir, tmp_path):
    """Router rows and correction-bias entries follow the kept experts, the same number from
    each group; the NextN block is left out (block_count 3, no nextn_predict_layers)."""
    diff = fc.pruned_difference(ds_dir, KEPT, tmp_path)
    assert diff < 1e-3, f"max |llama.cpp pruned - transformers pruned| = {diff}"
    r = gguf.GGUFReader(tmp_path / "pruned.gguf")
    assert r.get_field("deepseek32.block_count").contents() == 3
    assert r.get_field("deepseek32.nextn_predict_layers") is None


@pytest.mark.parametrize("ctx", [512, 4096])
def test_kv_cache_is_what_llama_cpp_allocates(ds_dir, ds_f32, ctx):
    """MLA's latent plus the indexer's key, per trunk block (no NextN block in the cache)."""
    measured, planned = fc.kv_bytes_measured_and_planned(ds_f32, ds_dir, ctx)
    assert abs(measured - planned) <= 0.01 * measured, (measured, planned)
    assert planned == 3 * (64 + 16 + 64) * ctx * 2


def test_node_names_calibrate_and_top_any(ds_dir, ds_f32, tmp_path):
    hooks = EvalHooks()
    hooks.record_names = True
    llm = attach(open_llama(ds_f32, n_ctx=64, threads=1), hooks)
    llm.eval(llm.tokenize(TEXT.encode(), add_bos=True)[:32])
    for name in (graph_nodes("deepseek32").ffn_input, "ffn_moe_weights", "ffn_moe_topk",
                 "ffn_moe_down", "ffn_moe_weights_norm", "ffn_moe_weights_scaled",
                 "indexer_score", "top_k"):
        assert {f"{name}-1", f"{name}-2"} <= hooks.names_seen, f"llama.cpp renamed {name}"
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    stats = tmp_path / "ds.stats.gguf"
    assert cli.main(["calibrate", str(ds_dir), "--text", str(text), "-o", str(stats),
                     "--no-sensitivity", "--max-tokens", "512", "--ctx", "256"]) == 0
    imatrix = {t.name for t in gguf.GGUFReader(stats).tensors}
    assert {"blk.1.ffn_gate_exps.weight.in_sum2", "blk.2.ffn_down_exps.weight.in_sum2"} <= imatrix
    assert cli.main(["validate", str(ds_f32), "--reference", str(ds_dir), "--text", str(text),
                     "--top-any", "0.3", "--json", str(tmp_path / "v.json")]) == 0
    q = json.loads((tmp_path / "v.json").read_text())["quality"]
    assert q["removed_share"] > 0 and q["experts_per_token"] < 2


def test_shapes_from_config(ds_dir):
    a = pipeline.open_model(ds_dir).adapter
    assert a.arch_name == "deepseek32" and a.hp.n_nextn == 1
    assert a.moe_layers() == [1, 2]
    assert not any(s.layer == 3 for s in a.tensor_specs(6))  # pruned: no NextN block


@pytest.mark.parametrize("change, match", [
    ({"scoring_func": "softmax_x"}, "scoring_func"),
    ({"hidden_act": "gelu"}, "silu"),
])
def test_options_llama_cpp_cannot_run_are_refused(change, match):
    cfg = af.deepseek_v32_config(1000).to_dict()
    adapter_for(cfg)
    with pytest.raises(UnsupportedModelError, match=match):
        adapter_for({**cfg, **change})


def test_published_deepseek_v32_shapes():
    """V3.2's config: V3's trunk (its uniform Q8_0 tensors predict 713.27 GB, the published V3
    Q8_0 file is 713.29 GB) plus 62 indexers and the NextN block; KV per token and trunk
    block: 512 + 64 latent + 128 indexer key."""
    import memory_planner as mp
    from edgemoe.planning.from_config import read_config
    from tests.conftest import ROOT

    a = adapter_for(read_config(ROOT / "tests" / "fixtures" / "configs" / "deepseek-v3.2.json"))
    plan = mp.uniform_plan(a.tensor_specs(), "Q8_0", mp.Budget(cap_bytes=2**62),
                           check_budget=False)
    extra = sum(t.nbytes for t in plan.tensors
                if t.name.startswith("blk.61.") or ".indexer." in t.name)
    assert abs((plan.weight_bytes - extra) / 713.29e9 - 1) < 1e-4
    assert a.kv_bytes(8192) == 61 * (512 + 64 + 128) * 8192 * 2


def test_fp8_checkpoint_converts_like_its_bf16_twin(ds_dir, tmp_path):
    """V3.2 ships FP8 e4m3 with 128x128 block scales, as V3 does (here every `*_proj`
    linear, NextN block included): the F32 file is byte for byte the one of a BF16 checkpoint
    holding the dequantized values."""
    fp8, bf16 = af.make_fp8_twins(ds_dir, tmp_path / "fp8", tmp_path / "bf16", mtp_layer=False)
    src = pipeline.open_model(fp8).source
    assert src.dtype("model.layers.3.self_attn.q_b_proj.weight") == "F8_E4M3"
    files = {}
    for name, d in (("fp8", fp8), ("bf16", bf16)):
        files[name] = tmp_path / f"{name}.gguf"
        export_planned(d, files[name], "F32")
    assert af.tensor_differences(files["fp8"], files["bf16"]) == []
    assert any(t.name == "blk.3.indexer.attn_q_b.weight"
               for t in gguf.GGUFReader(files["fp8"]).tensors)
