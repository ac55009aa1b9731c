"""llama.cpp's split GGUF layout: one model in several files, loaded from the first.

`llama-gguf-split` and llama.cpp's loader (src/llama-model-loader.cpp) agree on this: the
files are `<prefix>-00001-of-0000N.gguf`; the first holds all metadata; every file holds
`split.no` (u16, from 0), `split.count` (u16) and `split.tensors.count` (i32, the tensors
of the whole model), then the infos and data of its own tensors, in the model's order.
llama.cpp is given the first file and finds the others by name.

The layout depends only on the tensors' sizes and the size limit, so separate processes
(`--shard i/N`, one per file, e.g. a cluster job array) agree on it and each writes the
same bytes as a single process writing all the files.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

SPLIT_NO = gguf.Keys.Split.LLM_KV_SPLIT_NO
SPLIT_COUNT = gguf.Keys.Split.LLM_KV_SPLIT_COUNT
SPLIT_TENSORS = gguf.Keys.Split.LLM_KV_SPLIT_TENSORS_COUNT
# the three split keys as written: key length, key, type and value (u16, u16, i32)
SPLIT_KEYS_BYTES = sum(8 + len(k) + 4 + n for k, n in
                       ((SPLIT_NO, 2), (SPLIT_COUNT, 2), (SPLIT_TENSORS, 4)))


class SplitError(ValueError):
    """The split cannot be made as asked (a tensor bigger than the limit, a wrong shard)."""


@dataclass(frozen=True)
class SplitSpec:
    """Write at most `max_bytes` per file; with `shard` (1-based) of `n_shards`, write only
    that file (n_shards must be the layout's file count, as a check the user made the same
    layout in every process)."""

    max_bytes: int
    shard: int | None = None
    n_shards: int | None = None

    def __post_init__(self):
        if self.max_bytes <= 0:
            raise SplitError(f"the split size must be positive, not {self.max_bytes}")
        if (self.shard is None) != (self.n_shards is None):
            raise SplitError("a shard needs both its number and the count: --shard i/N")
        if self.shard is not None and not 1 <= self.shard <= self.n_shards:
            raise SplitError(f"shard {self.shard}/{self.n_shards}: i must be 1 to {self.n_shards}")


def parse_shard(text: str) -> tuple[int, int]:
    """"3/12" -> (3, 12)."""
    m = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text)
    if not m:
        raise SplitError(f"--shard {text!r}: expected i/N, e.g. 3/12")
    return int(m.group(1)), int(m.group(2))


def split_paths(out: str | Path, n: int) -> list[Path]:
    """The n file names llama.cpp looks for, from the output name without `.gguf`."""
    out = Path(out)
    prefix = out.name[:-5] if out.name.endswith(".gguf") else out.name
    return [out.with_name(f"{prefix}-{i + 1:05d}-of-{n:05d}.gguf") for i in range(n)]


def split_layout(names: Sequence[str], sizes: Sequence[int], max_bytes: int,
                 header_bound: int, alignment: int) -> list[range]:
    """Consecutive tensor index ranges, one per file, each file (its header at most
    `header_bound` bytes, then its padded tensor data) within `max_bytes`. As
    llama-gguf-split does, a file takes tensors until the next one would not fit."""
    budget = max_bytes - header_bound
    parts, start, used = [], 0, 0
    for i, n in enumerate(sizes):
        n = -(-n // alignment) * alignment
        if n > budget:
            raise SplitError(f"{names[i]} is {n:,} bytes, more than a file of {max_bytes:,} "
                             f"bytes can hold after its header ({header_bound:,}): raise "
                             "--split-max-size")
        if used + n > budget and i > start:
            parts.append(range(start, i))
            start, used = i, 0
        used += n
    parts.append(range(start, len(sizes)))
    if len(parts) > 0xFFFF:
        raise SplitError(f"{len(parts)} files: llama.cpp counts splits in 16 bits")
    return parts
