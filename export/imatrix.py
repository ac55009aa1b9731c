"""Calibration statistics on disk, in llama.cpp's importance-matrix formats.

Our stats file IS a llama.cpp GGUF imatrix (`general.type = imatrix`, tensors
`<weight>.in_sum2` {ne0, n_mat} and `<weight>.counts` {1, n_mat}), so `llama-quantize
--imatrix` takes it as it is; the expert statistics ride along as extra tensors under
`edgemoe.` names that llama.cpp's loader ignores. The legacy `.dat` format is read too.
"""

from __future__ import annotations

import struct
from contextlib import closing
from pathlib import Path

import gguf
import numpy as np

from memory_planner.stats import CalibSource, CalibStats, ExpertStats

from .gguf_check import check_gguf
from .gguf_io import atomic_output

KV_DATASETS = "imatrix.datasets"
KV_CHUNK_COUNT = "imatrix.chunk_count"
KV_CHUNK_SIZE = "imatrix.chunk_size"
KV_N_TOKENS = "edgemoe.calib.n_tokens"
KV_SCALE_NAMES = "edgemoe.sensitivity.names"
KV_SCALES = "edgemoe.sensitivity.scales"
KV_PRUNE_SCALE = "edgemoe.sensitivity.prune_scale"
COV_SUFFIX = ".edgemoe_in_cov"
# tensors whose covariance is another's (one input read by both): names, and whose
KV_COV_ALIASES = "edgemoe.cov.alias_names"
KV_COV_OWNERS = "edgemoe.cov.alias_owners"
# the model the statistics were measured on (CalibSource)
KV_SOURCE_TYPES = "edgemoe.calib.model_types"
KV_SOURCE_BPW = "edgemoe.calib.model_bpw"
KV_SOURCE_FIDELITY = "edgemoe.calib.fidelity"
_EXPERT_FIELDS = ("selected", "weight_sum", "saliency_sum", "energy_sum")


class ImatrixError(ValueError):
    """A file that is not a readable importance matrix."""


