"""What llama.cpp's extra buffer types (AMX, CPU_REPACK) do on this machine: crash or speed.

The bundled model is exported uniformly at Q4_0, Q4_K and Q8_0 (types the AMX and repack
kernels take) and each file is run in a fresh child process, `--reps` times, interleaved:
  llama.cpp default   use_extra_bufts = True: AMX (where built in) and CPU_REPACK
  no-repack           use_extra_bufts = False (llama-server --no-repack): edgemoe's choice
                      on AMX hosts
  repack only         use_extra_bufts = False, the attention and FFN weights overridden to
                      the CPU_REPACK buffer type: what a host without AMX keeps by default
A run is a 256-token prompt then 32 single-token decodes (threads: all cores); a run that
dies is reported with its signal. Medians of prompt and decode tokens/s, and each mode's
ratio to no-repack.

    python benchmarks/extra_bufts.py [--reps 5] [--out-dir /tmp/edgemoe-bench]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgemoe.report.tables import table  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
MODEL = ROOT / "models" / "stdlib-moe"
TYPES = ("Q4_0", "Q4_K", "Q8_0")
MODES = ("llama.cpp default", "no-repack", "repack only")
WEIGHTS = r"(attn_(q|k|v|output)|ffn_(gate|up|down)(_exps)?)\.weight"
N_PROMPT, N_DECODE = 256, 32


class _Override(ctypes.Structure):
    """struct llama_model_tensor_buft_override (include/llama.h)."""

    _fields_ = [("pattern", ctypes.c_char_p), ("buft", ctypes.c_void_p)]


def _cpu_extra_bufts() -> dict[str, int]:
    """The CPU device's extra buffer types by name ("AMX", "CPU_REPACK")."""
    import llama_cpp

    lib_dir = Path(llama_cpp.__file__).parent / "lib"
    ggml = ctypes.CDLL(str(lib_dir / "libggml.so"))
    base = ctypes.CDLL(str(lib_dir / "libggml-base.so"))
    ggml.ggml_backend_dev_by_type.restype = ctypes.c_void_p
    ggml.ggml_backend_dev_by_type.argtypes = [ctypes.c_int]
    base.ggml_backend_dev_backend_reg.restype = ctypes.c_void_p
    base.ggml_backend_dev_backend_reg.argtypes = [ctypes.c_void_p]
    base.ggml_backend_reg_get_proc_address.restype = ctypes.c_void_p
    base.ggml_backend_reg_get_proc_address.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
    base.ggml_backend_buft_name.restype = ctypes.c_char_p
    base.ggml_backend_buft_name.argtypes = [ctypes.c_void_p]
    dev = ggml.ggml_backend_dev_by_type(0)  # GGML_BACKEND_DEVICE_TYPE_CPU
    fn_ptr = base.ggml_backend_reg_get_proc_address(base.ggml_backend_dev_backend_reg(dev),
                                                     b"ggml_backend_dev_get_extra_bufts")
    fn = ctypes.CFUNCTYPE(ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p)(fn_ptr)
    arr, out, i = fn(dev), {}, 0
    while arr[i]:
        out[base.ggml_backend_buft_name(arr[i]).decode()] = arr[i]
        i += 1
    return out


def child(path: str, mode: str) -> dict:
    """One timed run of `path` in `mode` (in this process)."""
    import llama_cpp
    import numpy as np

    from edgemoe import llamacpp

    fields = {"use_extra_bufts": mode == "llama.cpp default"}
    if mode == "repack only":
        overrides = (_Override * 2)()  # NULL-terminated
        overrides[0].pattern = WEIGHTS.encode()
        overrides[0].buft = _cpu_extra_bufts()["CPU_REPACK"]
        fields["tensor_buft_overrides"] = ctypes.addressof(overrides)
    with llamacpp.load_policy(**fields):
        llm = llama_cpp.Llama(model_path=path, n_ctx=512, n_batch=512, verbose=False,
                              n_threads=os.cpu_count(), n_gpu_layers=0)
    tokens = np.random.default_rng(0).integers(0, llm.n_vocab(), N_PROMPT + N_DECODE).tolist()
    t0 = time.perf_counter()
    llm.eval(tokens[:N_PROMPT])
    prompt_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for t in tokens[N_PROMPT:]:
        llm.eval([t])
    decode_s = time.perf_counter() - t0
    return {"prompt_tps": N_PROMPT / prompt_s, "decode_tps": N_DECODE / decode_s}


