"""The eval-callback layer against the pinned llama.cpp: node names, layout, reads, writes."""

from __future__ import annotations

import ctypes

import numpy as np
import pytest

from edgemoe.calibration.hooks import EvalHooks, attach
from edgemoe.calibration.nodes import GGMLTensor, HookError, ggml, moe_routing, split_name
from edgemoe.llamacpp import eval_logits, open_llama
from tests.helpers import PROMPT

# the nodes edgemoe's runtime and calibration read or write (llama-graph.cpp build_moe_ffn)
REQUIRED = ("ffn_moe_logits", "ffn_moe_probs", "ffn_moe_argsort", "ffn_moe_topk",
            "ffn_moe_weights", "ffn_moe_down", "ffn_moe_out", "ffn_inp", "ffn_norm")


def _tokens(llm, n=40):
    return llm.tokenize(PROMPT.encode(), add_bos=False)[:n]


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])
def test_pinned_llama_cpp_still_has_the_moe_node_names(ggufs, arch):
    """Fails loudly when llama.cpp renames or restructures the nodes the runtime relies on."""
    hooks = EvalHooks()
    hooks.record_names = True
    seen = {}

    def on_weights(node):
        r = moe_routing(node)  # checks that src[1] of the weights is the top-k selection
        seen[node.layer] = r

    hooks.add("ffn_moe_weights", on_weights)
    llm = attach(open_llama(ggufs[arch], n_ctx=64, logits_all=True, threads=1), hooks)
    llm.eval(_tokens(llm))
    n_layer = 2
    for name in REQUIRED:
        missing = [f"{name}-{i}" for i in range(n_layer) if f"{name}-{i}" not in hooks.names_seen]
        assert not missing, f"llama.cpp no longer names these nodes: {missing}"
    assert sorted(seen) == list(range(n_layer))
    r = seen[0]
    assert r.ids.dtype == np.int32 and r.ids.shape == r.weights.shape == (40, 2)
    assert (r.weights[:, 0] >= r.weights[:, 1]).all()  # argsort descending: slot 0 is top


def test_struct_layout_matches_ggml():
    g = ggml()  # raises if sizeof(struct ggml_tensor) changed
    t = GGMLTensor()
    t.name = b"ffn_moe_topk-7"
    addr = ctypes.addressof(t)
    assert g.ggml_get_name(addr) == addr + GGMLTensor.name.offset
    assert split_name("ffn_moe_topk-7") == ("ffn_moe_topk", 7)
    assert split_name("ffn_moe_weights-5 (reshaped)") == ("ffn_moe_weights-5 (reshaped)", None)
    assert split_name("result_output") == ("result_output", None)


def test_reads_respect_strides_and_agree_with_each_other(ggufs):
    """probs (contiguous), argsort, and topk (a strided I32 view) read consistently."""
    got = {}
    hooks = EvalHooks()
    for name in ("ffn_moe_probs", "ffn_moe_argsort", "ffn_moe_topk"):
        hooks.add(name, lambda n, name=name: got.setdefault(name, n.matrix()), layers=[1])
    llm = attach(open_llama(ggufs["qwen3"], n_ctx=64, logits_all=True, threads=1), hooks)
    llm.eval(_tokens(llm, 24))
    probs, argsort, topk = got["ffn_moe_probs"], got["ffn_moe_argsort"], got["ffn_moe_topk"]
    assert probs.shape == (24, 4) and np.allclose(probs.sum(1), 1, atol=1e-5)
    assert topk.shape == (24, 2) and argsort.shape == (24, 4)
    np.testing.assert_array_equal(topk, argsort[:, :2])
    np.testing.assert_array_equal(topk, np.argsort(-probs, axis=1, kind="stable")[:, :2])


def test_writes_change_the_rest_of_the_graph(ggufs):
    """Writing the final norm's output changes the logits; reading alone does not."""
    tokens = list(range(5, 25))
    plain = eval_logits(open_llama(ggufs["qwen3"], n_ctx=64, f32_kv=True, threads=1), tokens)
    hooks = EvalHooks()
    hooks.add("ffn_moe_probs", lambda n: n.read())
    llm = attach(open_llama(ggufs["qwen3"], n_ctx=64, f32_kv=True, threads=1), hooks)
    np.testing.assert_array_equal(eval_logits(llm, tokens), plain)

    hooks = EvalHooks()
    hooks.add("result_norm", lambda n: n.write(np.zeros(n.read().shape, np.float32)))
    llm = attach(open_llama(ggufs["qwen3"], n_ctx=64, f32_kv=True, threads=1), hooks)
    zeroed = eval_logits(llm, tokens)
    assert np.abs(plain).max() > 1 and np.abs(zeroed).max() == 0  # no output bias


def test_handler_errors_and_missing_nodes_raise(ggufs):
    hooks = EvalHooks()

    def broken(node):
        raise ValueError("boom")

    hooks.add("ffn_moe_weights", broken)
    llm = attach(open_llama(ggufs["qwen3"], n_ctx=64, threads=1), hooks)
    with pytest.raises(HookError, match="boom"):
        llm.eval([5, 6, 7])

    hooks = EvalHooks()
    hooks.add("ffn_moe_weights_renamed", lambda n: None)
    llm = attach(open_llama(ggufs["qwen3"], n_ctx=64, threads=1), hooks)
    with pytest.raises(HookError, match="no node named ffn_moe_weights_renamed"):
        llm.eval([5, 6, 7])
