"""Sensitivity probes of a calibration run in layer segments: every block probed, each
segment's file written once.

A probe perturbs some tensors and measures the KL divergence at the head, so a probe of an
early block needs every later block run after it. In segments the probes travel with the
run: when segment k has run its calibration windows (its GGUF still open in llama.cpp), every
probe whose first perturbed block lies in segment k runs it on the probe windows' input
stream with its handlers installed (`edgemoe.calibration.perturb`), and every probe already
under way runs it on its own perturbed stream (with its handlers there too, if it has any:
a kind's probe spans segments, the pruning probe every MoE block; token_embd's gives the
first segment its rows at the probe type). In the last segment the probe's
log-probabilities give its KL divergence against the calibration run's own, as a probe of
the whole model does, to the bit (tests/edgemoe/calibration/test_segment_probes.py; a
float16 stream moved scales by up to 6%).

A probe under way keeps its stream on disk as its difference from the base stream, float32,
one file per probe (`probe_bytes` each); `calibrate` leaves room for `MAX_IN_FLIGHT` of them
within `--max-disk`. Which probes run is decided when the first segment has run, by
`sensitivity.Schedule` (the order a whole run probes in), each probe priced at the passes of
the segments it runs through (the first segment's time per token, scaled by each segment's
bytes) against the budget. The plan and each probe's progress are saved beside the
checkpoint, so a resumed run goes on where the probes were (the same run, asked for the
same probes: another `--probe-seconds` plans anew).
"""

from __future__ import annotations

import json
import logging
import os
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from tqdm import tqdm

from export.quantize import default_threads
from memory_planner.joint import kept_by_saliency, pruning_damage
from memory_planner.names import parse_tensor_name
from memory_planner.stats import CalibStats

from .. import pipeline
from ..llamacpp import eval_embeddings
from ..runtime.textscore import log_softmax
from .hooks import EvalHooks, attach
from .nodes import HookError
from .perturb import BasePass, ProbeError, PruneProbe, RunWeights, TensorProbe, WeightErrors
from .perturb import kld as mean_kld
from .segments import Segments, segment_bytes
from .sensitivity import (
    PROBE_TYPE,
    Predictions,
    Probe,
    ProbeLog,
    Schedule,
    default_budget,
    pruning_probe,
)

log = logging.getLogger(__name__)

MAX_IN_FLIGHT = 16  # probe streams calibrate leaves disk room for
EMBEDDINGS = "token_embd.weight"
OUT_OF_TIME = "out of time"  # a probe dropped before it started
# a probe's pass over a segment, in calibration passes of as many tokens (its handlers, the
# streams, the KLD): 1.25-1.9 measured on the 8gb benchmark's segments, the first and last
# the dearest
PASS_COST = 2.0
# weight errors kept between probes: half the whole run's (perturb.CACHE_BYTES), since the
# calibration's float64 sums are in memory beside them (1.58 GB peak anonymous at 8gb)
SEGMENT_CACHE = 1 << 27


def probe_bytes(n_tokens: int, n_embd: int) -> int:
    """Disk taken by one probe's stream file (float32)."""
    return n_tokens * n_embd * 4 + 128


@dataclass
class Flight:
    """One probe as it travels: `at` is the segment whose input its stream file holds
    (`start`: none yet, it starts from the base stream); `kld` once it reached the head."""

    label: str
    names: tuple[str, ...]
    kind: str | None
    start: int
    at: int
    n_keep: int = 0  # the pruning probe: experts kept per MoE block
    kld: float | None = None
    failed: str | None = None


