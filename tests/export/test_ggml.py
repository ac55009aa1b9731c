"""Loading ggml's quantizer library: typed errors, and one copy shared with llama.cpp."""

from __future__ import annotations

from pathlib import Path

import pytest

from export import ggml


def test_missing_library_is_a_typed_error(tmp_path: Path) -> None:
    with pytest.raises(ggml.GGMLLibraryError, match=r"llama-cpp-python==0\.3\.36"):
        ggml._load(tmp_path / "libggml-base.so")
    assert ggml.ggml_library_path().is_file()


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs /proc (Linux)")
def test_shares_the_ggml_instance_llama_cpp_uses() -> None:
    import llama_cpp.llama_cpp  # noqa: F401  (loads libllama and its libggml-base)

    ggml.library()
    maps = Path("/proc/self/maps").read_text().splitlines()
    loaded = {line.split()[-1] for line in maps if "libggml-base" in line}
    assert len(loaded) == 1, f"two copies of libggml-base loaded: {sorted(loaded)}"
