"""GGUF tensor names: `blk.3.ffn_down_exps.weight` -> kind `ffn_down_exps`, layer 3."""

from __future__ import annotations

from typing import NamedTuple


class TensorName(NamedTuple):
    kind: str  # "ffn_down_exps", "attn_q", or the first part of a name outside the blocks
    layer: int | None  # the block index of a `blk.N.*` name, else None


def parse_tensor_name(name: str) -> TensorName:
    """The kind and layer of a GGUF tensor name.

    In a block, the kind is the part after the index (`blk.3.attn_q.weight` -> `attn_q`;
    `blk.61.nextn.eh_proj.weight` -> `nextn`); outside the blocks it is the first part
    (`output.weight` -> `output`, `token_embd.weight` -> `token_embd`).
    """
    parts = name.split(".")
    if parts[0] == "blk" and len(parts) > 2:
        return TensorName(parts[2], int(parts[1]) if parts[1].isdigit() else None)
    return TensorName(parts[0], None)
