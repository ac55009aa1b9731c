"""llama.cpp's own command-line tools and source files, from the sdist of the installed
llama-cpp-python.

llama-cpp-python ships libllama and libggml but not llama.cpp's programs. `llama_quantize_path`
compiles the real `llama-quantize` (tools/quantize, plus the few files of common/ it uses:
the imatrix loader, logging) from the sdist of the installed version and links it against the
installed libraries, so the tool and the Python bindings run the very same quantizer. Built
once per machine into a cache directory (10 to 20 s on 2 cores; the first sdist download
adds 10 to 60 s). `llama_cpp_file` gives one file of that source (tests compare edgemoe's
tables with llama.cpp's), unpacked once into the same cache directory.

Set EDGEMOE_LLAMA_SDIST to an sdist (.tar.gz, or an unpacked copy) to skip the download.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

log = logging.getLogger(__name__)

DIST = "llama-cpp-python"
RECIPE = 2  # bump when the build below changes, so cached binaries are rebuilt

# translation units of llama-quantize, relative to vendor/llama.cpp; largest first so that
# parallel compilation finishes early. common.cpp provides two helpers (tty_can_use_colors,
# string_parse_kv_override); --gc-sections drops the rest of it and what that would need.
SOURCES = ("common/common.cpp", "common/json.cpp", "tools/quantize/quantize.cpp",
           "common/imatrix-loader.cpp", "common/log.cpp", "tools/quantize/main.cpp")
INCLUDE_DIRS = ("include", "ggml/include", "common", "vendor", "tools/quantize")
# what to unpack from the sdist (the whole tree is 3,900 files)
NEEDED = ("include/", "ggml/include/", "common/", "tools/quantize/", "vendor/nlohmann/")


class LlamaToolError(RuntimeError):
    """A llama.cpp tool could not be built or fetched."""


def installed_version() -> str:
    try:
        return importlib.metadata.version(DIST)
    except importlib.metadata.PackageNotFoundError:
        raise LlamaToolError(f"{DIST} is not installed") from None


def library_dir() -> Path:
    """llama_cpp/lib of the installed package (found without loading the libraries)."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or not spec.submodule_search_locations:
        raise LlamaToolError(f"{DIST} is not installed (no llama_cpp package)")
    lib = Path(next(iter(spec.submodule_search_locations))) / "lib"
    if not (lib / "libllama.so").exists():
        raise LlamaToolError(f"{lib} has no libllama.so: is {DIST} built with shared libraries?")
    return lib


def cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "edgemoe"


def llama_quantize_path() -> Path:
    """The `llama-quantize` binary of the installed llama-cpp-python version, built if needed.

    Raises LlamaToolError (with the compiler's or pip's output) when it cannot be built.
    """
    version, lib = installed_version(), library_dir()
    # keyed by the library directory too: the binary's rpath points there
    key = hashlib.sha1(f"{RECIPE} {lib.resolve()}".encode()).hexdigest()[:10]
    out = cache_dir() / f"llama-quantize-{version}-{key}" / "llama-quantize"
    if out.is_file():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx or not shutil.which(cxx):
        found = f"CXX={cxx} is not an executable" if cxx else "no g++ or c++ on PATH"
        raise LlamaToolError(f"building llama-quantize needs a C++17 compiler: {found} "
                             "(apt-get install g++, or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        root = _llama_cpp_source(version, tmp)
        t1 = time.perf_counter()
        binary = _build(cxx, root, lib, version, tmp / "obj")
        binary.replace(out)  # atomic: a concurrent build simply wins or loses
        log.warning("built %s in %.1f s (sources %.1f s, compile %.1f s)", out,
                    time.perf_counter() - t0, t1 - t0, time.perf_counter() - t1)
    return out


def llama_cpp_file(path: str) -> Path:
    """The file `path` (relative to vendor/llama.cpp, e.g. "src/llama-vocab.cpp") of the
    installed llama-cpp-python's sdist, unpacked once into the cache directory.

    Raises LlamaToolError when the sdist cannot be had or lacks the file.
    """
    version = installed_version()
    out = cache_dir() / f"llama.cpp-{version}" / path
    if out.is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="src-", dir=out.parent) as tmp:
        found = _llama_cpp_source(version, Path(tmp), needed=(path,)) / path
        if not found.is_file():
            raise LlamaToolError(f"the {DIST} {version} sdist has no vendor/llama.cpp/{path}: "
                                 "llama.cpp's layout changed")
        copy = Path(tmp) / "copy"
        shutil.copyfile(found, copy)
        copy.replace(out)  # atomic: a concurrent unpack simply wins or loses
    return out


