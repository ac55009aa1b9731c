"""Split exports: llama.cpp's `-0000i-of-0000N.gguf` layout, loaded from the first file, and
shards written by separate processes byte-identical to one process's files."""

from __future__ import annotations

import hashlib
import subprocess
import sys
from pathlib import Path

import gguf
import numpy as np
import pytest

from edgemoe import pipeline
from edgemoe.cli import main
from edgemoe.llamacpp import eval_logits, open_llama
from export.split import SplitError, SplitSpec, parse_shard, split_layout, split_paths
from tests.helpers import hf_tokens

ROOT = Path(__file__).resolve().parents[2]


def test_layout_fills_each_file_until_the_next_tensor_would_not_fit():
    names = list("abcdef")
    # 32-byte alignment: 40 -> 64, 10 -> 32
    parts = split_layout(names, [40, 10, 10, 90, 10, 10], max_bytes=200, header_bound=72,
                         alignment=32)
    # budget 128: [64+32+32] [96+32] [32]
    assert parts == [range(0, 3), range(3, 5), range(5, 6)]
    assert split_layout(names, [1] * 6, 10**6, 100, 32) == [range(0, 6)]
    with pytest.raises(SplitError, match="d is 96 bytes.*raise --split-max-size"):
        split_layout(names, [40, 10, 10, 90, 10, 10], max_bytes=150, header_bound=72,
                     alignment=32)


def test_names_and_shard_checks(tmp_path):
    assert [p.name for p in split_paths(tmp_path / "m.gguf", 3)] == [
        "m-00001-of-00003.gguf", "m-00002-of-00003.gguf", "m-00003-of-00003.gguf"]
    assert parse_shard(" 3/12") == (3, 12)
    for bad in ("3", "3/", "a/b"):
        with pytest.raises(SplitError, match="expected i/N"):
            parse_shard(bad)
    with pytest.raises(SplitError, match="i must be 1 to 4"):
        SplitSpec(10**6, 5, 4)
    with pytest.raises(SplitError, match="positive"):
        SplitSpec(0)


def _sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def exported(qwen3_dir, tmp_path_factory):
    """The tiny qwen3_moe as one Q8_0 file and as splits of at most a third of it."""
    tmp = tmp_path_factory.mktemp("split")
    model = pipeline.open_model(qwen3_dir)
    budget = pipeline.make_budget(model.adapter, "1GB", ctx=256)
    plan, _ = pipeline.make_plan(model, budget, "Q8_0", progress=False)
    plan_json = tmp / "plan.json"
    plan.save(plan_json)
    single = pipeline.export(model, plan, tmp / "single.gguf", progress=False)
    max_bytes = single.stat().st_size // 3
    first = pipeline.export(model, plan, tmp / "split.gguf", progress=False,
                            split=SplitSpec(max_bytes))
    return single, first, max_bytes, plan_json, tmp


def test_split_files_hold_the_single_files_tensors_and_load_in_llama_cpp(exported, qwen3_dir):
    single, first, max_bytes, _, tmp = exported
    files = sorted(tmp.glob("split-*-of-*.gguf"))
    assert first == files[0] and first.name.endswith(f"-00001-of-{len(files):05d}.gguf")
    assert len(files) >= 3, "a third of the file per split should make at least 3 files"
    assert all(f.stat().st_size <= max_bytes for f in files)

    one = {t.name: t for t in gguf.GGUFReader(single).tensors}
    seen = []
    for i, f in enumerate(files):
        r = gguf.GGUFReader(f)
        assert r.get_field("split.no").contents() == i
        assert r.get_field("split.count").contents() == len(files)
        assert r.get_field("split.tensors.count").contents() == len(one)
        # all metadata in the first file only, as llama-gguf-split writes it
        assert (r.get_field("tokenizer.ggml.tokens") is not None) == (i == 0)
        for t in r.tensors:
            assert t.tensor_type == one[t.name].tensor_type
            assert np.array_equal(np.asarray(t.data).reshape(-1),
                                  np.asarray(one[t.name].data).reshape(-1)), t.name
            seen.append(t.name)
    assert seen == list(one), "every tensor once, in the single file's order"

    tokens = hf_tokens(qwen3_dir)
    want = eval_logits(open_llama(single, n_ctx=64), tokens)
    got = eval_logits(open_llama(first, n_ctx=64), tokens)
    np.testing.assert_array_equal(got, want)


def test_shards_from_separate_processes_are_byte_identical(exported, qwen3_dir):
    _, _, max_bytes, plan_json, tmp = exported
    files = sorted(tmp.glob("split-*-of-*.gguf"))
    n = len(files)
    out = tmp / "sharded" / "split.gguf"
    out.parent.mkdir()
    base = [sys.executable, "-m", "edgemoe.cli", "export", str(qwen3_dir), "--memory", "1GB",
            "--plan", str(plan_json), "-o", str(out), "--split-max-size", str(max_bytes)]
    # all shards at once, each its own process
    procs = [subprocess.Popen(base + ["--shard", f"{i}/{n}"], cwd=ROOT,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for i in range(1, n + 1)]
    for p in procs:
        log = p.communicate()[0]
        assert p.returncode == 0, log
    shards = sorted(out.parent.glob("split-*-of-*.gguf"))
    assert [f.name for f in shards] == [f.name for f in files]
    assert [_sha(f) for f in shards] == [_sha(f) for f in files]


def test_wrong_shard_count_is_refused_with_the_right_one(exported, qwen3_dir, capsys):
    _, _, max_bytes, plan_json, tmp = exported
    n = len(sorted(tmp.glob("split-*-of-*.gguf")))
    out = tmp / "wrong.gguf"
    assert main(["export", str(qwen3_dir), "--memory", "1GB", "--plan", str(plan_json),
                 "-o", str(out), "--split-max-size", str(max_bytes),
                 "--shard", f"1/{n + 1}"]) == 2
    assert f"so N must be {n}" in capsys.readouterr().err
    assert not list(tmp.glob("wrong*"))
    assert main(["export", str(qwen3_dir), "--memory", "1GB", "-o", str(out),
                 "--shard", "1/2"]) == 2
    assert "give --split-max-size" in capsys.readouterr().err
