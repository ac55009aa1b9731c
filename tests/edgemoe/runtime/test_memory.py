"""What llama.cpp allocated, read from its own structures, against its own log."""

from __future__ import annotations

import pytest

from edgemoe.runtime.memory import memory_breakdown
from edgemoe.runtime.model import load


def test_memory_breakdown_agrees_with_llama_cpp_log(ggufs):
    """The std::map walk in memory_breakdown against llama.cpp's own log lines."""
    import ctypes
    import re

    import llama_cpp
    from llama_cpp import _logger

    lines: list[str] = []

    @llama_cpp.llama_log_callback
    def capture(level, text, user_data):
        lines.append(text.decode(errors="replace"))

    llama_cpp.llama_log_set(capture, ctypes.c_void_p(0))
    try:
        llm = load(ggufs["qwen3"], threads=1, top_any=0, n_ctx=512)
    finally:
        llama_cpp.llama_log_set(_logger.llama_log_callback, ctypes.c_void_p(0))
    mem = memory_breakdown(llm)
    log = "".join(lines)

    def mib(pattern):
        return float(re.findall(pattern + r"\s*=\s*([\d.]+) MiB", log)[-1])

    assert mem["context"] / 2**20 == pytest.approx(mib("KV buffer size"), abs=0.006)
    assert mem["compute"] / 2**20 == pytest.approx(mib("compute buffer size"), abs=0.006)
    assert mem["model"] / 2**20 == pytest.approx(mib("model buffer size"), abs=0.006)
    assert mem["context"] == 2 * 2 * 2 * 64 * 512 * 2  # layers * (K, V) * heads * dim * ctx * f16
