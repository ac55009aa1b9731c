"""Tiny MoE checkpoints built in the test session: real HF checkpoints, random weights.

Weights are drawn larger than transformers' default init so that logits and routing
decisions are far from zero: a conversion error then shows up as a large logit difference.
The token embedding is the largest part of the residual stream, as in a trained model, so
that a Q8_0 file's rounding error stays small next to the logits (`_residual_stream_init`).
"""

from __future__ import annotations

import math
import re
import shutil
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BUNDLED_MODEL = ROOT / "models" / "stdlib-moe"


def _init_weights(model, std: float = 0.08, seed: int = 0) -> None:
    """Every parameter redrawn from `seed`: norms around 1, routers and the output head
    spread out, the other matrices at `std` but the residual stream's (`_residual_stream_init`)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim == 1:  # norms: around 1, not exactly 1, so that a missed norm shows
                p.copy_(1.0 + 0.1 * torch.randn(p.shape, generator=g))
            elif "gate.weight" in name:  # routers: spread out, so top-k is not a tie
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.startswith("lm_head"):  # peaked next-token distributions, like a real LM
                p.copy_(0.4 * torch.randn(p.shape, generator=g))
            else:
                p.copy_(std * torch.randn(p.shape, generator=g))
    _residual_stream_init(model, std, seed)


def _residual_stream_init(model, std: float, seed: int) -> None:
    """The token embedding as the largest part of the residual stream (rms 2, each block's
    update about 0.5), the projections that write into it (o_proj, down_proj) drawn at
    std / sqrt(2 * n_layers), GPT-2's scaled residual init: a block adds to the token
    instead of replacing it.

    With every matrix at `std` the blocks' outputs swamp the embedding and each block's Q8_0
    rounding error (about 1% of its output) is carried whole into the next: a Q8_0 file's
    logits end 2-5% off and, the top two of near-Gaussian logits being close, 3-14% of its
    argmaxes differ from transformers'. With this init they are 1.1-1.3% off and 2-3% differ
    (per family in the Q8_0 tests of test_pipeline, test_qwen2moe_olmoe and
    test_deepseek_weights; with three other seeds, 992 to 1007 of 1024 tokens agree).
    """
    import torch

    g = torch.Generator().manual_seed(seed + 200)
    res_std = std / math.sqrt(2 * model.config.num_hidden_layers)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name == "model.embed_tokens.weight":
                p.copy_(2.0 * torch.randn(p.shape, generator=g))
            elif re.search(r"\.(o_proj|down_proj)(\.weight)?$", name):  # experts: one 3-D tensor
                p.copy_(res_std * torch.randn(p.shape, generator=g))


def _save(model, tok_dir: Path, out: Path, **save_kwargs) -> Path:
    from transformers import AutoTokenizer, GenerationConfig

    model.save_pretrained(out, **save_kwargs)
    for f in tok_dir.iterdir():
        if f.is_file() and f.name not in ("config.json",) and not f.name.endswith(".safetensors"):
            shutil.copy(f, out / f.name)
    tok = AutoTokenizer.from_pretrained(out)
    GenerationConfig(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id).save_pretrained(
        out
    )
    return out


def build_qwen3_moe(out: Path, tok_dir: Path, n_layers: int = 2, n_experts: int = 4,
                    hidden: int = 256, ff: int = 256, **save_kwargs) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen3MoeConfig, Qwen3MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = Qwen3MoeConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=2 * ff,
        moe_intermediate_size=ff, num_hidden_layers=n_layers, num_attention_heads=4,
        num_key_value_heads=2, head_dim=64, num_experts=n_experts, num_experts_per_tok=2,
        norm_topk_prob=True, max_position_embeddings=512, rms_norm_eps=1e-6,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    torch.manual_seed(0)
    model = Qwen3MoeForCausalLM(cfg)
    _init_weights(model)
    return _save(model, tok_dir, out, **save_kwargs)


def build_mixtral(out: Path, tok_dir: Path, n_layers: int = 2, n_experts: int = 4,
                  hidden: int = 256, ff: int = 256, **save_kwargs) -> Path:
    import torch
    from transformers import AutoTokenizer, MixtralConfig, MixtralForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = MixtralConfig(
        vocab_size=len(tok), hidden_size=hidden, intermediate_size=ff,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=2,
        num_local_experts=n_experts, num_experts_per_tok=2, max_position_embeddings=512,
        rms_norm_eps=1e-5, rope_theta=1e6, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(1)
    model = MixtralForCausalLM(cfg)
    _init_weights(model, seed=1)
    return _save(model, tok_dir, out, **save_kwargs)


@pytest.fixture(scope="session")
def bpe_tokenizer_dir(tmp_path_factory) -> Path:
    from tests.tokenizer_fixtures import make_bpe_tokenizer

    return make_bpe_tokenizer(tmp_path_factory.mktemp("bpe"), style="qwen2")


@pytest.fixture(scope="session")
def spm_tokenizer_dir(tmp_path_factory) -> Path:
    from tests.tokenizer_fixtures import make_spm_tokenizer

    return make_spm_tokenizer(tmp_path_factory.mktemp("spm"))


@pytest.fixture(scope="session")
def qwen3_dir(tmp_path_factory, bpe_tokenizer_dir) -> Path:
    return build_qwen3_moe(tmp_path_factory.mktemp("qwen3moe"), bpe_tokenizer_dir)


@pytest.fixture(scope="session")
def mixtral_dir(tmp_path_factory, spm_tokenizer_dir) -> Path:
    return build_mixtral(tmp_path_factory.mktemp("mixtral"), spm_tokenizer_dir)


@pytest.fixture(scope="session", params=["qwen3_moe", "mixtral"])
def tiny_model(request) -> Path:
    """Each supported architecture in turn."""
    return request.getfixturevalue({"qwen3_moe": "qwen3_dir", "mixtral": "mixtral_dir"}[
        request.param])


@pytest.fixture(scope="session")
def ggufs(qwen3_dir, mixtral_dir, tmp_path_factory) -> dict[str, Path]:
    """GGUF exports of the tiny session checkpoints, written once per session:
    {"qwen3": F32, "qwen3_q8": Q8_0, "mixtral": F32} paths."""
    from tests.helpers import export_uniform

    root = tmp_path_factory.mktemp("tiny-ggufs")
    return {
        "qwen3": export_uniform(qwen3_dir, root / "qwen3-f32.gguf", "F32"),
        "qwen3_q8": export_uniform(qwen3_dir, root / "qwen3-q8_0.gguf", "Q8_0"),
        "mixtral": export_uniform(mixtral_dir, root / "mixtral-f32.gguf", "F32"),
    }
