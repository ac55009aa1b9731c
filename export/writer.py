"""Stream a GGUF file: metadata and tensor infos first, then data tensor by tensor.

Sizes are known from the plan, so the header is complete before any weight is read. Data
is produced expert slice by expert slice on a thread pool (ggml's quantizer releases the
GIL) with a bounded number of slices in flight (threads + 1); dense tensors are read and
quantized in row blocks no larger than the largest expert slice. Memory thus stays near one
slice per worker, whatever the model's size. The file is written under a temporary name and
renamed only when complete.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Executor, ThreadPoolExecutor
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

from memory_planner.quant_types import qtype
from memory_planner.types import MemoryPlan

from .arch.base import TensorRecipe
from .gguf_io import header_bytes, resumable_output
from .options import ExportOptions
from .quantize import default_threads, quantize_rows
from .reads import check_finite
from .search import quantize_rows_searched, scaled_correlation
from .split import (
    SPLIT_COUNT,
    SPLIT_KEYS_BYTES,
    SPLIT_NO,
    SPLIT_TENSORS,
    SplitError,
    split_layout,
    split_paths,
)

log = logging.getLogger(__name__)

# Dense row blocks hold at least this many weights (and at most the largest expert slice's
# count, if larger): big enough that per-block overhead is nothing next to the quantizer.
MIN_BLOCK_ELEMENTS = 1 << 20

PLAN_KEY = "edgemoe.plan"  # the plan JSON, stored in the file's metadata
VERSION_KEY = "edgemoe.version"


class WriterStateError(RuntimeError):
    """Data written out of order or with a size the header did not announce."""


class _DataStream:
    """Writes tensor data in header order, checking each tensor's announced size."""

    def __init__(self, fout, infos: Sequence[tuple[str, int]], alignment: int):
        self.fout = fout
        self.pending = deque(infos)
        self.alignment = alignment
        self.current: tuple[str, int] | None = None
        self.written = 0

    def begin(self, name: str) -> None:
        if self.current is not None:
            raise WriterStateError(f"begin({name}) while {self.current[0]} is still open")
        if not self.pending or self.pending[0][0] != name:
            want = self.pending[0][0] if self.pending else "nothing"
            raise WriterStateError(f"tensor {name} written out of order: the header expects {want}")
        self.current = self.pending.popleft()
        self.written = 0
        self._pad()

    def write(self, data: np.ndarray) -> None:
        if self.current is None:
            raise WriterStateError("write() outside begin()/end()")
        self.fout.write(np.ascontiguousarray(data).data)
        self.written += data.nbytes

    def end(self) -> None:
        name, nbytes = self.current
        if self.written != nbytes:
            raise WriterStateError(f"{name}: wrote {self.written} bytes, header says {nbytes}")
        self.current = None
        self._pad()

    def _pad(self) -> None:
        pos = self.fout.tell()
        pad = -pos % self.alignment
        if pad:
            self.fout.write(b"\0" * pad)

    def close_check(self) -> None:
        if self.pending or self.current is not None:
            raise WriterStateError(f"{len(self.pending)} tensors were never written")


def _ordered(executor: Executor, fn: Callable, items: Sequence, window: int) -> Iterator:
    """executor.map with at most `window` results in flight (bounded memory)."""
    futures: deque = deque()
    it = iter(items)
    for item in it:
        futures.append(executor.submit(fn, item))
        if len(futures) >= window:
            yield futures.popleft().result()
    while futures:
        yield futures.popleft().result()


def _file_type(plan: MemoryPlan) -> int:
    """general.file_type: the type holding the most bytes among quantized tensors."""
    by_type: dict[str, int] = {}
    for t in plan.tensors:
        by_type[t.type] = by_type.get(t.type, 0) + t.nbytes
    main = max(by_type, key=by_type.__getitem__)
    names = {"F32": "ALL_F32", "F16": "MOSTLY_F16", "BF16": "MOSTLY_BF16"}
    ftype = names.get(main, f"MOSTLY_{main}")
    for candidate in (ftype, f"{ftype}_M", f"{ftype}_S", f"{ftype}_MOE"):  # MXFP4: _MOE
        if candidate in gguf.LlamaFileType.__members__:
            return int(gguf.LlamaFileType[candidate])
    return int(gguf.LlamaFileType.GUESSED)


