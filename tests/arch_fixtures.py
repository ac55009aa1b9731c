"""Tiny checkpoints of the other MoE families, built with transformers' own config classes.

DeepSeek-V3 / V2 (MLA, shared experts, leading dense block), Qwen2-MoE (shared expert with a
sigmoid gate, QKV biases) and OLMoE (whole-projection Q/K norms), with random weights drawn
as in conftest (`_init_weights`). Also: the pruned HF reference of a checkpoint, and an FP8
block-scaled copy of a DeepSeek checkpoint laid out like the DeepSeek-V3 release.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from tests.conftest import _init_weights, _save


def _finish(model, tok_dir: Path, out: Path, seed: int, dtype=None, **save_kwargs) -> Path:
    import torch

    _init_weights(model, seed=seed)
    g = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        for name, buf in model.named_buffers():
            # DeepSeek-V3's selection-only correction bias: non-zero, of the order of the
            # sigmoid scores' spread, so that it changes which experts are picked
            if name.endswith("e_score_correction_bias"):
                buf.copy_(0.1 * torch.randn(buf.shape, generator=g))
    if dtype is not None:
        model = model.to(dtype)
    return _save(model, tok_dir, out, **save_kwargs)


def deepseek_v3_config(vocab: int, n_layers: int = 3, n_experts: int = 16, **overrides):
    """V3 in miniature: q/kv LoRA, one leading dense block, 4 routing groups of which 2 are
    used, sigmoid + correction bias, renormalised top-k scaled by 2.5, one shared expert."""
    from transformers import DeepseekV3Config

    kw = dict(
        vocab_size=vocab, hidden_size=256, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=n_layers, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=n_experts, num_experts_per_tok=4, n_group=4, topk_group=2,
        n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        kv_lora_rank=64, q_lora_rank=96, qk_rope_head_dim=32, qk_nope_head_dim=32,
        v_head_dim=48, first_k_dense_replace=1, max_position_embeddings=512,
        rms_norm_eps=1e-6, rope_scaling=None, tie_word_embeddings=False,
    )
    kw.update(overrides)
    return DeepseekV3Config(**kw)


def build_deepseek_v3(out: Path, tok_dir: Path, dtype=None, **overrides) -> Path:
    import torch
    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = deepseek_v3_config(len(tok), bos_token_id=tok.bos_token_id,
                             eos_token_id=tok.eos_token_id, **overrides)
    torch.manual_seed(3)
    return _finish(DeepseekV3ForCausalLM(cfg), tok_dir, out, seed=3, dtype=dtype)


def build_deepseek_v2(out: Path, tok_dir: Path, dtype=None) -> Path:
    """V2-Lite in miniature: full-rank Q, softmax greedy top-k (no groups: transformers ranks
    V2 groups by their best score, llama.cpp by the sum of the top two), no renormalisation
    (transformers' V2 ignores norm_topk_prob), routed weights scaled by 1.5, 2 shared experts."""
    import torch
    from transformers import AutoTokenizer, DeepseekV2Config, DeepseekV2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = DeepseekV2Config(
        vocab_size=len(tok), hidden_size=256, intermediate_size=384, moe_intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=2, routed_scaling_factor=1.5,
        norm_topk_prob=False, topk_method="greedy", kv_lora_rank=64, q_lora_rank=None,
        qk_rope_head_dim=32, qk_nope_head_dim=32, v_head_dim=48, first_k_dense_replace=1,
        max_position_embeddings=512, rms_norm_eps=1e-6, tie_word_embeddings=False,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
    )
    torch.manual_seed(4)
    return _finish(DeepseekV2ForCausalLM(cfg), tok_dir, out, seed=4, dtype=dtype)


def build_qwen2_moe(out: Path, tok_dir: Path, dtype=None) -> Path:
    import torch
    from transformers import AutoTokenizer, Qwen2MoeConfig, Qwen2MoeForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = Qwen2MoeConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=384, moe_intermediate_size=128,
        shared_expert_intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
        max_position_embeddings=512, rms_norm_eps=1e-6, rope_theta=1e6,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, tie_word_embeddings=False,
    )
    torch.manual_seed(5)
    return _finish(Qwen2MoeForCausalLM(cfg), tok_dir, out, seed=5, dtype=dtype)


