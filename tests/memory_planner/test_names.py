"""GGUF tensor names parsed into kind and layer."""

from __future__ import annotations

import pytest

from memory_planner.names import TensorName, parse_tensor_name


@pytest.mark.parametrize("name, kind, layer", [
    ("blk.3.ffn_down_exps.weight", "ffn_down_exps", 3),
    ("blk.0.attn_q.bias", "attn_q", 0),
    ("blk.61.nextn.eh_proj.weight", "nextn.eh_proj", 61),
    ("blk.0.ssm_a", "ssm_a", 0),
    ("blk.2.exp_probs_b.bias", "exp_probs_b", 2),
    ("output.weight", "output", None),
    ("token_embd.weight", "token_embd", None),
    ("output_norm.weight", "output_norm", None),
    ("rope_freqs", "rope_freqs", None),
])
def test_parse_tensor_name(name, kind, layer):
    got = parse_tensor_name(name)
    assert got == TensorName(kind, layer) and (got.kind, got.layer) == (kind, layer)
