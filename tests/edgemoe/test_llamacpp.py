"""The llama-cpp-python pin and the one tokenizer helper."""

from __future__ import annotations

import importlib.metadata
import re

from edgemoe import llamacpp
from tests.conftest import ROOT
from tests.helpers import PROMPT


def test_the_pin_is_pyprojects(monkeypatch):
    """Read from the installed distribution, else from a checkout's pyproject.toml: both say
    what pyproject.toml says."""
    want = re.search(r'"llama-cpp-python==([^"]+)"', (ROOT / "pyproject.toml").read_text())[1]
    llamacpp.pinned_version.cache_clear()
    assert llamacpp.pinned_version() == want

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "requires", not_installed)
    llamacpp.pinned_version.cache_clear()
    try:
        assert llamacpp.pinned_version() == want
    finally:
        llamacpp.pinned_version.cache_clear()


def test_tokenize_a_file_an_open_model_and_a_prefix(ggufs):
    path = ggufs["qwen3"]
    llm = llamacpp.open_llama(path, n_ctx=64, threads=1)
    tokens = llamacpp.tokenize(path, PROMPT)
    assert len(tokens) > 20 and llamacpp.tokenize(llm, PROMPT) == tokens
    assert llamacpp.tokenize(str(path), PROMPT, 20) == tokens[:20]
    llm.close()