def build_olmoe(out: Path, tok_dir: Path, dtype=None) -> Path:
    import torch
    from transformers import AutoTokenizer, OlmoeConfig, OlmoeForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = OlmoeConfig(
        vocab_size=len(tok), hidden_size=256, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, max_position_embeddings=512, rms_norm_eps=1e-5,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=None,
        tie_word_embeddings=False,
    )
    torch.manual_seed(6)
    return _finish(OlmoeForCausalLM(cfg), tok_dir, out, seed=6, dtype=dtype)


def build_gpt_oss(out: Path, tok_dir: Path, dtype=None) -> Path:
    """gpt-oss in miniature: 3 layers (window, full, window) with an 8-token window, sinks,
    8 experts top-2 with biases, YaRN rope as released (factor 32 over 4096) but with
    `truncate: true`, the only YaRN llama.cpp has (it rounds the correction range; with the
    release's `false` transformers' logits here differ from llama.cpp's by 2.7e-3, from any
    GGUF). The router is spread out (top-k not a tie), the 1-D biases small; sinks near 1."""
    import torch
    from transformers import AutoTokenizer, GptOssConfig, GptOssForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = GptOssConfig(
        vocab_size=len(tok), hidden_size=128, intermediate_size=96, num_hidden_layers=3,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=8, max_position_embeddings=4096,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=32.0, beta_fast=32.0,
                             beta_slow=1.0, original_max_position_embeddings=4096,
                             truncate=True),
        rms_norm_eps=1e-5, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=None, tie_word_embeddings=False, attn_implementation="eager",
    )
    torch.manual_seed(7)
    model = GptOssForCausalLM(cfg)
    _init_weights(model, seed=7)
    g = torch.Generator().manual_seed(107)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("router.weight"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("_proj.bias") or name.endswith("router.bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    if dtype is not None:
        model = model.to(dtype)
    return _save(model, tok_dir, out)


# GLM's chat special tokens: llama.cpp's converter looks up [gMASK] (BOS), <|user|> (EOT),
# <|observation|> (EOM) and <|endoftext|> (UNK) by content
GLM_SPECIAL_TOKENS = ("[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                      "<|observation|>")
GLM_TEMPLATE = (
    "[gMASK]<sop>{% for m in messages %}<|{{ m['role'] }}|>\n{{ m['content'] }}{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def glm_tokenizer(tok_dir: Path, out: Path) -> Path:
    """The byte-level BPE test tokenizer with GLM's special tokens and a GLM-style template
    (eos <|endoftext|>, as in GLM-4.5/4.6's tokenizer_config.json)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens({"additional_special_tokens": list(GLM_SPECIAL_TOKENS)})
    tok.eos_token = tok.pad_token = "<|endoftext|>"
    tok.chat_template = GLM_TEMPLATE
    tok.save_pretrained(out)
    return out


def glm4_moe_config(vocab: int, **overrides):
    """GLM-4.5/4.6 in miniature: one leading dense block, sigmoid routing with a correction
    bias, renormalised top-k scaled by 2.5, one shared expert, Q/K/V biases, Q/K norms,
    half-rotary NEOX rope, one NextN (MTP) layer after the last."""
    from transformers import Glm4MoeConfig

    kw = dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, n_group=1,
        topk_group=1, first_k_dense_replace=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        attention_bias=True, use_qk_norm=True, num_nextn_predict_layers=1,
        max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6,
                         "partial_rotary_factor": 0.5},
    )
    kw.update(overrides)
    return Glm4MoeConfig(**kw)


def add_nextn_layer(model_dir: Path, copy_layer: int = 1, own_head: bool = False) -> None:
    """Append a NextN (MTP) block after the last layer, laid out as GLM-4.5 ships it (a full
    decoder block plus eh_proj, enorm, hnorm, shared_head.norm; with `own_head` also the
    block's embed_tokens and shared_head.head, as DeepSeek-V3/V3.2 ship it): transformers
    skips it, llama.cpp's converter writes it."""
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(model_dir / "model.safetensors")
    n = json.loads((model_dir / "config.json").read_text())["num_hidden_layers"]
    src = f"model.layers.{copy_layer}."
    g = torch.Generator().manual_seed(11)
    for name in [k for k in tensors if k.startswith(src)]:
        t = tensors[name]
        tensors[name.replace(src, f"model.layers.{n}.")] = t + 0.01 * torch.randn(
            t.shape, generator=g).to(t.dtype)
    d = tensors["model.norm.weight"].shape[0]
    dt = tensors["model.norm.weight"].dtype
    tensors[f"model.layers.{n}.eh_proj.weight"] = (0.05 * torch.randn(d, 2 * d, generator=g)
                                                   ).to(dt)
    for extra in ("enorm", "hnorm", "shared_head.norm"):
        tensors[f"model.layers.{n}.{extra}.weight"] = (1 + 0.1 * torch.randn(d, generator=g)
                                                       ).to(dt)
    if own_head:
        for extra, src_name in (("embed_tokens", "model.embed_tokens.weight"),
                                ("shared_head.head", "lm_head.weight")):
            t = tensors[src_name]
            tensors[f"model.layers.{n}.{extra}.weight"] = t + 0.01 * torch.randn(
                t.shape, generator=g).to(t.dtype)
    save_file(tensors, model_dir / "model.safetensors", metadata={"format": "pt"})


def build_glm4_moe(out: Path, tok_dir: Path, dtype=None, nextn: bool = True,
                   **overrides) -> Path:
    import torch
    from transformers import AutoTokenizer, Glm4MoeForCausalLM

    glm_tok = glm_tokenizer(tok_dir, out.parent / f"{out.name}-tokenizer")
    tok = AutoTokenizer.from_pretrained(glm_tok)
    cfg = glm4_moe_config(len(tok), eos_token_id=tok.eos_token_id, pad_token_id=None,
                          **overrides)
    torch.manual_seed(12)
    _finish(Glm4MoeForCausalLM(cfg), glm_tok, out, seed=12, dtype=dtype)
    if nextn:
        add_nextn_layer(out)
    return out


def minimax_m2_config(vocab: int, **overrides):
    """MiniMax-M2 in miniature: every block MoE, sigmoid routing with a correction bias,
    renormalised top-k, Q/K RMS-normalised over all heads at once, NEOX rope over
    `rotary_dim` of each head (the legacy keys the released config.json carries)."""
    from transformers import MiniMaxM2Config

    kw = dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=32, num_local_experts=8,
        num_experts_per_tok=2, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, rotary_dim=16, scoring_func="sigmoid",
        use_routing_bias=True, rope_theta=5e6,
    )
    kw.update(overrides)
    return MiniMaxM2Config(**kw)


def build_minimax_m2(out: Path, tok_dir: Path, dtype=None, **overrides) -> Path:
    import torch
    from transformers import AutoTokenizer, MiniMaxM2ForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = minimax_m2_config(len(tok), bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, **overrides)
    torch.manual_seed(13)
    return _finish(MiniMaxM2ForCausalLM(cfg), tok_dir, out, seed=13, dtype=dtype)


def bos_tokenizer(tok_dir: Path, out: Path) -> Path:
    """The byte-level BPE test tokenizer with DeepSeek's BOS, added to every text
    (llama.cpp's DeepSeek-V3.2 converter insists on add_bos_token)."""
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tok_dir)
    tok.add_special_tokens({"bos_token": "<\uff5cbegin\u2581of\u2581sentence\uff5c>"})
    tok.add_bos_token = True
    tok.save_pretrained(out)
    cfg_path = out / "tokenizer_config.json"  # as DeepSeek's release spells it
    cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "add_bos_token": True},
                                   indent=2))
    return out


