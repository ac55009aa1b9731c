"""Helpers shared by test modules: the test prompt and texts, exports of the tiny session
checkpoints, and transformers' side of a comparison with llama.cpp."""

from __future__ import annotations

from pathlib import Path

import numpy as np

PROMPT = (
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n"
    "    return a\n# The quick brown fox jumps over the lazy dog.\n"
)
TEXT = PROMPT * 12 + "import os\nprint(os.path.join('a', 'b'))\n" * 20


def hf_tokens(model_dir, n: int = 32) -> list[int]:
    """The first `n` tokens of PROMPT by the checkpoint's transformers tokenizer."""
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(model_dir)(PROMPT)["input_ids"]
    assert len(ids) >= n, "prompt too short for the test tokenizer"
    return ids[:n]


def text_windows(model_dir, n: int = 8, length: int = 128) -> list[list[int]]:
    """`n` windows of `length` tokens spread over the bundled calibration text."""
    from edgemoe.calibration.collect import DEFAULT_TEXT
    from edgemoe.llamacpp import tokenize

    ids = tokenize(model_dir, DEFAULT_TEXT.read_text())
    step = (len(ids) - length) // (n - 1)
    return [ids[i * step:i * step + length] for i in range(n)]


def hf_logits(model_dir, tokens) -> np.ndarray:
    """transformers' logits (float32) for one sequence, or for a batch of equal-length ones."""
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    ids = torch.tensor(tokens)
    with torch.no_grad():
        logits = model(ids.reshape(-1, ids.shape[-1])).logits.numpy()
    return logits if ids.ndim == 2 else logits[0]


def top1_agreement(gguf_path, model_dir) -> float:
    """How often the file's top-1 is transformers' (F32), over 1024 tokens of real text
    (`text_windows`): a 32-token prompt is too few to tell 95% from 90%."""
    from edgemoe.llamacpp import eval_logits, open_llama

    windows = text_windows(model_dir)
    llm = open_llama(gguf_path, n_ctx=len(windows[0]), f32_kv=True)
    got = np.stack([eval_logits(llm, w) for w in windows]).argmax(-1)
    return float((got == hf_logits(model_dir, windows).argmax(-1)).mean())


def q8_0_agreement(model_dir, out) -> float:
    """Export `model_dir` at Q8_0 to `out` (every weight Q8_0, router and norms F32) and
    return the file's top-1 agreement with transformers (`top1_agreement`)."""
    plan = export_planned(model_dir, out, "Q8_0")
    assert {t.type for t in plan.tensors} <= {"Q8_0", "F32"}
    return top1_agreement(out, model_dir)


def export_planned(model_dir, out, type_name=None, memory="10GB"):
    """Export `model_dir` as `pipeline.make_plan` plans it (one type if `type_name`) for
    `memory` at a 256-token context; returns the plan."""
    from edgemoe import pipeline

    model = pipeline.open_model(model_dir)
    budget = pipeline.make_budget(model.adapter, memory, ctx=256)
    plan, _ = pipeline.make_plan(model, budget, type_name, progress=False)
    pipeline.export(model, plan, out, progress=False)
    return plan


def export_uniform(model_dir, out: Path, type_name: str, cap: str = "10GB", ctx: int = 256,
                   check_budget: bool = True, kv_type: str = "f16") -> Path:
    """Export `model_dir` with every quantizable tensor `type_name`; returns the path."""
    import memory_planner as mp
    from edgemoe import pipeline

    model = pipeline.open_model(model_dir)
    budget = pipeline.make_budget(model.adapter, cap, ctx=ctx, kv_type=kv_type)
    plan = mp.uniform_plan(model.specs, type_name, budget, check_budget=check_budget)
    return pipeline.export(model, plan, out, progress=False)
