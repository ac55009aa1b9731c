"""llama.cpp's AMX kernels crash decode (llama.cpp issue 20824): every model edgemoe opens
avoids them, and a crash in native code is a message, not a bare "Segmentation fault"."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from edgemoe import llamacpp
from edgemoe.runtime.memory import model_buffer_types
from edgemoe.runtime.model import load
from edgemoe.supervise import CRASH_EXIT
from tests.conftest import ROOT, build_qwen3_moe

AMX = "AMX_INT8" in llamacpp.cpu_features()
LIBRARY = [ROOT / "edgemoe", ROOT / "export", ROOT / "memory_planner"]


def test_extra_buffer_types_are_off_exactly_where_amx_is_built_in(monkeypatch):
    monkeypatch.delenv(llamacpp.EXTRA_BUFTS_ENV, raising=False)
    assert llamacpp.use_extra_bufts() is (not AMX)
    assert llamacpp.server_flags() == (["--no-repack"] if AMX else [])
    assert llamacpp.model_params().use_extra_bufts is (not AMX)
    for forced in (True, False):
        monkeypatch.setenv(llamacpp.EXTRA_BUFTS_ENV, str(int(forced)))
        assert llamacpp.model_params(vocab_only=True).use_extra_bufts is forced


def test_llama_cpp_models_are_opened_in_one_place():
    """A new way of opening a model that skipped the load policy would crash on AMX hosts."""
    opener = re.compile(r"\b(Llama|LlamaModel)\(|llama_model_load_from_file|"
                        r"llama_model_default_params\(")
    offenders = [f"{p.relative_to(ROOT)}:{i}" for d in LIBRARY for p in d.rglob("*.py")
                 if p.name != "llamacpp.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if opener.search(line)]
    assert offenders == []


def test_every_opener_gets_the_load_policy(ggufs, monkeypatch):
    """open_llama, runtime.load (run, chat, validate) and the hooked contexts of calibration
    and top-any all load through edgemoe.llamacpp; no weight lands in an AMX buffer."""
    from edgemoe.calibration.hooks import EvalHooks, attach

    monkeypatch.delenv(llamacpp.EXTRA_BUFTS_ENV, raising=False)
    path = ggufs["qwen3_q8"]
    opened = [llamacpp.open_llama(path, n_ctx=64, threads=1),
              load(path, n_ctx=64, threads=1, top_any=0),
              load(path, n_ctx=64, threads=1, top_any=0.5),
              attach(llamacpp.open_llama(path, n_ctx=64, threads=1), EvalHooks())]
    for llm in opened:
        assert llm.model_params.use_extra_bufts is (not AMX)
        llm.eval([1, 2, 3])
        assert "AMX" not in model_buffer_types(llm)
        llm.close()


@pytest.fixture(scope="module")
def sixteen_expert_exports(tmp_path_factory, bpe_tokenizer_dir):
    """Q8_0, Q4_K and Q6_K exports of a 16-expert qwen3_moe: the files that crashed."""
    from edgemoe.pipeline import export, make_budget, open_model
    from memory_planner import uniform_plan

    d = tmp_path_factory.mktemp("q16")
    model = open_model(build_qwen3_moe(d / "hf", bpe_tokenizer_dir, n_experts=16))
    budget = make_budget(model.adapter, "1GB", 512)
    return {t: export(model, uniform_plan(model.specs, t, budget), d / f"{t}.gguf",
                      progress=False) for t in ("Q8_0", "Q4_K", "Q6_K")}


@pytest.mark.slow
@pytest.mark.skipif(not AMX, reason="this CPU (or this llama.cpp build) has no AMX kernels: "
                    "the crash they cause cannot happen here")
@pytest.mark.parametrize("qtype", ["Q8_0", "Q4_K", "Q6_K"])
def test_quantized_16_expert_model_validates_on_amx(sixteen_expert_exports, qtype):
    """Without the workaround, decoding these files dies with SIGSEGV or SIGILL here."""
    env = {k: v for k, v in os.environ.items() if k != llamacpp.EXTRA_BUFTS_ENV}
    r = subprocess.run([sys.executable, "-m", "edgemoe.supervise", "validate",
                        str(sixteen_expert_exports[qtype]), "--ctx", "512", "--threads", "2"],
                       capture_output=True, text=True, env=env, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "decode" in r.stdout


def test_a_native_crash_is_a_message_and_exit_code(tmp_path):
    """The supervisor turns a child killed by SIGSEGV into one line and exit code 3."""
    (tmp_path / "crashes.py").write_text("import ctypes\nctypes.string_at(0)\n")
    code = ("import sys; from edgemoe import supervise; "
            "sys.exit(supervise.run(['export', 'x'], module='crashes'))")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path), str(ROOT)])}
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert r.returncode == CRASH_EXIT
    err = r.stderr.strip().splitlines()
    assert len(err) == 1 and "`edgemoe export` crashed (SIGSEGV)" in err[0]
    assert "Traceback" not in r.stderr and "Fatal Python error" not in r.stderr

