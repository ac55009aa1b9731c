"""The plan's memory beside the weights is llama.cpp's own allocation (simulated without
weights), checked against llama.cpp running the exported file."""

from __future__ import annotations

import time
from pathlib import Path

import pytest

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.llamacpp import ContextRefusedError
from edgemoe.report.tables import llama_server_command
from edgemoe.runtime.memory import memory_breakdown
from edgemoe.runtime.model import load
from edgemoe.runtime.simulate import simulate_allocation
from export.arch import adapter_for
from export.arch.qwen3_moe import Qwen3MoeAdapter
from tests.conftest import BUNDLED_MODEL

CTXS = (512, 4096, 32768)
CONFIGS = Path(__file__).resolve().parents[2] / "fixtures" / "configs"


@pytest.fixture(scope="module")
def deepseek_v3_dir(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    from tests.arch_fixtures import build_deepseek_v3

    return build_deepseek_v3(tmp_path_factory.mktemp("dsv3"), bpe_tokenizer_dir)


@pytest.fixture(scope="module", params=["bundled", "deepseek_v3"])
def planned(request, tmp_path_factory):
    """A model, a mixed-type plan of it (about 4.5 bits per weight) and its exported file."""
    src = BUNDLED_MODEL if request.param == "bundled" else \
        request.getfixturevalue("deepseek_v3_dir")
    model = pipeline.open_model(src)
    q8 = sum(t.nbytes for t in mp.uniform_plan(model.specs, "Q8_0", mp.Budget(10**12)).tensors)
    probe = pipeline.make_budget(model.adapter, 10**12, ctx=512)
    budget = pipeline.make_budget(model.adapter, probe.runtime_bytes + q8 * 9 // 16, ctx=512)
    plan, _ = pipeline.make_plan(model, budget, progress=False)
    assert len({t.type for t in plan.tensors}) > 2  # a real mixed plan
    out = pipeline.export(model, plan, tmp_path_factory.mktemp("sim") / "m.gguf",
                          progress=False)
    return model, plan, out


def _llama_total(path, ctx: int, **kwargs) -> dict:
    llm = load(path, n_ctx=ctx, top_any=0, threads=1, **kwargs)
    try:
        mem = memory_breakdown(llm)
    finally:
        llm.close()
    return mem


@pytest.mark.parametrize("ctx", CTXS)
def test_planned_total_is_llama_cpps_total(planned, ctx):
    """weights + KV + compute + output as planned at ctx == what llama.cpp allocates when it
    loads the exported file at that ctx (memory_breakdown), within 1% (in fact exactly).
    Where llama.cpp repacks weights for this CPU it keeps a copy of those tensors beside
    their mapped pages (memory_breakdown's "repacked"), which the plan does not count."""
    model, plan, path = planned
    budget = pipeline.make_budget(model.adapter, plan.budget.cap_bytes, ctx=ctx)
    assert budget.memory_source == "llama.cpp"
    planned_total = plan.weight_bytes + budget.runtime_bytes
    real = _llama_total(path, ctx)
    real_total = real["model"] + real["context"] + real["compute"] + real["output"]
    assert abs(planned_total - real_total) <= 0.01 * real_total
    assert budget.kv_bytes == real["context"]
    assert budget.compute_bytes == real["compute"]
    assert plan.weight_bytes == real["model"]


def test_buffers_do_not_depend_on_weight_types():
    """The same context and compute bytes for F16 and Q2_K/Q4_0 weights, so one simulation
    holds for every plan of a model; fewer experts (pruning) never need more."""
    a = pipeline.open_model(BUNDLED_MODEL).adapter
    specs = a.tensor_specs()
    low = {s.name: mp.quant_types.legal_type("Q2_K", s.row_length) if s.quantizable
           else "F32" for s in specs}
    for ctx in (512, 4096):
        f16 = simulate_allocation(a, ctx=ctx)
        q2 = simulate_allocation(a, ctx=ctx, types=low)
        assert (q2.context, q2.compute, q2.output) == (f16.context, f16.compute, f16.output)
        assert q2.model < f16.model / 3
        pruned = simulate_allocation(a, ctx=ctx, n_experts_kept=a.n_expert // 2)
        assert pruned.context == f16.context and pruned.compute <= f16.compute


def test_a_cap_the_old_estimate_refused_now_fits_and_runs(tmp_path):
    """At ctx 512 the formulas put the bundled model's compute buffers at 2x what llama.cpp
    allocates: a cap between the two was refused; now it plans, exports, loads at that ctx
    within the cap and generates."""
    ctx = 512
    model = pipeline.open_model(BUNDLED_MODEL)
    old = pipeline.make_budget(model.adapter, 10**12, ctx=ctx, simulate=False)
    new = pipeline.make_budget(model.adapter, 10**12, ctx=ctx)
    assert old.memory_source.startswith("formula") and new.memory_source == "llama.cpp"
    assert new.runtime_bytes < old.runtime_bytes
    smallest = mp.planner.check_minimum(model.specs, new)
    cap = smallest + (new.runtime_bytes + old.runtime_bytes) // 2
    with pytest.raises(mp.BudgetTooSmallError):
        mp.planner.check_minimum(model.specs, pipeline.make_budget(
            model.adapter, cap, ctx=ctx, simulate=False))
    plan, _ = pipeline.make_plan(model, pipeline.make_budget(model.adapter, cap, ctx=ctx),
                                 progress=False)
    assert plan.total_bytes <= cap
    assert "-c 512 -b 512 -ub 512 -fa off -np 1" in llama_server_command("m.gguf", plan)
    path = pipeline.export(model, plan, tmp_path / "capped.gguf", progress=False)
    llm = load(path, n_ctx=ctx, top_any=0, threads=1)
    try:
        mem = memory_breakdown(llm)
        out = llm("def fib(n):", max_tokens=16, temperature=0)
    finally:
        llm.close()
    assert sum(mem.values()) <= cap
    assert out["usage"]["completion_tokens"] >= 1 and out["choices"][0]["text"]


def test_hf_gguf_and_config_only_sources_get_the_same_simulation(qwen3_dir, ggufs):
    """The header is written from the adapter alone (placeholder vocabulary), so an HF
    checkpoint, its GGUF export and its config.json get llama.cpp's same numbers."""
    from edgemoe.planning.from_config import read_config

    adapters = [pipeline.open_model(qwen3_dir).adapter,
                pipeline.open_model(ggufs["qwen3"]).adapter, adapter_for(read_config(qwen3_dir))]
    budgets = [pipeline.make_budget(a, "1GB", ctx=4096) for a in adapters]
    assert {b.memory_source for b in budgets} == {"llama.cpp"}
    assert len({(b.kv_bytes, b.compute_bytes, b.output_bytes) for b in budgets}) == 1
    real = _llama_total(ggufs["qwen3"], 4096)
    assert (real["context"], real["compute"], real["output"]) == (
        budgets[0].kv_bytes, budgets[0].compute_bytes, budgets[0].output_bytes)


def test_shape_only_deepseek_v3_is_simulated_in_seconds():
    """671B parameters from config.json alone: llama.cpp's own numbers, in well under the
    seconds a plan takes; the KV cache is the MLA latent (576 per token and layer)."""
    a = adapter_for(__import__("json").loads((CONFIGS / "deepseek-v3.json").read_text()))
    t0 = time.perf_counter()
    b = pipeline.make_budget(a, "1TB", ctx=8192)
    took = time.perf_counter() - t0
    assert b.memory_source == "llama.cpp"
    assert took < 10
    assert b.kv_bytes == 61 * (512 + 64) * 8192 * 2
    assert b.output_bytes == 4 * a.n_vocab


def test_quantized_kv_turns_flash_attention_on_and_off_is_refused():
    a = pipeline.open_model(BUNDLED_MODEL).adapter
    b = pipeline.make_budget(a, "1GB", ctx=4096, kv_type="q8_0")
    assert b.flash_attn and b.memory_source == "llama.cpp"
    assert b.kv_bytes == pytest.approx(a.kv_bytes(4096, "q8_0"), rel=0.001)
    with pytest.raises(ContextRefusedError, match="flash"):
        pipeline.make_budget(a, "1GB", ctx=4096, kv_type="q8_0", flash_attn=False)


class _NoBlockCount(Qwen3MoeAdapter):
    """A header llama.cpp cannot load: the block count is missing."""

    def add_metadata(self, w, n_experts_kept=None):
        super().add_metadata(w, n_experts_kept)
        for kv in w.kv_data:
            kv.pop(f"{self.arch_name}.block_count", None)


def test_the_formula_stands_in_where_llama_cpp_cannot_load_and_says_why():
    config = pipeline.open_model(BUNDLED_MODEL).adapter.config
    b = pipeline.make_budget(_NoBlockCount(config), "1GB", ctx=512)
    assert b.memory_source.startswith("formula (llama.cpp cannot load it")
    assert "block_count" in b.memory_source
    assert b.compute_bytes == _NoBlockCount(config).compute_bytes(512)
