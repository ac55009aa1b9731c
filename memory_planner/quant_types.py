"""GGUF quant types as the planner needs them: byte sizes, block-size fallbacks, the ladder.

Sizes come from gguf-py's `GGML_QUANT_SIZES` (the single source of truth); the fallback
chain is the one llama-quantize applies when a row length is not a multiple of the block.
"""

from __future__ import annotations

import re

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

from .types import TensorSpec

Q = GGMLQuantizationType

# Candidate types for quantizable weights, most bits first. The IQ3_XXS..IQ1_S types are
# added only when the planner has calibration data: ggml refuses IQ2_XXS, IQ2_XS and IQ1_S
# without an importance matrix, and the others are poor without one.
DEFAULT_LADDER: tuple[str, ...] = (
    "F16", "Q8_0", "Q6_K", "Q5_K", "Q4_K", "IQ4_XS", "Q3_K", "IQ3_S", "Q2_K",
)
IMATRIX_LADDER_EXTRA: tuple[str, ...] = ("IQ3_XXS", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M",
                                          "IQ1_S")
REQUIRES_IMATRIX: frozenset[str] = frozenset({"IQ2_XXS", "IQ2_XS", "IQ1_S"})

# llama-quantize's replacement when ne0 is not a multiple of the type's block size
_FALLBACK: dict[str, str] = {
    **{t: "IQ4_NL" for t in ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_S", "IQ3_XXS",
                             "IQ3_S", "IQ4_XS")},
    "Q2_K": "Q4_0", "Q3_K": "Q4_0", "TQ1_0": "Q4_0", "TQ2_0": "Q4_0",
    "Q4_K": "Q5_0", "Q5_K": "Q5_1", "Q6_K": "Q8_0",
}


class UnknownTypeError(ValueError):
    """A type name that is not a GGML quantization type."""


def qtype(name: str) -> GGMLQuantizationType:
    """The GGMLQuantizationType for a name such as "q4_k" or "Q8_0"."""
    try:
        return Q[name.upper()]
    except KeyError:
        known = ", ".join(t.name for t in Q if t in GGML_QUANT_SIZES)
        raise UnknownTypeError(f"unknown GGUF type {name!r}; known: {known}") from None


def block_size(type_name: str) -> int:
    return GGML_QUANT_SIZES[qtype(type_name)][0]


def tensor_nbytes(n_elements: int, row_length: int, type_name: str) -> int:
    """Exact bytes of a tensor of this type (n_elements / block * type_size)."""
    blck, size = GGML_QUANT_SIZES[qtype(type_name)]
    if row_length % blck:
        raise ValueError(f"row length {row_length} is not a multiple of {type_name}'s block {blck}")
    return n_elements // blck * size


def legal_type(type_name: str, row_length: int) -> str:
    """The type llama-quantize would actually use for rows of this length."""
    t = qtype(type_name).name
    while row_length % block_size(t):
        t = _FALLBACK.get(t, "F16")  # F16 has block 1: the chain always ends
    return t


def bits_per_weight(type_name: str) -> float:
    blck, size = GGML_QUANT_SIZES[qtype(type_name)]
    return 8.0 * size / blck


def with_types(ladder: tuple[str, ...], extra: tuple[str, ...]) -> tuple[str, ...]:
    """`ladder` with the types of `extra` it lacks, each after the types of as many or more
    bits per weight (a family's own candidates: gpt-oss's MXFP4 after IQ4_XS)."""
    out = list(ladder)
    for t in extra:
        if t not in out:
            bpw = bits_per_weight(t)
            at = next((i for i, x in enumerate(out) if bits_per_weight(x) < bpw), len(out))
            out.insert(at, t)
    return tuple(out)


def candidate_types(spec: TensorSpec, ladder: tuple[str, ...]) -> list[tuple[str, str]]:
    """(legal type, asked type) pairs for a tensor, deduplicated by legal type, ladder order."""
    if not spec.quantizable:
        return [("F32", "F32")]
    out: dict[str, str] = {}
    for asked in ladder:
        legal = legal_type(asked, spec.row_length)
        out.setdefault(legal, asked)
    return [(legal, asked) for legal, asked in out.items()]


_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([kmgt]?)(i?)(b?)\s*$", re.IGNORECASE)


def parse_size(text: str | int) -> int:
    """Bytes from "128GB" (10^9), "120GiB" (2^30), "500MB", "1.5T" or a plain integer."""
    if isinstance(text, int):
        return text
    m = _SIZE_RE.match(str(text))
    if not m:
        raise ValueError(f"cannot read {text!r} as a size: use e.g. 128GB, 120GiB, 500MB")
    number, prefix, binary, _ = m.groups()
    power = "kmgt".find(prefix.lower()) + 1 if prefix else 0
    base = 1024 if binary else 1000
    return int(round(float(number) * base**power))


def format_size(n: int | float) -> str:
    """Human size in decimal units, as model pages quote them."""
    n = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


# Bytes per element of llama.cpp KV cache types (--cache-type-k/v)
KV_TYPES: dict[str, str] = {
    "f32": "F32", "f16": "F16", "bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0",
    "q4_1": "Q4_1", "q5_0": "Q5_0", "q5_1": "Q5_1", "iq4_nl": "IQ4_NL",
}


def kv_bytes_per_element(kv_type: str) -> float:
    try:
        blck, size = GGML_QUANT_SIZES[Q[KV_TYPES[kv_type.lower()]]]
    except KeyError:
        raise UnknownTypeError(
            f"unknown KV cache type {kv_type!r}; known: {', '.join(KV_TYPES)}"
        ) from None
    return size / blck
