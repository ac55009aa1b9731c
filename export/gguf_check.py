"""Check a GGUF file's header against its size before anything parses it for real.

A damaged or hostile file can claim a billion tensors, a string longer than the file, an
array of 2^60 items or a tensor of 40 dimensions; a parser that believes it allocates or
loops without end. `check_gguf` walks the header with every count and length bounded by the
bytes that are really there (memory O(1), time linear in the header's size) and checks that
every tensor's data lies inside the file, as llama.cpp's loader does. It raises
`GGUFHeaderError` naming the file and the first problem.
"""

from __future__ import annotations

import struct
from pathlib import Path

import gguf

GGML_MAX_DIMS = 4
DEFAULT_ALIGNMENT = 32
_SCALARS = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}  # size
_STRING, _ARRAY = 8, 9
_UINT_FMT = {0: "<B", 2: "<H", 4: "<I", 10: "<Q"}  # for general.alignment


class GGUFHeaderError(ValueError):
    """The file is not a GGUF, or its header does not fit the file."""


class _Cursor:
    def __init__(self, path: Path):
        self.path = path
        self.size = path.stat().st_size
        self.fh = open(path, "rb")  # noqa: SIM115  # closed by check_gguf
        self.pos = 0

    def fail(self, what: str) -> GGUFHeaderError:
        return GGUFHeaderError(f"{self.path}: {what} (at byte {self.pos} of {self.size}); "
                               "the file is truncated or damaged")

    def need(self, n: int, what: str) -> None:
        if n < 0 or self.pos + n > self.size:
            raise self.fail(f"{what} needs {n} bytes, {self.size - self.pos} remain")

    def read(self, n: int, what: str) -> bytes:
        self.need(n, what)
        data = self.fh.read(n)
        self.pos += n
        return data

    def skip(self, n: int, what: str) -> None:
        self.need(n, what)
        self.fh.seek(n, 1)
        self.pos += n

    def u32(self, what: str) -> int:
        return struct.unpack("<I", self.read(4, what))[0]

    def u64(self, what: str) -> int:
        return struct.unpack("<Q", self.read(8, what))[0]

    def string(self, what: str) -> bytes:
        return self.read(self.u64(f"{what} length"), what)


def _skip_value(c: _Cursor, vtype: int, key: str) -> int | None:
    """Skip one value; returns it when it is an unsigned integer (for general.alignment)."""
    if vtype in _SCALARS:
        raw = c.read(_SCALARS[vtype], f"value of {key}")
        return struct.unpack(_UINT_FMT[vtype], raw)[0] if vtype in _UINT_FMT else None
    if vtype == _STRING:
        c.skip(c.u64(f"string length of {key}"), f"string value of {key}")
        return None
    if vtype == _ARRAY:
        sub, count = c.u32(f"array type of {key}"), c.u64(f"array length of {key}")
        if sub in _SCALARS:
            c.skip(count * _SCALARS[sub], f"{count} array items of {key}")
        elif sub == _STRING:
            c.need(count * 8, f"{count} strings of {key}")  # each has an 8-byte length
            for _ in range(count):
                c.skip(c.u64(f"string length in {key}"), f"a string in {key}")
        else:
            raise c.fail(f"array {key} has items of unknown type {sub}")
        return None
    raise c.fail(f"key {key} has unknown value type {vtype}")


def check_gguf(path: str | Path) -> None:
    """Raise GGUFHeaderError unless `path`'s header and tensor table fit the file."""
    c = _Cursor(Path(path))
    try:
        if c.read(4, "magic") != b"GGUF":
            raise GGUFHeaderError(f"{c.path} is not a GGUF file (no GGUF magic)")
        version = c.u32("version")
        if version not in (2, 3):
            raise c.fail(f"GGUF version {version} is not 2 or 3")
        n_tensors, n_kv = c.u64("tensor count"), c.u64("key count")
        # a key takes at least 12 bytes, a tensor info at least 24: counts beyond that lie
        c.need(n_kv * 12 + n_tensors * 24, f"{n_kv} keys and {n_tensors} tensors")
        alignment = DEFAULT_ALIGNMENT
        for _ in range(n_kv):
            key = c.string("key").decode("utf-8", "replace")
            value = _skip_value(c, c.u32(f"value type of {key}"), key)
            if key == gguf.Keys.General.ALIGNMENT and value:
                alignment = value
        tensors = []
        for _ in range(n_tensors):
            name = c.string("tensor name").decode("utf-8", "replace")
            n_dims = c.u32(f"dimension count of {name}")
            if not 1 <= n_dims <= GGML_MAX_DIMS:
                raise c.fail(f"tensor {name} has {n_dims} dimensions (ggml has 1 to "
                             f"{GGML_MAX_DIMS})")
            dims = [c.u64(f"dimensions of {name}") for _ in range(n_dims)]
            ttype, offset = c.u32(f"type of {name}"), c.u64(f"offset of {name}")
            tensors.append((name, dims, ttype, offset))
        data_start = -(-c.pos // alignment) * alignment
        for name, dims, ttype, offset in tensors:
            _check_tensor(c, name, dims, ttype, offset, data_start)
    finally:
        c.fh.close()


def _check_tensor(c: _Cursor, name: str, dims: list[int], ttype: int, offset: int,
                  data_start: int) -> None:
    try:
        qtype = gguf.GGMLQuantizationType(ttype)
    except ValueError:
        raise c.fail(f"tensor {name} has unknown ggml type {ttype}") from None
    block, type_size = gguf.GGML_QUANT_SIZES[qtype]
    if any(d == 0 for d in dims) or dims[0] % block:
        raise c.fail(f"tensor {name} {qtype.name} has dimensions {dims}")
    n = 1
    for d in dims:
        n *= d
    end = data_start + offset + n // block * type_size
    if end > c.size:
        raise GGUFHeaderError(f"{c.path}: tensor {name} ({qtype.name} {dims}) ends at byte "
                              f"{end}, beyond the end of the file ({c.size} bytes); the file "
                              "is truncated or damaged")
