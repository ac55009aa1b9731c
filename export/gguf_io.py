"""GGUF files on disk, beside the writer: atomic output, metadata read and rewritten.

Every file edgemoe writes appears at its path only when complete: it is written as
`<name>.part` and renamed into place (`atomic_output`), so a failed or interrupted run
leaves nothing at the output path.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from pathlib import Path
from typing import Any

import gguf

from memory_planner.types import MemoryPlan


@contextmanager
def atomic_output(path: str | Path) -> Iterator[Path]:
    """Yields the `.part` path to write `path` under; renames it to `path` when the block
    ends normally, removes it when the block (or the rename) raises."""
    path = Path(path)
    part = path.with_name(path.name + ".part")
    try:
        yield part
        os.replace(part, path)
    except BaseException:
        part.unlink(missing_ok=True)
        raise


def read_metadata(path: str | Path, keys: Sequence[str]) -> dict[str, Any]:
    """The values of those of `keys` that the GGUF file `path` holds (absent keys left out)."""
    reader = gguf.GGUFReader(path)
    out = {}
    for key in keys:
        f = reader.get_field(key)
        if f is not None:
            out[key] = f.contents()
    return out


def read_plan(path: str | Path) -> MemoryPlan | None:
    """The plan stored in an edgemoe GGUF (None for other files)."""
    from .writer import PLAN_KEY  # the writer imports this module

    stored = read_metadata(path, [PLAN_KEY]).get(PLAN_KEY)
    return MemoryPlan.from_json(stored) if stored is not None else None


def copy_with_metadata(src: str | Path, dst: str | Path,
                       add: Callable[[gguf.GGUFWriter], None],
                       drop: Iterable[str] = ()) -> Path:
    """Copy GGUF `src` to `dst`, tensors byte for byte, without the metadata keys `drop` and
    with those `add(writer)` writes (after the copied ones).

    `dst` may be `src`: the copy is written under a temporary name and renamed at the end.
    """
    src, dst = Path(src), Path(dst)
    skip = {gguf.Keys.General.ARCHITECTURE, *drop}
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    with atomic_output(dst) as part:
        writer = gguf.GGUFWriter(part, arch=arch, endianess=reader.endianess)
        with closing(writer):
            for f in reader.fields.values():
                if f.name in skip or f.name.startswith("GGUF."):
                    continue
                vtype = f.types[0]
                sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
                writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
            add(writer)
            for t in reader.tensors:
                writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                       t.tensor_type)
            writer.write_header_to_file()
            writer.write_kv_data_to_file()
            writer.write_ti_data_to_file()
            for t in reader.tensors:
                writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        del reader  # release the memory map before replacing src
    return dst
