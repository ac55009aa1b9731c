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


def test_to_float_reads_back_what_gguf_py_reads() -> None:
    import gguf
    import numpy as np

    from export import quantize as q
    from memory_planner.quant_types import qtype

    w = np.random.default_rng(0).standard_normal((4, 512)).astype(np.float32)
    im = np.linspace(0.1, 2.0, 512, dtype=np.float32)
    for t in ("Q8_0", "Q4_K", "Q2_K", "Q3_K", "Q6_K", "IQ4_XS", "IQ3_S", "IQ2_XXS", "F16"):
        raw = q.quantize_rows(w, t, im)
        # gguf-py's numpy dequantizer, one row per line (export.quantize.dequantize is ggml's)
        by_gguf_py = gguf.quants.dequantize(raw.reshape(len(w), -1), qtype(t))
        np.testing.assert_array_equal(ggml.to_float(t, raw, w.size),
                                      np.asarray(by_gguf_py, np.float32).reshape(-1), err_msg=t)
    with pytest.raises(ggml.QuantizeError, match="do not hold"):
        ggml.to_float("Q4_K", q.quantize_rows(w, "Q4_K")[:-1], w.size)
    with pytest.raises(ggml.QuantizeError, match="no dequantizer for F32"):
        ggml.to_float("F32", w.view(np.uint8), w.size)


def test_cpu_row_quantizer_rounds_only_ties_otherwise() -> None:
    """The calibration intermediates' Q8_0 (`quantize_rows(cpu_rows=True)`): ggml-cpu's row
    quantizer gives the file quantizer's scales, and values that differ by at most one
    step, only where x / d sits within float error of a rounding tie; other types and an
    imatrix keep the file quantizer."""
    import numpy as np

    from export import quantize as q

    assert ggml.cpu_row_quantizer("Q8_0") is not None  # llama-cpp-python ships libggml-cpu
    assert ggml.cpu_row_quantizer("Q4_K") is None
    w = np.random.default_rng(1).standard_normal((512, 1024)).astype(np.float32)
    ref = q.quantize_rows(w, "Q8_0").reshape(-1, 34)
    cpu = q.quantize_rows(w, "Q8_0", cpu_rows=True).reshape(-1, 34)
    np.testing.assert_array_equal(cpu[:, :2], ref[:, :2])  # the fp16 scales
    step = (ref[:, 2:].view(np.int8).astype(int) - cpu[:, 2:].view(np.int8).astype(int))
    assert np.abs(step).max() == 1 and 0 < np.count_nonzero(step) < 1e-3 * step.size
    d = np.abs(w.reshape(-1, 32)).max(axis=1, keepdims=True) / 127
    frac = np.abs(w.reshape(-1, 32) / d) % 1
    assert np.all(np.abs(frac[step != 0] - 0.5) < 1e-4)  # ties, within float error
    im = np.linspace(0.5, 2.0, 1024, dtype=np.float32)
    for t, imatrix in (("Q8_0", im), ("Q4_K", None), ("Q6_K", im)):
        np.testing.assert_array_equal(q.quantize_rows(w, t, imatrix, cpu_rows=True),
                                      q.quantize_rows(w, t, imatrix), err_msg=t)
