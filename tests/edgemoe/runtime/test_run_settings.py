"""`edgemoe run`, `chat` and `serve` open a file as its memory plan was made for: the plan's
context length, KV cache type and batches, unless told otherwise."""

from __future__ import annotations

import io

import pytest

from edgemoe.runtime import verbs
from edgemoe.runtime.model import RunSettings, kv_type_id, planned_settings
from tests.helpers import export_uniform


@pytest.fixture(scope="module")
def planned(qwen3_dir, tmp_path_factory):
    return export_uniform(qwen3_dir, tmp_path_factory.mktemp("run") / "q8kv.gguf", "Q8_0",
                          cap="40MB", ctx=512, kv_type="q8_0")


@pytest.fixture
def opened(monkeypatch):
    """The models the verbs open, as llama.cpp was asked to open them."""
    seen = []
    real = verbs.load

    def spy(*a, **k):
        seen.append(real(*a, **k))
        return seen[-1]

    monkeypatch.setattr(verbs, "load", spy)
    return seen


def _kv_and_ctx(llm) -> tuple[int, int, int]:
    p = llm.context_params
    return llm.n_ctx(), p.type_k, p.type_v


def test_the_plans_context_and_kv_type_are_the_defaults(planned, opened):
    s = planned_settings(planned)
    assert (s.ctx, s.kv_type) == (512, "q8_0")
    assert s.batches is not None and set(s.batches) == {"n_batch", "n_ubatch", "flash_attn"}
    verbs.run(str(planned), "def f(x):", max_tokens=2, threads=1, out=io.StringIO())
    q8 = kv_type_id("q8_0")
    assert _kv_and_ctx(opened[-1]) == (512, q8, q8)
    assert opened[-1].context_params.n_ubatch == s.batches["n_ubatch"]
    verbs.chat(str(planned), max_tokens=2, threads=1, inp=io.StringIO("hi\n"),
               out=io.StringIO())
    assert _kv_and_ctx(opened[-1]) == (512, q8, q8)
    # told otherwise
    verbs.run(str(planned), "def f(x):", max_tokens=2, threads=1, out=io.StringIO(), ctx=256,
              kv_type="f16")
    f16 = kv_type_id("f16")
    assert _kv_and_ctx(opened[-1]) == (256, f16, f16)


def test_a_file_without_a_plan_runs_at_4096_and_f16(tmp_path, planned):
    from export.gguf_io import copy_with_metadata
    from export.writer import PLAN_KEY

    bare = copy_with_metadata(planned, tmp_path / "bare.gguf", lambda w: None, drop=[PLAN_KEY])
    assert planned_settings(bare) == RunSettings(4096, "f16")
    assert planned_settings(bare, 512, "q4_0") == RunSettings(512, "q4_0")
    with pytest.raises(ValueError, match="unknown KV cache type"):
        RunSettings(512, "q3_x").llama_kwargs()