def write_gguf(
    out_path: str | Path,
    *,
    arch_name: str,
    recipes: Sequence[TensorRecipe],
    source,
    plan: MemoryPlan,
    add_metadata: Callable[[gguf.GGUFWriter], None],
    options: ExportOptions,
) -> Path:
    """Write `recipes` quantized as `plan` says, as `options` say (statistics, search,
    threads, reuse, progress, split: `export.options.ExportOptions`); returns the final path
    (with a split, the first file's, or the shard's).

    `add_metadata` fills the KV section (hyperparameters, tokenizer, names).
    """
    out_path = Path(out_path)
    types = plan.by_name()
    missing = [r.spec.name for r in recipes if r.spec.name not in types]
    if missing:
        raise ValueError(f"the plan has no type for {len(missing)} tensors: {missing[:5]}")

    def header(part: range, split_no: int | None = None, n_split: int = 1) -> gguf.GGUFWriter:
        w = gguf.GGUFWriter(path=None, arch=arch_name)
        if not split_no:  # the whole file, or a split's first file: all metadata
            add_metadata(w)
            w.add_file_type(_file_type(plan))
            w.add_quantization_version(gguf.GGML_QUANT_VERSION)
            w.add_string(PLAN_KEY, plan.to_json())
        if split_no is not None:
            w.add_uint16(SPLIT_NO, split_no)
            w.add_uint16(SPLIT_COUNT, n_split)
            w.add_int32(SPLIT_TENSORS, len(recipes))
        for r in (recipes[i] for i in part):
            w.add_tensor_info(r.spec.name, r.spec.shape, np.dtype(np.float32),
                              types[r.spec.name].nbytes, raw_dtype=qtype(types[r.spec.name].type))
        return w

    whole = range(len(recipes))
    split = options.split
    if split is None:
        _write_file(out_path, header(whole), [recipes[i] for i in whole], source, types,
                    options, options.overwrite)
        return out_path
    bound = len(header_bytes(header(whole))) + SPLIT_KEYS_BYTES
    parts = split_layout([r.spec.name for r in recipes],
                         [types[r.spec.name].nbytes for r in recipes], split.max_bytes, bound,
                         gguf.GGUFWriter(path=None, arch=arch_name).data_alignment)
    paths = split_paths(out_path, len(parts))
    todo = range(len(parts))
    if split.shard is not None:
        if split.n_shards != len(parts):
            raise SplitError(f"--shard {split.shard}/{split.n_shards}: at "
                             f"{split.max_bytes:,} bytes per file this model makes "
                             f"{len(parts)} files, so N must be {len(parts)}")
        todo = range(split.shard - 1, split.shard)
    for i in todo:
        _write_file(paths[i], header(parts[i], i, len(parts)),
                    [recipes[j] for j in parts[i]], source, types, options)
    return paths[todo[0]]


def _write_file(out_path: Path, w: gguf.GGUFWriter, recipes: Sequence[TensorRecipe], source,
                types: Mapping, options: ExportOptions, overwrite: Path | None = None) -> None:
    """One GGUF file: the header of `w`, then the data of `recipes` (resumable; written over
    `overwrite`, see `resumable_output`)."""
    infos = [(r.spec.name, types[r.spec.name].nbytes) for r in recipes]

    # the options the data loop below reads
    imatrix, covariance, reuse = options.imatrix, options.covariance, options.reuse
    search, progress = options.search, options.progress
    threads = options.threads or default_threads()
    block = max([MIN_BLOCK_ELEMENTS] + [math.prod(r.spec.shape[1:]) for r in recipes
                                        if r.spec.n_experts])
    total = sum(n for _, n in infos)
    copies = _reusable(reuse, recipes, types) if reuse is not None else {}
    header = header_bytes(w)
    fingerprint = _fingerprint(header, source, options)
    with resumable_output(out_path, header, fingerprint, [n for _, n in infos],
                          w.data_alignment, overwrite) as (fout, first):
        stream = _DataStream(fout, infos[first:], w.data_alignment)
        desc = f"writing {out_path.name}"
        if covariance and search > 1:  # tell why it takes longer than llama-quantize
            desc += " (output-error search)"
        with ThreadPoolExecutor(threads) as pool, tqdm(
            total=total, initial=sum(n for _, n in infos[:first]), unit="B", unit_scale=True,
            desc=desc, disable=not progress,
        ) as bar:
            for r in recipes[first:]:
                type_name = types[r.spec.name].type
                im = None if imatrix is None else imatrix.get(r.spec.name)
                cov = None if covariance is None or search < 2 else covariance.get(r.spec.name)
                stream.begin(r.spec.name)
                if r.spec.name in copies:
                    chunks = _copied(reuse, *copies[r.spec.name], block)
                else:
                    quant = _quantizer(type_name, search, options.cpu_rows)
                    chunks = _tensor_chunks(r, source, quant, im, cov, pool, threads, block)
                for chunk in chunks:
                    stream.write(chunk)
                    bar.update(chunk.nbytes)
                    del chunk  # not held while the next one is awaited
                stream.end()
        stream.close_check()
    log.info("wrote %s (%d bytes of tensor data)", out_path, total)


def _fingerprint(header: bytes, source, options: ExportOptions) -> dict[str, str]:
    """What decides the file's bytes besides its header, by part, so that a resumed export
    is byte-identical to an uninterrupted one and a changed input says what changed."""
    from . import quantize, search
    from .ggml import ggml_library_path

    def digest(*parts) -> str:
        h = hashlib.sha256()
        for p in parts:
            h.update(p if isinstance(p, bytes) else repr(p).encode())
        return h.hexdigest()[:32]

    def arrays(d) -> list:
        return [] if not d else [(k, v.shape, v.dtype.str, hashlib.sha256(
            np.ascontiguousarray(v).data).hexdigest()) for k, v in sorted(d.items())]

    def identity(p: Path) -> tuple:
        st = p.stat()
        return str(p.resolve()), st.st_size, st.st_mtime_ns

    reuse = [identity(Path(options.reuse))] if options.reuse is not None else []
    return {
        "plan or metadata": digest(header),
        "source files": digest(*(identity(p) for p in source.files)),
        "statistics or search": digest(options.search, reuse,
                                       arrays(options.imatrix), arrays(options.covariance)),
        "row quantizer": digest("ggml-cpu" if options.cpu_rows else "ggml"),
        "quantizer": digest(Path(quantize.__file__).read_bytes(),
                            Path(search.__file__).read_bytes(),
                            identity(ggml_library_path())),
    }


