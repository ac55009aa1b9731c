"""Log-probabilities and KL divergence worked out in blocks of rows equal the whole-array
formulas to the bit (the probes' scales and validate's numbers rest on them)."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe.calibration.perturb import kld
from edgemoe.runtime.textscore import ROWS, log_softmax


def _whole_log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


@pytest.mark.parametrize("rows, vocab", [(1, 7), (ROWS - 1, 1000), (3 * ROWS + 5, 4096)])
def test_log_softmax_and_kld_in_blocks_equal_the_whole_array_formulas(rows, vocab):
    rng = np.random.default_rng(rows)
    a = (4 * rng.standard_normal((rows, vocab))).astype(np.float32)
    b = a + (0.3 * rng.standard_normal((rows, vocab))).astype(np.float32)
    la, lb = log_softmax(a), log_softmax(b)
    assert la.dtype == np.float32 and np.array_equal(la, _whole_log_softmax(a))
    assert np.array_equal(log_softmax(a[0]), la[0])  # one row alone
    whole = sum(float((np.exp(r.astype(np.float64)) * (r.astype(np.float64) - c)).sum())
                for r, c in ((la, lb), (lb, la))) / (2 * rows)
    assert kld([la, lb], [lb, la]) == whole > 0
    assert kld([la], [la]) == 0.0
