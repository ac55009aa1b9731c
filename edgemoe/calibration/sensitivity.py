"""Measured sensitivity: how much KL divergence one unit of predicted damage costs, per tensor.

The planner's damage proxy (importance-weighted relative error) ranks types within a tensor
well, but says nothing of how much an error in `output` hurts compared with the same error
in `blk.3.attn_k`. Probes settle that in llama.cpp itself, on the GGUF calibration ran: the
calibration run's first windows give reference log-probabilities (or, resumed from a
checkpoint, one base pass), and each probe is one more pass in which the
eval callback adds a tensor's (or a group's) error at a low-bit probe type to its products
(`edgemoe.calibration.perturb`; no model file is written). Its KL divergence against the
base, divided by the predicted damage of that choice, is the tensor's scale. One more probe
drops the least salient experts of every layer and gives the scale of pruning damage.

The probes run within a time budget. When every tensor fits, each is probed alone. Otherwise
each tensor kind is probed first (the kinds with most weights first), on a few layers spread
over depth at once, then single tensors kind by kind, layers spread over depth, as long as
the budget lasts; a tensor not probed alone carries its kind's scale. A stacked expert
tensor is probed on the experts whose error `measure_damage` measures (16 at most), so its
probe quantizes those alone. Scales are stored with the calibration statistics.
"""

from __future__ import annotations

import logging
import time
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
from tqdm import tqdm

import memory_planner as mp
from export.quantize import default_threads
from memory_planner.joint import keep_grid, kept_by_saliency, pruning_damage
from memory_planner.stats import CalibStats

from .. import pipeline
from ..damage import measure_damage, measured_experts
from .nodes import HookError
from .perturb import (
    SUPPORTED_KINDS,
    BasePass,
    ProbeError,
    ProbeRunner,
    PruneProbe,
    RunWeights,
    TensorProbe,
    WeightErrors,
    kld,
)

log = logging.getLogger(__name__)

PROBE_TYPE = "Q2_K"
# the default budget: this share of the calibration run's time, at least MIN_PROBE_SECONDS
# (calibration with probes then costs about 1.5 calibration runs)
PROBE_SHARE = 0.5
MIN_PROBE_SECONDS = 60.0
MIN_PROBE_TOKENS = 512  # probes run on a sixteenth of the calibration tokens, at least this
KIND_LAYERS = 4  # layers probed at once in a kind's first probe


@dataclass
class ProbeLog:
    """What the probes measured and what was carried, for the log and the summary."""

    base_seconds: float | None = None  # None: the reference is calibration's own run
    passes: list[tuple[str, float, float]] = field(default_factory=list)  # label, KLD, scale
    carried: dict[str, list[str]] = field(default_factory=dict)  # source -> tensors
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        ref = ("reference from the calibration run" if self.base_seconds is None
               else f"base pass {self.base_seconds:.1f} s")
        lines = [f"sensitivity probes: {ref}, {len(self.passes)} probe passes"]
        lines += [f"  probed {label}: KLD {k:.5f}, scale {s:.3g}" for label, k, s in self.passes]
        for src, names in self.carried.items():
            lines.append(f"  carried {src} to {len(names)} tensors: {_short(names)}")
        if self.skipped:
            lines.append(f"  not probed (out of time or failed): {_short(self.skipped)}")
        return "\n".join(lines)


def _short(names: list[str], n: int = 6) -> str:
    return ", ".join(names[:n]) + (f" ... (+{len(names) - n})" if len(names) > n else "")


