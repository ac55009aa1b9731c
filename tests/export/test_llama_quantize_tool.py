"""Our stats files in llama.cpp's real `llama-quantize`.

The program is built from the installed llama-cpp-python's own sources (tests/llama_tools.py),
so its imatrix reader (common/imatrix-loader.cpp and quantize.cpp's load_imatrix) is the one
users run, not a Python copy of it. What it writes with our stats must be, tensor for tensor
and byte for byte, what `edgemoe export --search 0` writes with the same stats and types; with
the output-error search (the default), each row's output error is at most llama-quantize's.
"""

from __future__ import annotations

import os
import subprocess
from dataclasses import dataclass, replace
from pathlib import Path

import gguf
import numpy as np
import pytest

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.calibration.collect import calibrate
from edgemoe.cli import main
from export.imatrix import read_stats, write_legacy, write_stats
from export.search import output_error
from memory_planner.stats import CalibStats
from tests.helpers import PROMPT
from tests.llama_tools import llama_quantize_path

N_CTX = 64
PLAN_CTX = 256
# written by quantize.cpp into the model it makes (not in gguf-py's tables)
KV_IMATRIX_ENTRIES = "quantize.imatrix.entries_count"
KV_IMATRIX_CHUNKS = "quantize.imatrix.chunks_count"
KV_IMATRIX_DATASET = "quantize.imatrix.dataset"


@dataclass(frozen=True)
class Calibrated:
    model: pipeline.Model
    stats: CalibStats  # as the calibration run returned it
    gguf_stats: Path  # written by write_stats
    dat_stats: Path  # written by write_legacy
    f32: Path  # the model as an F32 GGUF, llama-quantize's input


@pytest.fixture(scope="module")
def tool() -> Path:
    """The real llama-quantize (built on first use, then cached on disk)."""
    return llama_quantize_path()


@pytest.fixture(scope="module")
def calibrated(qwen3_dir, tmp_path_factory) -> Calibrated:
    d = tmp_path_factory.mktemp("llama-quantize")
    text = d / "calib.txt"
    text.write_text(PROMPT * 12)
    stats = calibrate(str(qwen3_dir), text=str(text), n_ctx=N_CTX, calib_type="F32",
                      progress=False)
    model = pipeline.open_model(qwen3_dir)
    f32 = pipeline.export(model, mp.uniform_plan(model.specs, "F32", mp.Budget(2**62)),
                          d / "model-F32.gguf", progress=False)
    return Calibrated(model, stats, write_stats(stats, d / "ours.imatrix", chunk_size=N_CTX),
                      write_legacy(stats, d / "ours.dat"), f32)


@pytest.fixture(scope="module")
def iq2_from_gguf_stats(tool, calibrated, tmp_path_factory):
    """`llama-quantize --imatrix ours.imatrix model-F32.gguf out.gguf IQ2_XXS`: path, log."""
    out = tmp_path_factory.mktemp("iq2") / "iq2.gguf"
    return out, run(tool, "--imatrix", calibrated.gguf_stats, calibrated.f32, out, "IQ2_XXS", 2)


def run(tool: Path, *args) -> str:
    r = subprocess.run([str(tool), *map(str, args)], capture_output=True, text=True)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"llama-quantize exited with {r.returncode}:\n{log[-4000:]}"
    return log


def assert_loaded(log: str, stats_file: Path, n_entries: int, n_chunks: int) -> None:
    """llama-quantize's own account of the imatrix: every matrix, none of our extras."""
    assert (f"loaded {n_entries} importance matrix entries from {stats_file} computed on "
            f"{n_chunks} chunks") in log, log[-4000:]
    assert f"have {n_entries} importance matrix entries" in log


def assert_same_as_edgemoe(theirs: Path, c: Calibrated, stats: CalibStats, out: Path) -> None:
    """edgemoe's export with `stats`, no output-error search and, per tensor, the type
    llama-quantize chose gives the same bytes as llama-quantize."""
    types = {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs).tensors}
    by_type = {ty: mp.uniform_plan(c.model.specs, ty, mp.Budget(2**62)).by_name()
               for ty in set(types.values())}
    plan = mp.uniform_plan(c.model.specs, "F32", mp.Budget(2**62))
    plan = replace(plan, tensors=tuple(by_type[types[t.name]][t.name] for t in plan.tensors))
    assert_same_tensors(theirs, pipeline.export(c.model, plan, out, stats=stats, progress=False,
                                                search=0))


