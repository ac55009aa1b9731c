"""Calibration of an HF source in layer segments (edgemoe.calibration.segments): the same
statistics, to the bit, as a run of the whole calibration GGUF, one segment's file on disk
at a time, resumable between segments (the probes: test_segment_probes.py)."""

from __future__ import annotations

import numpy as np
import pytest

from edgemoe import pipeline
from edgemoe.calibration import collect as collect_module
from edgemoe.calibration import intermediate, segments
from edgemoe.calibration.accumulate import checkpoint_bytes, cov_plan
from edgemoe.calibration.collect import calibrate, collect
from edgemoe.calibration.nodes import graph_nodes
from edgemoe.calibration.segment_probes import probe_bytes
from edgemoe.calibration.segments import Segments
from edgemoe.calibration.sensitivity import probe_token_count
from tests import arch_fixtures
from tests.conftest import build_qwen3_moe
from tests.edgemoe.calibration.test_calib_source import _peak_extra_disk, _same
from tests.helpers import PROMPT

N_CTX = 64
TEXT = PROMPT * 4


def _build(arch: str, root, tok_dir):
    if arch == "qwen3_moe":
        return build_qwen3_moe(root, tok_dir, n_layers=4)
    if arch == "qwen3_5_moe":
        return arch_fixtures.build_qwen3_5_moe(root, tok_dir, num_hidden_layers=8)
    return getattr(arch_fixtures, f"build_{arch}")(root, tok_dir)


# a leading dense block (deepseek_v3), window attention in even blocks (gpt_oss: a segment
# starts at an even block), recurrent and attention blocks with M-RoPE (qwen3_5_moe: a
# segment holds whole periods of both). (glm4_moe: llama.cpp's graph refuses input
# embeddings, test_glm4_moe_runs_whole)
ARCHS = {"qwen3_moe": [(0, 1), (1, 3), (3, 4)], "deepseek_v3": [(0, 1), (1, 2), (2, 3)],
         "gpt_oss": [(0, 2), (2, 3)], "qwen3_5_moe": [(0, 4), (4, 8)]}


def _collect(model, blocks, gguf_path=None, segs=None, **kw):
    a = model.adapter
    return collect(gguf_path, TEXT, model.specs, a.n_layer, a.n_expert, n_ctx=N_CTX,
                   progress=False, cov_blocks=blocks, segs=segs, **kw)


@pytest.mark.parametrize("arch", sorted(ARCHS))
def test_segments_measure_what_the_whole_model_measures(arch, tmp_path, bpe_tokenizer_dir):
    src = _build(arch, tmp_path / "hf", bpe_tokenizer_dir)
    model = pipeline.open_model(src)
    blocks = cov_plan(model.specs, 1 << 22, graph_nodes(model.adapter.arch_name))
    plan = intermediate.candidate_plan(model.specs, intermediate.CANDIDATES[0])  # Q8_0
    whole = tmp_path / "whole.gguf"
    pipeline.export(model, plan, whole, progress=False, cpu_rows=True)  # as calibrate does
    reference = _collect(model, blocks, gguf_path=whole)

    out = tmp_path / "out"
    out.mkdir()
    segs = Segments(model, plan, ARCHS[arch], out / "s.gguf", progress=False)
    seen = []
    stats = _collect(model, blocks, segs=segs,
                     on_window=lambda w, logits, s: seen.append(np.array(logits)))
    _same(stats, reference)  # the same kernels on the same float32 stream: to the bit
    # the last segment's head gives the whole model's logits
    from edgemoe.llamacpp import eval_logits, open_llama

    llm = open_llama(whole, n_ctx=N_CTX, logits_all=True, n_batch=N_CTX, n_ubatch=N_CTX)
    from edgemoe.llamacpp import tokenize
    from edgemoe.runtime.textscore import whole_windows

    first = whole_windows(tokenize(llm, TEXT), N_CTX)[0]
    np.testing.assert_allclose(seen[0], eval_logits(llm, first), rtol=1e-4, atol=1e-4)
    llm.close()
    # what is left: the last segment (for the probes) and the streams, until calibrate ends
    left = sorted(p.name for p in out.iterdir())
    assert left == sorted([segs.gguf_path(len(segs) - 1).name]
                          + [segs.stream_path(k).name for k in range(1, min(3, len(segs)))])
    segs.remove()
    assert not list(out.iterdir())
    # a segment but the last has no vocabulary: no embeddings or head to run (the first
    # runs on the token embeddings, `Segments.inputs`)
    import gguf

    for k in range(len(segs) - 1):
        r = gguf.GGUFReader(segs.write(k))
        assert r.get_field("tokenizer.ggml.model").contents() == "none"
        rows = {t.name: int(t.shape[-1]) for t in r.tensors
                if t.name in ("token_embd.weight", "output.weight")}
        assert rows == {"token_embd.weight": 1, "output.weight": 1}
        segs.remove()


