"""llama.cpp's real `llama-imatrix`, built from the installed llama-cpp-python's sdist
(tests/llama_tools.py), on a tiny model: it runs, edgemoe reads its file, and over the same
tokens its importance matrices are edgemoe's calibration's (benchmarks/scale.py puts the two
side by side at scale, so they must be doing the same job).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import numpy as np
import pytest

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.calibration.collect import calibrate
from edgemoe.llamacpp import tokenize, use_extra_bufts
from export.imatrix import read_stats
from tests.helpers import PROMPT
from tests.llama_tools import llama_imatrix_path

N_CTX = 64


@pytest.fixture(scope="module")
def tool() -> Path:
    return llama_imatrix_path()


def test_llama_imatrix_measures_what_edgemoe_calibration_measures(tool, qwen3_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 24)
    model = pipeline.open_model(qwen3_dir)
    f32 = pipeline.export(model, mp.uniform_plan(model.specs, "F32", mp.Budget(2**62)),
                          tmp_path / "model-F32.gguf", progress=False)
    n_chunks = len(tokenize(f32, text.read_text())) // N_CTX
    assert n_chunks >= 2
    out = tmp_path / "llama.imatrix"
    cmd = [str(tool), "-m", str(f32), "-f", str(text), "-c", str(N_CTX), "-b", str(N_CTX),
           "--chunks", str(n_chunks), "--no-ppl", "--process-output", "-t", "2",
           *([] if use_extra_bufts() else ["--no-repack"]), "-o", str(out)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"llama-imatrix exited with {r.returncode}:\n{log[-4000:]}"
    assert f"computing over {n_chunks} chunks, n_ctx={N_CTX}" in log, log[-4000:]

    theirs = read_stats(out)
    ours = calibrate(str(qwen3_dir), text=str(text), n_ctx=N_CTX, max_tokens=n_chunks * N_CTX,
                     calib_type="F32", progress=False)
    assert theirs.n_tokens == ours.n_tokens == n_chunks * N_CTX
    # llama.cpp also measures the router's input (never quantized): edgemoe skips it
    extra = set(theirs.in_sum2) - set(ours.in_sum2)
    assert all(".ffn_gate_inp." in n for n in extra), extra
    assert set(ours.in_sum2) <= set(theirs.in_sum2)
    assert any("_exps" in n for n in ours.in_sum2)
    for name, ours_sum in ours.in_sum2.items():
        np.testing.assert_array_equal(theirs.counts[name], ours.counts[name], err_msg=name)
        np.testing.assert_allclose(theirs.in_sum2[name], ours_sum, rtol=2e-3, atol=1e-6,
                                   err_msg=name)
