"""The checks every newly added MoE family passes on its tiny checkpoint (issue 12), shared by
the per-family test modules: transformers as truth for the logits, llama.cpp's own converter
as truth for the file layout, llama.cpp's own allocation as truth for the KV cache."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import gguf
import numpy as np

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.llamacpp import eval_logits, open_llama
from edgemoe.runtime.memory import memory_breakdown
from tests import arch_fixtures as af
from tests.helpers import hf_logits, hf_tokens
from tests.llama_converter import convert_hf, layout_differences

# keys each tool fills in its own way: general.name (edgemoe: the folder's name; the
# converter: from config or folder, capitalised), the converter's naming metadata
# (general.size_label, general.type, and general.basename / general.version / general.finetune
# that it parses out of folder names like "deepseek-v32") and edgemoe.plan (the plan edgemoe
# stores in its files)
OWN_KEYS = ("general.name", "general.size_label", "general.type", "general.basename",
            "general.version", "general.finetune", "edgemoe.plan")


def f32_logit_difference(model_dir: Path, gguf_path: Path) -> float:
    """max |llama.cpp - transformers| over the test prompt, both F32 (F32 KV cache)."""
    tokens = hf_tokens(model_dir)
    want = hf_logits(model_dir, tokens)
    assert np.abs(want).max() > 1.0, "logits too small for the comparison to mean anything"
    got = eval_logits(open_llama(gguf_path, n_ctx=64, f32_kv=True), tokens)
    return float(np.abs(got - want).max())


def converter_differences(model_dir: Path, ours: Path, out: Path, pre: str = "qwen2",
                          kept: tuple[str, ...] = (), restore_add_bos: bool = False
                          ) -> list[str]:
    """How our F32 file differs from the one llama.cpp's converter writes for `model_dir`,
    leaving out OWN_KEYS and the differences in `kept` (each must still occur: a kept
    difference that went away is reported too, so the list stays true)."""
    theirs = convert_hf(model_dir, out, pre=pre, restore_add_bos=restore_add_bos)
    diffs = layout_differences(ours, theirs, ignore_keys=OWN_KEYS)
    gone = [f"listed difference no longer seen: {k}" for k in kept if k not in diffs]
    return [d for d in diffs if d not in kept] + gone


def export_pruned(model_dir: Path, kept: dict[int, tuple[int, ...]], out: Path) -> Path:
    """`model_dir` exported at F32 keeping `kept` experts per MoE layer; returns `out`."""
    model = pipeline.open_model(model_dir)
    n_keep = len(next(iter(kept.values())))
    plan = mp.uniform_plan(model.adapter.tensor_specs(n_keep), "F32", mp.Budget(10**12))
    plan = replace(plan, n_experts=model.adapter.n_expert, n_experts_kept=n_keep,
                   kept_experts={str(k): v for k, v in kept.items()})
    out = pipeline.export(model, plan, out, progress=False)
    arch = model.adapter.arch_name
    assert gguf.GGUFReader(out).get_field(f"{arch}.expert_count").contents() == n_keep
    return out


def pruned_difference(model_dir: Path, kept: dict[int, tuple[int, ...]], tmp: Path,
                      exported: Path | None = None) -> float:
    """The max logit difference between `model_dir` exported keeping `kept` experts per MoE
    layer (`exported`, or `export_pruned` into `tmp`) and transformers running the checkpoint
    pruned the same way."""
    out = exported or export_pruned(model_dir, kept, tmp / "pruned.gguf")
    tokens = hf_tokens(model_dir)
    reference = af.prune_hf_checkpoint(model_dir, tmp / "hf_pruned", kept)
    want = hf_logits(reference, tokens)
    assert np.abs(hf_logits(model_dir, tokens) - want).max() > 0.1, \
        "pruning these experts should change the logits"
    return float(np.abs(eval_logits(open_llama(out, n_ctx=64, f32_kv=True), tokens)
                        - want).max())


def kv_bytes_measured_and_planned(gguf_path: Path, model_dir: Path, ctx: int,
                                  kv_type: str = "f16") -> tuple[int, int]:
    """(llama.cpp's context memory for `ctx` tokens, the adapter's kv_bytes for it)."""
    llm = open_llama(gguf_path, n_ctx=ctx, f32_kv=kv_type == "f32")
    measured = memory_breakdown(llm)["context"]
    del llm
    return measured, pipeline.open_model(model_dir).adapter.kv_bytes(ctx, kv_type)
