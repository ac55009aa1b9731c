"""Positioned reads of safetensors: the same float32 values safetensors and torch give, for
whole tensors and row ranges, in single and sharded checkpoints, through the page cache or
past it (O_DIRECT, in pieces); streamed dense blocks write the bytes of the whole tensor."""

from __future__ import annotations

import errno
import json

import gguf
import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import export.reads as reads
import export.writer as writer
from edgemoe import pipeline
from edgemoe.damage import measure_damage
from export.quantize import quantize_rows, relative_error
from export.source import HFSource, SourceError


def _rows(n: int) -> list:
    """Row selections for an axis of length n >= 3: all, one, a range, an unordered list
    with repeats and negatives, none."""
    return [None, 0, n // 2, -1, range(1, n - 1), [n - 1, 1, 2, 2, -2], []]


def _tensors(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(37, 300, generator=g) * 3
    w[0, :4] = torch.tensor([float("inf"), -0.0, 1e-40, 65504.0])  # edge values survive
    return {
        "f32": w.clone(),
        "f16": w.half(),
        "bf16": w.bfloat16(),
        "stacked_bf16": torch.randn(5, 40, 24, generator=g).bfloat16(),
        "norm_f16": torch.randn(300, generator=g).half(),
    }


def _reference(path, name: str, rows) -> np.ndarray:
    with safe_open(path, framework="pt") as h:
        a = h.get_tensor(name).to(torch.float32).numpy()
    return a if rows is None else a[rows if isinstance(rows, int) else list(rows)]


def _check(src: HFSource, files: dict[str, object]) -> None:
    for name, path in files.items():
        for rows in _rows(src.shape(name)[0]):
            got = src.load(name, rows)
            want = _reference(path, name, rows)
            assert got.dtype == np.float32 and got.shape == want.shape, (name, rows)
            assert np.array_equal(got, want), (name, rows)


@pytest.fixture
def single(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    tensors = _tensors(0)
    save_file(tensors, tmp_path / "model.safetensors")
    return tmp_path, dict.fromkeys(tensors, tmp_path / "model.safetensors")


def test_single_file_matches_safetensors(single):
    path, files = single
    src = HFSource(path)
    assert set(src.names) == set(files)
    for name in files:
        with safe_open(files[name], framework="pt") as h:
            assert src.dtype(name) == h.get_slice(name).get_dtype()
            assert src.shape(name) == tuple(h.get_slice(name).get_shape())
    _check(src, files)
    with pytest.raises(IndexError):
        src.load("f32", [0, 37])


def test_sharded_checkpoint_matches_safetensors(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    files, weight_map = {}, {}
    for k, seed in enumerate((1, 2)):
        shard = f"model-{k + 1:05d}-of-00002.safetensors"
        tensors = {f"s{k}.{n}": t for n, t in _tensors(seed).items()}
        save_file(tensors, tmp_path / shard, metadata={"format": "pt"})
        files.update(dict.fromkeys(tensors, tmp_path / shard))
        weight_map.update(dict.fromkeys(tensors, shard))
    index = {"metadata": {}, "weight_map": weight_map}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps(index))
    _check(HFSource(tmp_path), files)


def _fp8_reference(weight: torch.Tensor, scale: torch.Tensor, block) -> np.ndarray:
    """The dequantization edgemoe did with torch before the positioned reads."""
    lead = scale.ndim - len(block)
    s = scale.to(torch.float32)
    for i, size in enumerate(block):
        s = s.repeat_interleave(size, lead + i)
    s = s[tuple(slice(0, n) for n in weight.shape)]
    return (weight.to(torch.float32) * s).numpy()


def test_fp8_block_scales_match_torch(tmp_path):
    block = [16, 32]
    cfg = {"quantization_config": {"quant_method": "fp8", "weight_block_size": block}}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(3)
    w = (torch.randn(70, 100, generator=g) * 50).to(torch.float8_e4m3fn)  # partial blocks
    w.view(torch.uint8)[0, :2] = torch.tensor([0x7F, 0x01], dtype=torch.uint8)  # NaN, subnormal
    s = torch.rand(5, 4, generator=g).bfloat16() + 0.5
    stacked = (torch.randn(3, 32, 64, generator=g) * 50).to(torch.float8_e4m3fn)
    s3 = torch.rand(3, 2, 2, generator=g) + 0.5  # one scale grid per expert
    save_file({"w": w, "w_scale_inv": s, "e": stacked, "e_scale_inv": s3},
              tmp_path / "model.safetensors")
    src = HFSource(tmp_path)
    assert sorted(src.names) == ["e", "w"]
    for name, weight, scale in (("w", w, s), ("e", stacked, s3)):
        full = _fp8_reference(weight, scale, block)
        for rows in _rows(len(full)):
            want = full if rows is None else full[rows if isinstance(rows, int) else list(rows)]
            got = src.load(name, rows)
            assert got.shape == want.shape
            assert np.array_equal(got, want, equal_nan=True), (name, rows)


def test_damaged_files_raise(single):
    path, _ = single
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-100])
    with pytest.raises(SourceError, match="truncated"):
        HFSource(path)
    f.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!")
    with pytest.raises(SourceError, match="header"):
        HFSource(path)
    header = json.dumps({"w": {"dtype": "F32", "shape": [1]}}).encode()  # no data_offsets
    f.write_bytes(len(header).to_bytes(8, "little") + header + bytes(4))
    with pytest.raises(SourceError, match="malformed"):
        HFSource(path)


@pytest.fixture
def direct(monkeypatch):
    """Every read past the page cache, in pieces of three pages: tensors span several, and
    start and end inside pages."""
    monkeypatch.setattr(reads, "DIRECT_MIN", 0)
    monkeypatch.setattr(reads, "DIRECT_PIECE", 3 * 4096)


def _files(src) -> list[reads.PositionedFile]:
    if isinstance(src, HFSource):
        return [src._locate(n)[0].file for n in src.names]
    return [src._file]


def _loads(model) -> dict[str, list[np.ndarray]]:
    """Every tensor of every recipe whole and as a few row selections."""
    out = {}
    for r in model.recipes:
        name = r.hf_names[0]
        n = model.source.shape(name)[0]
        out[name] = [model.source.load(name, rows) for rows in (None, [n - 1, 0], range(1, n))]
    return out


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_reads_past_the_page_cache_give_the_same_values(kind, qwen3_dir, tmp_path, direct,
                                                        monkeypatch):
    path = qwen3_dir
    if kind == "gguf":
        hf = pipeline.open_model(qwen3_dir)
        path = pipeline.export(hf, _plan(hf, "Q8_0"), tmp_path / "src.gguf", progress=False)
    monkeypatch.setattr(reads, "DIRECT_MIN", 1 << 60)  # through the cache
    want = _loads(pipeline.open_model(path))
    monkeypatch.setattr(reads, "DIRECT_MIN", 0)
    model = pipeline.open_model(path)
    got = _loads(model)
    if any(f._direct is not None and f._direct < 0 for f in _files(model.source)):
        pytest.skip(f"{tmp_path}'s file system refuses O_DIRECT: the cached reads ran")
    assert all(f._direct is not None for f in _files(model.source))  # the direct path ran
    for name, arrays in want.items():
        for a, b in zip(arrays, got[name], strict=True):
            assert a.shape == b.shape and np.array_equal(a, b, equal_nan=True), name


def test_a_refused_direct_read_falls_back_to_the_cache(single, direct, monkeypatch):
    path, files = single

    def refuse(*args):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(reads.PositionedFile, "_read_direct", staticmethod(refuse))
    src = HFSource(path)
    _check(src, files)
    assert all(f._direct == -1 for f in _files(src))


def test_a_file_cut_short_after_opening_raises_past_the_cache_too(single, direct):
    path, _ = single
    src = HFSource(path)
    f = path / "model.safetensors"
    f.write_bytes(f.read_bytes()[:-4000])  # stacked_bf16 or norm_f16 lose their end
    with pytest.raises(SourceError, match="truncated"):
        for name in src.names:
            src.load(name)


def _plan(model, type_name: str):
    budget = pipeline.make_budget(model.adapter, "1GB", ctx=128)
    return pipeline.make_plan(model, budget, type_name, progress=False)[0]


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_streamed_dense_blocks_write_the_whole_tensors_bytes(kind, qwen3_dir, tmp_path,
                                                             monkeypatch):
    """With blocks of one expert slice, token_embd/output are written in several row blocks;
    every tensor's bytes must be those of quantizing the tensor whole."""
    path = qwen3_dir
    if kind == "gguf":  # a Q8_0 GGUF of the same model as the source
        hf = pipeline.open_model(qwen3_dir)
        path = pipeline.export(hf, _plan(hf, "Q8_0"), tmp_path / "src.gguf", progress=False)
    monkeypatch.setattr(writer, "MIN_BLOCK_ELEMENTS", 1)
    model = pipeline.open_model(path)
    plan = _plan(model, "Q4_K")
    out = pipeline.export(model, plan, tmp_path / "m.gguf", threads=2, progress=False)
    types = plan.by_name()
    got = {t.name: np.asarray(t.data).reshape(-1).view(np.uint8)
           for t in gguf.GGUFReader(out).tensors}
    slice_size = max(np.prod(r.spec.shape[1:]) for r in model.recipes if r.spec.n_experts)
    embd = next(r for r in model.recipes if r.spec.name == "token_embd.weight")
    assert np.prod(embd.spec.shape) > 2 * slice_size  # really written in several blocks
    for r in model.recipes:
        data = r.load(model.source)
        rows = data.reshape(-1, data.shape[-1]) if data.ndim > 1 else data.reshape(1, -1)
        want = quantize_rows(rows, types[r.spec.name].type)
        assert np.array_equal(got[r.spec.name], want), r.spec.name


@pytest.mark.parametrize("kind", ["hf", "gguf"])
def test_damage_reads_only_the_sampled_rows_of_dense_tensors(kind, qwen3_dir, tmp_path,
                                                            monkeypatch):
    """Planning reads max_rows rows of a dense tensor, not the tensor (token_embd of a 129k
    vocabulary is 3.7 GB in float32), and measures the same error as on the whole tensor."""
    path = qwen3_dir
    if kind == "gguf":
        hf = pipeline.open_model(qwen3_dir)
        path = pipeline.export(hf, _plan(hf, "F32"), tmp_path / "src.gguf", progress=False)
    model = pipeline.open_model(path)
    embd = next(r for r in model.recipes if r.spec.name == "token_embd.weight")
    max_rows = 16
    assert embd.spec.shape[0] > 4 * max_rows
    read = []
    load = type(model.source).load

    def spy(self, name, rows=None):
        out = load(self, name, rows)
        read.append((name, out.size))
        return out

    monkeypatch.setattr(type(model.source), "load", spy)
    damage = measure_damage(model, ladder=("Q4_K",), max_rows=max_rows, progress=False)
    monkeypatch.undo()
    got = damage.dense["token_embd.weight"]["Q4_K"]
    sizes = [n for name, n in read if name == embd.hf_names[0]]
    assert sizes == [max_rows * embd.spec.shape[1]]
    whole = relative_error(embd.load(model.source), "Q4_K", max_rows=max_rows)
    assert got == whole
