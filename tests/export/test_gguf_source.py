"""A GGUF file as the source: read, calibrated, planned, pruned and re-quantized.

The round trips start from a BF16 checkpoint, so that a BF16 GGUF holds exactly the weights
transformers holds: exporting that GGUF must then give the very file (tensor bytes and every
metadata key, tokenizer included) that exporting the checkpoint gives, at Q8_0, pruned, and
with a calibrated plan.
"""

from __future__ import annotations

from dataclasses import replace

import gguf
import numpy as np
import pytest

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.llamacpp import eval_logits, open_llama
from export.arch import GGUFAdapter
from export.source import GGUFSource, SourceError
from tests import arch_fixtures as af
from tests.helpers import export_planned, hf_tokens

FAMILIES = {"deepseek_v3": af.build_deepseek_v3, "qwen2_moe": af.build_qwen2_moe}
KEPT = {"deepseek_v3": {1: tuple(e for e in range(16) if e % 4 != 1),
                        2: tuple(e for e in range(16) if e % 4 != 2)},
        "qwen2_moe": {0: (0, 1, 2), 1: (0, 2, 3)}}


@pytest.fixture(scope="module", params=list(FAMILIES))
def bf16_pair(request, tmp_path_factory, bpe_tokenizer_dir):
    """(family, BF16 HF checkpoint, the BF16 GGUF exported from it)."""
    import torch

    root = tmp_path_factory.mktemp(request.param)
    hf = FAMILIES[request.param](root / "hf", bpe_tokenizer_dir, dtype=torch.bfloat16)
    path = root / f"{request.param}-BF16.gguf"
    plan = export_planned(hf, path, "BF16")
    assert {t.type for t in plan.tensors} == {"BF16", "F32"}
    return request.param, hf, path


def _metadata(path) -> dict:
    """Every key with its GGUF type(s) and value."""
    out = {}
    for key, f in gguf.GGUFReader(path).fields.items():
        out[key] = (tuple(f.types), f.contents())
    return out


def _same_file(a, b) -> None:
    assert af.tensor_differences(a, b) == []
    assert [t.name for t in gguf.GGUFReader(a).tensors] == \
        [t.name for t in gguf.GGUFReader(b).tensors]
    ma, mb = _metadata(a), _metadata(b)
    assert ma.keys() == mb.keys()
    assert [k for k in ma if ma[k] != mb[k]] == []


# ---- reading

def test_reads_f32_f16_bf16_q8_0_and_rows_of_the_first_axis(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((3, 4, 64)).astype(np.float32)
    path = tmp_path / "t.gguf"
    w = gguf.GGUFWriter(path, "qwen3moe")
    w.add_uint32("qwen3moe.expert_count", 3)
    w.add_array("qwen3moe.some_array", [1.5, 2.5])
    for name, qt in (("q8", "Q8_0"), ("bf16", "BF16")):
        t = gguf.GGMLQuantizationType[qt]
        w.add_tensor(name, gguf.quants.quantize(x, t), raw_dtype=t)
    w.add_tensor("f16", x.astype(np.float16))
    w.add_tensor("f32", x)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()

    src = GGUFSource(path)
    assert src.names == ["q8", "bf16", "f16", "f32"]
    assert src.metadata["qwen3moe.expert_count"].type == gguf.GGUFValueType.UINT32
    assert src.metadata["qwen3moe.some_array"].sub_type == gguf.GGUFValueType.FLOAT32
    assert src.config["qwen3moe.some_array"] == [1.5, 2.5]
    for name, qt, tol in (("q8", "Q8_0", 0.02), ("bf16", "BF16", 0.01), ("f16", "F16", 1e-3),
                          ("f32", "F32", 0)):
        assert src.shape(name) == (3, 4, 64) and src.dtype(name) == qt
        full = src.load(name)
        assert full.dtype == np.float32 and np.abs(full - x).max() <= tol * np.abs(x).max()
        assert np.array_equal(src.load(name, 2), full[2])
        assert np.array_equal(src.load(name, [2, 0]), full[[2, 0]])
    want = gguf.quants.dequantize(gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0),
                                  gguf.GGMLQuantizationType.Q8_0)
    assert np.array_equal(src.load("q8"), want)


