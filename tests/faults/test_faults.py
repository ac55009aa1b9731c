"""The fault battery: damaged inputs, hostile files, impossible requests, interruptions.

Every case runs the real `edgemoe` command (the supervisor and its child) and must end with
one line on stderr that names the file and the problem (no traceback), exit code 2 for bad
input, 1 for a failed check, 3 for a crash in native code, 128 + signal when stopped;
nothing at the output path, no stray `.part` unless kept on purpose to resume, and the
source byte-for-byte unchanged. BENCHMARKS.md ("Fault battery") lists the cases.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ROOT

TIMEOUT = float(os.environ.get("EDGEMOE_TEST_TIMEOUT", 180))  # slower machines: raise it


@dataclass
class Outcome:
    code: int
    out: str
    err: str

    @property
    def last_err(self) -> str:
        lines = [x for x in self.err.strip().splitlines() if x.strip()]
        return lines[-1] if lines else ""


def edgemoe(*args, cwd: Path, env: dict | None = None, preexec_fn=None,
            timeout: float = TIMEOUT) -> Outcome:
    """Run `edgemoe ARGS` as a user would (the console entry point's module)."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    r = subprocess.run([sys.executable, "-m", "edgemoe.supervise", *map(str, args)],
                       cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=timeout, preexec_fn=preexec_fn)
    return Outcome(r.returncode, r.stdout, r.stderr)


def tree_hash(path: Path) -> dict[str, str]:
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    return {str(p): hashlib.sha256(p.read_bytes()).hexdigest() for p in files}


def assert_clean_failure(r: Outcome, code: int, words: list[str], out: Path | None,
                         sources: dict[str, str], keep_part: bool = False) -> None:
    """The outcome every fault must have (see the module docstring)."""
    assert r.code == code, (r.code, r.err[-3000:])
    assert "Traceback" not in r.err, r.err[-3000:]
    line = r.last_err
    assert line.startswith("edgemoe:"), r.err[-2000:]
    for w in words:
        assert w in line, (w, line)
    if out is not None:
        assert not out.exists(), f"{out} was left behind"
        part = out.with_name(out.name + ".part")
        assert part.exists() == keep_part, f"{part} exists: {part.exists()}"
    for p, digest in sources.items():
        assert hashlib.sha256(Path(p).read_bytes()).hexdigest() == digest, f"{p} changed"


# -- checkpoints to damage --------------------------------------------------------------------

@pytest.fixture
def model(qwen3_dir, tmp_path) -> Path:
    """A private copy of the tiny qwen3_moe checkpoint."""
    return Path(shutil.copytree(qwen3_dir, tmp_path / "model"))


def st_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), n


def st_rewrite(path: Path, header: dict, data: bytes | None = None) -> None:
    """Write `path` anew with `header` (and `data`, else the old data)."""
    old, n = st_header(path)
    raw = path.read_bytes()
    body = raw[8 + n:] if data is None else data
    h = json.dumps(header).encode()
    h += b" " * (-len(h) % 8)
    path.write_bytes(struct.pack("<Q", len(h)) + h + body)


def first_weight(header: dict, suffix: str = "q_proj.weight") -> str:
    return next(k for k in header if k.endswith(suffix))


def export_args(model: Path, out: Path, *extra) -> list:
    return ["export", model, "--memory", "1GB", "--ctx", "256", "--type", "Q8_0",
            "-o", out, *extra]


# -- safetensors and checkpoint folders ------------------------------------------------------

def test_truncated_safetensors(model, tmp_path):
    st = model / "model.safetensors"
    with open(st, "r+b") as f:
        f.truncate(st.stat().st_size - 1000)
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["model.safetensors", "truncated"], tmp_path / "o.gguf", src)


def test_corrupt_safetensors_header_json(model, tmp_path):
    st = model / "model.safetensors"
    raw = bytearray(st.read_bytes())
    raw[8:12] = b"{{{{"
    st.write_bytes(bytes(raw))
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["model.safetensors", "header"], tmp_path / "o.gguf", src)


def test_safetensors_offsets_out_of_range(model, tmp_path):
    st = model / "model.safetensors"
    header, _ = st_header(st)
    name = first_weight(header)
    a, b = header[name]["data_offsets"]
    header[name]["data_offsets"] = [a + 10**9, b + 10**9]
    st_rewrite(st, header)
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["model.safetensors", name, "data_offsets"],
                         tmp_path / "o.gguf", src)


