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
probe quantizes those alone. Scales are stored with the calibration statistics. A run in
layer segments probes in the same order as it goes (`edgemoe.calibration.segment_probes`).
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
from ..damage import (
    SAMPLED_ROWS,
    expert_errors,
    expert_shares,
    measure_damage,
    measured_experts,
    measured_types,
)
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
# the default budget: this share of the calibration run's time, or what is left of
# MIN_CALIBRATION_SECONDS after the run, whichever is more. The share keeps calibration with
# probes within 2x llama-imatrix over the same tokens (its runs cost 1.15-1.2x llama-imatrix
# and an HF source's layer segments 0.15x more; at 0.5 the 8gb benchmark's segments took
# 1.95-2.2x, 2026-12-04). The floor is on the whole stage, so a small model probes every
# tensor alone: the bundled model's 31 passes take 10.5-15 s on 2 cores whole; in two
# layer segments 6 s on a quiet machine and 20.5 s beside the test suite. It was 60 s, then
# 30 s on the probes alone, which at 8gb was 0.65 of the run
PROBE_SHARE = 0.4
MIN_CALIBRATION_SECONDS = 40.0
MIN_PROBE_TOKENS = 512  # probes run on a sixteenth of the calibration tokens, at least this
KIND_LAYERS = 4  # layers probed at once in a kind's first probe


@dataclass
class ProbeLog:
    """What the probes measured and what was carried, for the log and the summary."""

    base_seconds: float | None = None  # None: the reference is calibration's own run
    passes: list[tuple[str, float, float]] = field(default_factory=list)  # label, KLD, scale
    carried: dict[str, list[str]] = field(default_factory=dict)  # source -> tensors
    skipped: list[str] = field(default_factory=list)

    def probed(self, label: str, kld_value: float, predicted: float) -> float:
        """The scale of a probe that measured `kld_value` where `predicted` was predicted."""
        scale = kld_value / predicted if predicted > 0 else 0.0
        self.passes.append((label, kld_value, scale))
        log.info("probe %s: KLD %.5f / predicted %.5f = %.3f", label, kld_value, predicted,
                 scale)
        return scale

    def pruned(self, n_keep: int, kld_value: float, predicted: float) -> float | None:
        """The scale of pruning damage (None when no damage was predicted)."""
        scale = kld_value / predicted if predicted > 0 else None
        self.passes.append((f"pruning to {n_keep} experts", kld_value, scale or 0.0))
        log.info("pruning probe keep %d: KLD %.5f / predicted %.5f", n_keep, kld_value,
                 predicted)
        return scale

    def finish(self, stats: CalibStats, scales: dict[str, float], prune_scale: float | None,
               progress: bool) -> CalibStats:
        """`stats` with the scales, after logging what was measured and carried."""
        log.info("%s", self.summary())
        if progress:
            tqdm.write(self.summary())
        values = np.array(list(scales.values()))
        if len(values):
            log.info("sensitivity scales: min %.3g median %.3g max %.3g", values.min(),
                     np.median(values), values.max())
        return replace(stats, scales=scales, prune_scale=prune_scale)

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
    """The probe budget: time spent, and whether n more tensor probe passes fit (priced
    at the mean of those run, each a pass and its tensors' quantization; 1.5 calibration
    passes before the first)."""

    def __init__(self, seconds: float):
        self.t0, self.seconds = time.monotonic(), seconds
        self.base = 0.0
        self.passes: list[float] = []

    def guess(self) -> float:
        return float(np.mean(self.passes)) if self.passes else 1.5 * self.base

    def fits(self, n: int = 1) -> bool:
        return time.monotonic() - self.t0 + n * self.guess() <= self.seconds


def default_budget(calibration_seconds: float) -> float:
    """Seconds of probes after a calibration run of `calibration_seconds`: PROBE_SHARE of it,
    or the rest of MIN_CALIBRATION_SECONDS."""
    return max(PROBE_SHARE * calibration_seconds,
               MIN_CALIBRATION_SECONDS - calibration_seconds)


