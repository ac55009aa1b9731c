"""GGUF exports of the tiny session checkpoints, shared by the runtime tests.

Import the `ggufs` fixture into a test module; the files are written once per session.
"""

from __future__ import annotations

import functools
from pathlib import Path

import pytest

PROMPT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n# The quick brown fox jumps over the lazy dog.\n"
)
TEXT = PROMPT * 12 + "import os\nprint(os.path.join('a', 'b'))\n" * 20


def export(model_dir, out: Path, type_name: str, cap: str = "10GB", ctx: int = 256,
           check_budget: bool = True) -> Path:
    import memory_planner as mp
    from edgemoe import pipeline

    model = pipeline.open_model(model_dir)
    budget = pipeline.make_budget(model.adapter, cap, ctx=ctx)
    plan = mp.uniform_plan(model.specs, type_name, budget, check_budget=check_budget)
    return pipeline.export(model, plan, out, progress=False)


@functools.cache
def _build(qwen3_dir: Path, mixtral_dir: Path, root: Path) -> dict[str, Path]:
    return {
        "qwen3": export(qwen3_dir, root / "qwen3-f32.gguf", "F32"),
        "qwen3_q8": export(qwen3_dir, root / "qwen3-q8_0.gguf", "Q8_0"),
        "mixtral": export(mixtral_dir, root / "mixtral-f32.gguf", "F32"),
    }


@pytest.fixture(scope="session")
def ggufs(qwen3_dir, mixtral_dir, tmp_path_factory) -> dict[str, Path]:
    """{"qwen3": F32, "qwen3_q8": Q8_0, "mixtral": F32} GGUF paths."""
    root = tmp_path_factory.getbasetemp() / "tiny-ggufs"
    root.mkdir(exist_ok=True)
    return _build(Path(qwen3_dir), Path(mixtral_dir), root)
