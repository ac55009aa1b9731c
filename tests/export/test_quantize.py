"""ggml quantization from Python: round trips, threading, errors, and byte identity with
llama.cpp's own `llama_model_quantize` on a tiny qwen3moe GGUF."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES, MODEL_ARCH, MODEL_TENSOR, MODEL_TENSORS, TENSOR_NAMES

from edgemoe.llamacpp import llama_quantize as run_llama_quantize
from export import ggml
from export import quantize as q
from memory_planner.quant_types import REQUIRES_IMATRIX, qtype


def gaussian(*shape: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(shape, dtype=np.float32)


def positive(n: int, seed: int = 1) -> np.ndarray:
    """An imatrix-like vector: positive, with a few dominant columns."""
    return (np.random.default_rng(seed).gamma(0.5, size=n) + 1e-3).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------

ROUND_TRIP = [("Q8_0", 1e-4), ("Q6_K", 1e-3), ("Q4_K", 1e-2), ("IQ4_XS", 1e-2),
              ("IQ3_S", 5e-2), ("Q2_K", 0.15), ("IQ2_XXS", 0.2)]


@pytest.mark.parametrize("type_name,bound", ROUND_TRIP)
def test_round_trip_error_and_size(type_name: str, bound: float) -> None:
    w = gaussian(32, 256)
    im = positive(256) if type_name in REQUIRES_IMATRIX else None
    raw = q.quantize_rows(w, type_name, im)
    blck, size = GGML_QUANT_SIZES[qtype(type_name)]
    assert raw.dtype == np.uint8 and raw.shape == (w.size // blck * size,)
    back = q.dequantize(raw, type_name, w.shape)
    assert back.shape == w.shape and back.dtype == np.float32
    err = float(np.square(back - w).sum() / np.square(w).sum())
    assert 0 < err < bound
    assert q.relative_error(w, type_name, im) == pytest.approx(
        err if im is None else float(im @ np.square(back - w).sum(0) / (im @ np.square(w).sum(0))))


def test_error_ordered_by_bits() -> None:
    w = gaussian(64, 512)
    errs = [q.relative_error(w, t) for t in ("Q8_0", "Q6_K", "Q4_K", "Q2_K")]
    assert errs == sorted(errs) and errs[0] * 10 < errs[-1]
    assert q.relative_error(w, "F32") == 0.0
    assert q.relative_error(w, "F16") < 1e-6


# ggml builds lattice tables for these on first use: seconds each, once per process
HEAVY_INIT = ("IQ1_S", "IQ1_M", "IQ2_XS", "IQ2_S")


@pytest.mark.parametrize("types", [
    sorted(ggml.QUANTIZABLE - set(HEAVY_INIT)),  # read back by ggml (gguf-py 0.19 lacks Q1_0)
    pytest.param(HEAVY_INIT, marks=pytest.mark.slow),
])
def test_every_quantizable_type_round_trips(types: list[str]) -> None:
    w = gaussian(4, 256)
    for t in types:
        raw = q.quantize_rows(w, t, positive(256))
        blck, size = GGML_QUANT_SIZES[qtype(t)]
        assert raw.size == w.size // blck * size
        back = q.dequantize(raw, t, w.shape)
        assert np.square(back - w).sum() < np.square(w).sum(), t  # ternary TQ*: ~0.65


def test_float_types_match_numpy() -> None:
    w = gaussian(3, 256)
    w[0, :4] = [0.0, -0.0, 1e-8, 65504.0]
    assert q.quantize_rows(w, "F32").tobytes() == w.tobytes()
    assert q.quantize_rows(w, "F16").tobytes() == w.astype(np.float16).tobytes()
    bf16 = q.dequantize(q.quantize_rows(w, "BF16"), "BF16", w.shape)
    assert np.abs(bf16 - w).max() <= np.abs(w).max() * 2**-8


def test_imatrix_changes_result_and_improves_weighted_error() -> None:
    w = gaussian(64, 256)
    im = positive(256)
    plain, weighted = q.quantize_rows(w, "Q4_K"), q.quantize_rows(w, "Q4_K", im)
    assert plain.tobytes() != weighted.tobytes()
    # importance-weighted error is lower when the quantizer knows the importance
    def werr(raw: np.ndarray) -> float:
        d = q.dequantize(raw, "Q4_K", w.shape) - w
        return float(im @ np.square(d).sum(0))
    assert werr(weighted) < werr(plain)


# ---------------------------------------------------------------------------------------------
# threads and expert slices
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("type_name", ["Q4_K", "IQ3_S", "Q8_0"])
def test_threaded_equals_single(type_name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(q, "MIN_CHUNK_ELEMENTS", 256 * 7)  # force many uneven chunks
    w = gaussian(100, 256)
    e = gaussian(3, 50, 256, seed=2)
    im = np.stack([positive(256, seed=s) for s in range(3)])
    single = q.quantize_rows(w, type_name, im[0])
    single_e = q.quantize_expert_slices(e, type_name, im)
    with ThreadPoolExecutor(4) as pool:
        assert q.quantize_rows(w, type_name, im[0], executor=pool).tobytes() == single.tobytes()
        threaded_e = q.quantize_expert_slices(e, type_name, im, executor=pool)
    assert threaded_e.tobytes() == single_e.tobytes()


def test_expert_slices_use_their_own_imatrix_row() -> None:
    e = gaussian(3, 16, 256)
    im = np.stack([positive(256, seed=s) for s in range(3)])
    out = q.quantize_expert_slices(e, "IQ2_XXS", im).reshape(3, -1)
    for i in range(3):
        assert out[i].tobytes() == q.quantize_rows(e[i], "IQ2_XXS", im[i]).tobytes()
    swapped = q.quantize_expert_slices(e, "IQ2_XXS", im[[1, 0, 2]]).reshape(3, -1)
    assert swapped[0].tobytes() != out[0].tobytes()
    assert swapped[2].tobytes() == out[2].tobytes()
    shared = q.quantize_expert_slices(e, "IQ2_XXS", im[0]).reshape(3, -1)
    assert shared[0].tobytes() == out[0].tobytes() and shared[1].tobytes() != out[1].tobytes()


def test_relative_error_samples_deterministically_across_experts() -> None:
    e = gaussian(8, 64, 256)
    e[5] *= 0.0  # an all-zero expert contributes nothing; others still counted
    a = q.relative_error(e, "Q3_K", max_rows=40, seed=3)
    assert a == q.relative_error(e, "Q3_K", max_rows=40, seed=3)
    assert a != q.relative_error(e, "Q3_K", max_rows=40, seed=4)
    assert a == pytest.approx(q.relative_error(e, "Q3_K", max_rows=10_000), rel=0.3)
    # the full sample equals the error of the whole tensor quantized slice by slice
    im = np.stack([positive(256, seed=s) for s in range(8)])
    full = q.relative_error(e, "IQ2_XXS", im, max_rows=10_000)
    d = q.dequantize(q.quantize_expert_slices(e, "IQ2_XXS", im), "IQ2_XXS", e.shape) - e
    num = sum(float(im[i] @ np.square(d[i]).sum(0)) for i in range(8))
    den = sum(float(im[i] @ np.square(e[i]).sum(0)) for i in range(8))
    assert full == pytest.approx(num / den, rel=1e-6)


# ---------------------------------------------------------------------------------------------
# errors and helpers
# ---------------------------------------------------------------------------------------------


def test_requires_imatrix() -> None:
    for t in REQUIRES_IMATRIX:
        assert ggml.requires_imatrix(t)
        with pytest.raises(q.QuantizeError, match="imatrix"):
            q.quantize_rows(gaussian(2, 256), t)
    assert not ggml.requires_imatrix("Q4_K")


def test_bad_inputs() -> None:
    with pytest.raises(q.QuantizeError, match="multiple of Q4_K's block size 256"):
        q.quantize_rows(gaussian(2, 128), "Q4_K")
    with pytest.raises(q.QuantizeError, match="cannot quantize to Q8_K"):
        q.quantize_rows(gaussian(2, 256), "Q8_K")
    with pytest.raises(q.QuantizeError, match="imatrix shape"):
        q.quantize_rows(gaussian(2, 256), "Q4_K", positive(128))
    with pytest.raises(q.QuantizeError, match="non-finite"):
        q.quantize_rows(gaussian(2, 256), "Q4_K", np.full(256, np.nan, np.float32))
    with pytest.raises(q.QuantizeError, match="imatrix shape"):
        q.quantize_expert_slices(gaussian(3, 2, 256), "Q4_K", np.ones((2, 256), np.float32))
    with pytest.raises(q.QuantizeError, match="3-D"):
        q.quantize_expert_slices(gaussian(2, 256), "Q4_K")
    bad = gaussian(4, 256)
    bad[2, 7] = np.nan
    for t in ("Q4_K", "IQ3_S"):  # would abort the process inside ggml if it got through
        with pytest.raises(q.QuantizeError, match="non-finite"):
            q.quantize_rows(bad, t)
    with pytest.raises(q.QuantizeError, match="bytes do not hold"):
        q.dequantize(np.zeros(10, np.uint8), "Q4_K", (1, 256))
    # non-contiguous float64 input is converted, not rejected
    w = gaussian(256, 8).T.astype(np.float64)
    w32 = np.ascontiguousarray(w, dtype=np.float32)
    assert q.quantize_rows(w, "Q8_0").tobytes() == q.quantize_rows(w32, "Q8_0").tobytes()


def test_default_threads(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("EDGEMOE_THREADS", raising=False)
    assert q.default_threads() >= 1
    monkeypatch.setenv("EDGEMOE_THREADS", "3")
    assert q.default_threads() == 3
    monkeypatch.setenv("EDGEMOE_THREADS", "zero")
    with pytest.raises(ValueError, match="EDGEMOE_THREADS"):
        q.default_threads()


# ---------------------------------------------------------------------------------------------
# byte identity with llama.cpp's llama_model_quantize
# ---------------------------------------------------------------------------------------------

N_EMBD, N_FF_EXP, N_EXPERT, N_HEAD, N_HEAD_KV, HEAD_DIM, N_VOCAB, N_LAYER = (
    256, 256, 4, 4, 2, 64, 64, 2)

# numpy shapes (ggml shapes reversed) of every qwen3moe tensor
SHAPES: dict[MODEL_TENSOR, tuple[int, ...]] = {
    MODEL_TENSOR.TOKEN_EMBD: (N_VOCAB, N_EMBD),
    MODEL_TENSOR.OUTPUT_NORM: (N_EMBD,),
    MODEL_TENSOR.OUTPUT: (N_VOCAB, N_EMBD),
    MODEL_TENSOR.ATTN_NORM: (N_EMBD,),
    MODEL_TENSOR.ATTN_Q: (N_HEAD * HEAD_DIM, N_EMBD),
    MODEL_TENSOR.ATTN_Q_NORM: (HEAD_DIM,),
    MODEL_TENSOR.ATTN_K: (N_HEAD_KV * HEAD_DIM, N_EMBD),
    MODEL_TENSOR.ATTN_K_NORM: (HEAD_DIM,),
    MODEL_TENSOR.ATTN_V: (N_HEAD_KV * HEAD_DIM, N_EMBD),
    MODEL_TENSOR.ATTN_OUT: (N_EMBD, N_HEAD * HEAD_DIM),
    MODEL_TENSOR.FFN_NORM: (N_EMBD,),
    MODEL_TENSOR.FFN_GATE_INP: (N_EXPERT, N_EMBD),
    MODEL_TENSOR.FFN_GATE_EXP: (N_EXPERT, N_FF_EXP, N_EMBD),
    MODEL_TENSOR.FFN_UP_EXP: (N_EXPERT, N_FF_EXP, N_EMBD),
    MODEL_TENSOR.FFN_DOWN_EXP: (N_EXPERT, N_EMBD, N_FF_EXP),
}


def write_tiny_qwen3moe(path: Path) -> dict[str, np.ndarray]:
    """A minimal F32 qwen3moe GGUF that llama_model_quantize accepts; returns its tensors."""
    arch = MODEL_ARCH.QWEN3MOE
    tensors: dict[str, np.ndarray] = {}
    rng = np.random.default_rng(7)
    for kind in MODEL_TENSORS[arch]:
        blocks = range(N_LAYER) if "{bid}" in TENSOR_NAMES[kind] else [None]
        for bid in blocks:
            name = TENSOR_NAMES[kind].format(bid=bid) + ".weight"
            w = rng.standard_normal(SHAPES[kind], dtype=np.float32)
            if kind == MODEL_TENSOR.FFN_DOWN_EXP:
                w[1] *= 100.0  # experts of very different scale: slices must not share state
            tensors[name] = w * 0.05
    writer = gguf.GGUFWriter(path, gguf.MODEL_ARCH_NAMES[arch])
    writer.add_context_length(128)
    writer.add_embedding_length(N_EMBD)
    writer.add_block_count(N_LAYER)
    writer.add_feed_forward_length(N_FF_EXP)
    writer.add_head_count(N_HEAD)
    writer.add_head_count_kv(N_HEAD_KV)
    writer.add_key_length(HEAD_DIM)
    writer.add_value_length(HEAD_DIM)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    writer.add_expert_count(N_EXPERT)
    writer.add_expert_used_count(2)
    writer.add_expert_feed_forward_length(N_FF_EXP)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32)
    for name, w in tensors.items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return tensors


def llama_quantize(src: Path, dst: Path, overrides: dict[str, str],
                   imatrix: dict[str, np.ndarray] | None = None) -> None:
    """llama.cpp's quantizer with per-tensor overrides on top of a Q8_0 default."""
    run_llama_quantize(src, dst, "Q8_0", overrides, imatrix, threads=2)