def deepseek_v32_config(vocab: int, **overrides):
    """DeepSeek-V3.2 in miniature: V3's MLA, groups, sigmoid + correction bias and leading
    dense block, plus the DSA lightning indexer choosing 8 keys per query (so that on a
    32-token prompt it changes which tokens each query attends; index_head_dim a multiple
    of 64, the smallest Hadamard rotation llama.cpp applies to the indexer's q and k), and
    one NextN block."""
    from transformers import DeepseekV32Config

    kw = dict(
        vocab_size=vocab, hidden_size=128, intermediate_size=192, moe_intermediate_size=64,
        num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=4,
        n_routed_experts=8, num_experts_per_tok=2, n_group=2, topk_group=1,
        n_shared_experts=1, routed_scaling_factor=2.5, norm_topk_prob=True,
        kv_lora_rank=64, q_lora_rank=64, qk_rope_head_dim=16, qk_nope_head_dim=32,
        v_head_dim=32, first_k_dense_replace=1, mlp_layer_types=["dense", "sparse", "sparse"],
        layer_types=["indexed_attention"] * 3, index_n_heads=16, index_head_dim=64,
        index_topk=8, max_position_embeddings=2048, rms_norm_eps=1e-6,
        tie_word_embeddings=False, num_nextn_predict_layers=1,
        scoring_func="sigmoid", topk_method="noaux_tc",  # as the released config.json says
    )
    kw.update(overrides)
    return DeepseekV32Config(**kw)