class SegmentProbes:
    """collect's `on_segment`: the probes of a run in segments `segs`, on the windows of
    `ref` (filled by the last segment's calibration windows), within `seconds` (None: the
    default budget) and `room` bytes of stream files."""

    def __init__(self, model: pipeline.Model, segs: Segments, ref: BasePass, room: int,
                 fingerprint: str, seconds: float | None = None, threads: int | None = None,
                 probe_type: str = PROBE_TYPE, progress: bool = True):
        self.model, self.segs, self.ref = model, segs, ref
        self.room, self.seconds = room, seconds
        # the saved plan is this run's when the run and what the probes were asked are the same
        self.fingerprint = (f"{fingerprint}; probes: {seconds} s, {ref.n_tokens} tokens, "
                            f"{probe_type}")
        self.threads, self.probe_type, self.progress = threads, probe_type, progress
        self.state_path = segs.base.with_name(f"{segs.base.name}.probes.json")
        self.flights: list[Flight] | None = None  # planned when the first segment has run
        self.budget = 0.0
        # seconds a probe's pass over each segment was priced at; seconds spent, and what
        # those passes were priced at (the ratio corrects the price of the passes to come)
        self.pass_seconds: list[float] = []
        self.spent = self.priced = 0.0
        # the probed slices' errors on measure_damage's rows, for the predictions (`finish`)
        self.sampled: dict[tuple[str, int | None], float] = {}
        specs = [s for s in model.specs if s.quantizable]
        self.schedule = Schedule(specs, lambda probes: False)  # for its kinds and scales
        self._load()

    # ---- the plan
    def _segment_of(self, names) -> int:
        """The first segment a probe of `names` perturbs."""
        if any(parse_tensor_name(n).kind == "output" for n in names):
            return len(self.segs) - 1
        # token_embd's probe is on block 0's norm
        return self._segment_of_block(min(parse_tensor_name(n).layer or 0 for n in names))

    def _segment_of_block(self, block: int) -> int:
        return next(k for k, (lo, hi) in enumerate(self.segs.ranges) if lo <= block < hi)

    def _plan(self, stats: CalibStats, per_token: float, n_calib: int, first: int = 0) -> None:
        """The probes that fit, from segment `first` on."""
        segs, n = self.segs, len(self.segs)
        sizes = segment_bytes(self.model, segs.plan, segs.ranges)
        n_probe = self.ref.n_tokens
        self.pass_seconds = pass_seconds = [PASS_COST * per_token * n_probe * b / sizes[0]
                                            for b in sizes]
        self.budget = self.seconds or default_budget(per_token * n_calib * sum(sizes) / sizes[0])
        # stream files under way, beside the one being written
        cap = max(0, self.room // probe_bytes(n_probe, self.model.adapter.hp.n_embd) - 1)
        flights: list[Flight] = []
        planned = {"seconds": 0.0, "moving": 0}

        def fits_from(starts: list[int]) -> bool:
            return (min(starts) >= first
                    and planned["seconds"] + sum(sum(pass_seconds[s:]) for s in starts)
                    <= self.budget and planned["moving"] + sum(s < n - 1 for s in starts) <= cap)

        def take(label: str, names: tuple[str, ...], kind: str | None, start: int,
                 n_keep: int = 0) -> None:
            flights.append(Flight(label, names, kind, start, start, n_keep))
            planned["seconds"] += sum(pass_seconds[start:])
            planned["moving"] += start < n - 1

        pruning = pruning_probe(self.model, stats)
        if pruning is not None:  # first, as a whole run probes it: from the first MoE block
            moe = min(s.layer for s in self.model.specs if s.n_experts and s.layer is not None)
            start = self._segment_of_block(moe)
            if fits_from([start]):
                take(f"pruning to {pruning[0]} experts", (), None, start, pruning[0])
        for p in Schedule(self.schedule.specs,
                          lambda probes: fits_from([self._segment_of(p) for p in probes])):
            take(p.label, p.names, p.kind, self._segment_of(p.names))
        self.flights = flights
        msg = (f"sensitivity probes in segments: {len(flights)} planned, about "
               f"{planned['seconds']:.0f} s of a {self.budget:.0f} s budget; "
               f"{planned['moving']} start before the last segment (disk room for {cap})")
        log.info("%s", msg)
        if self.progress:
            tqdm.write(msg)

    def _kept(self, stats: CalibStats, n_keep: int) -> dict[int, tuple[int, ...]]:
        return kept_by_saliency(stats, n_keep, self.model.adapter.n_expert_groups)

    # ---- running them
    def __call__(self, k: int, llm, col, windows: list[list[int]],
                 per_token: float | None) -> None:
        """After segment k's calibration windows, on its open model `llm`: every probe
        that starts or is under way here runs it once. `per_token`: seconds per token of
        those windows (None: none ran now, a resumed run)."""
        stats = col.snapshot()  # segment k's blocks are complete
        n_calib, windows = sum(map(len, windows)), self.ref_windows(windows)
        if self.flights is None:
            if k:
                log.warning("the probes' plan of this run was lost: blocks before segment %d "
                            "will carry scales", k + 1)
            if not windows:
                log.warning("too few tokens to probe: no window of %d", self.ref.n_ctx)
                self.flights = []
            else:
                self._plan(stats, per_token or self._time(llm, k, windows), n_calib,
                           first=k)
        began = time.monotonic()
        todo = [f for f in self.flights if f.start <= k == f.at and f.failed is None]
        if not todo:
            self._save()
            return
        lo, hi = self.segs.ranges[k]
        last = k == len(self.segs) - 1
        pool = ThreadPoolExecutor(self.threads or default_threads())
        predict = Predictions(self.model, stats, self.probe_type)
        errors = WeightErrors(self.model, stats, RunWeights(self.segs.gguf_path(k), lo),
                              predict.types, executor=pool,
                              cache_bytes=SEGMENT_CACHE, sampled=self.sampled)
        ref = self._reference(llm, k, windows) if last else None
        try:
            for f in tqdm(todo, desc=f"sensitivity probes (segment {k + 1} of {len(self.segs)})",
                          disable=not self.progress):
                # token_embd's probe changes the first segment's input, in Python
                hooked = [n for n in f.names if n != EMBEDDINGS]
                probe = (PruneProbe({b: ids for b, ids in self._kept(stats, f.n_keep).items()
                                     if lo <= b < hi}) if f.n_keep
                         else TensorProbe(errors, hooked, predict.subset))
                try:
                    self._run(f, probe, llm, k, windows, ref,
                              errors if k == 0 and EMBEDDINGS in f.names else None)
                except (HookError, ProbeError) as e:
                    log.warning("probe %s failed (%s): its tensors carry other scales",
                                f.label, e)
                    f.failed = str(e)
                    self.stream_path(self.flights.index(f)).unlink(missing_ok=True)
                self._save()
        finally:
            pool.shutdown()
        self.spent += time.monotonic() - began
        self.priced += len(todo) * self.pass_seconds[k]
        self._trim(k)
        self._save()

    def _trim(self, k: int) -> None:
        """After segment k's probes: drop the probes not yet started, the last planned
        first, while those under way and the rest would overrun the budget at the price
        measured so far."""
        ratio = self.spent / self.priced if self.priced else 1.0
        alive = [f for f in self.flights if f.kld is None and f.failed is None]

        def rest(f: Flight) -> float:
            return ratio * sum(self.pass_seconds[max(f.start, k + 1):])

        while self.spent + sum(map(rest, alive)) > self.budget:
            f = next((f for f in reversed(alive) if f.start > k), None)
            if f is None:  # those under way finish: their passes so far would be lost
                break
            f.failed = OUT_OF_TIME
            alive.remove(f)
            log.info("probe %s dropped: out of time", f.label)

    def ref_windows(self, windows: list[list[int]]) -> list[list[int]]:
        """The probe windows: the first calibration windows, whole and as many as the
        reference takes (`BasePass`); only the text's last window may be short."""
        n = -(-self.ref.n_tokens // self.ref.n_ctx)
        return [w for w in windows[:n] if len(w) == self.ref.n_ctx]

    def _time(self, llm, k: int, windows: list[list[int]]) -> float:
        """Seconds per token of a plain pass of segment k (a resumed run's first probes)."""
        attach(llm, _hooks(k, self.segs))
        began = time.monotonic()
        eval_embeddings(llm, self.segs.inputs(k, windows[0], slice(0, len(windows[0]))))
        return (time.monotonic() - began) / len(windows[0])

    def _reference(self, llm, k: int, windows: list[list[int]]) -> list[np.ndarray]:
        """The last segment's log-probabilities on the probe windows without a probe: the
        calibration run's own, or (resumed past them) one plain pass."""
        if self.ref.windows == windows:
            return self.ref.logprobs
        attach(llm, _hooks(k, self.segs))
        out, start = [], 0
        for w in windows:
            rows = slice(start, start + len(w))
            out.append(log_softmax(eval_embeddings(llm, self.segs.inputs(k, w, rows))))
            start += len(w)
        return out

    def _run(self, f: Flight, probe, llm, k: int, windows: list[list[int]],
             ref: list[np.ndarray] | None, embeddings: WeightErrors | None = None) -> None:
        """Flight `f` through segment k: its stream advanced a segment, or its KLD. With
        `embeddings`, the first segment runs on the token embeddings at the probe type."""
        i = self.flights.index(f)
        hooks = _hooks(k, self.segs)
        lo, hi = self.segs.ranges[k]
        last = k == len(self.segs) - 1
        probe.install(hooks, range(lo, hi), head=last)
        kept: dict[str, np.ndarray] = {}
        if not last:
            hooks.add("l_out", lambda node: kept.__setitem__("x", node.matrix()),
                      layers=[hi - 1])
        attach(llm, hooks)
        n = sum(map(len, windows))
        if not last:
            part = self.stream_path(i).with_suffix(".part.npy")
            out = np.lib.format.open_memmap(part, mode="w+", dtype=np.float32,
                                            shape=(n, self.model.adapter.hp.n_embd))
            base_out = np.load(self.segs.stream_path(k + 1), mmap_mode="r")
        moving = f.at > f.start
        delta = np.load(self.stream_path(i), mmap_mode="r") if moving else None
        total, start = 0.0, 0
        for j, w in enumerate(windows):
            rows = slice(start, start + len(w))
            if embeddings is not None:  # token_embd's probe: its rows at the probe type
                x = embeddings.probe_rows(EMBEDDINGS, np.asarray(w))
            else:
                x = self.segs.inputs(k, w, rows)
                if delta is not None:
                    x = x + delta[rows]
            logits = eval_embeddings(llm, x)
            if last:
                total += mean_kld([ref[j]], [log_softmax(logits)]) * len(w)
            else:
                out[rows] = kept.pop("x") - base_out[rows]
            start += len(w)
        probe.check()  # what it installed here ran
        if last:
            f.kld, f.at = total / n, k + 1
            self.stream_path(i).unlink(missing_ok=True)
            return
        out.flush()
        del out, delta
        os.replace(part, self.stream_path(i))
        f.at = k + 1

    # ---- results, state
    def finish(self, stats: CalibStats) -> CalibStats:
        """`stats` with the scales the probes measured and carried."""
        report = ProbeLog()
        predict = Predictions(self.model, stats, self.probe_type, self.sampled)
        prune_scale = None
        results: dict[Probe, float | None] = {}
        for f in self.flights or []:
            if f.failed == OUT_OF_TIME:  # never ran, as a probe that did not fit
                continue
            if f.n_keep:
                if f.kld is not None:
                    kept = self._kept(stats, f.n_keep)
                    prune_scale = report.pruned(f.n_keep, f.kld,
                                                sum(pruning_damage(stats, kept).values()))
                continue
            p = Probe(f.label, f.names, f.kind)
            results[p] = None if f.kld is None else report.probed(f.label, f.kld,
                                                                  predict(f.names))
        scales = self.schedule.scales(results, report)
        dropped = sum(f.failed == OUT_OF_TIME for f in self.flights or [])
        log.info("probes in segments took %.0f s of a %.0f s budget (%d dropped before they "
                 "started)", self.spent, self.budget, dropped)
        return report.finish(stats, scales, prune_scale, self.progress)

    def stream_path(self, i: int) -> Path:
        return self.segs.base.with_name(f"{self.segs.base.name}.probe-{i}.npy")

    def _save(self) -> None:
        state = {"fingerprint": self.fingerprint, "budget": self.budget,
                 "pass_seconds": self.pass_seconds, "spent": self.spent,
                 "priced": self.priced,
                 "flights": [asdict(f) for f in self.flights or []]}
        tmp = self.state_path.with_suffix(".part")
        tmp.write_text(json.dumps(state))
        os.replace(tmp, self.state_path)

    def _load(self) -> None:
        if not self.state_path.is_file():
            return
        state = json.loads(self.state_path.read_text())
        if state.get("fingerprint") != self.fingerprint:  # another run's: its streams go
            self.remove()
            return
        self.budget, self.pass_seconds = state["budget"], state["pass_seconds"]
        self.spent, self.priced = state["spent"], state["priced"]
        self.flights = [Flight(**{**f, "names": tuple(f["names"])}) for f in state["flights"]]

    def remove(self) -> None:
        """Delete the plan and every stream file."""
        for i in range(len(self.flights or [])):
            self.stream_path(i).unlink(missing_ok=True)
            self.stream_path(i).with_suffix(".part.npy").unlink(missing_ok=True)
        for p in self.segs.base.parent.glob(f"{self.segs.base.name}.probe-*.npy"):
            p.unlink(missing_ok=True)
        self.state_path.unlink(missing_ok=True)
        self.flights = None


def _hooks(k: int, segs: Segments) -> EvalHooks:
    hooks = EvalHooks()
    hooks.layer_offset = segs.ranges[k][0]
    return hooks