def probe_token_count(calibration_tokens: int, most: int, n_ctx: int) -> int:
    """Tokens each probe pass runs: a sixteenth of the calibration's, between
    MIN_PROBE_TOKENS and `most`, in whole windows of `n_ctx` (one at least)."""
    n = min(most, max(MIN_PROBE_TOKENS, calibration_tokens // 16))
    return max(n_ctx, n // n_ctx * n_ctx)


class Predictions:
    """The predicted damage of a probe: its tensors' importance-weighted error at the probe
    type (`measure_damage`'s, on the experts a probe quantizes), found when first asked.

    `sampled` holds the errors a probe's `WeightErrors` found on the same rows as it
    quantized the whole slices (by (name, expert)). Those are not quantized again: of an
    expert tensor only the slices no probe quantized (experts its tokens never chose) are
    measured, on the same rows; a dense tensor not there is measured by `measure_damage`."""

    def __init__(self, model: pipeline.Model, stats: CalibStats, probe_type: str = PROBE_TYPE,
                 sampled: dict[tuple[str, int | None], float] | None = None):
        self.model, self.stats, self.probe_type = model, stats, probe_type
        self.specs = {s.name: s for s in model.specs if s.quantizable}
        plan = mp.uniform_plan(model.specs, probe_type, mp.Budget(2**62), check_budget=False)
        self.types = {t.name: t.type for t in plan.tensors}
        # an expert tensor is probed on the experts whose error measure_damage measures: the
        # prediction is then measured, and the probe quantizes those experts only
        self.subset = {n: measured_experts(s.n_experts) for n, s in self.specs.items()
                       if s.n_experts}
        self.sampled = {} if sampled is None else sampled
        self._known: dict[str, float] = {}

    def __call__(self, names) -> float:
        todo = [n for n in names if n not in self._known and not self._from_sampled(n)]
        self._sample([n for n in todo if self.specs[n].n_experts])
        todo = [n for n in todo if not self._from_sampled(n)]
        if todo:
            d = measure_damage(self.model, ladder=(self.probe_type,), stats=self.stats,
                               progress=False, only=set(todo))
            for n in todo:  # 0 where the probe type is not a candidate of the tensor
                t = self.types[n]
                per = d.per_expert[n].get(t) if n in d.per_expert else None
                self._known[n] = (float(per[self.subset[n]].sum()) if per is not None
                                  else d.dense.get(n, {}).get(t, 0.0))
        return sum(self._known[n] for n in names)

    def _sample(self, names: list[str]) -> None:
        """Into `sampled`: the slices of these expert tensors that are not there yet."""
        if not names:
            return
        recipes = {r.spec.name: r for r in self.model.recipes}
        with ThreadPoolExecutor(default_threads()) as pool:
            for n in names:  # a tensor at a time: its sampled rows only are held
                missing = [e for e in self.subset[n] if (n, int(e)) not in self.sampled]
                jobs = expert_errors(self.model, recipes[n], missing, [self.types[n]],
                                     self.stats.importance_for(self.specs[n]), SAMPLED_ROWS,
                                     pool)
                for (e, _), job in jobs.items():
                    self.sampled[n, e] = job.result()

    def _from_sampled(self, name: str) -> bool:
        """Whether `name`'s prediction is known now from `sampled` (measure_damage's sums
        on its rows: the same number), or is 0 (the probe type is not measured for it)."""
        spec, t = self.specs[name], self.types[name]
        imatrix = self.stats.importance_for(spec) is not None
        if t not in measured_types(spec, (self.probe_type,), imatrix):
            self._known[name] = 0.0
            return True
        slices = [(name, int(e)) for e in self.subset[name]] if spec.n_experts else [(name, None)]
        if any(s not in self.sampled for s in slices):
            return False
        if spec.n_experts:
            share = expert_shares(self.stats, spec)[self.subset[name]]
            self._known[name] = float((np.array([self.sampled[s] for s in slices]) * share).sum())
        else:
            self._known[name] = self.sampled[name, None]
        return True


def pruning_probe(model: pipeline.Model, stats: CalibStats
                  ) -> tuple[int, dict[int, tuple[int, ...]]] | None:
    """(experts kept per layer, the kept ids per layer) of the pruning probe: the first
    keep count below all, the most salient; None when the model cannot be pruned."""
    a = model.adapter
    if not stats.has_expert_stats or a.n_expert <= a.n_expert_used:
        return None
    n_keep = keep_grid(a.n_expert, a.n_expert_used, n_groups=a.n_expert_groups)[1]
    return n_keep, kept_by_saliency(stats, n_keep, a.n_expert_groups)


def measure_scales(model: pipeline.Model, stats: CalibStats, tokens: list[int],
                   gguf_path: str | Path, probe_type: str = PROBE_TYPE, n_ctx: int = 512,
                   seconds: float = MIN_CALIBRATION_SECONDS, progress: bool = True,
                   threads: int | None = None, base: BasePass | None = None) -> CalibStats:
    """`stats` with `scales` (per tensor) and `prune_scale` measured by probes run on
    `gguf_path` (the model calibration ran) within about `seconds`: on `tokens`, against a
    base pass run first, or on the windows of `base` against its log-probabilities. (A run
    in layer segments probes as it goes: `edgemoe.calibration.segment_probes`.)"""
    clock = _Clock(seconds)
    predict = Predictions(model, stats, probe_type)
    report = ProbeLog()
    if base is not None:
        tokens = base.tokens
    runner = ProbeRunner(gguf_path, tokens, n_ctx, threads)
    pool = ThreadPoolExecutor(threads or default_threads())
    try:
        if base is not None:  # calibration's own run: its time is what a pass costs
            ref, clock.base = base.logprobs, base.seconds
        else:
            start = time.monotonic()
            ref = runner.logprobs()
            clock.base = report.base_seconds = time.monotonic() - start
        errors = WeightErrors(model, stats, RunWeights(gguf_path, source=model.source),
                              predict.types, executor=pool, sampled=predict.sampled)

        def probe(p) -> float:
            start = time.monotonic()
            value = kld(ref, runner.logprobs(p))
            if isinstance(p, TensorProbe):  # what the next costs (the pruning pass
                clock.passes.append(time.monotonic() - start)  # quantizes nothing: cheaper)
            return value

        prune_scale = None
        pruning = pruning_probe(model, stats)
        if pruning is not None and clock.fits():
            n_keep, kept = pruning
            pred = sum(pruning_damage(stats, kept).values())
            k = probe(PruneProbe(kept))
            prune_scale = report.pruned(n_keep, k, pred)

        def one(label: str, names: list[str]) -> float | None:
            try:
                k = probe(TensorProbe(errors, names, predict.subset))
            except (HookError, ProbeError) as e:  # a graph this module does not know
                log.warning("probe %s failed (%s): its tensors carry other scales", label, e)
                return None
            return report.probed(label, k, predict(names))

        scales = _probe_tensors([s for s in model.specs if s.quantizable], one, clock, report,
                                progress)
    finally:
        runner.close()
        pool.shutdown()
    return report.finish(stats, scales, prune_scale, progress)


@dataclass(frozen=True)
class Probe:
    """One probe pass: `names` perturbed at once; `kind` set on a kind's first probe."""

    label: str
    names: tuple[str, ...]
    kind: str | None = None


class Schedule:
    """Which probes run, in order, and the scales their results give every tensor.

    Every tensor alone when `fits` says all of them fit (`fits(list of name tuples)`: would
    these probes fit in the budget left?); otherwise each tensor kind first (the kinds with
    most weights first), on `KIND_LAYERS` layers spread over depth at once, then single
    tensors kind by kind, layers spread over depth: each that `fits` allows. Iterating asks
    `fits` before each probe, so a budget measured as probes run stays exact; where probes
    cost alike, the first that does not fit ends the schedule. A tensor not
    probed alone carries its kind's scale, or the median of its kind's probed layers."""

    def __init__(self, specs: list[mp.TensorSpec], fits):
        self.specs, self.fits = specs, fits
        self.by_kind: dict[str, list[str]] = defaultdict(list)
        weights: dict[str, int] = defaultdict(int)
        for s in specs:
            self.by_kind[s.kind].append(s.name)
            weights[s.kind] += s.n_elements
        # the kinds holding most weights first (routed experts, in an MoE): the budget may end
        self.kinds = {k: _spread(self.by_kind[k])
                      for k in sorted(self.by_kind, key=lambda k: -weights[k])
                      if k in SUPPORTED_KINDS}
        self.unsupported = [n for k, v in self.by_kind.items() if k not in SUPPORTED_KINDS
                            for n in v]
        n = sum(len(v) for v in self.kinds.values())
        self.all_alone = fits([(name,) for v in self.kinds.values() for name in v])
        self.total = n if self.all_alone else len(self.kinds) + n  # at most, for a progress bar

    def __iter__(self):
        kinds = self.kinds
        if not self.all_alone:  # a first scale for every kind, from a few layers at once
            for kind, names in kinds.items():
                sample = tuple(sorted(names[:KIND_LAYERS]))  # names are in spread order
                if self.fits([sample]):
                    yield Probe(f"{kind} in {len(sample)} layers", sample, kind)
        # then single tensors: kinds in turn, each kind's layers spread over depth; a kind of
        # one tensor (output, token_embd) was probed alone by its kind probe
        queue = [names[i] for i in range(max(map(len, kinds.values()), default=0))
                 for names in kinds.values()
                 if i < len(names) and (self.all_alone or len(names) > 1)]
        for name in queue:
            if self.fits([(name,)]):
                yield Probe(name, (name,))

    def scales(self, results: dict[Probe, float | None], report: ProbeLog) -> dict[str, float]:
        """Per tensor, the scale its probe measured or the one it carries (`results`: the
        scale of each probe run, None where it failed)."""
        kind_scale = {p.kind: v for p, v in results.items() if p.kind and v is not None}
        alone = {p.names[0]: v for p, v in results.items()
                 if v is not None and (p.kind is None or len(self.kinds[p.kind]) == 1)}
        report.skipped += [n for p, v in results.items() if v is None for n in p.names
                           if n not in report.skipped]
        scales = dict(alone)
        for kind, probed in self.kinds.items():
            rest = [n for n in self.by_kind[kind] if n not in alone]
            if not rest:
                continue
            src, label = kind_scale.get(kind), f"{kind}'s kind probe"
            if src is None and len(rest) < len(probed):
                src = float(np.median([alone[n] for n in probed if n in alone]))
                label = f"the median of {kind}'s probed layers"
            if src is None:
                report.skipped += [n for n in rest if n not in report.skipped]
                continue
            scales.update(dict.fromkeys(rest, src))
            report.carried[label] = rest
        missing = [s.name for s in self.specs if s.name not in scales]
        if missing and scales:
            scales.update(dict.fromkeys(missing, float(np.median(list(scales.values())))))
            why = "out of time" if not self.unsupported else \
                "no probe in the graph or out of time"
            report.carried[f"the median of all probes ({why})"] = missing
        return scales


def _probe_tensors(specs: list[mp.TensorSpec], one, clock: _Clock, report: ProbeLog,
                   progress: bool) -> dict[str, float]:
    """Per-tensor scales from probes run now, as `Schedule` orders them, while `clock`
    allows: `one(label, names)` runs one and gives its scale (None: it failed)."""
    schedule = Schedule(specs, lambda probes: clock.fits(len(probes)))
    results: dict[Probe, float | None] = {}
    with tqdm(total=schedule.total, desc="sensitivity probes", disable=not progress) as bar:
        for p in schedule:
            results[p] = one(p.label, list(p.names))
            bar.update()
    return schedule.scales(results, report)