def ours(w: np.ndarray, type_name: str, imatrix: np.ndarray | None) -> np.ndarray:
    if w.ndim == 1:  # norms: copied as F32
        return q.quantize_rows(w[None], type_name)
    if w.ndim == 3:
        return q.quantize_expert_slices(w, type_name, imatrix)
    return q.quantize_rows(w, type_name, imatrix)


def expected_type(name: str, overrides: dict[str, str]) -> str:
    """The type llama.cpp should pick: first matching override, like its regex_search."""
    return next((t for pat, t in overrides.items() if re.search(pat, name)), "F32")


def assert_identical(path: Path, tensors: dict[str, np.ndarray], overrides: dict[str, str],
                     imatrix: dict[str, np.ndarray] | None = None) -> None:
    reader = gguf.GGUFReader(path)
    assert {t.name for t in reader.tensors} == set(tensors)
    seen = set()
    for t in reader.tensors:
        want = expected_type(t.name, overrides)
        assert t.tensor_type.name == want, f"{t.name}: llama.cpp chose {t.tensor_type.name}"
        mine = ours(tensors[t.name], want, (imatrix or {}).get(t.name))
        theirs = np.asarray(t.data).view(np.uint8).reshape(-1)
        assert mine.tobytes() == theirs.tobytes(), f"{t.name} ({want}) differs from llama.cpp"
        seen.add(want)
    assert seen >= set(overrides.values())