def assert_same_tensors(theirs: Path, ours: Path) -> None:
    a = {t.name: t for t in gguf.GGUFReader(theirs).tensors}
    b = {t.name: t for t in gguf.GGUFReader(ours).tensors}
    assert set(a) == set(b)
    for name, t in a.items():
        assert t.tensor_type == b[name].tensor_type, name
        assert list(t.shape) == list(b[name].shape), name
        assert t.data.tobytes() == b[name].data.tobytes(), f"{name} ({t.tensor_type.name})"


def test_gguf_stats_drive_the_real_llama_quantize(calibrated, iq2_from_gguf_stats, tmp_path):
    c = calibrated
    out, log = iq2_from_gguf_stats
    n_chunks = c.stats.n_tokens // N_CTX
    assert_loaded(log, c.gguf_stats, len(c.stats.in_sum2), n_chunks)
    r = gguf.GGUFReader(out)
    assert r.get_field(KV_IMATRIX_ENTRIES).contents() == len(c.stats.in_sum2)
    assert r.get_field(KV_IMATRIX_CHUNKS).contents() == n_chunks
    assert r.get_field(KV_IMATRIX_DATASET).contents() == "calib.txt"
    types = {t.tensor_type.name for t in r.tensors}
    assert "IQ2_XXS" in types  # a type that cannot be made without an imatrix
    # the file, read back, is what `edgemoe export --stats` uses
    assert_same_as_edgemoe(out, c, read_stats(c.gguf_stats), tmp_path / "ours.gguf")


def test_legacy_dat_stats_drive_the_real_llama_quantize(tool, calibrated, tmp_path):
    c = calibrated
    out = tmp_path / "iq2.gguf"
    log = run(tool, "--imatrix", c.dat_stats, c.f32, out, "IQ2_XXS", 2)
    assert_loaded(log, c.dat_stats, len(c.stats.in_sum2), 1)
    assert_same_as_edgemoe(out, c, read_stats(c.dat_stats), tmp_path / "ours.gguf")


def test_calibration_run_quantizes_as_its_stats_file(calibrated, iq2_from_gguf_stats, tmp_path):
    out, _ = iq2_from_gguf_stats
    assert_same_as_edgemoe(out, calibrated, calibrated.stats, tmp_path / "ours.gguf")


def test_searched_export_has_less_output_error_than_llama_quantize(calibrated,
                                                                  iq2_from_gguf_stats, tmp_path):
    """The default export (the better of two candidates per row, by output error under the
    measured input covariance) writes the same types and sizes as llama-quantize, and per
    row never more output error; in total clearly less."""
    c = calibrated
    out, _ = iq2_from_gguf_stats
    stats = read_stats(c.gguf_stats)
    assert stats.in_cov, "calibration kept no input covariances"
    theirs = {t.name: t for t in gguf.GGUFReader(out).tensors}
    plan = mp.uniform_plan(c.model.specs, "F32", mp.Budget(2**62))
    plan = replace(plan, tensors=tuple(
        mp.uniform_plan(c.model.specs, theirs[t.name].tensor_type.name, mp.Budget(2**62))
        .by_name()[t.name] for t in plan.tensors))
    ours = {t.name: t for t in gguf.GGUFReader(pipeline.export(
        c.model, plan, tmp_path / "searched.gguf", stats=stats, progress=False)).tensors}
    weights = {t.name: t.data for t in gguf.GGUFReader(c.f32).tensors}
    searched, ratios = 0, []
    for name, t in theirs.items():
        assert ours[name].tensor_type == t.tensor_type and ours[name].n_bytes == t.n_bytes
        cov = stats.covariance(name)
        if cov is None or t.tensor_type.name in ("F32", "F16"):
            continue
        searched += 1
        w = weights[name].reshape(len(cov), -1, weights[name].shape[-1])
        raw_t = t.data.reshape(len(cov), w.shape[1], -1)
        raw_o = ours[name].data.reshape(len(cov), w.shape[1], -1)
        err_t = [output_error(w[m], raw_t[m], t.tensor_type.name, cov[m]) for m in range(len(w))]
        err_o = [output_error(w[m], raw_o[m], t.tensor_type.name, cov[m]) for m in range(len(w))]
        for a, b in zip(err_o, err_t):
            assert (a <= b * (1 + 1e-6)).all(), name
        ratios.append(sum(a.sum() for a in err_o) / sum(b.sum() for b in err_t))
    assert searched >= 10
    assert max(ratios) < 0.97 and float(np.mean(ratios)) < 0.9, ratios


