"""GLM-4.x MoE (glm4_moe -> glm4moe): a tiny checkpoint exported and run in llama.cpp.

The checkpoint has what GLM-4.5/4.6 have: a leading dense block, sigmoid routing with a
non-zero correction bias, renormalised top-k scaled by 2.5, a shared expert, Q/K/V biases,
Q/K norms, half-rotary NEOX rope, and a NextN (MTP) block after the trunk that transformers
skips and llama.cpp's converter writes.
"""

from __future__ import annotations

import json

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
from tests.helpers import TEXT, export_planned, q8_0_agreement

# 6 of 8 experts in each MoE layer, different ones per layer
KEPT = {1: (0, 1, 3, 4, 6, 7), 2: (1, 2, 3, 5, 6, 7)}


@pytest.fixture(scope="module")
def glm_dir(tmp_path_factory, bpe_tokenizer_dir):
    return af.build_glm4_moe(tmp_path_factory.mktemp("glm4moe"), bpe_tokenizer_dir)


@pytest.fixture(scope="module")
def glm_f32(glm_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("glm-f32") / "f32.gguf"
    export_planned(glm_dir, out, "F32")
    return out


def test_f32_export_matches_transformers(glm_dir, glm_f32):
    diff = fc.f32_logit_difference(glm_dir, glm_f32)
    assert diff < 1e-3, f"max |llama.cpp - transformers| = {diff}"


def test_same_layout_as_llama_cpp_converter(glm_dir, glm_f32, tmp_path):
    """Tensor names, shapes and types and every metadata key and value (NextN block and
    nextn_predict_layers included, GLM's [gMASK]/<|user|>/<|observation|> special tokens)."""
    assert fc.converter_differences(glm_dir, glm_f32, tmp_path / "theirs.gguf") == []
    names = {t.name for t in gguf.GGUFReader(glm_f32).tensors}
    assert {"blk.3.nextn.eh_proj.weight", "blk.3.ffn_up_exps.weight",
            "blk.1.exp_probs_b.bias", "blk.0.ffn_up.weight"} <= names


def test_q8_0_export_agrees_on_top1(glm_dir, tmp_path):
    """Top-1 of a Q8_0 file (router, norms F32) vs transformers over 1024 tokens of real
    text. Measured: 1009 of 1024 (0.985)."""
    agree = q8_0_agreement(glm_dir, tmp_path / "q8.gguf")
    assert agree >= 0.95, f"top-1 agreement {agree:.3f}"


def test_pruned_export_matches_pruned_transformers(glm_dir, tmp_path):
    """Router rows and correction-bias entries follow the kept experts; the NextN block is
    left out of a pruned file (block_count 3, no nextn_predict_layers)."""
    diff = fc.pruned_difference(glm_dir, KEPT, tmp_path)
    assert diff < 1e-3, f"max |llama.cpp pruned - transformers pruned| = {diff}"
    r = gguf.GGUFReader(tmp_path / "pruned.gguf")
    assert r.get_field("glm4moe.block_count").contents() == 3
    assert r.get_field("glm4moe.nextn_predict_layers") is None
    assert r.get_tensor(next(i for i, t in enumerate(r.tensors)
                             if t.name == "blk.2.exp_probs_b.bias")).shape.tolist() == [6]


@pytest.mark.parametrize("ctx", [512, 4096])
def test_kv_cache_is_what_llama_cpp_allocates(glm_dir, glm_f32, ctx):
    """KV rows for the trunk's layers only: llama.cpp's main context caches no NextN block."""
    measured, planned = fc.kv_bytes_measured_and_planned(glm_f32, glm_dir, ctx)
    assert abs(measured - planned) <= 0.01 * measured, (measured, planned)


def test_node_names_calibrate_and_top_any(glm_dir, glm_f32, tmp_path):
    """The nodes calibration reads exist under the names edgemoe expects (GLM names the
    experts' input `post_attn_norm`); `edgemoe calibrate` and `validate --top-any` run."""
    hooks = EvalHooks()
    hooks.record_names = True
    llm = attach(open_llama(glm_f32, n_ctx=64, threads=1), hooks)
    llm.eval(llm.tokenize(TEXT.encode(), add_bos=False)[:32])
    node = graph_nodes("glm4moe").ffn_input
    for name in (node, "ffn_moe_weights", "ffn_moe_topk", "ffn_moe_down", "ffn_moe_weights_norm",
                 "ffn_moe_weights_scaled", "attn_norm", "kqv_out"):
        assert {f"{name}-1", f"{name}-2"} <= hooks.names_seen, f"llama.cpp renamed {name}"
    text = tmp_path / "text.txt"
    text.write_text(TEXT)
    stats = tmp_path / "glm.stats.gguf"
    assert cli.main(["calibrate", str(glm_dir), "--text", str(text), "-o", str(stats),
                     "--no-sensitivity", "--max-tokens", "512", "--ctx", "256"]) == 0
    imatrix = {t.name for t in gguf.GGUFReader(stats).tensors}
    assert {"blk.1.ffn_gate_exps.weight.in_sum2", "blk.2.attn_q.weight.in_sum2"} <= imatrix
    assert cli.main(["validate", str(glm_f32), "--reference", str(glm_dir), "--text", str(text),
                     "--top-any", "0.3", "--json", str(tmp_path / "v.json")]) == 0
    q = json.loads((tmp_path / "v.json").read_text())["quality"]
    assert q["removed_share"] > 0 and q["experts_per_token"] < 2


def test_memory_plan_counts_trunk_kv_and_every_tensor(glm_dir):
    model = pipeline.open_model(glm_dir)
    hp = model.adapter.hp
    assert (hp.n_layer, hp.n_nextn, hp.rope_dim) == (3, 1, 16)
    assert model.adapter.kv_bytes(1000, "f16") == 3 * 2 * 2 * 32 * 1000 * 2


@pytest.mark.parametrize("change, match", [
    ({"hidden_act": "gelu"}, "silu"),
    ({"n_shared_experts": 0}, "shared expert"),
    ({"rope_scaling": {"rope_type": "yarn", "factor": 4.0}}, "rope scaling"),
])
def test_options_llama_cpp_cannot_run_are_refused(change, match):
    from transformers import Glm4MoeConfig

    cfg = Glm4MoeConfig().to_dict()
    adapter_for(cfg)
    with pytest.raises(UnsupportedModelError, match=match):
        adapter_for({**cfg, **change, "rope_parameters": None} if "rope_scaling" in change
                    else {**cfg, **change})


def test_published_glm_shapes():
    """GLM-4.7's config.json (GLM-4.6's shapes): the parameters llama.cpp counts in GLM-4.6's
    blocks ("repeating layers = 355.234 B parameters", NextN block included), the KV cache of
    the 92 trunk layers only."""
    from edgemoe.planning.from_config import read_config
    from tests.conftest import ROOT

    a = adapter_for(read_config(ROOT / "tests" / "fixtures" / "configs" / "glm-4.7.json"))
    in_blocks = sum(int(np.prod(s.shape)) for s in a.tensor_specs() if s.layer is not None)
    assert in_blocks == 355_234_001_216
    assert a.kv_bytes(8192) == 92 * 8 * (128 + 128) * 8192 * 2
    assert a.hp.rope_dim == 64 and a.hp.n_dense_lead == 3 and a.hp.n_nextn == 1