def write_stats(stats: CalibStats, path: str | Path, chunk_size: int = 0) -> Path:
    """Write `stats` as a llama.cpp GGUF imatrix (plus edgemoe's expert statistics)."""
    path = Path(path)
    w = gguf.GGUFWriter(path=None, arch="imatrix")
    w.add_type(gguf.GGUFType.IMATRIX)
    w.add_array(KV_DATASETS, list(stats.datasets) or ["edgemoe"])
    n_chunks = max(1, stats.n_tokens // chunk_size) if chunk_size else 1
    w.add_uint32(KV_CHUNK_COUNT, n_chunks)
    w.add_uint32(KV_CHUNK_SIZE, chunk_size)
    w.add_uint64(KV_N_TOKENS, stats.n_tokens)
    if stats.scales:
        names = sorted(stats.scales)
        w.add_array(KV_SCALE_NAMES, names)
        w.add_array(KV_SCALES, [float(stats.scales[n]) for n in names])
    if stats.prune_scale is not None:
        w.add_float64(KV_PRUNE_SCALE, float(stats.prune_scale))
    if stats.source is not None:
        w.add_string(KV_SOURCE_TYPES, stats.source.types)
        w.add_float64(KV_SOURCE_BPW, float(stats.source.bpw))
        w.add_string(KV_SOURCE_FIDELITY, stats.source.fidelity)
    # a covariance shared by several tensors (the same array object) is stored once
    owners: dict[int, str] = {}
    for name in sorted(stats.in_cov):
        if name in stats.in_sum2:
            owners.setdefault(id(stats.in_cov[name]), name)
    aliases = {n: owners[id(c)] for n, c in stats.in_cov.items()
               if n in stats.in_sum2 and owners[id(c)] != n}
    if aliases:
        w.add_array(KV_COV_ALIASES, sorted(aliases))
        w.add_array(KV_COV_OWNERS, [aliases[n] for n in sorted(aliases)])
    for name in sorted(stats.in_sum2):
        s = np.asarray(stats.in_sum2[name], dtype=np.float32)
        s = s.reshape(len(stats.counts[name]), -1)
        w.add_tensor(f"{name}.in_sum2", s)
        w.add_tensor(f"{name}.counts",
                     np.asarray(stats.counts[name], dtype=np.float32).reshape(-1, 1))
        if name in stats.in_cov and name not in aliases:  # llama.cpp skips these
            w.add_tensor(f"{name}{COV_SUFFIX}", np.asarray(stats.in_cov[name], np.float32))
    for layer in sorted(stats.experts):
        e = stats.experts[layer]
        for f in _EXPERT_FIELDS:
            w.add_tensor(f"edgemoe.blk.{layer}.{f}", np.asarray(getattr(e, f), dtype=np.float32))
        w.add_tensor(f"edgemoe.blk.{layer}.output_energy",
                     np.array([e.output_energy], dtype=np.float32))
    with atomic_output(path) as part, closing(w):
        w.write_header_to_file(part)
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
    return path


def read_stats(path: str | Path) -> CalibStats:
    """Read a GGUF imatrix (ours or llama.cpp's) or a legacy llama.cpp `.dat` imatrix."""
    path = Path(path)
    if not path.is_file():
        raise ImatrixError(f"{path}: no such file")
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic == b"GGUF":
        return _read_gguf(path)
    return _read_legacy(path)


def _read_gguf(path: Path) -> CalibStats:
    check_gguf(path)
    r = gguf.GGUFReader(path)
    t = r.get_field(gguf.Keys.General.TYPE)
    if t is None or t.contents() != gguf.GGUFType.IMATRIX:
        raise ImatrixError(f"{path} is a GGUF file but not an imatrix (general.type "
                           f"{t.contents() if t else None!r})")
    tensors = {x.name: np.array(x.data, dtype=np.float32) for x in r.tensors}
    in_sum2, counts, in_cov = {}, {}, {}
    shapes = {x.name: tuple(int(n) for n in reversed(x.shape)) for x in r.tensors}
    for name, data in tensors.items():
        if name.endswith(COV_SUFFIX):
            in_cov[name[: -len(COV_SUFFIX)]] = data.reshape(shapes[name])
        if name.endswith(".in_sum2"):
            base = name[: -len(".in_sum2")]
            if f"{base}.counts" not in tensors:
                raise ImatrixError(f"{path}: {base} has in_sum2 but no counts")
            c = tensors[f"{base}.counts"].reshape(-1)
            in_sum2[base] = data.reshape(len(c), -1)
            counts[base] = np.round(c)
    experts: dict[int, dict[str, np.ndarray]] = {}
    for name, data in tensors.items():
        if name.startswith("edgemoe.blk."):
            _, _, layer, field = name.split(".", 3)
            experts.setdefault(int(layer), {})[field] = data.reshape(-1)
    ds = r.get_field(KV_DATASETS)
    nt = r.get_field(KV_N_TOKENS)
    names, values = r.get_field(KV_SCALE_NAMES), r.get_field(KV_SCALES)
    scales = dict(zip(names.contents(), values.contents())) if names and values else {}
    ps = r.get_field(KV_PRUNE_SCALE)
    alias_names, alias_owners = r.get_field(KV_COV_ALIASES), r.get_field(KV_COV_OWNERS)
    if alias_names and alias_owners:
        for name, owner in zip(alias_names.contents(), alias_owners.contents()):
            if owner in in_cov:
                in_cov[name] = in_cov[owner]  # one array, as calibration made it
    st, sb, sf = (r.get_field(k) for k in (KV_SOURCE_TYPES, KV_SOURCE_BPW, KV_SOURCE_FIDELITY))
    source = (CalibSource(str(st.contents()), float(sb.contents()), str(sf.contents()))
              if st and sb and sf else None)
    n_tokens = int(nt.contents()) if nt is not None else int(
        max((c.max() for c in counts.values()), default=0))
    return CalibStats(
        in_sum2=in_sum2, counts=counts,
        experts={k: ExpertStats(**{f: v[f] for f in _EXPERT_FIELDS},
                                output_energy=float(v["output_energy"][0]))
                 for k, v in experts.items()},
        n_tokens=n_tokens,
        datasets=tuple(ds.contents()) if ds is not None else (),
        scales={k: float(v) for k, v in scales.items()},
        prune_scale=float(ps.contents()) if ps is not None else None,
        in_cov={k: v for k, v in in_cov.items() if k in in_sum2},
        source=source,
    )


def _read_legacy(path: Path) -> CalibStats:
    """llama.cpp's original format: per entry name, ncall, and sums already divided by the
    per-row counts and multiplied by ncall; no per-expert counts."""
    raw = path.read_bytes()
    pos = 0

    def take(fmt: str):
        nonlocal pos
        size = struct.calcsize(fmt)
        if pos + size > len(raw):
            raise ImatrixError(f"{path}: truncated or not an imatrix file")
        out = struct.unpack_from(fmt, raw, pos)
        pos += size
        return out

    (n_entries,) = take("<i")
    if n_entries < 1 or n_entries > 1_000_000:
        raise ImatrixError(f"{path}: not an imatrix file (entry count {n_entries})")
    in_sum2, counts = {}, {}
    for _ in range(n_entries):
        (n,) = take("<i")
        name = raw[pos:pos + n].decode()
        pos += n
        ncall, nval = take("<ii")
        if nval < 1:
            raise ImatrixError(f"{path}: entry {name} has {nval} values")
        vals = np.frombuffer(raw, dtype="<f4", count=nval, offset=pos).astype(np.float32)
        pos += 4 * nval
        # values / ncall is the mean squared input: store it as sums over ncall "tokens"
        in_sum2[name] = vals.reshape(1, -1)
        counts[name] = np.array([float(ncall)])
    datasets: tuple[str, ...] = ()
    if pos + 8 <= len(raw):
        _chunks, n = take("<ii")
        if n > 0:
            datasets = (raw[pos:pos + n].decode(errors="replace"),)
    return CalibStats(in_sum2=in_sum2, counts=counts, n_tokens=0, datasets=datasets)


def write_legacy(stats: CalibStats, path: str | Path) -> Path:
    """The legacy `.dat` format (for tools that only read that)."""
    path = Path(path)
    out = bytearray(struct.pack("<i", len(stats.in_sum2)))
    for name in sorted(stats.in_sum2):
        c = np.asarray(stats.counts[name], dtype=np.float64).reshape(-1, 1)
        # a tensor no token reached gets ones, as in the GGUF format (with ncall = 0
        # llama.cpp's reader would take the stored values, zeros, as the importance)
        ncall = max(1, int(c.max()) if c.size else 0)
        s = np.asarray(stats.in_sum2[name], dtype=np.float64).reshape(len(c), -1)
        vals = np.where(c > 0, s / np.maximum(c, 1), 1.0) * ncall
        b = name.encode()
        out += struct.pack("<i", len(b)) + b + struct.pack("<ii", ncall, vals.size)
        out += vals.astype("<f4").tobytes()
    ds = (stats.datasets[0] if stats.datasets else "edgemoe").encode()
    out += struct.pack("<ii", 1, len(ds)) + ds
    path.write_bytes(bytes(out))
    return path