def run_child(path: Path, mode: str) -> dict:
    code = ("import json, sys; sys.path.insert(0, sys.argv[1]); "
            "from benchmarks.extra_bufts import child; "
            "print('RESULT ' + json.dumps(child(sys.argv[2], sys.argv[3])))")
    r = subprocess.run([sys.executable, "-c", code, str(ROOT), str(path), mode],
                       capture_output=True, text=True)
    if r.returncode < 0:
        return {"crash": signal.Signals(-r.returncode).name}
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        return {"crash": f"exit {r.returncode}: {r.stderr.strip()[-300:]}"}
    return json.loads(lines[-1][7:])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--out-dir", default="/tmp/edgemoe-bench")
    args = ap.parse_args()
    from edgemoe import llamacpp
    from edgemoe.pipeline import export, make_budget, open_model
    from memory_planner import uniform_plan

    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    model = open_model(MODEL)
    budget = make_budget(model.adapter, "1GB", 512)
    files = {}
    for t in TYPES:
        files[t] = out_dir / f"stdlib-moe-{t}.gguf"
        if not files[t].exists():
            export(model, uniform_plan(model.specs, t, budget), files[t], progress=False)
    runs: dict[tuple[str, str], list[dict]] = {(t, m): [] for t in TYPES for m in MODES}
    for rep in range(args.reps):
        for t in TYPES:
            for m in MODES:
                runs[t, m].append(run_child(files[t], m))
        print(f"rep {rep + 1}/{args.reps} done", file=sys.stderr)
    rows, results = [], []
    for t in TYPES:
        base = [r for r in runs[t, "no-repack"] if "crash" not in r]
        base_p = statistics.median(r["prompt_tps"] for r in base) if base else float("nan")
        base_d = statistics.median(r["decode_tps"] for r in base) if base else float("nan")
        for m in MODES:
            ok = [r for r in runs[t, m] if "crash" not in r]
            crashes = sorted({r["crash"] for r in runs[t, m] if "crash" in r})
            p = statistics.median(r["prompt_tps"] for r in ok) if ok else float("nan")
            d = statistics.median(r["decode_tps"] for r in ok) if ok else float("nan")
            results.append({"type": t, "mode": m, "runs": len(runs[t, m]), "ok": len(ok),
                            "crashes": crashes, "prompt_tps_median": p, "decode_tps_median": d,
                            "prompt_ratio": p / base_p, "decode_ratio": d / base_d})
            rows.append([t, m, f"{len(ok)}/{len(runs[t, m])}", ", ".join(crashes) or "-",
                         f"{p:.0f}" if ok else "-", f"{p / base_p:.2f}" if ok else "-",
                         f"{d:.1f}" if ok else "-", f"{d / base_d:.2f}" if ok else "-"])
    print(table(rows, ["type", "mode", "ran", "crashed", "prompt t/s", "vs no-repack",
                       "decode t/s", "vs no-repack"]))
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = {"machine": {"cpu_features": sorted(llamacpp.cpu_features()),
                          "extra_bufts": sorted(_cpu_extra_bufts()),
                          "cores": os.cpu_count(), "python": platform.python_version()},
              "model": str(MODEL.relative_to(ROOT)), "reps": args.reps,
              "n_prompt": N_PROMPT, "n_decode": N_DECODE, "results": results}
    (RESULTS / "extra_bufts.json").write_text(json.dumps(report, indent=1))
    print(f"\nwrote {RESULTS / 'extra_bufts.json'}")


if __name__ == "__main__":
    main()
