"""llama.cpp's own Hugging Face converter (convert_hf_to_gguf.py), from the sdist of the
installed llama-cpp-python, and a comparison of two GGUF files' layouts.

Tests of an architecture adapter run the converter on the same tiny checkpoint and require
the same tensor names, shapes and types, and the same metadata keys and values: the
converter is the fact sheet edgemoe follows. It runs in a child process with the sdist's
own gguf-py first on sys.path, as the script does by itself.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

from tests.llama_tools import LlamaToolError, _llama_cpp_source, cache_dir, installed_version

CONVERTER_FILES = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/")


def converter_dir() -> Path:
    """vendor/llama.cpp of the installed version's sdist with the converter's files only,
    unpacked once into the cache directory."""
    version = installed_version()
    out = cache_dir() / f"llama.cpp-converter-{version}"
    if (out / "convert_hf_to_gguf.py").is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="converter-", dir=out.parent) as tmp:
        root = _llama_cpp_source(version, Path(tmp), needed=CONVERTER_FILES)
        staged = Path(tmp) / "staged"
        for name in CONVERTER_FILES:
            src = root / name.rstrip("/")
            if not src.exists():
                raise LlamaToolError(f"the sdist has no vendor/llama.cpp/{name}")
            dst = staged / name.rstrip("/")
            dst.parent.mkdir(parents=True, exist_ok=True)
            (shutil.copytree if src.is_dir() else shutil.copyfile)(src, dst)
        try:
            staged.replace(out)  # atomic: a concurrent unpack simply wins or loses
        except OSError:
            if not (out / "convert_hf_to_gguf.py").is_file():
                raise
    return out


# The converter names a BPE pre-tokenizer from a hash of its output on a fixed text, listed
# for published tokenizers only; the tests' freshly trained tokenizers are in no list, so the
# child replaces that lookup by the name given (edgemoe's own choice is tested elsewhere).
_DRIVER = """
import runpy, sys
sys.path.insert(1, sys.argv[1] + "/gguf-py")
sys.path.insert(1, sys.argv[1])
pre, restore_add_bos = sys.argv[2], sys.argv[3] == "1"
if pre:
    import conversion.base
    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
if restore_add_bos:
    import json, pathlib, transformers
    _load = transformers.AutoTokenizer.from_pretrained
    def _from_pretrained(path, *args, **kwargs):
        tok = _load(path, *args, **kwargs)
        cfg = pathlib.Path(path) / "tokenizer_config.json"
        if cfg.is_file() and json.loads(cfg.read_text()).get("add_bos_token"):
            tok.add_bos_token = True
        return tok
    transformers.AutoTokenizer.from_pretrained = _from_pretrained
sys.argv = [sys.argv[1] + "/convert_hf_to_gguf.py"] + sys.argv[4:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def converter_command(hf_dir: Path, out: Path, outtype: str = "f32", pre: str | None = None,
                      args: tuple[str, ...] = (), restore_add_bos: bool = False) -> list[str]:
    """The command that runs llama.cpp's converter on `hf_dir` (in `converter_dir()`);
    arguments as for `convert_hf`."""
    root = converter_dir()
    return [sys.executable, "-c", _DRIVER, str(root), pre or "", "1" if restore_add_bos else "0",
            "--outtype", outtype, *args, "--outfile", str(out), str(hf_dir)]


def convert_hf(hf_dir: Path, out: Path, outtype: str = "f32", pre: str | None = None,
               args: tuple[str, ...] = (), restore_add_bos: bool = False) -> Path:
    """Run llama.cpp's converter on `hf_dir`; returns `out`. `pre` names the BPE
    pre-tokenizer (tokenizer.ggml.pre) for tokenizers the converter's hash list lacks;
    `args` are further converter flags (e.g. --no-mtp). `restore_add_bos`: transformers 5
    drops tokenizer_config.json's add_bos_token when a tokenizer.json exists, so a converter
    that asserts the flag (DeepSeek-V3.2's) fails on every checkpoint; the child sets it back
    from the file. Raises LlamaToolError with the converter's output when it fails."""
    cmd = converter_command(hf_dir, out, outtype, pre, args, restore_add_bos)
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=converter_dir())
    if r.returncode != 0 or not out.is_file():
        raise LlamaToolError(f"llama.cpp's converter failed ({r.returncode}): {' '.join(cmd)}\n"
                             f"{(r.stdout + r.stderr)[-4000:]}")
    return out


def _value(field) -> object:
    """A metadata field's value as plain Python (arrays as lists)."""
    v = field.contents()
    return v.tolist() if isinstance(v, np.ndarray) else v


def layout_differences(ours: Path, theirs: Path, ignore_keys: tuple[str, ...] = ()) -> list[str]:
    """How two GGUF files differ in tensor names, shapes and types and in metadata keys and
    values; [] when they agree. Floats compare to 1e-6 relative; `ignore_keys` are skipped
    (e.g. general.name, which each tool derives in its own way)."""
    import gguf

    a, b = gguf.GGUFReader(ours), gguf.GGUFReader(theirs)
    out = []
    ta = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in a.tensors}
    tb = {t.name: (tuple(int(x) for x in t.shape), t.tensor_type.name) for t in b.tensors}
    out += [f"tensor {n} only in ours" for n in sorted(set(ta) - set(tb))]
    out += [f"tensor {n} only in llama.cpp's" for n in sorted(set(tb) - set(ta))]
    out += [f"tensor {n}: ours {ta[n]}, llama.cpp's {tb[n]}"
            for n in sorted(set(ta) & set(tb)) if ta[n] != tb[n]]
    skip = set(ignore_keys) | {"GGUF.version", "GGUF.tensor_count", "GGUF.kv_count"}
    fa = {k: f for k, f in a.fields.items() if k not in skip}
    fb = {k: f for k, f in b.fields.items() if k not in skip}
    out += [f"key {k} only in ours" for k in sorted(set(fa) - set(fb))]
    out += [f"key {k} only in llama.cpp's" for k in sorted(set(fb) - set(fa))]
    for k in sorted(set(fa) & set(fb)):
        va, vb = _value(fa[k]), _value(fb[k])
        if isinstance(va, float) and isinstance(vb, float):
            same = np.isclose(va, vb, rtol=1e-6, atol=0)
        elif isinstance(va, list) and va and isinstance(va[0], float):
            same = len(va) == len(vb) and np.allclose(va, vb, rtol=1e-6, atol=0)
        else:
            same = va == vb
        if not same:
            show = lambda v: repr(v)[:120]  # noqa: E731
            out.append(f"key {k}: ours {show(va)}, llama.cpp's {show(vb)}")
    return out