def build_deepseek_v32(out: Path, tok_dir: Path, dtype=None, nextn: bool = True,
                       **overrides) -> Path:
    import torch
    from transformers import AutoTokenizer, DeepseekV32ForCausalLM

    ds_tok = bos_tokenizer(tok_dir, out.parent / f"{out.name}-tokenizer")
    tok = AutoTokenizer.from_pretrained(ds_tok)
    cfg = deepseek_v32_config(len(tok), bos_token_id=tok.bos_token_id,
                              eos_token_id=tok.eos_token_id, **overrides)
    torch.manual_seed(14)
    _finish(DeepseekV32ForCausalLM(cfg), ds_tok, out, seed=14, dtype=dtype)
    if nextn:
        add_nextn_layer(out, own_head=True)
    return out


# ---- derived checkpoints ---------------------------------------------------------------------

_EXPERT_KEYS = ("num_experts", "num_local_experts", "n_routed_experts")


def prune_hf_checkpoint(src: Path, out: Path, kept: dict[int, tuple[int, ...]]) -> Path:
    """The checkpoint with only `kept` experts per layer, renumbered in order; router rows,
    the correction bias and stacked experts (gpt-oss) sliced the same way; NextN / MTP
    blocks dropped. The reference a pruned export must match."""
    from safetensors.torch import load_file, save_file

    shutil.copytree(src, out)
    cfg = json.loads((src / "config.json").read_text())
    text = cfg.get("text_config") or {}
    n_layers = cfg.get("num_hidden_layers", text.get("num_hidden_layers"))
    # model.layers or, in a vision-language wrapper, model.language_model.layers
    prefix = r"(model\.(?:language_model\.)?layers)\.(\d+)\."
    new = {}
    for name, t in load_file(src / "model.safetensors").items():
        m = re.match(prefix, name)
        if m and int(m.group(2)) >= n_layers:
            continue  # NextN / MTP blocks: transformers does not run them
        m = re.match(prefix + r"(.*)\.experts\.(\d+)\.(.*)", name)
        if m:
            layer, e = int(m.group(2)), int(m.group(4))
            if e in kept[layer]:
                i = kept[layer].index(e)
                new[f"{m.group(1)}.{layer}.{m.group(3)}.experts.{i}.{m.group(5)}"] = t
            continue
        m = re.match(prefix + r"(mlp|block_sparse_moe)\.(gate\.weight|"
                     r"gate\.e_score_correction_bias|e_score_correction_bias|router\.weight|"
                     r"router\.bias|experts\.\w+)$", name)
        if m:  # router rows, correction bias, stacked experts: the first axis
            t = t[list(kept[int(m.group(2))])].clone()
        new[name] = t
    save_file(new, out / "model.safetensors", metadata={"format": "pt"})
    for c in (cfg, text):
        for key in _EXPERT_KEYS:
            if key in c:
                c[key] = len(next(iter(kept.values())))
    (out / "config.json").write_text(json.dumps(cfg))
    return out


