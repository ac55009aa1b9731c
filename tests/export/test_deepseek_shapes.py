"""Planning huge MoE models from config.json alone: DeepSeek-V3 (MLA), Qwen3-235B, Mixtral.

Published numbers anchor the shape-only predictions: DeepSeek-V3 has 671.03e9 GGUF
parameters (the MTP layer is not exported) and its Q8_0 GGUF (bartowski, V3-0324) is
713.29e9 bytes. A tiny random DeepSeek written from the adapter's specs and metadata is
loaded by llama.cpp itself, which checks every name, shape and key, and reports the KV
cache it allocates.
"""

from __future__ import annotations

import ctypes
import json
import re
from contextlib import contextmanager
from pathlib import Path

import gguf
import numpy as np
import pytest

import memory_planner as mp
from edgemoe.planning.from_config import plan_from_config, read_config
from export.arch import ADAPTERS, adapter_for
from memory_planner.priors import DAMAGE_MODEL, REL_ERROR, prior_damage
from memory_planner.quant_types import DEFAULT_LADDER, IMATRIX_LADDER_EXTRA

CONFIGS = Path(__file__).resolve().parents[1] / "fixtures" / "configs"
V3 = CONFIGS / "deepseek-v3.json"
IQ_LADDER = DEFAULT_LADDER + IMATRIX_LADDER_EXTRA
GB = 10**9


def _v3() -> dict:
    return json.loads(V3.read_text())


