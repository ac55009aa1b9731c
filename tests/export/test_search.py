"""The output-error search (export/search.py): never worse than ggml's bytes, better in total,
independent of how rows are split, GPTQ on ggml's grid."""

from __future__ import annotations

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES

from export import ggml, search
from export import quantize as q
from memory_planner.quant_types import qtype
from tests.export.test_quantize import HEAVY_INIT, gaussian, positive


def correlated_cov(n: int, seed: int = 2) -> np.ndarray:
    """A (n // 256 or 1, B, B) block covariance with strong correlations between columns."""
    b = search.cov_block(n)
    a = np.random.default_rng(seed).standard_normal((n // b, b, b // 4))
    return (a @ a.transpose(0, 2, 1) / b + 0.05 * np.eye(b)).astype(np.float32)


def test_output_error_is_the_blockwise_quadratic_form() -> None:
    w, cov = gaussian(8, 512), correlated_cov(512)
    raw = q.quantize_rows(w, "Q4_K")
    e = (q.dequantize(raw, "Q4_K", w.shape) - w).astype(np.float64).reshape(8, 2, 256)
    want = sum(np.einsum("ri,ij,rj->r", e[:, k], cov[k].astype(np.float64), e[:, k])
               for k in range(2))
    np.testing.assert_allclose(search.output_error(w, raw, "Q4_K", cov), want, rtol=1e-5)  # float32


# GPTQ on ggml's grid (Q*_K, IQ4_XS), the target shift (IQ lattices), rows spanning two
# covariance blocks (Q8_0's 32-blocks are searched as whole rows)
SEARCHED = ["Q4_K", "Q2_K", "Q3_K", "IQ4_XS", "IQ3_S", "IQ2_XXS", "Q8_0"]
SEARCHES = [{}, {"tries": 3}, {"select": 0.0}, {"strategy": "shift", "select": 0.0},
            {"tries": 4, "strategy": "weightings"}]


@pytest.mark.parametrize("type_name", SEARCHED)
def test_search_never_loses_to_ggml_and_wins_in_total(type_name: str) -> None:
    w, im, cov = gaussian(64, 512), positive(512), correlated_cov(512)
    plain = q.quantize_rows(w, type_name, im)
    e_plain = search.output_error(w, plain, type_name, cov)
    for kw in SEARCHES:
        searched = search.quantize_rows_searched(w, type_name, im, cov, **kw)
        assert searched.shape == plain.shape
        e_search = search.output_error(w, searched, type_name, cov)
        assert (e_search <= e_plain).all(), kw
        if kw.get("strategy") == "weightings":  # Q8_0 ignores the weightings
            continue
        # every row searched: clearly less in total; the default searches some rows only
        bound = 0.9 if kw.get("select") == 0.0 or kw.get("tries", 2) > 2 else 0.98
        assert e_search.sum() < bound * e_plain.sum(), kw
    # search 0 and 1 are ggml's own quantization
    for tries in (0, 1):
        np.testing.assert_array_equal(
            search.quantize_rows_searched(w, type_name, im, cov, tries=tries), plain)


@pytest.mark.parametrize("type_name", ["Q4_K", "Q3_K", "IQ4_XS"])
def test_gptq_on_the_grid_beats_sixteen_weightings(type_name: str) -> None:
    """On the scalar types one second candidate (GPTQ's rounding on the grid ggml chose,
    written into ggml's blocks) removes more output error than 16 weightings did."""
    w, im, cov = gaussian(64, 512), positive(512), correlated_cov(512)
    plain, gptq, old = (search.output_error(w, raw, type_name, cov).sum() for raw in (
        q.quantize_rows(w, type_name, im),
        search.quantize_rows_searched(w, type_name, im, cov, select=0.0),
        search.quantize_rows_searched(w, type_name, im, cov, 16, strategy="weightings")))
    assert gptq < 0.6 * plain and gptq < 0.8 * old


@pytest.mark.parametrize("type_name,kw", [("IQ3_S", {}), ("Q4_K", {}), ("Q4_K", {"tries": 3}),
                                          ("Q8_0", {"tries": 3}), ("IQ2_XXS", {"select": 0})])
def test_search_bytes_do_not_depend_on_the_row_split(type_name: str, kw: dict) -> None:
    w, im, cov = gaussian(40, 512), positive(512), correlated_cov(512)
    whole = search.quantize_rows_searched(w, type_name, im, cov, **kw)
    parts = np.concatenate([search.quantize_rows_searched(w[a:b], type_name, im, cov, **kw)
                            for a, b in ((0, 1), (1, 17), (17, 40))])
    np.testing.assert_array_equal(whole, parts)
    np.testing.assert_array_equal(whole, search.quantize_rows_searched(w, type_name, im, cov, **kw))


def test_search_strategy_is_checked() -> None:
    w, cov = gaussian(4, 256), correlated_cov(256)
    with pytest.raises(ValueError, match="unknown search strategy"):
        search.quantize_rows_searched(w, "Q4_K", None, cov, strategy="random")


@pytest.mark.parametrize("types", [
    sorted(t for t in ggml.QUANTIZABLE if GGML_QUANT_SIZES[qtype(t)][0] == 256
           and t not in HEAVY_INIT),
    pytest.param(HEAVY_INIT, marks=pytest.mark.slow),
])
def test_super_blocks_are_quantized_independently(types: list[str]) -> None:
    """The search picks super-blocks one by one: ggml's choices for one must not depend on
    the rest of the row."""
    w, im = gaussian(4, 1024), positive(1024)
    for t in types:
        parts = [q.quantize_rows(np.ascontiguousarray(w[:, k:k + 256]), t, im[k:k + 256])
                 .reshape(4, -1) for k in range(0, 1024, 256)]
        np.testing.assert_array_equal(q.quantize_rows(w, t, im).reshape(4, -1),
                                      np.concatenate(parts, axis=1), err_msg=t)


@pytest.mark.parametrize("type_name", sorted(search._GRIDS))
def test_grid_holds_what_ggml_wrote(type_name: str) -> None:
    """The byte layouts the search reads the grid from: each value of a quantized block is
    offset + step * one of the type's levels."""
    w = gaussian(16, 256) * np.linspace(0.1, 3, 256, dtype=np.float32)
    raw = q.quantize_rows(w, type_name, positive(256)).reshape(16, -1)
    offset, step = search._grid(raw, type_name)
    levels = search._GRIDS[type_name].levels
    values = q.dequantize(raw, type_name, w.shape).astype(np.float64)
    assert (step != 0).mean() > 0.9
    z = np.divide(values - offset, step, out=np.zeros_like(step), where=step != 0)
    assert np.abs(z[..., None] - levels).min(-1).max() < 1e-3
    np.testing.assert_allclose(values[step == 0], offset[step == 0], atol=1e-7)


def test_ldl_feedback_factors_the_dampened_covariance() -> None:
    cov = correlated_cov(256)[0].astype(np.float64)
    order, f = search._ldl_feedback(cov)
    assert np.array_equal(f, np.triu(f, 1))
    h = cov[np.ix_(order, order)] + search._GPTQ_DAMP * np.diagonal(cov).mean() * np.eye(256)
    m = np.linalg.inv(np.eye(256) + f)
    d = m @ h @ m.T
    np.testing.assert_allclose(d, np.diag(np.diagonal(d)), atol=1e-9 * np.abs(d).max())
    assert search._ldl_feedback(np.zeros((256, 256))) is None


def test_ldlq_rounds_as_gptq(monkeypatch: pytest.MonkeyPatch) -> None:
    """One column at a time, the grid rounding is GPTQ's (Frantar et al. 2022, Algorithm 1
    with H^-1's Cholesky factor), written here the textbook way."""
    monkeypatch.setattr(search, "_GPTQ_GROUP", 1)
    cov = correlated_cov(256)[0].astype(np.float64)
    w = gaussian(8, 256).astype(np.float64)
    offset, step = np.full_like(w, -2.0), np.full_like(w, 0.5)
    levels = np.arange(8.0)
    order, f = search._ldl_feedback(cov)
    got, codes = search._ldlq(w, offset, step, levels, (order, f))

    h = cov[np.ix_(order, order)] + search._GPTQ_DAMP * np.diagonal(cov).mean() * np.eye(256)
    u = np.linalg.cholesky(np.linalg.inv(h)).T  # upper: H^-1 = U^T U
    x, want = w[:, order].copy(), np.empty_like(w)
    for k in range(256):
        qk = -2.0 + 0.5 * np.clip(np.rint((x[:, k] + 2.0) / 0.5), 0, 7)
        want[:, order[k]] = qk
        x[:, k:] -= np.outer((x[:, k] - qk) / u[k, k], u[k, k:])
    np.testing.assert_allclose(got, want, atol=1e-9)
    np.testing.assert_array_equal(codes, np.rint((want + 2.0) / 0.5))  # the level indices


@pytest.mark.parametrize("type_name", sorted(search._GRIDS))
def test_codes_written_into_ggml_blocks_are_read_back_by_ggml(type_name: str) -> None:
    """GPTQ's codes go into the blocks ggml wrote (its scales kept): ggml's dequantizer
    reads back offset + step * levels[code] for every weight, whatever the codes."""
    w = gaussian(32, 256) * np.linspace(0.1, 3, 256, dtype=np.float32)
    raw = q.quantize_rows(w, type_name, positive(256)).reshape(32, -1)
    offset, step = search._grid(raw, type_name)
    levels = search._GRIDS[type_name].levels
    codes = np.random.default_rng(3).integers(0, len(levels), (32, 256)).astype(np.uint8)
    packed = search._pack(raw, codes, type_name)
    values = q.dequantize(packed, type_name, w.shape).astype(np.float64)
    np.testing.assert_allclose(values, offset + step * levels[codes], rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(search._grid(packed, type_name)[1], step)  # scales kept
    # ggml's own codes written back give ggml's own bytes (rows where every code counts)
    full = (step != 0).all(axis=1)
    assert full.sum() >= 8
    own = np.divide(q.dequantize(raw, type_name, w.shape) - offset, step,
                    out=np.zeros_like(step), where=step != 0)
    own = np.abs(own[..., None] - levels).argmin(-1).astype(np.uint8)
    np.testing.assert_array_equal(search._pack(raw[full], own[full], type_name), raw[full])


def test_scaled_correlation_keeps_the_correlations_and_takes_the_imatrix() -> None:
    cov, im = correlated_cov(512), positive(512)
    c = search.scaled_correlation(cov, im)
    np.testing.assert_allclose(np.diagonal(c, axis1=1, axis2=2).reshape(-1), im, rtol=1e-5)

    def corr(m):
        d = np.sqrt(np.diagonal(m, axis1=1, axis2=2))
        return m / d[:, :, None] / d[:, None, :]

    np.testing.assert_allclose(corr(c.astype(np.float64)), corr(cov.astype(np.float64)),
                               atol=1e-5)


def test_search_checks_the_covariance_shape() -> None:
    with pytest.raises(q.QuantizeError, match="covariance shape"):
        search.quantize_rows_searched(gaussian(4, 512), "Q4_K", None, correlated_cov(256))
    assert search.cov_block(7168) == 256 and search.cov_block(64) == 64
    assert search.cov_block(300) is None