FP8_BLOCK = 128


def _fp8_linear(name: str) -> bool:
    """The tensors DeepSeek-V3 ships in FP8: every linear weight of the blocks, not the
    router, the norms, the embeddings or the output head."""
    return name.startswith("model.layers.") and name.endswith("_proj.weight")


def _scales(w, g):
    """One scale per 128x128 block, with at most 4 significant bits: times an e4m3 value (4
    significant bits) the product has at most 8, so BF16 holds it exactly."""
    import torch

    rows, cols = -(-w.shape[0] // FP8_BLOCK), -(-w.shape[1] // FP8_BLOCK)
    absmax = torch.zeros(rows, cols)
    for i in range(rows):
        for j in range(cols):
            blk = w[i * FP8_BLOCK:(i + 1) * FP8_BLOCK, j * FP8_BLOCK:(j + 1) * FP8_BLOCK]
            absmax[i, j] = blk.abs().max()
    base = torch.exp2(torch.floor(torch.log2(absmax / 448.0)) + 1)  # power of 2 >= absmax/448
    mant = 1.0 + torch.randint(0, 8, (rows, cols), generator=g) / 8.0
    return base * mant


def _expand(scale, shape):
    s = scale.repeat_interleave(FP8_BLOCK, 0).repeat_interleave(FP8_BLOCK, 1)
    return s[: shape[0], : shape[1]]


def make_fp8_twins(src: Path, fp8_out: Path, bf16_out: Path, mtp_layer: bool = True):
    """An FP8 e4m3 checkpoint with 128x128 `weight_scale_inv` blocks and the
    `quantization_config` of the DeepSeek-V3 release, and a BF16 twin holding exactly its
    dequantized values. Other tensors are BF16 in both (the correction bias F32, as released).

    With `mtp_layer`, the FP8 copy also carries a multi-token-prediction block after the
    last layer (as V3 does: layer 61 of 61), which an export must ignore.
    """
    import torch
    from safetensors.torch import load_file, save_file

    tensors = load_file(src / "model.safetensors")
    g = torch.Generator().manual_seed(8)
    fp8, twin = {}, {}
    for name, t in tensors.items():
        t = t.float()
        if _fp8_linear(name):
            scale = _scales(t, g)
            q = (t / _expand(scale, t.shape)).to(torch.float8_e4m3fn)
            deq = q.float() * _expand(scale, t.shape)
            fp8[name], fp8[name + "_scale_inv"] = q, scale
            twin[name] = deq.to(torch.bfloat16)
            assert torch.equal(twin[name].float(), deq), f"{name} is not exact in BF16"
        else:
            keep = torch.float32 if name.endswith("e_score_correction_bias") else torch.bfloat16
            fp8[name] = twin[name] = t.to(keep)
    cfg = json.loads((src / "config.json").read_text())
    if mtp_layer:
        n = cfg["num_hidden_layers"]
        for name in [k for k in fp8 if k.startswith("model.layers.1.")]:
            fp8[name.replace("model.layers.1.", f"model.layers.{n}.")] = fp8[name].clone()
        d = cfg["hidden_size"]
        fp8[f"model.layers.{n}.eh_proj.weight"] = torch.zeros(d, 2 * d, dtype=torch.bfloat16)
        for extra in ("enorm", "hnorm", "shared_head.norm"):
            fp8[f"model.layers.{n}.{extra}.weight"] = torch.ones(d, dtype=torch.bfloat16)
    for out, data, quant in ((fp8_out, fp8, True), (bf16_out, twin, False)):
        shutil.copytree(src, out)
        save_file(data, out / "model.safetensors", metadata={"format": "pt"})
        c = {**cfg, "dtype": "bfloat16"}
        if quant:
            c["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3",
                                        "quant_method": "fp8",
                                        "weight_block_size": [FP8_BLOCK, FP8_BLOCK]}
        (out / "config.json").write_text(json.dumps(c, indent=2))
    return fp8_out, bf16_out


def tensor_differences(path_a: Path, path_b: Path) -> list[str]:
    """Tensors present in one GGUF file only, or with another type or other data (order and
    trailing dimensions of 1 ignored: llama-quantize sorts tensors and drops those dims)."""
    import gguf
    import numpy as np

    a = {t.name: t for t in gguf.GGUFReader(path_a).tensors}
    b = {t.name: t for t in gguf.GGUFReader(path_b).tensors}
    return sorted(set(a) ^ set(b)) + [
        n for n in a if n in b and (
            a[n].tensor_type != b[n].tensor_type
            or not np.array_equal(np.asarray(a[n].data).reshape(-1),
                                  np.asarray(b[n].data).reshape(-1)))]


def qwen3_5_moe_text_config(vocab: int, **overrides) -> dict:
    """Qwen3.5-MoE's text model in miniature: 4 blocks, full attention every 4th as in the
    release, 2 key heads for 4 value heads in the DeltaNet blocks (so llama.cpp's value-head
    reordering is exercised), 8 experts of which 2 are used, a shared expert, a rope base and
    interleaved-MRoPE sections other than the defaults."""
    kw = dict(
        vocab_size=vocab, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=32, linear_conv_kernel_dim=4, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_num_key_heads=2, linear_num_value_heads=4,
        moe_intermediate_size=64, shared_expert_intermediate_size=96, num_experts=8,
        num_experts_per_tok=2, max_position_embeddings=512, rms_norm_eps=1e-6,
        rope_parameters={"rope_type": "default", "rope_theta": 1e6, "partial_rotary_factor": 0.25,
                         "mrope_interleaved": True, "mrope_section": [2, 1, 1]},
        tie_word_embeddings=False,
    )
    kw.update(overrides)
    return kw


def build_qwen3_5_moe(out: Path, tok_dir: Path, dtype=None, mtp: bool = True,
                      **overrides) -> Path:
    """A checkpoint laid out like the Qwen3.5-MoE release: the vision-language wrapper
    (`Qwen3_5MoeForConditionalGeneration`, text settings in `text_config`, a one-block
    vision tower) and, with `mtp`, a multi-token-prediction block under `mtp.` as the
    release ships it (transformers ignores it; an export must too)."""
    import torch
    from safetensors.torch import load_file, save_file
    from transformers import (
        AutoTokenizer,
        Qwen3_5MoeConfig,
        Qwen3_5MoeForCausalLM,
        Qwen3_5MoeForConditionalGeneration,
        Qwen3_5MoeTextConfig,
    )

    tok = AutoTokenizer.from_pretrained(tok_dir)
    text = qwen3_5_moe_text_config(len(tok), bos_token_id=tok.bos_token_id,
                                   eos_token_id=tok.eos_token_id, **overrides)
    # weights drawn on the text model (conftest's init reads its layers), the DeltaNet output
    # projections, which also write into the residual stream, scaled like o_proj
    torch.manual_seed(7)
    lm = Qwen3_5MoeForCausalLM(Qwen3_5MoeTextConfig(**text))
    _init_weights(lm, seed=7)
    g = torch.Generator().manual_seed(207)
    with torch.no_grad():
        for name, p in lm.named_parameters():
            if name.endswith("linear_attn.out_proj.weight"):
                p.copy_(0.08 / (2 * text["num_hidden_layers"]) ** 0.5
                        * torch.randn(p.shape, generator=g))
    cfg = Qwen3_5MoeConfig(text_config=text, vision_config=dict(
        depth=1, hidden_size=32, intermediate_size=64, num_heads=2, out_hidden_size=128,
        num_position_embeddings=64), tie_word_embeddings=False)
    model = Qwen3_5MoeForConditionalGeneration(cfg)
    state = {k.replace("model.", "model.language_model.", 1): v
             for k, v in lm.state_dict().items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.startswith("model.visual.") for k in missing), missing
    _save(model if dtype is None else model.to(dtype), tok_dir, out)
    if mtp:
        tensors = load_file(out / "model.safetensors")
        last = f"model.language_model.layers.{text['num_hidden_layers'] - 1}."
        for name in [k for k in tensors if k.startswith(last)]:
            tensors[name.replace(last, "mtp.layers.0.")] = tensors[name].clone()
        d = text["hidden_size"]
        tensors["mtp.fc.weight"] = torch.zeros(d, 2 * d, dtype=tensors[name].dtype)
        for norm in ("norm", "pre_fc_norm_embedding", "pre_fc_norm_hidden"):
            tensors[f"mtp.{norm}.weight"] = torch.zeros(d, dtype=tensors[name].dtype)
        save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    return out
def _mxfp4(w):
    """MXFP4 as the gpt-oss release stores it, from float weights (..., rows, cols): per block
    of 32 along a row one E8M0 exponent (ggml's rule: floor(log2 amax) - 2) and 4-bit e2m1
    codes, nearest value; returns (blocks U8 [..., rows, cols/32, 16] with element 2i in the
    low nibble, scales U8 [..., rows, cols/32], the dequantized values)."""
    import torch

    lut = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0,
                        -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0])
    x = w.float().reshape(*w.shape[:-1], w.shape[-1] // 32, 32)
    e = torch.floor(torch.log2(x.abs().amax(-1))) - 2
    scaled = x / torch.exp2(e)[..., None]
    codes = (scaled[..., None] - lut).abs().argmin(-1)  # first of equals: +0 before -0
    deq = lut[codes] * torch.exp2(e)[..., None]
    packed = (codes[..., 0::2] | (codes[..., 1::2] << 4)).to(torch.uint8)
    return packed, (e + 127).to(torch.uint8), deq.reshape(w.shape)


def make_mxfp4_twins(src: Path, mxfp4_out: Path, bf16_out: Path):
    """A gpt-oss checkpoint laid out like the release (experts as MXFP4 `*_blocks` and
    `*_scales` in (out x in) orientation, the `quantization_config` of the release, the other
    tensors BF16) and a BF16 twin holding exactly its dequantized values (BF16 holds every
    e2m1 value times a power of 2)."""
    import torch
    from safetensors.torch import load_file, save_file

    q, twin = {}, {}
    for name, t in load_file(src / "model.safetensors").items():
        if re.search(r"\.experts\.(gate_up_proj|down_proj)$", name):
            blocks, scales, deq = _mxfp4(t.float().transpose(1, 2))  # HF keeps (in x out)
            q[name + "_blocks"], q[name + "_scales"] = blocks, scales
            twin[name] = deq.transpose(1, 2).contiguous().to(torch.bfloat16)
            assert torch.equal(twin[name].float(), deq.transpose(1, 2)), name
        else:
            q[name] = twin[name] = t.to(torch.bfloat16)
    cfg = json.loads((src / "config.json").read_text())
    for out, data, quant in ((mxfp4_out, q, True), (bf16_out, twin, False)):
        shutil.copytree(src, out)
        save_file(data, out / "model.safetensors", metadata={"format": "pt"})
        c = {**cfg, "dtype": "bfloat16"}
        if quant:
            c["quantization_config"] = {
                "quant_method": "mxfp4",
                "modules_to_not_convert": ["model.layers.*.self_attn", "model.layers.*.mlp.router",
                                           "model.embed_tokens", "lm_head"]}
        (out / "config.json").write_text(json.dumps(c, indent=2))
    return mxfp4_out, bf16_out