def _gguf_file_size(adapter, plan: mp.MemoryPlan, specs, tmp_path: Path) -> int:
    """Bytes of the GGUF this plan makes, without the tokenizer: gguf-py writes the header."""
    w = gguf.GGUFWriter(tmp_path / "header.gguf", adapter.arch_name)
    adapter.add_metadata(w)
    shapes = {s.name: s.shape for s in specs}
    for t in plan.tensors:
        w.add_tensor_info(t.name, shapes[t.name], np.dtype(np.float32), t.nbytes,
                          raw_dtype=gguf.GGMLQuantizationType[t.type])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    align = gguf.GGUF_DEFAULT_ALIGNMENT
    header = (tmp_path / "header.gguf").stat().st_size
    return -(-header // align) * align + sum(-(-t.nbytes // align) * align for t in plan.tensors)


# ---- (a) DeepSeek-V3 from its config: parameters and the published Q8_0 size

def test_v3_parameter_count_and_q8_0_size_match_the_published_gguf(tmp_path):
    a = adapter_for(_v3())
    specs = a.tensor_specs()
    n_params = sum(s.n_elements for s in specs)
    assert abs(n_params - 671.03e9) < 0.005e9, n_params
    plan = mp.uniform_plan(specs, "Q8_0", mp.Budget(10**13))
    assert {t.type for t in plan.tensors} == {"Q8_0", "F32"}
    size = _gguf_file_size(a, plan, specs, tmp_path)
    published = 713.29e9
    assert abs(size - published) / published < 1e-3, size
    # what is missing is the tokenizer (129280 tokens and their merges): a few MB
    assert 0 < published - size < 20e6, published - size


def test_v3_tensors_are_the_ones_llama_cpp_creates():
    a = adapter_for(_v3())
    specs = a.tensor_specs()
    by_name = {s.name: s for s in specs}
    assert len(by_name) == len(specs)
    templates = {gguf.TENSOR_NAMES[t] for t in gguf.MODEL_TENSORS[gguf.MODEL_ARCH.DEEPSEEK2]}
    for s in specs:
        base = re.sub(r"^blk\.\d+\.", "blk.{bid}.", s.name.rsplit(".", 1)[0])
        assert base in templates, s.name
    assert not any(s.name.startswith("blk.61.") for s in specs)  # MTP block not exported
    # MLA, split per head as llama.cpp's converter writes it (numpy order: ne reversed)
    assert by_name["blk.0.attn_q_a.weight"].shape == (1536, 7168)
    assert by_name["blk.0.attn_q_b.weight"].shape == (128 * 192, 1536)
    assert by_name["blk.0.attn_kv_a_mqa.weight"].shape == (576, 7168)
    assert by_name["blk.0.attn_k_b.weight"].shape == (128, 512, 128)  # ne0 = qk_nope = 128
    assert by_name["blk.0.attn_v_b.weight"].shape == (128, 128, 512)
    assert by_name["blk.0.attn_output.weight"].shape == (7168, 128 * 128)
    # three dense blocks, then MoE blocks with router, correction bias and a shared expert
    assert by_name["blk.2.ffn_down.weight"].shape == (7168, 18432)
    assert "blk.3.ffn_gate.weight" not in by_name
    assert by_name["blk.3.ffn_gate_exps.weight"].shape == (256, 2048, 7168)
    assert by_name["blk.3.ffn_down_exps.weight"].shape == (256, 7168, 2048)
    assert by_name["blk.3.ffn_up_shexp.weight"].shape == (2048, 7168)
    assert by_name["blk.60.exp_probs_b.bias"].shape == (256,)
    kept_f32 = {s.kind for s in specs if not s.quantizable}
    assert kept_f32 == {"attn_norm", "attn_q_a_norm", "attn_kv_a_norm", "ffn_norm",
                        "ffn_gate_inp", "exp_probs_b", "output_norm"}
    # K-quants cannot tile attn_k_b's 128-long rows: llama.cpp's fallback applies
    assert mp.legal_type("Q4_K", by_name["blk.0.attn_k_b.weight"].row_length) == "Q5_0"


def test_v2_lite_style_config_uses_full_rank_q_and_softmax():
    cfg = {**_v3(), "model_type": "deepseek_v2", "q_lora_rank": None, "scoring_func": "softmax",
           "topk_method": "greedy", "n_group": 1, "topk_group": 1}
    a = adapter_for(cfg)
    kinds = {s.kind for s in a.tensor_specs()}
    assert "attn_q" in kinds and not kinds & {"attn_q_a", "attn_q_b", "attn_q_a_norm"}
    assert "exp_probs_b" not in kinds
    w = gguf.GGUFWriter(None, a.arch_name)
    a.add_metadata(w)
    kv = {k: v.value for k, v in w.kv_data[0].items()}
    assert kv["deepseek2.expert_gating_func"] == gguf.ExpertGatingFuncType.SOFTMAX
    assert kv["deepseek2.attention.q_lora_rank"] == 0
    assert "deepseek2.expert_group_count" not in kv


def test_v3_metadata_keys():
    a = adapter_for(_v3())
    w = gguf.GGUFWriter(None, a.arch_name)
    a.add_metadata(w)
    kv = {k: v.value for k, v in w.kv_data[0].items()}
    want = {
        "block_count": 61, "leading_dense_block_count": 3, "expert_count": 256,
        "expert_used_count": 8, "expert_shared_count": 1, "expert_weights_scale": 2.5,
        "expert_weights_norm": True, "expert_gating_func": 2, "expert_group_count": 8,
        "expert_group_used_count": 4, "attention.q_lora_rank": 1536,
        "attention.kv_lora_rank": 512, "attention.key_length": 576,
        "attention.value_length": 512, "attention.key_length_mla": 192,
        "attention.value_length_mla": 128, "attention.head_count_kv": 1,
        "rope.dimension_count": 64, "rope.scaling.type": "yarn", "rope.scaling.factor": 40.0,
        "rope.scaling.original_context_length": 4096, "feed_forward_length": 18432,
        "expert_feed_forward_length": 2048,
    }
    for key, value in want.items():
        assert kv[f"deepseek2.{key}"] == pytest.approx(value), key
    assert kv["deepseek2.rope.scaling.yarn_log_multiplier"] == pytest.approx(0.1)


def test_deepseek_adapters_are_registered():
    assert {"deepseek_v2", "deepseek_v3"} <= set(ADAPTERS)


# ---- (b) DeepSeek-V3 under a memory cap

def test_v3_at_128gb_needs_pruning():
    """671e9 weights at IQ1_S (1.5625 bpw) alone are 131.7 GB: 128 GB needs pruning."""
    with pytest.raises(mp.BudgetTooSmallError, match="128.00 GB") as e:
        plan_from_config(V3, "128GB", ctx=8192, ladder=IQ_LADDER, prune=False)
    assert 131.6 * GB < e.value.minimum_total_bytes < 136 * GB
    plan = plan_from_config(V3, "128GB", ctx=8192)
    b = plan.budget
    assert plan.n_experts == 256 and plan.n_experts_kept < 256
    assert plan.kept_experts == {}  # which experts: only calibration can say
    assert plan.weight_bytes + b.runtime_bytes + b.reserve_bytes == plan.total_bytes
    assert 0.99 * b.cap_bytes < plan.total_bytes <= b.cap_bytes == 128 * GB
    assert b.kv_bytes == 61 * (512 + 64) * 8192 * 2
    exps = [t for t in plan.tensors if t.name == "blk.10.ffn_up_exps.weight"][0]
    assert exps.n_elements == plan.n_experts_kept * 2048 * 7168
    assert plan.pruning_damage > 0


@pytest.mark.parametrize("cap, ladder", [("200GB", IQ_LADDER), ("256GB", DEFAULT_LADDER)])
def test_v3_plan_totals_add_up_and_kv_is_the_mla_latent(cap, ladder):
    plan = plan_from_config(V3, cap, ctx=8192, ladder=ladder, prune=False)
    b = plan.budget
    assert b.kv_bytes == 61 * (512 + 64) * 8192 * 2  # K-only f16 cache: 576 per token, layer
    assert plan.weight_bytes + b.runtime_bytes + b.reserve_bytes == plan.total_bytes
    assert plan.total_bytes <= b.cap_bytes == mp.parse_size(cap)
    assert plan.total_bytes > 0.99 * b.cap_bytes  # the cap is used, not wasted
    assert plan.damage_model == DAMAGE_MODEL and plan.solver.endswith("optimal")
    assert plan.n_experts == plan.n_experts_kept == 256
    types = {t.name: t.type for t in plan.tensors}
    assert types["blk.3.ffn_gate_inp.weight"] == types["blk.3.exp_probs_b.bias"] == "F32"
    # the priors spend bits where they are cheap: shared expert above routed experts
    bits = {t.name: t.bits_per_weight for t in plan.tensors}
    assert bits["blk.30.ffn_down_shexp.weight"] > bits["blk.30.ffn_down_exps.weight"]


def test_uniform_type_and_config_directory(tmp_path):
    (tmp_path / "config.json").write_text(V3.read_text())
    plan = plan_from_config(tmp_path, "800GB", type_name="Q8_0")
    assert plan.solver == "uniform Q8_0"
    assert plan.weight_bytes == pytest.approx(713.28e9, rel=1e-4)
    with pytest.raises(FileNotFoundError, match="config.json"):
        read_config(tmp_path / "nowhere")


# ---- (c) the other public configs

@pytest.mark.parametrize("name, params, cap", [
    ("qwen3-235b-a22b", 235.09e9, "96GB"),
    ("mixtral-8x7b", 46.70e9, "24GB"),
])
def test_other_models_sizes_and_plans(name, params, cap):
    a = adapter_for(read_config(CONFIGS / f"{name}.json"))
    specs = a.tensor_specs()
    n = sum(s.n_elements for s in specs)
    assert n == pytest.approx(params, rel=2e-3)
    q8 = mp.uniform_plan(specs, "Q8_0", mp.Budget(10**13))
    # Q8_0 is 8.5 bits; the F32 norms and routers add a hair
    assert 8.5 <= q8.bits_per_weight < 8.52
    plan = plan_from_config(CONFIGS / f"{name}.json", cap, ctx=8192)
    b = plan.budget
    assert plan.weight_bytes + b.runtime_bytes + b.reserve_bytes == plan.total_bytes
    assert plan.total_bytes <= b.cap_bytes
    assert b.kv_bytes == a.n_layer * a.hp.n_head_kv * a.hp.head_dim * 2 * 8192 * 2


# ---- priors

def test_priors_cover_the_ladders_and_fall_with_bits():
    for t in IQ_LADDER + ("Q5_0", "Q5_1", "Q4_0", "IQ4_NL", "F16"):
        assert t in REL_ERROR
    chain = ["F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "Q3_K", "Q2_K"]
    errs = [sum(REL_ERROR[t]) for t in chain]
    assert errs == sorted(errs)
    specs = adapter_for(_v3()).tensor_specs()
    d = prior_damage(specs, DEFAULT_LADDER, experts_used=8)
    assert set(d) == {s.name for s in specs if s.quantizable}
    # output feeds the logits directly; one routed-expert tensor is one of 2L + 1 terms
    assert d["output.weight"]["Q4_K"] > 100 * d["blk.5.ffn_up_exps.weight"]["Q4_K"]
    assert d["blk.5.ffn_up_exps.weight"]["Q4_K"] == pytest.approx(
        8 * d["blk.5.ffn_up_shexp.weight"]["Q4_K"])  # k * ff_exp vs one shared expert


# ---- llama.cpp loads what the adapter describes

def _tiny(**overrides) -> dict:
    cfg = {**_v3(), "vocab_size": 320, "hidden_size": 256, "intermediate_size": 512,
           "moe_intermediate_size": 128, "num_hidden_layers": 3, "num_attention_heads": 4,
           "n_routed_experts": 16, "num_experts_per_tok": 4, "n_group": 4, "topk_group": 2,
           "kv_lora_rank": 64, "q_lora_rank": 96, "qk_rope_head_dim": 32,
           "qk_nope_head_dim": 32, "v_head_dim": 48, "first_k_dense_replace": 1}
    cfg.pop("quantization_config")
    return {**cfg, **overrides}


def _write_random(adapter, path: Path) -> None:
    w = gguf.GGUFWriter(path, adapter.arch_name)
    adapter.add_metadata(w)
    V = adapter.n_vocab
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list([f"<t{i}>" for i in range(V)])
    w.add_token_types([int(gguf.TokenType.NORMAL)] * V)
    w.add_token_merges(["<t 0"])
    w.add_bos_token_id(0)
    w.add_eos_token_id(1)
    rng = np.random.default_rng(0)
    for s in adapter.tensor_specs():
        x = rng.standard_normal(s.shape).astype(np.float32) * 0.05
        w.add_tensor(s.name, x + 1.0 if s.kind.endswith("norm") else x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@contextmanager
def _llama_log():
    """llama.cpp's log lines while the block runs (they carry its buffer sizes)."""
    import llama_cpp
    import llama_cpp._logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def collect(level, text, user_data):
        lines.append(text.decode("utf-8", "replace"))

    llama_cpp.llama_log_set(collect, ctypes.c_void_p(0))
    try:
        yield lines
    finally:
        llama_cpp.llama_log_set(llama_cpp._logger.llama_log_callback, ctypes.c_void_p(0))


def _mib(lines: list[str], pattern: str) -> float:
    m = re.search(pattern + r"\s*=\s*([0-9.]+) MiB", "".join(lines))
    assert m, pattern
    return float(m.group(1)) * 2**20


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    {},  # V3: q_lora, sigmoid + correction bias, groups, yarn
    {"model_type": "deepseek_v2", "q_lora_rank": None, "scoring_func": "softmax",
     "topk_method": "greedy", "n_group": 1, "topk_group": 1, "rope_scaling": None},
], ids=["v3", "v2-lite"])
def test_tiny_deepseek_loads_and_runs_in_llama_cpp(tmp_path, overrides):
    from edgemoe.llamacpp import eval_logits, open_llama

    a = adapter_for(_tiny(**overrides))
    path = tmp_path / "tiny.gguf"
    _write_random(a, path)
    ctx = 2048
    with _llama_log() as lines:
        llm = open_llama(path, n_ctx=ctx, threads=1)
    assert np.isfinite(eval_logits(llm, [2, 3, 4, 5])).all()
    kv = _mib(lines, r"CPU KV buffer size")
    assert abs(kv - a.kv_bytes(ctx)) <= 0.005 * 2**20  # printed to 0.01 MiB
    assert "V (f16):    0.00 MiB" in "".join(lines)  # MLA: K-only cache
    assert _mib(lines, r"CPU compute buffer size") <= a.compute_bytes(ctx)
