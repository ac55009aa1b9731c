"""Runtime top-any in llama.cpp: exactness at the two ends, thresholds from the file, the API."""

from __future__ import annotations

import io
import json

import gguf
import numpy as np
import pytest

from edgemoe import runtime, topany
from edgemoe.hooks import EvalHooks
from edgemoe.llamacpp import eval_logits, open_llama
from edgemoe.validate import chat, run

from . import tiny_gguf
from .tiny_gguf import PROMPT, TEXT

ggufs = tiny_gguf.ggufs  # the session fixture


def _tokens(path, n=48):
    from edgemoe.textscore import tokenize_file

    return tokenize_file(path, PROMPT)[:n]


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])
def test_tau_zero_is_bit_identical_to_plain_llama_cpp(ggufs, arch):
    path = ggufs[arch]
    tokens = _tokens(path)
    plain = eval_logits(open_llama(path, n_ctx=64, threads=1), tokens)
    # the callback installed and running, dropping nothing
    hooked = runtime.load(path, threads=1, top_any=0, n_ctx=64, logits_all=True, hooks=EvalHooks())
    assert hooked.dropper is not None
    np.testing.assert_array_equal(eval_logits(hooked, tokens), plain)
    assert hooked.expert_use.experts_per_token == 2.0
    off = runtime.load(path, threads=1, top_any="off", n_ctx=64, logits_all=True)
    assert off.dropper is None  # no callback at all
    np.testing.assert_array_equal(eval_logits(off, tokens), plain)


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])
def test_dropping_every_second_slot_is_expert_used_count_one(ggufs, arch):
    path = ggufs[arch]
    tokens = _tokens(path)
    arch_name = gguf.GGUFReader(path).get_field("general.architecture").contents()
    k1 = open_llama(path, n_ctx=64, kv_overrides={f"{arch_name}.expert_used_count": 1}, threads=1)
    want = eval_logits(k1, tokens)
    full = eval_logits(open_llama(path, n_ctx=64, threads=1), tokens)
    assert np.abs(want - full).max() > 0.1, "top-1 routing should change these logits"

    hooks = EvalHooks()
    dropper = topany.SlotDropper(lambda layer, w: np.arange(w.shape[1])[None, :] % 2 == 1)
    dropper.install(hooks)
    llm = runtime.load(path, threads=1, top_any=0, n_ctx=64, logits_all=True, hooks=hooks)
    np.testing.assert_array_equal(eval_logits(llm, tokens), want)
    assert dropper.use.removed_share == 0.5 and dropper.use.experts_per_token == 1.0


@pytest.mark.parametrize("arch", ["qwen3", "mixtral"])
def test_skipping_slots_every_token_drops_changes_no_bit(ggufs, arch):
    """Cutting dropped slots from mul_mat_id (decode) = pointing them at the top expert;
    the one-token fast path decides as the batched rule."""
    path = ggufs[arch]
    tokens = _tokens(path, 24)

    def decode(skip: bool, generic: bool = False):
        hooks = EvalHooks()
        if generic:  # the batched numpy path, also for one token
            dropper = topany.SlotDropper(topany.threshold_rule([0.3, 0.3]), skip=skip)
        else:  # TopAny has a plain-Python path for one token
            dropper = topany.TopAny([0.3, 0.3], skip=skip)
        dropper.install(hooks)
        llm = runtime.load(path, threads=1, top_any=0, n_ctx=64, logits_all=True, hooks=hooks)
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
    tokens = _tokens(path)
    seen = []
    hooks = EvalHooks()
    hooks.add("ffn_moe_weights_norm", lambda n: seen.append(n.matrix()), required=True)
    llm = runtime.load(path, threads=1, top_any=0.5, n_ctx=64, logits_all=True, hooks=hooks)
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
    tokens = _tokens(path, 20)
    hooks = EvalHooks()
    keep_top = topany.TopAny([1.0, 1.0], protect_first=5).install(hooks)
    llm = runtime.load(path, threads=1, top_any=0, n_ctx=64, hooks=hooks)
    llm.eval(tokens[:12])  # one batch: positions 0..11
    llm.eval(tokens[12:])  # then 12..19; the last layer sees only the output row
    use = keep_top.use
    assert use.tokens == {0: 20, 1: 2}
    assert use.kept[0] == 20 + 5  # tau = 1 keeps only the top, except at positions 0-4
    assert use.kept[1] == 2