def test_safetensors_overlapping_tensors(model, tmp_path):
    st = model / "model.safetensors"
    header, _ = st_header(st)
    a, b = sorted((k for k in header if k.endswith("proj.weight")),
                  key=lambda k: header[k]["data_offsets"][0])[:2]
    size = header[b]["data_offsets"][1] - header[b]["data_offsets"][0]
    start = header[a]["data_offsets"][0]
    header[b]["data_offsets"] = [start, start + size]  # b now starts inside a
    st_rewrite(st, header)
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["model.safetensors", "overlap"], tmp_path / "o.gguf", src)


def test_index_names_a_missing_shard(model, tmp_path):
    header, _ = st_header(model / "model.safetensors")
    weight_map = {k: "model.safetensors" for k in header if k != "__metadata__"}
    weight_map[first_weight(header)] = "model-00002-of-00002.safetensors"
    (model / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["model-00002-of-00002.safetensors", "missing"],
                         tmp_path / "o.gguf", src)


def test_unsupported_dtype(model, tmp_path):
    st = model / "model.safetensors"
    header, _ = st_header(st)
    name = first_weight(header)
    assert header[name]["dtype"] == "F32"
    header[name]["dtype"] = "I32"  # same bytes per element: the header stays consistent
    st_rewrite(st, header)
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["model.safetensors", name, "I32"], tmp_path / "o.gguf", src)


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_or_inf_weights_name_the_tensor(model, tmp_path, bad):
    from safetensors.numpy import load_file, save_file

    st = model / "model.safetensors"
    tensors = load_file(st)
    name = first_weight(tensors, "down_proj.weight")
    tensors[name] = tensors[name].copy()
    tensors[name].reshape(-1)[5] = bad
    save_file(tensors, st, metadata={"format": "pt"})
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["model.safetensors", name, "NaN or infinite"],
                         tmp_path / "o.gguf", src)


def test_config_disagrees_with_tensor_shapes(model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["hidden_size"] *= 2
    (model / "config.json").write_text(json.dumps(cfg))
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["has shape", "config implies"], tmp_path / "o.gguf", src)


def test_unknown_architecture(model, tmp_path):
    cfg = json.loads((model / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "frobnicator_moe", ["FrobnicatorForCausalLM"]
    (model / "config.json").write_text(json.dumps(cfg))
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["frobnicator_moe"], tmp_path / "o.gguf", src)


def test_corrupt_config_json(model, tmp_path):
    (model / "config.json").write_text('{"model_type": "qwen3_moe",')
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["config.json", "not valid JSON"], tmp_path / "o.gguf", src)


def test_missing_tokenizer(model, tmp_path):
    (model / "tokenizer.json").unlink()
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["tokenizer", "model"], tmp_path / "o.gguf", src)


def test_corrupt_tokenizer(model, tmp_path):
    (model / "tokenizer.json").write_text('{"model": {"type": "BPE", ')
    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["tokenizer.json", "not valid JSON"], tmp_path / "o.gguf", src)


# -- GGUF sources -----------------------------------------------------------------------------

@pytest.fixture
def gguf_source(ggufs, tmp_path) -> Path:
    return Path(shutil.copy(ggufs["qwen3"], tmp_path / "src.gguf"))


