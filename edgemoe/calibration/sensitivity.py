"""Measured sensitivity: how much KL divergence one unit of predicted damage costs, per tensor.

The planner's damage proxy (importance-weighted relative error) ranks types within a tensor
well, but says nothing of how much an error in `output` hurts compared with the same error
in `blk.3.attn_k`. Probes settle that in llama.cpp itself: quantize one tensor (or one group
of tensors) to a low-bit probe type, everything else left as in the base model, measure the
KL divergence against the base on calibration text, and divide by the predicted damage of
that choice. One more probe prunes the least salient experts of every layer and gives the
scale of pruning damage. Scales are stored with the calibration statistics.
"""

from __future__ import annotations

import logging
import tempfile
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

import memory_planner as mp
from memory_planner.joint import keep_grid, kept_by_saliency, pruning_damage
from memory_planner.stats import CalibStats

from .. import pipeline
from ..damage import measure_damage
from ..runtime import textscore

log = logging.getLogger(__name__)

PROBE_TYPE = "Q2_K"
MAX_PER_TENSOR = 64  # beyond this many quantizable tensors, probe by tensor kind


def _groups(specs: list[mp.TensorSpec], per_tensor: bool) -> dict[str, list[str]]:
    groups: dict[str, list[str]] = defaultdict(list)
    for s in specs:
        if s.quantizable:
            groups[s.name if per_tensor else s.kind].append(s.name)
    return dict(groups)


def measure_scales(model: pipeline.Model, stats: CalibStats, tokens: list[int],
                   base_type: str = "F32", probe_type: str = PROBE_TYPE, n_ctx: int = 512,
                   per_tensor: bool | None = None, progress: bool = True,
                   workdir: str | Path | None = None) -> CalibStats:
    """`stats` with `scales` (per tensor) and `prune_scale` measured by probes in llama.cpp."""
    specs = model.specs
    if per_tensor is None:
        per_tensor = sum(s.quantizable for s in specs) <= MAX_PER_TENSOR
    damage = measure_damage(model, ladder=(probe_type,), stats=stats,
                            progress=False).table(specs)
    base = mp.uniform_plan(specs, base_type, mp.Budget(2**62), check_budget=False)
    groups = _groups(specs, per_tensor)
    with tempfile.TemporaryDirectory(prefix="edgemoe-probe-", dir=workdir) as tmp:
        tmp = Path(tmp)
        base_path = pipeline.export(model, base, tmp / "base.gguf", stats=stats, progress=False)
        ref = textscore.logprobs(base_path, tokens, n_ctx)

        def kld_of(plan: mp.MemoryPlan) -> float:
            path = pipeline.export(model, plan, tmp / "probe.gguf", stats=stats, progress=False,
                                   reuse=base_path)
            return textscore.compare(ref, textscore.logprobs(path, tokens, n_ctx), tokens,
                                     n_ctx).kld_mean

        scales: dict[str, float] = {}
        for label, names in tqdm(groups.items(), desc="sensitivity probes",
                                 disable=not progress):
            chosen = set(names)
            probe = mp.uniform_plan(specs, probe_type, mp.Budget(2**62), check_budget=False)
            probe_types = probe.by_name()
            tensors = tuple(probe_types[t.name] if t.name in chosen else t
                            for t in base.tensors)
            predicted = sum(damage[n].get(probe_types[n].type, 0.0) for n in names)
            kld = kld_of(replace(base, tensors=tensors))
            scale = kld / predicted if predicted > 0 else 0.0
            for n in names:
                scales[n] = scale
            log.info("probe %s: KLD %.5f / predicted %.5f = %.3f", label, kld, predicted, scale)

        prune_scale = None
        a = model.adapter
        if stats.has_expert_stats and a.n_expert > a.n_expert_used:
            n_keep = keep_grid(a.n_expert, a.n_expert_used, n_groups=a.n_expert_groups)[1]
            kept = kept_by_saliency(stats, n_keep, a.n_expert_groups)
            predicted = sum(pruning_damage(stats, kept).values())
            specs_k = a.tensor_specs(n_keep)
            plan = mp.uniform_plan(specs_k, base_type, mp.Budget(2**62), check_budget=False)
            plan = replace(plan, n_experts=a.n_expert, n_experts_kept=n_keep,
                           kept_experts={str(k): v for k, v in kept.items()})
            kld = kld_of(plan)
            prune_scale = kld / predicted if predicted > 0 else None
            log.info("pruning probe keep %d: KLD %.5f / predicted %.5f", n_keep, kld, predicted)
    values = np.array(list(scales.values()))
    log.info("sensitivity scales: min %.3g median %.3g max %.3g", values.min(),
             np.median(values), values.max())
    return replace(stats, scales=scales, prune_scale=prune_scale)