def test_calibrate_in_segments_within_the_disk_budget(qwen3_dir, tmp_path, monkeypatch):
    # room for two probes' streams under way: this model's head and embeddings are most of
    # a segment, and the streams of 16 would cost more than the whole file
    monkeypatch.setattr(collect_module, "MAX_IN_FLIGHT", 2)
    model = pipeline.open_model(qwen3_dir)
    cov = 1 << 20
    nodes = graph_nodes(model.adapter.arch_name)
    ckpt = checkpoint_bytes(model.specs, cov_plan(model.specs, cov, nodes), nodes)
    q8 = intermediate.candidate_plan(model.specs, intermediate.CANDIDATES[0])
    from edgemoe.llamacpp import tokenize

    n_tokens = len(tokenize(qwen3_dir, TEXT))
    n_embd = model.adapter.hp.n_embd
    # room for one block of Q8_0 with the embeddings and head, not for the whole file, and
    # for the probes' streams
    probe_room = 3 * probe_bytes(probe_token_count(n_tokens, N_CTX, N_CTX), n_embd)
    budget = segments.smallest_segment(model, q8) + ckpt \
        + segments.stream_bytes(n_tokens, n_embd) + probe_room
    assert budget < intermediate.file_bytes(model, q8) + ckpt
    cand, _, ranges = segments.choose(model, budget, ckpt, n_tokens, forced="Q8_0",
                                      probe_room=probe_room)
    assert cand.label == "Q8_0" and ranges == [(0, 1), (1, 2)]
    # the most faithful type comes first, in segments before a coarser whole file
    assert segments.choose(model, budget, ckpt, n_tokens, probe_room=probe_room)[0] == cand
    # and a whole file of it before segments
    cand, _, whole = segments.choose(model, intermediate.file_bytes(model, q8) + ckpt, ckpt,
                                     n_tokens)
    assert whole == [(0, 2)] and cand == intermediate.CANDIDATES[0]

    text = tmp_path / "calib.txt"
    text.write_text(TEXT)
    out = tmp_path / "o"
    out.mkdir()
    stats, peak = _peak_extra_disk(out, out / "s.gguf", lambda: calibrate(
        str(qwen3_dir), text=str(text), output=str(out / "s.gguf"), n_ctx=N_CTX,
        progress=False, max_disk=budget, cov_budget=cov, sensitivity=True,
        probe_seconds=600, calib_type="Q8_0", probe_tokens=N_CTX))
    assert 0 < peak <= budget
    assert stats.source.types == "Q8_0, run in 2 layer segments"
    assert stats.source.fidelity == "near"
    assert [p.name for p in out.iterdir()] == ["s.gguf"]
    # every tensor has a scale (test_segment_probes.py: which probes, and how exact)
    assert set(stats.scales) == {s.name for s in model.specs if s.quantizable}
    assert stats.prune_scale is not None and stats.prune_scale > 0


def test_a_segmented_run_resumes_between_and_within_segments(qwen3_dir, tmp_path,
                                                             monkeypatch):
    model = pipeline.open_model(qwen3_dir)
    blocks = cov_plan(model.specs, 1 << 20, graph_nodes(model.adapter.arch_name))
    plan = intermediate.candidate_plan(model.specs, intermediate.CANDIDATES[0])
    ranges = [(0, 1), (1, 2)]
    segs = Segments(model, plan, ranges, tmp_path / "a.gguf", progress=False)
    full = _collect(model, blocks, segs=segs)
    segs.remove()

    monkeypatch.setenv("EDGEMOE_CHECKPOINT_SECONDS", "0")
    real = collect_module.eval_embeddings
    calls = []

    from edgemoe.llamacpp import tokenize
    from edgemoe.runtime.textscore import whole_windows

    n_windows = len(whole_windows(tokenize(qwen3_dir, TEXT), N_CTX))

    def stop_at_third(llm, x):  # Ctrl-C in the second segment's third window
        calls.append(1)
        if len(calls) == n_windows + 3:
            raise KeyboardInterrupt
        return real(llm, x)

    monkeypatch.setattr(collect_module, "eval_embeddings", stop_at_third)
    ckpt = tmp_path / "b.ckpt.npz"
    segs = Segments(model, plan, ranges, tmp_path / "b.gguf", progress=False)
    with pytest.raises(KeyboardInterrupt, match=r"first 2 of \d+ windows \(layer segment 2"):
        _collect(model, blocks, segs=segs, checkpoint_path=ckpt, fingerprint="x")
    assert not segs.gguf_path(0).exists() and segs.gguf_path(1).exists()
    monkeypatch.setattr(collect_module, "eval_embeddings", real)
    resumed = _collect(model, blocks, segs=segs, checkpoint_path=ckpt, fingerprint="x")
    _same(resumed, full)


def test_glm4_moe_runs_whole(tmp_path, bpe_tokenizer_dir):
    """llama.cpp's glm4moe graph aborts on input embeddings: a smaller whole intermediate,
    never segments, and an error that says why when none fits."""
    model = pipeline.open_model(arch_fixtures.build_glm4_moe(tmp_path / "hf", bpe_tokenizer_dir))
    assert not model.adapter.takes_input_embeddings
    q8 = intermediate.candidate_plan(model.specs, intermediate.CANDIDATES[0])
    cand, _, ranges = segments.choose(model, intermediate.file_bytes(model, q8) - 1, 0, 256)
    assert cand != intermediate.CANDIDATES[0] and ranges == [(0, model.adapter.n_layer)]
    with pytest.raises(intermediate.DiskBudgetError, match="takes no input embeddings"):
        segments.choose(model, 1000, 0, 256)