def test_low_bit_sources_are_refused_with_the_tensors_named(tmp_path):
    path = tmp_path / "q4.gguf"
    w = gguf.GGUFWriter(path, "qwen3moe")
    x = np.random.default_rng(1).standard_normal((2, 32)).astype(np.float32)
    q4 = gguf.GGMLQuantizationType.Q4_0
    w.add_tensor("blk.0.ffn_up_exps.weight", gguf.quants.quantize(x, q4), raw_dtype=q4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    with pytest.raises(SourceError, match=r"blk\.0\.ffn_up_exps\.weight \(Q4_0\)"):
        GGUFSource(path)


# ---- the same model, from either source

def test_gguf_describes_the_model_the_checkpoint_does(bf16_pair):
    _, hf, path = bf16_pair
    from_hf, from_gguf = pipeline.open_model(hf), pipeline.open_model(path)
    assert isinstance(from_gguf.adapter, GGUFAdapter)
    assert from_gguf.specs == from_hf.specs
    a, b = from_gguf.adapter, from_hf.adapter
    for attr in ("arch_name", "n_layer", "n_expert", "n_expert_used", "n_vocab"):
        assert getattr(a, attr) == getattr(b, attr), attr
    assert a.moe_layers() == b.moe_layers()
    for ctx in (256, 8192):
        assert a.kv_bytes(ctx) == b.kv_bytes(ctx)
        assert a.compute_bytes(ctx) == b.compute_bytes(ctx)


def test_bf16_gguf_to_q8_0_is_the_checkpoints_q8_0(bf16_pair, tmp_path):
    _, hf, path = bf16_pair
    export_planned(path, tmp_path / "from_gguf.gguf", "Q8_0")
    export_planned(hf, tmp_path / "from_hf.gguf", "Q8_0")
    _same_file(tmp_path / "from_gguf.gguf", tmp_path / "from_hf.gguf")
    tokens = hf_tokens(hf)
    logits = [eval_logits(open_llama(tmp_path / f, n_ctx=64, f32_kv=True), tokens)
              for f in ("from_gguf.gguf", "from_hf.gguf")]
    assert np.abs(logits[0]).max() > 1.0
    assert np.array_equal(logits[0], logits[1])


def test_pruned_gguf_export_is_the_pruned_checkpoint_export(bf16_pair, tmp_path):
    family, hf, path = bf16_pair
    kept = KEPT[family]
    n_kept = len(next(iter(kept.values())))
    files = []
    for name, src in (("from_gguf", path), ("from_hf", hf)):
        model = pipeline.open_model(src)
        plan = mp.uniform_plan(model.adapter.tensor_specs(n_kept), "Q8_0", mp.Budget(10**12))
        plan = replace(plan, n_experts=model.adapter.n_expert, n_experts_kept=n_kept,
                       kept_experts={str(k): v for k, v in kept.items()})
        files.append(pipeline.export(model, plan, tmp_path / f"{name}.gguf", progress=False))
    _same_file(*files)
    arch = pipeline.open_model(path).adapter.arch_name
    assert gguf.GGUFReader(files[0]).get_field(f"{arch}.expert_count").contents() == n_kept
    llm = open_llama(files[0], n_ctx=64)
    assert np.isfinite(eval_logits(llm, hf_tokens(hf))).all()


def test_calibrated_plan_from_gguf_is_the_checkpoints(bf16_pair, tmp_path):
    """Calibration runs the BF16 GGUF source as it is, and a BF16 intermediate of the HF
    checkpoint: the same file, so the same statistics, the same measured damage, the same
    plan and the same output. Pruning is weighed only
    with a measured pruning cost (probes, tests/edgemoe/calibration/test_sensitivity.py): one
    is set here, the same for both sources, and at this cap the plans prune (Qwen2-MoE to 2 of
    4 experts, DeepSeek-V3 to 8 of 16), so the pruned export from a GGUF source is compared
    too."""
    from edgemoe.calibration.collect import calibrate

    _, hf, path = bf16_pair
    results = []
    for src, calib_type in ((path, None), (hf, "BF16")):
        stats = replace(calibrate(str(src), max_tokens=256, n_ctx=128, progress=False,
                                  calib_type=calib_type), prune_scale=1.0)
        model = pipeline.open_model(src)
        probe = pipeline.make_budget(model.adapter, 10**9, ctx=256)
        q8 = mp.uniform_plan(model.specs, "Q8_0", probe).weight_bytes
        cap = probe.runtime_bytes + int(q8 * 0.3)  # about 2.5 bits a weight
        budget = pipeline.make_budget(model.adapter, cap, ctx=256)
        plan, tradeoff = pipeline.make_plan(model, budget, stats=stats, progress=False)
        assert len(tradeoff) > 1  # keep counts were weighed
        results.append((model, stats, plan))
    (m1, s1, p1), (m2, s2, p2) = results
    assert s1.n_tokens == s2.n_tokens > 0
    assert s1.in_sum2.keys() == s2.in_sum2.keys()
    assert all(np.array_equal(s1.in_sum2[k], s2.in_sum2[k]) for k in s1.in_sum2)
    assert sorted(s1.experts) == sorted(s2.experts) == m1.adapter.moe_layers()
    assert "source GGUF itself (BF16)" in p1.calibration and "BF16" in p2.calibration
    assert replace(p1, calibration="") == replace(p2, calibration="")
    assert len({t.type for t in p1.tensors}) > 2  # a mixed plan, not one type

    assert p1.n_experts_kept < p1.n_experts
    assert p1.n_experts_kept % m1.adapter.n_expert_groups == 0
    # (the plan stored in the file says what the statistics ran on: the one difference)
    files = [pipeline.export(m, replace(p, calibration=""), tmp_path / f"{i}.gguf", stats=s,
                             progress=False) for i, (m, s, p) in enumerate(results)]
    _same_file(*files)