def test_byte_identical_to_llama_model_quantize(tmp_path: Path) -> None:
    src, dst = tmp_path / "f32.gguf", tmp_path / "mixed.gguf"
    tensors = write_tiny_qwen3moe(src)
    overrides = {
        r"ffn_down_exps\.weight$": "Q4_K", r"ffn_gate_exps\.weight$": "Q2_K",
        r"ffn_up_exps\.weight$": "Q3_K", r"attn_q\.weight$": "Q6_K",
        r"attn_k\.weight$": "IQ3_S", r"attn_v\.weight$": "Q5_0",
        r"attn_output\.weight$": "BF16", r"^token_embd\.weight$": "IQ4_XS",
        r"^output\.weight$": "Q8_0",
    }
    llama_quantize(src, dst, overrides)
    assert_identical(dst, tensors, overrides)


IMATRIX_CASES = [
    {
        r"ffn_down_exps\.weight$": "Q2_K", r"ffn_gate_exps\.weight$": "IQ2_XXS",
        r"ffn_up_exps\.weight$": "Q4_K", r"attn_q\.weight$": "IQ3_XXS",
        r"attn_k\.weight$": "IQ3_S", r"attn_v\.weight$": "Q4_0",
        r"attn_output\.weight$": "IQ4_XS", r"^token_embd\.weight$": "Q5_K",
        r"^output\.weight$": "Q6_K",
    },
    pytest.param({
        r"ffn_down_exps\.weight$": "IQ2_XS", r"ffn_gate_exps\.weight$": "IQ1_S",
        r"ffn_up_exps\.weight$": "IQ1_M", r"attn_q\.weight$": "IQ2_S",
        r"attn_k\.weight$": "IQ2_XXS", r"attn_v\.weight$": "Q5_1",
        r"attn_output\.weight$": "Q4_1", r"^token_embd\.weight$": "F16",
        r"^output\.weight$": "Q3_K",
    }, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("overrides", IMATRIX_CASES)
def test_byte_identical_with_imatrix(tmp_path: Path, overrides: dict[str, str]) -> None:
    src, dst = tmp_path / "f32.gguf", tmp_path / "iq.gguf"
    tensors = write_tiny_qwen3moe(src)
    # one imatrix row per expert (llama.cpp's layout: ne0 * n_expert floats); token_embd gets
    # none, as llama-imatrix never collects one for it
    imatrix: dict[str, np.ndarray] = {}
    for i, (name, w) in enumerate(tensors.items()):
        if w.ndim > 1 and not name.startswith("token_embd"):
            rows = [positive(w.shape[-1], seed=100 + 8 * i + e) for e in range(N_EXPERT)]
            imatrix[name] = np.stack(rows) if w.ndim == 3 else rows[0]
    llama_quantize(src, dst, overrides, imatrix)
    assert_identical(dst, tensors, overrides, imatrix)
