"""Reading checkpoints and binding them to GGUF tensors: the clear errors users hit first."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest

from edgemoe import pipeline
from export.arch import IncompleteCheckpointError, UnsupportedModelError, adapter_for
from export.source import HFSource, MissingFileError
from tests.conftest import build_qwen3_moe


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory, bpe_tokenizer_dir):
    return build_qwen3_moe(tmp_path_factory.mktemp("sharded"), bpe_tokenizer_dir,
                           max_shard_size="1MB")


def test_sharded_checkpoint_reads_like_a_single_file(sharded_dir, qwen3_dir):
    assert len(list(sharded_dir.glob("*.safetensors"))) > 1
    assert (sharded_dir / "model.safetensors.index.json").is_file()
    src = HFSource(sharded_dir)
    assert len(src.names) == len(HFSource(qwen3_dir).names)
    m = pipeline.open_model(sharded_dir)
    exps = [r for r in m.recipes if r.spec.kind == "ffn_down_exps"][0]
    stacked = exps.load(src)
    assert stacked.shape == exps.spec.shape
    assert np.array_equal(stacked[1], src.load("model.layers.0.mlp.experts.1.down_proj.weight"))


def test_missing_shard_is_named(sharded_dir, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(sharded_dir, broken)
    shard = sorted(broken.glob("*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(MissingFileError, match=shard.name):
        HFSource(broken)


def test_missing_expert_is_named(qwen3_dir, tmp_path):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "noexpert"
    shutil.copytree(qwen3_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    del tensors["model.layers.1.mlp.experts.2.up_proj.weight"]
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(IncompleteCheckpointError, match=r"blk\.1\.ffn_up_exps\.weight experts 2"):
        pipeline.open_model(broken)


def test_unknown_architecture_names_what_is_supported(qwen3_dir, tmp_path):
    cfg = json.loads((qwen3_dir / "config.json").read_text())
    cfg["model_type"] = "my_moe"
    with pytest.raises(UnsupportedModelError, match=r"'my_moe'.*supports: .*mixtral") as e:
        adapter_for(cfg)
    assert "qwen3_moe" in str(e.value)


def test_no_config_and_no_weights(tmp_path):
    with pytest.raises(MissingFileError, match="config.json"):
        HFSource(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(MissingFileError, match="safetensors"):
        HFSource(tmp_path)


def test_qwen3_without_topk_renormalisation_is_refused(qwen3_dir):
    cfg = json.loads((qwen3_dir / "config.json").read_text())
    cfg["norm_topk_prob"] = False
    with pytest.raises(UnsupportedModelError, match="norm_topk_prob"):
        adapter_for(cfg)


def test_hub_style_config_spellings(qwen3_dir):
    """Hub checkpoints say num_experts and rope_theta where transformers 5 writes others."""
    cfg = json.loads((qwen3_dir / "config.json").read_text())
    a = adapter_for(cfg)
    hub = dict(cfg)
    hub["num_experts"] = hub.pop("num_local_experts", hub.get("num_experts"))
    hub["rope_theta"] = hub.pop("rope_parameters")["rope_theta"]
    hub["torch_dtype"] = hub.pop("dtype", "float32")
    b = adapter_for(hub)
    assert (a.n_expert, a.hp.rope_theta) == (b.n_expert, b.hp.rope_theta)
    assert a.tensor_specs() == b.tensor_specs()