def test_gguf_source_truncated(gguf_source, tmp_path):
    with open(gguf_source, "r+b") as f:
        f.truncate(gguf_source.stat().st_size // 2)
    src = tree_hash(gguf_source)
    r = edgemoe(*export_args(gguf_source, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["src.gguf", "beyond the end of the file"],
                         tmp_path / "o.gguf", src)


def _gguf_header_positions(path: Path) -> dict:
    """Byte positions of interest in a GGUF header, found with gguf-py's reader."""
    import gguf

    r = gguf.GGUFReader(path)
    pos = {}
    for f in r.fields.values():
        if f.types and f.types[0] == gguf.GGUFValueType.ARRAY and "tokens" in f.name:
            pos["array_len"] = int(f.parts[4].ctypes.data - r.data.ctypes.data)
    t = r.tensors[-1]
    pos["last_offset"] = int(t.field.parts[-1].ctypes.data - r.data.ctypes.data)
    pos["first_ndims"] = int(r.tensors[0].field.parts[2].ctypes.data - r.data.ctypes.data)
    return pos


def _poke(path: Path, at: int, fmt: str, value: int) -> None:
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(struct.pack(fmt, value))


def test_gguf_tensor_beyond_the_end(gguf_source, tmp_path):
    _poke(gguf_source, _gguf_header_positions(gguf_source)["last_offset"], "<Q", 1 << 40)
    src = tree_hash(gguf_source)
    r = edgemoe(*export_args(gguf_source, tmp_path / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["src.gguf", "beyond the end of the file"],
                         tmp_path / "o.gguf", src)


def test_gguf_absurd_array_length_is_bounded(gguf_source, tmp_path):
    _poke(gguf_source, _gguf_header_positions(gguf_source)["array_len"], "<Q", 1 << 60)
    src = tree_hash(gguf_source)
    t0 = time.monotonic()
    r = edgemoe(*export_args(gguf_source, tmp_path / "o.gguf"), cwd=tmp_path, timeout=60,
                preexec_fn=_limit_memory(2 << 30))
    assert time.monotonic() - t0 < 60
    assert_clean_failure(r, 2, ["src.gguf", "strings of tokenizer.ggml.tokens"],
                         tmp_path / "o.gguf", src)


def test_gguf_absurd_n_dims(gguf_source, tmp_path):
    _poke(gguf_source, _gguf_header_positions(gguf_source)["first_ndims"], "<I", 1 << 30)
    src = tree_hash(gguf_source)
    r = edgemoe(*export_args(gguf_source, tmp_path / "o.gguf"), cwd=tmp_path, timeout=60,
                preexec_fn=_limit_memory(2 << 30))
    assert_clean_failure(r, 2, ["src.gguf", "dimensions"], tmp_path / "o.gguf", src)


def _limit_memory(nbytes: int):
    def limit():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (nbytes, nbytes))
    return limit


def test_inspect_a_hostile_gguf(gguf_source, tmp_path):
    _poke(gguf_source, _gguf_header_positions(gguf_source)["array_len"], "<Q", 1 << 60)
    r = edgemoe("inspect", gguf_source, cwd=tmp_path, timeout=60,
                preexec_fn=_limit_memory(2 << 30))
    assert_clean_failure(r, 2, ["src.gguf"], None, {})


# -- requests that cannot be met --------------------------------------------------------------

def test_impossible_cap(model, tmp_path):
    src = tree_hash(model)
    r = edgemoe("export", model, "--memory", "1MB", "-o", tmp_path / "o.gguf", cwd=tmp_path)
    assert_clean_failure(r, 2, ["below the smallest", "MB in all"], tmp_path / "o.gguf", src)


def test_output_folder_missing(model, tmp_path):
    src = tree_hash(model)
    out = tmp_path / "no" / "such" / "o.gguf"
    r = edgemoe(*export_args(model, out), cwd=tmp_path)
    assert_clean_failure(r, 2, [str(out.parent), "does not exist"], out, src)


def test_broken_pipe_is_quiet(ggufs, tmp_path):
    p = subprocess.Popen([sys.executable, "-m", "edgemoe.supervise", "inspect",
                          str(ggufs["qwen3"])], cwd=tmp_path, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env={**os.environ, "PYTHONPATH": str(ROOT)})
    p.stdout.close()  # `| head -0`: the reader is gone before the first line
    err = p.stderr.read().decode()
    assert p.wait(timeout=TIMEOUT) == 128 + signal.SIGPIPE
    assert err == ""


def test_output_is_the_source(gguf_source, tmp_path):
    src = tree_hash(gguf_source)
    r = edgemoe(*export_args(gguf_source, gguf_source), cwd=tmp_path)
    assert_clean_failure(r, 2, ["src.gguf", "source file itself"], None, src)
    assert not gguf_source.with_name("src.gguf.part").exists()


def test_stats_from_another_model(model, tmp_path):
    from export.imatrix import write_stats
    from memory_planner.stats import CalibStats

    other = tmp_path / "other.stats.gguf"
    write_stats(CalibStats(in_sum2={"blk.0.attn_q.weight": np.ones((1, 512), np.float32)},
                           counts={"blk.0.attn_q.weight": np.ones(1, np.float32)},
                           n_tokens=1), other)
    src = {**tree_hash(model), **tree_hash(other)}
    r = edgemoe(*export_args(model, tmp_path / "o.gguf", "--stats", other), cwd=tmp_path)
    assert_clean_failure(r, 2, ["other.stats.gguf", "from another model", "blk.0.attn_q"],
                         tmp_path / "o.gguf", src)


def test_plan_from_another_model(model, mixtral_dir, tmp_path):
    plan = tmp_path / "mixtral-plan.json"
    assert edgemoe("plan", mixtral_dir, "--memory", "1GB", "--type", "Q8_0", "-o", plan,
                   cwd=tmp_path).code == 0
    src = {**tree_hash(model), **tree_hash(plan)}
    r = edgemoe("export", model, "--memory", "1GB", "--plan", plan, "-o", tmp_path / "o.gguf",
                cwd=tmp_path)
    assert_clean_failure(r, 2, ["mixtral-plan.json", "plan for another model"],
                         tmp_path / "o.gguf", src)


@pytest.fixture
def mounted(tmp_path):
    """mount(options) -> a fresh tmpfs folder with those mount options (root only)."""
    points = []

    def mount(options: str) -> Path:
        point = tmp_path / f"mnt{len(points)}"
        point.mkdir()
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs here ({r.stderr.strip()}): needs root")
        points.append(point)
        return point

    yield mount
    for p in points:
        subprocess.run(["umount", str(p)], capture_output=True)


def test_read_only_output_folder(model, tmp_path, mounted):
    ro = mounted("ro,size=16m")
    src = tree_hash(model)
    r = edgemoe(*export_args(model, ro / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["o.gguf.part", "Read-only file system"], ro / "o.gguf", src)


def test_not_enough_disk_is_refused_with_the_numbers(model, tmp_path, mounted):
    small = mounted("size=1m")
    src = tree_hash(model)
    r = edgemoe(*export_args(model, small / "o.gguf"), cwd=tmp_path)
    assert_clean_failure(r, 2, ["o.gguf", "more to write but only", "free on"],
                         small / "o.gguf", src)


def test_disk_full_part_way(model, tmp_path):
    """`ulimit -f`: the write fails after the header, mid-tensor data."""
    def small_files():
        import resource

        resource.setrlimit(resource.RLIMIT_FSIZE, (2 << 20, 2 << 20))

    src = tree_hash(model)
    r = edgemoe(*export_args(model, tmp_path / "o.gguf"), cwd=tmp_path, preexec_fn=small_files)
    assert_clean_failure(r, 2, ["o.gguf.part", "File too large"], tmp_path / "o.gguf", src)


# -- interruptions, and resuming after them ---------------------------------------------------

@pytest.fixture(scope="module")
def slow_model(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    """A qwen3_moe whose Q2_K export on one thread takes seconds: time to interrupt it."""
    from tests.conftest import build_qwen3_moe

    return build_qwen3_moe(tmp_path_factory.mktemp("slow"), bpe_tokenizer_dir, n_layers=4,
                           n_experts=16, hidden=512, ff=512)


def slow_export(model: Path, out: Path) -> list:
    return ["export", model, "--memory", "10GB", "--ctx", "256", "--type", "Q2_K",
            "--threads", "1", "-o", out]


def _as_a_terminal() -> None:
    """Ctrl-C's default, as a terminal's foreground job has it (a test run started in the
    background by a non-interactive shell would pass SIGINT on ignored)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


def start(args, cwd: Path, env: dict | None = None) -> subprocess.Popen:
    """`edgemoe ARGS` in a session of its own, as a terminal runs a foreground job."""
    return subprocess.Popen([sys.executable, "-m", "edgemoe.supervise", *map(str, args)],
                            cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})},
                            start_new_session=True, preexec_fn=_as_a_terminal)


def ctrl_c(p: subprocess.Popen) -> None:
    """What a terminal does on Ctrl-C: SIGINT to the whole foreground job."""
    os.killpg(p.pid, signal.SIGINT)


def kill_9(p: subprocess.Popen) -> None:
    """SIGKILL to the supervisor and its child at once: nothing gets to clean up."""
    os.killpg(p.pid, signal.SIGKILL)
    p.wait()


def wait_for(path: Path, min_size: int = 1, timeout: float = TIMEOUT) -> None:
    t0 = time.monotonic()
    while not (path.exists() and path.stat().st_size >= min_size):
        assert time.monotonic() - t0 < timeout, f"{path} never reached {min_size} bytes"
        time.sleep(0.05)


def finish(p: subprocess.Popen) -> Outcome:
    out, err = p.communicate(timeout=TIMEOUT)
    return Outcome(p.returncode, out, err)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_signal_mid_export_keeps_the_part_to_resume(slow_model, tmp_path, sig):
    out = tmp_path / "o.gguf"
    src = tree_hash(slow_model)
    p = start(slow_export(slow_model, out), tmp_path)
    wait_for(out.with_name("o.gguf.part"), 4 << 20)
    ctrl_c(p) if sig == signal.SIGINT else p.send_signal(sig)  # `kill PID`: the supervisor
    r = finish(p)
    assert_clean_failure(r, 128 + sig, ["interrupted", "o.gguf.part", "resume"], out, src,
                         keep_part=True)


def test_export_resumes_after_sigkill_byte_identical(slow_model, tmp_path):
    whole = tmp_path / "whole.gguf"
    assert edgemoe(*slow_export(slow_model, whole), cwd=tmp_path).code == 0
    out = tmp_path / "o.gguf"
    part = out.with_name("o.gguf.part")
    p = start(slow_export(slow_model, out), tmp_path)
    wait_for(part, whole.stat().st_size // 3)
    kill_9(p)
    kept = part.stat().st_size
    assert not out.exists() and kept > 0
    r = edgemoe(*slow_export(slow_model, out), cwd=tmp_path)
    assert r.code == 0, r.err[-2000:]
    assert "resuming o.gguf.part" in r.out
    assert out.read_bytes() == whole.read_bytes()
    assert not part.exists() and not part.with_name("o.gguf.part.json").exists()


def test_a_changed_argument_starts_over(slow_model, tmp_path):
    out = tmp_path / "o.gguf"
    p = start(slow_export(slow_model, out), tmp_path)
    wait_for(out.with_name("o.gguf.part"), 4 << 20)
    ctrl_c(p)
    assert finish(p).code == 130
    args = slow_export(slow_model, out)
    args[args.index("Q2_K")] = "Q3_K"
    r = edgemoe(*args, cwd=tmp_path)
    assert r.code == 0 and "resuming" not in r.out
    assert "different export (the plan or metadata changed): starting over" in r.err


def test_two_exports_to_one_output(slow_model, tmp_path):
    out = tmp_path / "o.gguf"
    first = start(slow_export(slow_model, out), tmp_path)
    wait_for(out.with_name("o.gguf.part"), 1 << 20)
    second = edgemoe(*slow_export(slow_model, out), cwd=tmp_path)
    assert second.code == 2 and "Traceback" not in second.err
    assert "being written by another edgemoe process" in second.last_err
    r = finish(first)  # the first is unharmed
    assert r.code == 0, r.err[-2000:]
    assert out.is_file() and not out.with_name("o.gguf.part").exists()


def saved_windows(checkpoint: Path) -> int | None:
    """The windows a calibration checkpoint covers; None while it is absent or being
    written."""
    try:
        with np.load(checkpoint) as state:
            return int(state["windows_done"])
    except Exception:  # absent, or torn mid-save
        return None


def calibrate_args(model: Path, out: Path, max_tokens: int = 1536) -> list:
    return ["calibrate", model, "--no-sensitivity", "--ctx", "128", "--max-tokens",
            str(max_tokens), "-o", out]


def test_calibrate_ctrl_c_then_resume_after_sigkill(slow_model, tmp_path):
    env = {"EDGEMOE_CHECKPOINT_SECONDS": "0"}  # a checkpoint after every window

    def args(out: Path) -> list:  # 48 windows: a resumed run still saves after 1 s here
        return calibrate_args(slow_model, out, max_tokens=6144)

    whole = tmp_path / "whole.stats.gguf"
    r = edgemoe(*args(whole), cwd=tmp_path, env=env)
    assert r.code == 0, r.err[-2000:]
    out = tmp_path / "s.stats.gguf"
    checkpoint = out.with_name("s.stats.gguf.checkpoint.npz")
    src = tree_hash(slow_model)

    p = start(args(out), tmp_path, env)
    wait_for(checkpoint)
    ctrl_c(p)
    r = finish(p)
    assert_clean_failure(r, 130, ["interrupted", "checkpoint.npz", "resume"], out, src)

    first = saved_windows(checkpoint)
    assert first is not None  # Ctrl-C waited for the save under way
    # kill it once it has saved a later checkpoint, well before the next save (the
    # checkpoint is rewritten in place: a kill during a save leaves it torn, and the next
    # run starts over: test_a_resumed_gguf_run_has_the_uninterrupted_runs_bits)
    p = start(args(out), tmp_path, {"EDGEMOE_CHECKPOINT_SECONDS": "1"})
    t0 = time.monotonic()
    while (saved_windows(checkpoint) or 0) <= first and time.monotonic() - t0 < TIMEOUT:
        assert p.poll() is None, "the resumed run ended before it saved again: give it more windows"
        time.sleep(0.02)
    kill_9(p)
    r = edgemoe(*args(out), cwd=tmp_path, env=env)
    assert r.code == 0, r.err[-2000:]
    assert "resuming calibration" in r.out
    assert out.read_bytes() == whole.read_bytes()
    assert not checkpoint.exists()
    assert sorted(x.name for x in tmp_path.iterdir() if x.name.startswith("s.")) == [out.name]
