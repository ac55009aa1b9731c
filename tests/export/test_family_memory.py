"""Issue 12: for every family added in 2026, the plan's KV cache (or recurrent state),
compute and output buffers are what llama.cpp allocates when it runs the exported file, at
two context lengths: the budget (`pipeline.make_budget`, llama.cpp's own simulation without
weights) against `memory_breakdown` of the real load."""

from __future__ import annotations

import pytest

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.runtime.memory import memory_breakdown
from edgemoe.runtime.model import load
from tests import arch_fixtures as af

BUILDERS = {"qwen3_5_moe": af.build_qwen3_5_moe, "gpt_oss": af.build_gpt_oss,
            "glm4_moe": af.build_glm4_moe, "minimax_m2": af.build_minimax_m2,
            "deepseek_v32": af.build_deepseek_v32}
CTXS = (256, 2048)


@pytest.fixture(scope="module", params=list(BUILDERS))
def exported(request, tmp_path_factory, bpe_tokenizer_dir):
    tmp = tmp_path_factory.mktemp(request.param)
    model = pipeline.open_model(BUILDERS[request.param](tmp / "hf", bpe_tokenizer_dir))
    plan = mp.uniform_plan(model.specs, "Q8_0", mp.Budget(10**12), check_budget=False)
    return model, pipeline.export(model, plan, tmp / "m.gguf", progress=False)


@pytest.mark.parametrize("ctx", CTXS)
def test_planned_buffers_are_llama_cpps(exported, ctx):
    model, path = exported
    budget = pipeline.make_budget(model.adapter, 10**12, ctx=ctx)
    assert budget.memory_source == "llama.cpp", budget.memory_source
    llm = load(path, n_ctx=ctx, top_any=0, threads=1, n_batch=budget.n_batch,
               n_ubatch=budget.n_ubatch)
    try:
        real = memory_breakdown(llm)
    finally:
        llm.close()
    planned = budget.kv_bytes + budget.compute_bytes + budget.output_bytes
    allocated = real["context"] + real["compute"] + real["output"]
    assert abs(planned - allocated) <= 0.01 * allocated, (budget, real)
    assert budget.kv_bytes == real["context"]
    # the adapter's own KV/state formula (the fallback) agrees too
    assert model.adapter.kv_bytes(ctx, "f16") == real["context"]
