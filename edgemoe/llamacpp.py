"""Thin helpers over llama-cpp-python: open a GGUF, get logits, read llama.cpp's own numbers."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

PINNED_VERSION = "0.3.36"
GGML_TYPE_F32 = 0  # ggml_type value, for an exact (F32) KV cache


def check_version() -> None:
    """Fail loudly if llama-cpp-python is not the version whose internals we rely on."""
    import llama_cpp

    if llama_cpp.__version__ != PINNED_VERSION:
        raise RuntimeError(
            f"llama-cpp-python {llama_cpp.__version__} is installed; edgemoe is pinned to "
            f"{PINNED_VERSION} (pip install llama-cpp-python=={PINNED_VERSION})"
        )


def open_llama(path: str | Path, n_ctx: int = 512, f32_kv: bool = False,
               logits_all: bool = True, threads: int | None = None, **kwargs):
    """A `llama_cpp.Llama` on the CPU; `f32_kv` for comparisons with transformers."""
    import llama_cpp

    check_version()
    if f32_kv:
        kwargs.setdefault("type_k", GGML_TYPE_F32)
        kwargs.setdefault("type_v", GGML_TYPE_F32)
    return llama_cpp.Llama(
        model_path=str(path), n_ctx=n_ctx, logits_all=logits_all, verbose=False,
        n_threads=threads or os.cpu_count(), n_gpu_layers=0, **kwargs,
    )


def eval_logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """Logits (n_tokens x n_vocab, float32) of one sequence, from a fresh context."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def model_weight_bytes(llm) -> int:
    """llama.cpp's own count of the model's weight bytes (llama_model_size)."""
    import llama_cpp

    return int(llama_cpp.llama_model_size(llm.model))