def run_printed(shown: str, tool: Path, cwd: Path) -> tuple[str, str]:
    """Run the llama-quantize command `edgemoe plan` printed, verbatim, in `cwd` (which must
    hold model-F32.gguf); the command and the tool's log."""
    cmd = shown.split("the same types with llama.cpp's own tool:\n", 1)[1].split("\n\n")[0]
    env = {**os.environ, "PATH": f"{tool.parent}{os.pathsep}{os.environ['PATH']}"}
    r = subprocess.run(["bash", "-c", cmd], cwd=cwd, env=env, capture_output=True, text=True)
    log = r.stdout + r.stderr
    assert r.returncode == 0, f"{cmd}\nexited with {r.returncode}:\n{log[-4000:]}"
    return cmd, log


def test_plan_prints_a_command_that_runs_as_printed(tool, calibrated, qwen3_dir, tmp_path,
                                                    capsys):
    """`edgemoe plan` prints a llama-quantize command; run verbatim (with the F32 model as
    model-F32.gguf in the working directory) it makes what `edgemoe export --search 0` makes
    of the plan."""
    c = calibrated
    # room for the model at 2.5 bits per weight (all IQ2_S): the plan mixes types, among
    # them some that need an imatrix
    budget = pipeline.make_budget(c.model.adapter, 0, PLAN_CTX)
    weights = mp.uniform_plan(c.model.specs, "IQ2_S", mp.Budget(2**62)).weight_bytes
    flags = ["--memory", str(weights + budget.runtime_bytes),
             "--ctx", str(PLAN_CTX), "--stats", str(c.gguf_stats), "--no-prune"]
    assert main(["plan", str(qwen3_dir), *flags, "-o", str(tmp_path / "plan.json")]) == 0
    plan = mp.MemoryPlan.load(tmp_path / "plan.json")
    planned = {t.name: t.type for t in plan.tensors}
    assert len(set(planned.values()) - {"F32"}) > 1, planned
    assert set(planned.values()) & mp.quant_types.REQUIRES_IMATRIX, planned

    (tmp_path / "model-F32.gguf").symlink_to(c.f32)
    cmd, log = run_printed(capsys.readouterr().out, tool, tmp_path)
    assert cmd.startswith(f"llama-quantize --imatrix {c.gguf_stats} \\\n")
    assert_loaded(log, c.gguf_stats, len(c.stats.in_sum2), c.stats.n_tokens // N_CTX)
    theirs = tmp_path / "model-out.gguf"
    assert {t.name: t.tensor_type.name for t in gguf.GGUFReader(theirs).tensors} == planned

    # `edgemoe export --search 0` with these flags: the same plan, then this
    ours = pipeline.export(c.model, plan, tmp_path / "ours.gguf", stats=read_stats(c.gguf_stats),
                           progress=False, search=0)
    assert_same_tensors(theirs, ours)


def test_all_f32_plan_prints_a_command_that_runs(tool, calibrated, qwen3_dir, tmp_path, capsys):
    assert main(["plan", str(qwen3_dir), "--memory", "1GB", "--type", "F32"]) == 0
    (tmp_path / "model-F32.gguf").symlink_to(calibrated.f32)
    run_printed(capsys.readouterr().out, tool, tmp_path)
    assert_same_tensors(tmp_path / "model-out.gguf", calibrated.f32)
