"""Runtime top-any in llama.cpp: exactness at the two ends, the rule's decisions, the API."""

from __future__ import annotations

import io

import gguf
import numpy as np
import pytest

from edgemoe.calibration.hooks import EvalHooks
from edgemoe.cli import chat, run
from edgemoe.llamacpp import eval_logits, open_llama, tokenize
from edgemoe.runtime import topany
from edgemoe.runtime.model import load
from tests.helpers import PROMPT


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])
def test_tau_zero_is_bit_identical_to_plain_llama_cpp(ggufs, arch):
    path = ggufs[arch]
    tokens = tokenize(path, PROMPT, 48)
    plain = eval_logits(open_llama(path, n_ctx=64, threads=1), tokens)
    # the callback installed and running, dropping nothing
    hooked = load(path, threads=1, top_any=0, n_ctx=64, logits_all=True, hooks=EvalHooks())
    assert hooked.dropper is not None
    np.testing.assert_array_equal(eval_logits(hooked, tokens), plain)
    assert hooked.expert_use.experts_per_token == 2.0
    off = load(path, threads=1, top_any="off", n_ctx=64, logits_all=True)
    assert off.dropper is None  # no callback at all
    np.testing.assert_array_equal(eval_logits(off, tokens), plain)


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])
def test_dropping_every_second_slot_is_expert_used_count_one(ggufs, arch):
    path = ggufs[arch]
    tokens = tokenize(path, PROMPT, 48)
    arch_name = gguf.GGUFReader(path).get_field("general.architecture").contents()
    k1 = open_llama(path, n_ctx=64, kv_overrides={f"{arch_name}.expert_used_count": 1}, threads=1)
    want = eval_logits(k1, tokens)
    full = eval_logits(open_llama(path, n_ctx=64, threads=1), tokens)
    assert np.abs(want - full).max() > 0.1, "top-1 routing should change these logits"

    hooks = EvalHooks()
    dropper = topany.SlotDropper(lambda layer, w: np.arange(w.shape[1])[None, :] % 2 == 1)
    dropper.install(hooks)
    llm = load(path, threads=1, top_any=0, n_ctx=64, logits_all=True, hooks=hooks)
    np.testing.assert_array_equal(eval_logits(llm, tokens), want)
    assert dropper.use.removed_share == 0.5 and dropper.use.experts_per_token == 1.0


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])
def test_skipping_slots_every_token_drops_changes_no_bit(ggufs, arch):
    """Cutting dropped slots from mul_mat_id (decode) = pointing them at the top expert;
    the one-token fast path decides as the batched rule."""
    path = ggufs[arch]
    tokens = tokenize(path, PROMPT, 24)

    def decode(skip: bool, generic: bool = False):
        hooks = EvalHooks()
        if generic:  # the batched numpy path, also for one token
            dropper = topany.SlotDropper(topany.threshold_rule([0.3, 0.3]), skip=skip)
        else:  # TopAny has a plain-Python path for one token
            dropper = topany.TopAny([0.3, 0.3], skip=skip)
        dropper.install(hooks)
        llm = load(path, threads=1, top_any=0, n_ctx=64, logits_all=True, hooks=hooks)
        llm.eval(tokens[:8])
        for t in tokens[8:]:
            llm.eval([t])
        return np.array(llm.scores[:len(tokens)]), dropper

    want, plain_dropper = decode(False, generic=True)
    got, skipper = decode(True)
    assert skipper.n_skips > 5 and plain_dropper.n_skips == 0
    assert skipper.use == plain_dropper.use
    np.testing.assert_array_equal(got, want)
    got, generic_skipper = decode(True, generic=True)
    assert generic_skipper.n_skips == skipper.n_skips
    np.testing.assert_array_equal(got, want)


def test_thresholds_drop_small_weights_and_keep_the_top(ggufs):
    path = ggufs["qwen3"]
    tokens = tokenize(path, PROMPT, 48)
    seen = []
    hooks = EvalHooks()
    hooks.add("ffn_moe_weights_norm", lambda n: seen.append(n.matrix()), required=True)
    llm = load(path, threads=1, top_any=0.5, n_ctx=64, logits_all=True, hooks=hooks)
    eval_logits(llm, tokens)
    w = np.concatenate(seen)  # renormalised weights after the rule, (tokens * layers, k)
    dropped = w == 0
    assert dropped.any() and not dropped.all(axis=1).any()  # every token keeps one expert
    assert np.allclose(w.sum(1), 1, atol=1e-6)
    # kept second slots were at least half the top one
    kept2 = ~dropped[:, 1]
    assert (w[kept2, 1] >= 0.5 * w[kept2, 0] - 1e-6).all()
    share = dropped.mean()
    assert llm.expert_use.removed_share == pytest.approx(share)


def test_protected_positions_keep_all_their_experts(ggufs):
    path = ggufs["qwen3"]
    tokens = tokenize(path, PROMPT, 20)
    hooks = EvalHooks()
    keep_top = topany.TopAny([1.0, 1.0], protect_first=5).install(hooks)
    llm = load(path, threads=1, top_any=0, n_ctx=64, hooks=hooks)
    llm.eval(tokens[:12])  # one batch: positions 0..11
    llm.eval(tokens[12:])  # then 12..19; the last layer sees only the output row
    use = keep_top.use
    assert use.tokens == {0: 20, 1: 2}
    assert use.kept[0] == 20 + 5  # tau = 1 keeps only the top, except at positions 0-4
    assert use.kept[1] == 2


def test_completion_chat_and_verbs_stream(ggufs, tmp_path):
    path = ggufs["qwen3"]
    greedy = {"max_tokens": 6, "temperature": 0.0}
    plain = open_llama(path, n_ctx=128, logits_all=False, threads=1)
    want = plain(PROMPT[:40], **greedy)["choices"][0]["text"]
    llm = load(path, threads=1, top_any=0, n_ctx=128, hooks=EvalHooks())
    assert llm(PROMPT[:40], **greedy)["choices"][0]["text"] == want
    llm = load(path, threads=1, top_any=0.3, n_ctx=128)
    pieces = [c["choices"][0]["text"] for c in llm(PROMPT[:40], stream=True, **greedy)]
    assert len(pieces) >= 1 and llm.expert_use.experts_per_token < 2.0
    msg = llm.create_chat_completion(messages=[{"role": "user", "content": "hi"}], **greedy)
    assert msg["choices"][0]["message"]["role"] == "assistant"

    out = io.StringIO()
    text = run(str(path), PROMPT[:40], top_any="0.3", max_tokens=6, temperature=0.0, ctx=128,
               threads=1, out=out)
    assert out.getvalue().startswith(text) and text
    out = io.StringIO()
    messages = chat(str(path), threads=1, top_any="0.3", max_tokens=4, temperature=0.0, ctx=128,
                    inp=io.StringIO("hello\nhow are you\n\n"), out=out)
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant"]
    assert out.getvalue().count("> ") == 3
