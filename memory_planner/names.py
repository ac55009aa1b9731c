"""GGUF tensor names: `blk.3.ffn_down_exps.weight` -> kind `ffn_down_exps`, layer 3."""

from __future__ import annotations

import re
from typing import NamedTuple


class TensorName(NamedTuple):
    kind: str  # "ffn_down_exps", "attn_q", "output", "token_embd", ...
    layer: int | None  # the block index of a `blk.N.*` name, else None


_NAME = re.compile(r"^(?:blk\.(\d+)\.)?(.+?)(?:\.(?:weight|bias))?$")


def parse_tensor_name(name: str) -> TensorName:
    """The kind and layer of a GGUF tensor name: what lies between the block index and the
    `.weight` / `.bias` suffix (`blk.3.attn_q.weight` -> `attn_q`, 3;
    `blk.61.nextn.eh_proj.weight` -> `nextn.eh_proj`, 61; `blk.0.ssm_a` -> `ssm_a`, 0;
    `output.weight` -> `output`, None)."""
    m = _NAME.match(name)
    return TensorName(m.group(2), int(m.group(1)) if m.group(1) else None)