def _reusable(path: str | Path, recipes: Sequence[TensorRecipe],
              types: Mapping) -> dict[str, tuple[int, int]]:
    """(offset, size) in `path` of the tensors the new file can copy from it."""
    want = {r.spec.name: tuple(r.spec.shape) for r in recipes}
    out = {}
    for t in gguf.GGUFReader(path).tensors:
        tp = types.get(t.name)
        if (tp is not None and t.tensor_type == qtype(tp.type) and int(t.n_bytes) == tp.nbytes
                and tuple(int(n) for n in reversed(t.shape)) == want.get(t.name)):
            out[t.name] = (int(t.data_offset), int(t.n_bytes))
    return out


def _copied(path: str | Path, offset: int, size: int, block: int) -> Iterator[np.ndarray]:
    """`size` bytes of `path` from `offset`, in pieces of about `block` weights."""
    piece = 4 * block
    with open(path, "rb") as f:
        f.seek(offset)
        while size > 0:
            data = f.read(min(piece, size))
            if not data:
                raise WriterStateError(f"{path} ends before the tensor it was to copy from it")
            size -= len(data)
            yield np.frombuffer(data, np.uint8)


def _quantizer(type_name: str, search: int, cpu_rows: bool = False) -> Callable:
    """rows, imatrix, covariance -> bytes: ggml's quantization, searched where a covariance
    is given (float types are exact conversions: nothing to search); `cpu_rows`: see
    `ExportOptions`."""
    exact = type_name in ("F32", "F16", "BF16")

    def quant(rows: np.ndarray, im: np.ndarray | None, cov: np.ndarray | None) -> np.ndarray:
        if cov is None or exact:
            return quantize_rows(rows, type_name, im, cpu_rows=cpu_rows)
        return quantize_rows_searched(rows, type_name, im, cov, search)
    return quant


def _finite(data: np.ndarray, r: TensorRecipe, source, expert: int | None = None) -> np.ndarray:
    """`data` as loaded for `r`, or an error naming the source tensor and file if it holds
    NaN or infinite values (llama.cpp would compute garbage with them)."""
    name = r.hf_names[expert if expert is not None and not r.stacked else 0]
    return check_finite(data, name, source.file_of(name))


def _tensor_chunks(r: TensorRecipe, source, quant: Callable, imatrix: np.ndarray | None,
                   cov: np.ndarray | None, pool: Executor, threads: int,
                   block: int) -> Iterator[np.ndarray]:
    """The bytes of one tensor, in file order, at most threads + 1 pieces in flight.

    Expert tensors come one expert slice at a time. Dense tensors that are read as they are
    (no transform, no row selection) come in row blocks of at most `block` weights, read and
    quantized on the workers; the others are loaded whole and split into `threads` blocks.
    ggml quantizes row by row, so the blocks never change the bytes.
    """
    window = threads + 1
    if r.spec.n_experts:
        def one(e: int) -> np.ndarray:
            row_im = None
            if imatrix is not None:
                row_im = imatrix[e] if imatrix.ndim == 2 else imatrix
            row_cov = None
            if cov is not None and cov.ndim == 4:
                row_cov = cov[e]
            elif cov is not None:  # shared by the experts: scaled by this one's imatrix
                row_cov = cov if row_im is None else scaled_correlation(cov, row_im)
            return quant(_finite(r.load_expert(source, e), r, source, e), row_im, row_cov)

        yield from _ordered(pool, one, range(r.spec.n_experts), window)
        return
    name = r.hf_names[0]
    shape = tuple(source.shape(name))
    if r.transform is None and r.rows is None and len(shape) > 1:
        per_index = math.prod(shape[1:])  # weights under one index of the first axis
        step = max(1, min(-(-shape[0] // threads), block // per_index))

        def part(start: int) -> np.ndarray:
            a = _finite(source.load(name, range(start, min(start + step, shape[0]))), r, source)
            return quant(a.reshape(-1, a.shape[-1]), imatrix, cov)

        yield from _ordered(pool, part, range(0, shape[0], step), window)
        return
    data = _finite(r.load(source), r, source)
    rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
    # split big matrices into row blocks so that all workers quantize at once
    n = rows.shape[0]
    step = max(1, -(-n // threads))
    blocks = [rows[i:i + step] for i in range(0, n, step)]
    yield from _ordered(pool, lambda b: quant(b, imatrix, cov), blocks, window)
