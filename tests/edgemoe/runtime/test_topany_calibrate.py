"""Top-any thresholds calibrated in llama.cpp for a share of activations or a damage budget."""

from __future__ import annotations

import json

import pytest

from edgemoe.llamacpp import tokenize
from edgemoe.runtime.topany_calibrate import calibrate
from edgemoe.runtime.topany_metadata import parse_spec
from tests.helpers import TEXT


def test_calibration_hits_a_share_and_a_damage_budget(ggufs, tmp_path):
    path = ggufs["qwen3"]
    tokens = tokenize(path, TEXT, 512)
    grid = [0, 0.2, 0.4, 0.6, 0.8]
    cal = calibrate(path, tokens, share=0.25, n_ctx=128, grid=grid, threads=1, progress=False)
    assert cal.removed_share == pytest.approx(0.25, abs=0.03)
    assert cal.kld_mean > 0 and cal.ppl != cal.ppl_base
    uni = calibrate(path, tokens, share=0.25, n_ctx=128, method="uniform", threads=1,
                    progress=False)
    assert uni.removed_share == pytest.approx(0.25, abs=0.03)
    assert len(set(uni.thresholds)) == 1
    budget = calibrate(path, tokens, max_ppl_increase=0.01, n_ctx=128, method="uniform",
                       threads=1, progress=False)
    assert budget.ppl_increase <= 0.01 and budget.removed_share > 0
    cal.save(tmp_path / "cal.json")
    assert json.loads((tmp_path / "cal.json").read_text())["thresholds"] == list(cal.thresholds)
    assert parse_spec(str(tmp_path / "cal.json"), 2, None).tolist() == pytest.approx(
        list(cal.thresholds))
