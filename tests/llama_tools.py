"""llama.cpp's own command-line tools and source files, from the sdist of the installed
llama-cpp-python.

llama-cpp-python ships libllama and libggml but not llama.cpp's programs. `llama_quantize_path`
compiles the real `llama-quantize` (tools/quantize, plus the few files of common/ it uses:
the imatrix loader, logging) from the sdist of the installed version and links it against the
installed libraries, so the tool and the Python bindings run the very same quantizer. Built
once per machine into a cache directory (10 to 20 s on 2 cores; the first sdist download
adds 10 to 60 s). `llama_imatrix_path` builds `llama-imatrix` the same way (with all of
llama-common, which its argument parser needs: 3 to 10 minutes once); `llama_tool_path`
builds any `Tool` described by its sources. `llama_cpp_file` gives one file of that source
(tests compare edgemoe's tables with llama.cpp's), unpacked once into the same cache
directory.

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
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

DIST = "llama-cpp-python"


@dataclass(frozen=True)
class Tool:
    """One llama.cpp program: its translation units (paths or globs relative to
    vendor/llama.cpp; largest first so that parallel compilation finishes early), include
    directories, the sdist prefixes to unpack, and which sources are compiled optimised."""

    name: str
    sources: tuple[str, ...]
    include_dirs: tuple[str, ...]
    needed: tuple[str, ...]
    # -O0 builds twice as fast and costs nothing where the work runs in libllama and libggml;
    # sources with hot loops of their own (imatrix's collector) are built -O2
    optimized: tuple[str, ...] = ()
    check_args: tuple[str, ...] = ()  # run with these, the built tool must print its usage
    recipe: int = 1  # bump when the build below changes, so cached binaries are rebuilt


# common.cpp provides two helpers (tty_can_use_colors, string_parse_kv_override);
# --gc-sections drops the rest of it and what that would need.
QUANTIZE = Tool(
    "llama-quantize",
    sources=("common/common.cpp", "common/json.cpp", "tools/quantize/quantize.cpp",
             "common/imatrix-loader.cpp", "common/log.cpp", "tools/quantize/main.cpp"),
    include_dirs=("include", "ggml/include", "common", "vendor", "tools/quantize"),
    # what to unpack from the sdist (the whole tree is 3,900 files)
    needed=("include/", "ggml/include/", "common/", "tools/quantize/", "vendor/nlohmann/"),
    recipe=2)
# imatrix parses its arguments with common/arg.cpp, whose option table reaches chat
# templates, downloads (cpp-httplib) and samplers: all of llama-common is compiled
IMATRIX = Tool(
    "llama-imatrix",
    sources=("common/arg.cpp", "tools/imatrix/imatrix.cpp", "vendor/cpp-httplib/httplib.cpp",
             "common/*.cpp", "common/jinja/*.cpp", "common/parsers/*.cpp"),
    include_dirs=("include", "ggml/include", "common", "vendor", "tools/imatrix"),
    needed=("include/", "ggml/include/", "common/", "tools/imatrix/", "vendor/nlohmann/",
            "vendor/cpp-httplib/", "vendor/sheredom/"),
    optimized=("tools/imatrix/imatrix.cpp",), check_args=("--help",))
PERPLEXITY = Tool(
    "llama-perplexity", sources=(*IMATRIX.sources[:1], "tools/perplexity/perplexity.cpp",
                                 "tools/perplexity/main.cpp", *IMATRIX.sources[2:]),
    include_dirs=("include", "ggml/include", "common", "vendor", "tools/perplexity"),
    needed=(*IMATRIX.needed[:3], "tools/perplexity/", *IMATRIX.needed[4:]),
    optimized=("tools/perplexity/perplexity.cpp",), check_args=("--help",))
NEEDED = QUANTIZE.needed


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
    return llama_tool_path(QUANTIZE)


def llama_imatrix_path() -> Path:
    """The `llama-imatrix` binary of the installed llama-cpp-python version, built if needed
    (all of llama-common: 3 to 10 minutes on 2 cores, once)."""
    return llama_tool_path(IMATRIX)


def llama_perplexity_path() -> Path:
    """`llama-perplexity`, built like `llama_imatrix_path` (benchmarks' baseline of validate)."""
    return llama_tool_path(PERPLEXITY)


def llama_tool_path(tool: Tool) -> Path:
    """`tool`'s binary, built from the installed version's sdist and linked against its
    libraries, cached per version and library directory."""
    version, lib = installed_version(), library_dir()
    # keyed by the library directory too: the binary's rpath points there
    key = hashlib.sha1(f"{tool.recipe} {lib.resolve()}".encode()).hexdigest()[:10]
    out = cache_dir() / f"{tool.name}-{version}-{key}" / tool.name
    if out.is_file():
        return out
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    if not cxx or not shutil.which(cxx):
        found = f"CXX={cxx} is not an executable" if cxx else "no g++ or c++ on PATH"
        raise LlamaToolError(f"building {tool.name} needs a C++17 compiler: {found} "
                             "(apt-get install g++, or set CXX)")
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="build-", dir=out.parent) as tmp:
        tmp = Path(tmp)
        t0 = time.perf_counter()
        root = _llama_cpp_source(version, tmp, needed=tool.needed)
        t1 = time.perf_counter()
        binary = _build(tool, cxx, root, lib, version, tmp / "obj")
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
    log.warning("fetching the %s %s sdist to build llama.cpp tools: %s", DIST, version,
                " ".join(cmd))
    r = subprocess.run(cmd, capture_output=True, text=True)
    found = sorted(dest.glob("*.tar.gz")) if dest.is_dir() else []
    if r.returncode != 0 or not found:
        raise LlamaToolError(
            f"could not download the {DIST} {version} sdist (needed to build llama.cpp tools; "
            f"or set EDGEMOE_LLAMA_SDIST to a copy): {' '.join(cmd)} exited with "
            f"{r.returncode}\n{(r.stdout + r.stderr)[-3000:]}")
    return found[0]