def _spread(items: list, n: int | None = None) -> list:
    """`items` reordered so that any prefix is spread evenly (middle, ends, quarters...)."""
    order, seen = [], set()
    k = 1
    while len(order) < len(items):
        for i in range(k + 1):
            j = round(i * (len(items) - 1) / k) if k else 0
            if j not in seen:
                seen.add(j)
                order.append(items[j])
        k *= 2
    mid = items[(len(items) - 1) // 2]
    order.remove(mid)
    order.insert(0, mid)
    return order[:n] if n is not None else order


class _Clock:
    """The probe budget: time spent, and whether n more passes fit."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds
        self.base = 0.0
        self.passes: list[float] = []

    def guess(self) -> float:
        return float(np.mean(self.passes)) if self.passes else 1.5 * self.base

    def fits(self, n: int = 1) -> bool:
        return time.monotonic() - self.t0 + n * self.guess() <= self.seconds


def default_budget(calibration_seconds: float) -> float:
    """Seconds of probes after a calibration run of `calibration_seconds`."""
    return max(MIN_PROBE_SECONDS, PROBE_SHARE * calibration_seconds)


def probe_token_count(calibration_tokens: int, most: int, n_ctx: int) -> int:
    """Tokens each probe pass runs: a sixteenth of the calibration's, between
    MIN_PROBE_TOKENS and `most`, in whole windows of `n_ctx` (one at least)."""
    n = min(most, max(MIN_PROBE_TOKENS, calibration_tokens // 16))
    return max(n_ctx, n // n_ctx * n_ctx)


def measure_scales(model: pipeline.Model, stats: CalibStats, tokens: list[int],
                   gguf_path: str | Path, probe_type: str = PROBE_TYPE, n_ctx: int = 512,
                   seconds: float = MIN_PROBE_SECONDS, progress: bool = True,
                   threads: int | None = None, base: BasePass | None = None,
                   inputs: np.ndarray | None = None, first_block: int = 0) -> CalibStats:
    """`stats` with `scales` (per tensor) and `prune_scale` measured by probes run on
    `gguf_path` (the model calibration ran) within about `seconds`: on `tokens`, against a
    base pass run first, or on the windows of `base` against its log-probabilities.

    `gguf_path` may be the last layer segment of the model (`edgemoe.calibration.segments`),
    from block `first_block` on, run on `inputs` (the residual stream entering it at the
    tokens' positions): its tensors are probed and the others carry their kinds' scales."""
    clock = _Clock(seconds)
    specs = [s for s in model.specs if s.quantizable]
    probe_plan = mp.uniform_plan(model.specs, probe_type, mp.Budget(2**62), check_budget=False)
    types = {t.name: t.type for t in probe_plan.tensors}
    # an expert tensor is probed on the experts whose error measure_damage measures: the
    # prediction is then measured, and the probe quantizes those experts only
    subset = {s.name: measured_experts(s.n_experts) for s in specs if s.n_experts}
    predicted: dict[str, float] = {}

    def predict(names: list[str]) -> float:
        """The predicted damage of the probe of `names`, measured when first asked."""
        todo = [n for n in names if n not in predicted]
        if todo:
            d = measure_damage(model, ladder=(probe_type,), stats=stats, progress=False,
                               only=set(todo))
            for n in todo:  # 0 where the probe type is not a candidate of the tensor
                t = types[n]
                per = d.per_expert[n].get(t) if n in d.per_expert else None
                predicted[n] = (float(per[subset[n]].sum()) if per is not None
                                else d.dense.get(n, {}).get(t, 0.0))
        return sum(predicted[n] for n in names)

    report = ProbeLog()
    if base is not None:
        tokens = base.tokens
    runner = ProbeRunner(gguf_path, tokens, n_ctx, threads, inputs, first_block)
    pool = ThreadPoolExecutor(threads or default_threads())
    try:
        if base is not None:  # calibration's own run: its time is what a pass costs
            ref, clock.base = base.logprobs, base.seconds
        else:
            start = time.monotonic()
            ref = runner.logprobs()
            clock.base = report.base_seconds = time.monotonic() - start
        errors = WeightErrors(model, stats, RunWeights(gguf_path, first_block), types,
                              executor=pool)

        def probe(p) -> float:
            start = time.monotonic()
            value = kld(ref, runner.logprobs(p))
            clock.passes.append(time.monotonic() - start)
            return value

        prune_scale = None
        a = model.adapter
        if stats.has_expert_stats and a.n_expert > a.n_expert_used and clock.fits():
            n_keep = keep_grid(a.n_expert, a.n_expert_used, n_groups=a.n_expert_groups)[1]
            kept_all = kept_by_saliency(stats, n_keep, a.n_expert_groups)
            kept = {layer: ids for layer, ids in kept_all.items()
                    if layer >= first_block}  # the blocks in the file
            pred = sum(v for layer, v in pruning_damage(stats, kept_all).items()
                       if layer in kept)
            k = probe(PruneProbe(kept))
            prune_scale = k / pred if pred > 0 else None
            report.passes.append((f"pruning to {n_keep} experts", k, prune_scale or 0.0))
            log.info("pruning probe keep %d: KLD %.5f / predicted %.5f", n_keep, k, pred)

        def one(label: str, names: list[str]) -> float | None:
            pred = predict(names)
            try:
                k = probe(TensorProbe(errors, names, subset))
            except (HookError, ProbeError) as e:  # a graph this module does not know
                log.warning("probe %s failed (%s): its tensors carry other scales", label, e)
                report.skipped += names
                return None
            scale = k / pred if pred > 0 else 0.0
            report.passes.append((label, k, scale))
            log.info("probe %s: KLD %.5f / predicted %.5f = %.3f", label, k, pred, scale)
            return scale

        # a segment's file holds the embeddings, but runs on the stream: they are not used
        in_file = {s.name for s in specs if (s.layer >= first_block if s.layer is not None
                                             else s.kind != "token_embd" or not first_block)}
        scales = _probe_tensors(specs, one, clock, report, progress, in_file)
    finally:
        runner.close()
        pool.shutdown()
    log.info("%s", report.summary())
    if progress:
        tqdm.write(report.summary())
    values = np.array(list(scales.values()))
    if len(values):
        log.info("sensitivity scales: min %.3g median %.3g max %.3g", values.min(),
                 np.median(values), values.max())
    return replace(stats, scales=scales, prune_scale=prune_scale)


def _probe_tensors(specs: list[mp.TensorSpec], one, clock: _Clock, report: ProbeLog,
                   progress: bool, probeable: set[str] | None = None) -> dict[str, float]:
    """Per-tensor scales: every `probeable` tensor (default: all) alone if the budget
    allows, else kinds first; the others carry their kind's."""
    if probeable is None:
        probeable = {s.name for s in specs}
    by_kind: dict[str, list[str]] = defaultdict(list)
    weights: dict[str, int] = defaultdict(int)
    for s in specs:
        by_kind[s.kind].append(s.name)
        weights[s.kind] += s.n_elements
    # the kinds holding most weights first (routed experts, in an MoE): the budget may end
    kinds = {k: _spread([n for n in by_kind[k] if n in probeable])
             for k in sorted(by_kind, key=lambda k: -weights[k])
             if k in SUPPORTED_KINDS and any(n in probeable for n in by_kind[k])}
    unsupported = [n for k, v in by_kind.items() if k not in SUPPORTED_KINDS for n in v]
    n_tensors = sum(len(v) for v in kinds.values())
    all_alone = clock.fits(n_tensors)
    bar = tqdm(total=n_tensors if all_alone else len(kinds) + n_tensors,
               desc="sensitivity probes", disable=not progress)
    kind_scale: dict[str, float] = {}
    if not all_alone:  # a first scale for every kind, from a few layers at once
        for kind, names in kinds.items():
            if not clock.fits():
                break
            sample = sorted(names[:KIND_LAYERS])  # names are in spread order
            value = one(f"{kind} in {len(sample)} layers", sample)
            if value is not None:
                kind_scale[kind] = value
            bar.update()
    # then single tensors: kinds in turn, each kind's layers spread over depth
    queue = [names[i] for i in range(max(map(len, kinds.values()), default=0))
             for names in kinds.values() if i < len(names)]
    # a kind of one tensor (output, token_embd) was probed alone by its kind probe
    alone = {v[0]: kind_scale[k] for k, v in kinds.items() if len(v) == 1 and k in kind_scale}
    queue = [n for n in queue if n not in alone]
    for name in queue:
        if not clock.fits():
            break
        value = one(name, [name])
        if value is not None:
            alone[name] = value
        bar.update()
    bar.close()

    scales = dict(alone)
    for kind, probed in kinds.items():
        names = by_kind[kind]
        rest = [n for n in names if n not in alone]
        if not rest:
            continue
        src, label = kind_scale.get(kind), f"{kind}'s kind probe"
        if src is None and len(rest) < len(names):
            src = float(np.median([alone[n] for n in probed if n in alone]))
            label = f"the median of {kind}'s probed layers"
        if src is None:
            report.skipped += [n for n in rest if n not in report.skipped]
            continue
        scales.update(dict.fromkeys(rest, src))
        report.carried[label] = rest
    missing = [s.name for s in specs if s.name not in scales]
    if missing and scales:
        scales.update(dict.fromkeys(missing, float(np.median(list(scales.values())))))
        why = "out of time" if not unsupported else "no probe in the graph or out of time"
        report.carried[f"the median of all probes ({why})"] = missing
    return scales