def _llama_cpp_source(version: str, tmp: Path, needed: tuple[str, ...] = NEEDED) -> Path:
    """vendor/llama.cpp of the sdist of `version`, unpacked under `tmp` (only the files under
    the `needed` prefixes)."""
    given = os.environ.get("EDGEMOE_LLAMA_SDIST")
    if given:
        sdist = Path(given)
        if sdist.is_dir():
            _check_sdist_version(sdist / "PKG-INFO", version)
            return sdist / "vendor" / "llama.cpp"
    else:
        sdist = _download_sdist(version, tmp / "dl")
    top = f"llama_cpp_python-{version}/"
    prefix = f"{top}vendor/llama.cpp/"
    try:
        with tarfile.open(sdist) as tar:
            members = [m for m in tar.getmembers() if m.isfile() and m.name.startswith(prefix)
                       and m.name[len(prefix):].startswith(needed)]
            # the "data" filter (Python >= 3.10.12 / 3.11.4) refuses links and absolute paths
            safe = {"filter": "data"} if hasattr(tarfile, "data_filter") else {}
            tar.extractall(tmp / "src", members=[tar.getmember(f"{top}PKG-INFO"), *members],
                           **safe)
    except (tarfile.TarError, KeyError, OSError) as exc:
        raise LlamaToolError(f"{sdist} is not the {DIST} {version} sdist: {exc}") from exc
    _check_sdist_version(tmp / "src" / top / "PKG-INFO", version)
    return tmp / "src" / prefix


def _check_sdist_version(pkg_info: Path, version: str) -> None:
    lines = pkg_info.read_text().splitlines() if pkg_info.is_file() else []
    found = next((x.split(":", 1)[1].strip() for x in lines if x.startswith("Version:")), None)
    if found != version:
        raise LlamaToolError(f"the sdist at {pkg_info.parent} is {DIST} {found or '(no version)'}"
                             f", but {version} is installed: the tool must match the libraries")


def _download_sdist(version: str, dest: Path) -> Path:
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
           "--disable-pip-version-check", "-d", str(dest), f"{DIST}=={version}"]
    log.warning("fetching the %s %s sdist to build llama-quantize: %s", DIST, version,
                " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.tar.gz")) if dest.is_dir() else []
    if r.returncode != 0 or not found:
        raise LlamaToolError(
            f"could not download the {DIST} {version} sdist (needed to build llama-quantize; "
            f"or set EDGEMOE_LLAMA_SDIST to a copy): {' '.join(cmd)} exited with "
            f"{r.returncode}\n{(r.stdout + r.stderr)[-3000:]}")
    return found[0]


def _build(cxx: str, root: Path, lib: Path, version: str, obj: Path) -> Path:
    obj.mkdir(parents=True)
    missing = [s for s in SOURCES if not (root / s).is_file()]
    if missing:
        raise LlamaToolError(f"{root} lacks {missing}: llama.cpp's layout changed, update "
                             "tests/llama_tools.py")
    # build-info.cpp is generated by CMake from this template
    info = (root / "common" / "build-info.cpp.in").read_text()
    for k, v in {"LLAMA_BUILD_NUMBER": "0", "LLAMA_BUILD_COMMIT": f"{DIST}-{version}",
                 "BUILD_COMPILER": Path(cxx).name, "BUILD_TARGET": sys.platform}.items():
        info = info.replace(f"@{k}@", v)
    (obj / "build-info.cpp").write_text(info)
    sources = [root / s for s in SOURCES] + [obj / "build-info.cpp"]
    # -O0 builds twice as fast and costs nothing: quantizing runs in libllama and libggml
    flags = ["-std=c++17", "-O0", "-ffunction-sections", "-fdata-sections",
             *(f"-I{root / d}" for d in INCLUDE_DIRS)]

    def compile_one(i_src: tuple[int, Path]) -> Path:
        i, src = i_src
        o = obj / f"{i}-{src.stem}.o"
        _run([cxx, *flags, "-c", str(src), "-o", str(o)], f"compiling {src.name}")
        return o

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, enumerate(sources)))
    binary = obj / "llama-quantize"
    # DT_RPATH (not RUNPATH) so that LD_LIBRARY_PATH cannot swap in other libraries
    _run([cxx, *map(str, objects), "-o", str(binary), "-Wl,--gc-sections",
          f"-L{lib}", "-lllama", "-lggml", "-lggml-base", "-pthread",
          f"-Wl,-rpath,{lib}", "-Wl,--disable-new-dtags"], "linking llama-quantize")
    r = subprocess.run([str(binary)], capture_output=True, text=True)
    if "usage:" not in r.stdout + r.stderr:
        raise LlamaToolError(f"the built {binary} does not run: {(r.stdout + r.stderr)[-2000:]}")
    return binary


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise LlamaToolError(f"{what} failed ({r.returncode}): {' '.join(cmd)}\n"
                             f"{(r.stdout + r.stderr)[-4000:]}")