def test_thresholds_stored_in_the_file_are_used(ggufs, tmp_path):
    src = ggufs["qwen3"]
    dst = tmp_path / "with-tau.gguf"
    topany.write_top_any(src, dst, [0.3, 0.6], {"note": "test"})
    tau, info = topany.read_top_any(dst)
    assert tau.tolist() == pytest.approx([0.3, 0.6]) and info == {"note": "test"}
    # the rest of the file is unchanged
    a, b = gguf.GGUFReader(src), gguf.GGUFReader(dst)
    assert [t.name for t in a.tensors] == [t.name for t in b.tensors]
    assert all(np.array_equal(x.data, y.data) for x, y in zip(a.tensors, b.tensors))
    tokens = _tokens(src)
    stored = runtime.load(dst, threads=1, n_ctx=64, logits_all=True)
    explicit = runtime.load(src, threads=1, top_any=[0.3, 0.6], n_ctx=64, logits_all=True)
    np.testing.assert_array_equal(eval_logits(stored, tokens), eval_logits(explicit, tokens))
    assert 0 < stored.expert_use.removed_share < 0.5
    off = runtime.load(dst, threads=1, top_any="off", n_ctx=64, logits_all=True)
    np.testing.assert_array_equal(eval_logits(off, tokens),
                                  eval_logits(open_llama(src, n_ctx=64, threads=1), tokens))


def test_add_top_any_metadata_for_the_exporter(tmp_path):
    w = gguf.GGUFWriter(tmp_path / "m.gguf", arch="qwen3moe")
    topany.add_top_any_metadata(w, [0.0, 0.25], {"share": 0.2})
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    tau, info = topany.read_top_any(tmp_path / "m.gguf")
    assert tau.dtype == np.float32 and tau.tolist() == [0.0, 0.25] and info == {"share": 0.2}
    with pytest.raises(ValueError, match="in \\[0, 1\\]"):
        topany.add_top_any_metadata(w, [1.5])


def test_parse_spec():
    stored = np.array([0.1, 0.2], np.float32)
    assert topany.parse_spec(None, 2, stored) is stored
    assert topany.parse_spec("file", 2, None) is None
    assert topany.parse_spec("off", 2, stored).tolist() == [0, 0]
    assert topany.parse_spec("0.25", 2, None).tolist() == [0.25, 0.25]
    assert topany.parse_spec("0,0.5", 2, None).tolist() == [0, 0.5]
    with pytest.raises(ValueError, match="3 top-any thresholds given, the model has 2"):
        topany.parse_spec([0.1, 0.1, 0.1], 2, None)
    with pytest.raises(ValueError, match="cannot read top-any spec"):
        topany.parse_spec("lots", 2, None)


def test_completion_chat_and_verbs_stream(ggufs, tmp_path):
    path = ggufs["qwen3"]
    greedy = {"max_tokens": 6, "temperature": 0.0}
    plain = open_llama(path, n_ctx=128, logits_all=False, threads=1)
    want = plain(PROMPT[:40], **greedy)["choices"][0]["text"]
    llm = runtime.load(path, threads=1, top_any=0, n_ctx=128, hooks=EvalHooks())
    assert llm(PROMPT[:40], **greedy)["choices"][0]["text"] == want
    llm = runtime.load(path, threads=1, top_any=0.3, n_ctx=128)
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


def test_calibration_hits_a_share_and_a_damage_budget(ggufs, tmp_path):
    from edgemoe.textscore import tokenize_file

    path = ggufs["qwen3"]
    tokens = tokenize_file(path, TEXT)[:512]
    grid = [0, 0.2, 0.4, 0.6, 0.8]
    cal = topany.calibrate(path, tokens, share=0.25, n_ctx=128, grid=grid, threads=1,
                           progress=False)
    assert cal.removed_share == pytest.approx(0.25, abs=0.03)
    assert cal.kld_mean > 0 and cal.ppl != cal.ppl_base
    uni = topany.calibrate(path, tokens, share=0.25, n_ctx=128, method="uniform", threads=1,
                           progress=False)
    assert uni.removed_share == pytest.approx(0.25, abs=0.03)
    assert len(set(uni.thresholds)) == 1
    budget = topany.calibrate(path, tokens, max_ppl_increase=0.01, n_ctx=128,
                              method="uniform", threads=1, progress=False)
    assert budget.ppl_increase <= 0.01 and budget.removed_share > 0
    cal.save(tmp_path / "cal.json")
    assert json.loads((tmp_path / "cal.json").read_text())["thresholds"] == list(cal.thresholds)
    assert topany.parse_spec(str(tmp_path / "cal.json"), 2, None).tolist() == pytest.approx(
        list(cal.thresholds))