def _sources(tool: Tool, root: Path) -> list[Path]:
    """The tool's translation units, globs expanded, each once, in the listed order."""
    found: dict[Path, None] = {}
    for pattern in tool.sources:
        hits = sorted(root.glob(pattern)) if "*" in pattern else [root / pattern]
        if not hits or not all(h.is_file() for h in hits):
            raise LlamaToolError(f"{root} lacks {pattern}: llama.cpp's layout changed, update "
                                 "tests/llama_tools.py")
        found.update(dict.fromkeys(hits))
    return list(found)


def _object_key(cxx: str, args: list[str], dirs: list[str], rel: str, src: Path) -> str:
    return hashlib.sha1(repr((Path(cxx).name, args, dirs, rel)).encode()
                        + src.read_bytes()).hexdigest()[:16]


def _build(tool: Tool, cxx: str, root: Path, lib: Path, version: str, obj: Path) -> Path:
    obj.mkdir(parents=True)
    # build-info.cpp is generated by CMake from this template
    info = (root / "common" / "build-info.cpp.in").read_text()
    for k, v in {"LLAMA_BUILD_NUMBER": "0", "LLAMA_BUILD_COMMIT": f"{DIST}-{version}",
                 "BUILD_COMPILER": Path(cxx).name, "BUILD_TARGET": sys.platform}.items():
        info = info.replace(f"@{k}@", v)
    (obj / "build-info.cpp").write_text(info)
    sources = _sources(tool, root) + [obj / "build-info.cpp"]
    optimized = {root / s for s in tool.optimized}
    # objects are cached per version and flags: the tools share llama-common's 50 files
    shared = cache_dir() / f"objects-{version}"
    shared.mkdir(parents=True, exist_ok=True)

    def compile_one(i_src: tuple[int, Path]) -> Path:
        i, src = i_src
        rel = src.relative_to(root).as_posix() if src.is_relative_to(root) else None
        dirs = [d for d in tool.include_dirs if not d.startswith("tools/")
                or (rel or "").startswith("tools/")]  # a tool's own headers, for its files
        args = ["-std=c++17", "-ffunction-sections", "-fdata-sections",
                "-O2" if src in optimized else "-O0"]
        cmd = [cxx, *args, *(f"-I{root / d}" for d in dirs), "-c", str(src)]
        o = obj / f"{i}-{src.stem}.o"
        key = None
        if rel is not None:
            key = _object_key(cxx, args, dirs, rel, src)
            cached = shared / f"{src.stem}-{key}.o"
            if cached.is_file():
                shutil.copyfile(cached, o)
                return o
        _run([*cmd, "-o", str(o)], f"compiling {src.name}")
        if key is not None:
            tmp = shared / f".{cached.name}.{os.getpid()}"
            shutil.copyfile(o, tmp)
            tmp.replace(cached)  # atomic: a concurrent build simply wins or loses
        return o

    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        objects = list(pool.map(compile_one, enumerate(sources)))
    binary = obj / tool.name
    # DT_RPATH (not RUNPATH) so that LD_LIBRARY_PATH cannot swap in other libraries
    _run([cxx, *map(str, objects), "-o", str(binary), "-Wl,--gc-sections",
          f"-L{lib}", "-lllama", "-lggml", "-lggml-base", "-pthread",
          f"-Wl,-rpath,{lib}", "-Wl,--disable-new-dtags"], f"linking {tool.name}")
    r = subprocess.run([str(binary), *tool.check_args], capture_output=True, text=True)
    if "usage" not in (r.stdout + r.stderr).lower():
        raise LlamaToolError(f"the built {binary} does not run: {(r.stdout + r.stderr)[-2000:]}")
    return binary


def _run(cmd: list[str], what: str) -> None:
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise LlamaToolError(f"{what} failed ({r.returncode}): {' '.join(cmd)}\n"
                             f"{(r.stdout + r.stderr)[-4000:]}")
