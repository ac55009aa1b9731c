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


def tokenize(path: str | Path, text: str) -> list[int]:
    """llama.cpp's tokens for `text` (no BOS, special tokens as text) from a GGUF file, or
    from a Hugging Face directory's tokenizer (which llama.cpp matches exactly)."""
    path = Path(path)
    if path.is_dir():
        from transformers import AutoTokenizer

        return list(AutoTokenizer.from_pretrained(path)(text, add_special_tokens=False)
                    ["input_ids"])
    llm = open_llama(path, n_ctx=8, logits_all=False, vocab_only=True)
    try:
        return llm.tokenize(text.encode(), add_bos=False, special=False)
    finally:
        llm.close()


def eval_logits(llm, tokens: Sequence[int]) -> np.ndarray:
    """Logits (n_tokens x n_vocab, float32) of one sequence, from a fresh context."""
    llm.reset()
    llm.eval(list(tokens))
    return np.array(llm.scores[: len(tokens)], dtype=np.float32)


def model_weight_bytes(llm) -> int:
    """llama.cpp's own count of the model's weight bytes (llama_model_size)."""
    import llama_cpp

    return int(llama_cpp.llama_model_size(llm.model))


def llama_quantize(src: str | Path, dst: str | Path, ftype: str = "Q8_0",
                   overrides: dict[str, str] | None = None,
                   imatrix: dict[str, np.ndarray] | None = None, threads: int | None = None,
                   pure: bool = False) -> None:
    """llama.cpp's own quantizer (`llama_model_quantize`), the side-by-side baseline.

    `ftype` is a llama_ftype name without MOSTLY_ ("Q4_K_M", "IQ2_XXS", ...); `overrides`
    maps a regex (searched in tensor names, first match wins) to a GGUF type; `imatrix`
    maps a tensor name to its mean squared inputs (n_expert * n_per_row for `_exps`).
    """
    import ctypes

    import gguf
    import llama_cpp

    check_version()
    params = llama_cpp.llama_model_quantize_default_params()
    params.nthread = threads or os.cpu_count()
    params.ftype = int(gguf.LlamaFileType[f"MOSTLY_{ftype.upper()}"])
    params.pure = pure
    keep: list = []  # ctypes buffers must outlive the call
    if overrides:
        tt = (llama_cpp.llama_model_tensor_override * (len(overrides) + 1))()
        for i, (pattern, type_name) in enumerate(overrides.items()):
            tt[i].pattern = pattern.encode()
            tt[i].type = int(gguf.GGMLQuantizationType[type_name.upper()])
        tt[len(overrides)].pattern = None
        params.tt_overrides = tt
        keep.append(tt)
    if imatrix:
        im = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()
        for i, (name, values) in enumerate(imatrix.items()):
            values = np.ascontiguousarray(values, dtype=np.float32).reshape(-1)
            keep.append(values)
            im[i].name = name.encode()
            im[i].data = values.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            im[i].size = values.size
        im[len(imatrix)].name = None
        params.imatrix = im
        keep.append(im)
    rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(),
                                        ctypes.byref(params))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize({src} -> {dst}, {ftype}) failed with {rc}")
