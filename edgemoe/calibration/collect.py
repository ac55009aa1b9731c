"""Calibration: run the model in llama.cpp on text and measure what matters.

Through the eval callback (`edgemoe.calibration.hooks`) every MoE layer reports, per token,
the experts the router chose, their weights as the architecture normalises them, and each
expert's output; every weight matrix's input is summed squared per column (llama.cpp's
importance matrix, per expert for stacked expert tensors), and its second moments in blocks
(`accumulate`). The result is a `CalibStats`, written as a llama.cpp GGUF imatrix that also
carries the expert statistics.

What runs is the source GGUF itself, or for an HF source an intermediate GGUF within a disk
budget (`intermediate`); the statistics say which and how faithful it is.
"""

from __future__ import annotations

import functools
import logging
import os
import shutil
import time
from pathlib import Path

import gguf
import numpy as np
from threadpoolctl import threadpool_limits
from tqdm import tqdm

import memory_planner as mp
from export.imatrix import write_stats
from memory_planner.stats import CalibSource, CalibStats

from .. import pipeline
from ..llamacpp import eval_embeddings, tokenize
from ..runtime.textscore import whole_windows
from . import checkpoint, intermediate, segments
from .accumulate import Collector, CovSpec, checkpoint_bytes, cov_bytes, cov_plan  # noqa: F401
from .hooks import attach, signals_held
from .nodes import graph_nodes
from .perturb import BasePass, open_run
from .segment_probes import MAX_IN_FLIGHT, SegmentProbes, probe_bytes
from .segments import Segments
from .sensitivity import default_budget, measure_scales, probe_token_count

log = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).parents[1] / "data" / "calibration.txt"
DEFAULT_COV_BUDGET = 1 << 30  # bytes of input covariances kept in a stats file
FREE_DISK_SHARE = 0.9  # default --max-disk: this share of the free space beside the output


def collect(gguf_path: str | Path | None, text: str, specs: list[mp.TensorSpec], n_layer: int,
            n_expert: int, n_ctx: int = 512, max_tokens: int | None = None,
            progress: bool = True, dataset: str = "text",
            cov_blocks: dict[str, CovSpec] | None = None,
            checkpoint_path: Path | None = None, fingerprint: str = "",
            threads: int | None = None, source: CalibSource | None = None,
            on_window=None, segs: Segments | None = None, on_segment=None,
            tokens: list[int] | None = None, arch: str | None = None) -> CalibStats:
    """Run `gguf_path` (a model with tensors `specs`) in llama.cpp over `text` in windows of
    `n_ctx` tokens; statistics. With `segs` (and no `gguf_path`) the model runs a layer
    segment at a time (`edgemoe.calibration.segments`), to the same statistics.

    `cov_blocks` (`cov_plan`) asks for those tensors' input covariances. With
    `checkpoint_path` the sums are saved there between windows (`checkpoint.every()`), and a
    checkpoint of the same `fingerprint` is resumed: the windows it covers are not run
    again, and the result is the same to the bit (the sums are added in float64 in window
    order whatever `threads`, the workers for the sums and llama.cpp's threads, and
    rounded to float32 after each window, the checkpoint's precision).
    `on_window(tokens, logits, seconds)` is called after each window the model's head ran
    (windows a checkpoint covers are not run); `logits` is valid during the call only.
    `on_segment(k, llm, collector, windows, seconds_per_token)` after segment k's windows
    (the whole model's, without `segs`), on its open model (`SegmentProbes`);
    seconds_per_token is None when no window ran (all covered by the checkpoint). `tokens`:
    the text's, when the caller has them from the tokenizer this run would use. `arch`: the
    model's llama.cpp architecture, when the caller knows it (read from the file if not)."""
    threads = threads or os.cpu_count() or 1
    if segs is not None:
        arch = segs.model.adapter.arch_name
    elif arch is None:
        arch = str(gguf.GGUFReader(gguf_path).get_field("general.architecture").contents())
    col = Collector(specs, n_layer, n_expert, cov_blocks, threads=threads,
                    nodes=graph_nodes(arch))  # which graph nodes feed which tensors
    first_segment, start = checkpoint.resume(col, checkpoint_path, fingerprint)
    ranges = segs.ranges if segs is not None else [(0, n_layer)]
    every = checkpoint.every()
    saved, saved_at = (first_segment, start), time.monotonic()
    windows: list[list[int]] = []

    def save(segment: int, done: int) -> None:  # Ctrl-C waits for the file and `saved`
        nonlocal checkpoint_path, saved, saved_at
        with signals_held():
            if checkpoint.save(col.state(), checkpoint_path, fingerprint, done, segment):
                saved, saved_at = (segment, done), time.monotonic()
            else:
                checkpoint_path, saved = None, (0, 0)

    # numpy's BLAS on one thread in each worker: llama.cpp's threads hold the cores
    with threadpool_limits(1, user_api="blas"):
        try:
            for k in range(first_segment, len(ranges)):
                lo, hi = ranges[k]
                last = k == len(ranges) - 1
                hooks = col.hooks(range(lo, hi) if segs is not None else None, last)
                hooks.layer_offset = lo
                stream: dict[str, np.ndarray] = {}
                if not last:  # the residual stream the next segment starts from
                    hooks.add("l_out", functools.partial(_keep_stream, stream), layers=[hi - 1])
                path = gguf_path if segs is None else segs.write(k)
                llm = attach(open_run(path, n_ctx, threads), hooks)
                if not windows:  # (a segment but the last has no vocabulary)
                    by = llm if segs is None else segs.model.source.path
                    if tokens is None:
                        tokens = tokenize(by, text, max_tokens)
                    windows = whole_windows(tokens, n_ctx)
                    if not windows:
                        raise ValueError("the calibration text is too short: no tokens to run")
                    rows = np.cumsum([0] + [len(w) for w in windows])
                if not last:
                    outputs = segs.stream(k, int(rows[-1]), write=True)
                done = start if k == first_segment else 0
                desc = "calibrating in llama.cpp"
                if len(ranges) > 1:
                    desc += f" (blocks {lo}-{hi - 1}, segment {k + 1} of {len(ranges)})"
                ran = [0.0, 0]  # seconds, tokens
                for i, w in enumerate(tqdm(windows[done:], desc=desc, initial=done,
                                           total=len(windows), disable=not progress), done + 1):
                    began = time.monotonic()
                    r = slice(int(rows[i - 1]), int(rows[i]))
                    if segs is not None:  # on the stream (the first: embeddings)
                        logits = eval_embeddings(llm, segs.inputs(k, w, r))
                    else:
                        llm.reset()
                        llm.eval(w)
                        logits = llm.scores[:len(w)]
                    if not last:
                        outputs[r] = stream.pop("x")
                    elif on_window is not None:
                        on_window(w, logits, time.monotonic() - began)
                    ran[0] += time.monotonic() - began
                    ran[1] += len(w)
                    col.end_window()
                    if checkpoint_path is not None and time.monotonic() - saved_at >= every \
                            and (i < len(windows) or not last):
                        if not last:
                            outputs.flush()
                        save(k, i)
                if not last:
                    outputs.flush()
                if on_segment is not None:
                    on_segment(k, llm, col, windows, ran[0] / ran[1] if ran[1] else None)
                llm.close()
                del llm
                if not last:  # the next segment starts from the stream and is written
                    del outputs  # over this one's file (Segments.write)
                    if checkpoint_path is not None:
                        save(k + 1, 0)
        except KeyboardInterrupt as e:
            col.lanes.close()
            if checkpoint_path is None or saved == (0, 0):
                raise
            where = f" (layer segment {saved[0] + 1} of {len(ranges)})" if len(ranges) > 1 \
                else ""
            raise type(e)(f"the sums of the first {saved[1]} of {len(windows)} windows"
                          f"{where} are kept in {checkpoint_path}: run the same command again "
                          "to resume") from None
        return col.stats((dataset,), source=source)


def _keep_stream(stream: dict, node) -> None:
    stream["x"] = node.matrix()


def calibrate(source: str, text: str | None = None, output: str | None = None,
              calib_model: str | None = None, n_ctx: int = 512,
              max_tokens: int | None = None, calib_type: str | None = None,
              sensitivity: bool = False, probe_tokens: int = 2048, progress: bool = True,
              cov_budget: int = DEFAULT_COV_BUDGET, max_disk: int | None = None,
              threads: int | None = None,
              probe_seconds: float | None = None) -> CalibStats:
    """Measure expert usage and importance matrices for SOURCE (an HF model directory or a
    GGUF).

    A GGUF source runs in llama.cpp as it is. An HF source runs as an intermediate GGUF
    written beside the output: the most faithful of `intermediate.CANDIDATES` (or the
    uniform type `calib_type`) whose file, with the checkpoint of the sums, fits in
    `max_disk` bytes (default: 90% of the free space there), whole or, where no whole file
    of that type fits, a segment of layers at a time (`edgemoe.calibration.segments`: the
    same statistics and probe scales, one segment's file on disk at a time, the probes
    running segment by segment with it, `segment_probes`); `calib_model` runs a GGUF of
    the model you have instead. The checkpoint of the sums (resume after an interruption;
    float32, each shared sum once, so no larger than the stats file) is removed before
    the stats file is written: a GGUF source's calibration never has more on disk than
    its output. Where `max_disk` has no room for it, or writing it fails, calibration runs
    on without one.

    The text is `text` (default: the text shipped with edgemoe). With `sensitivity`, probes
    measure each tensor's KL divergence per unit of predicted damage on the first whole
    windows of the text (a sixteenth of the calibration tokens, 512 to `probe_tokens`),
    inside llama.cpp's eval callback on the GGUF just run (edgemoe.calibration.sensitivity;
    no file written; the reference is this run's own logits), for `probe_seconds` (default:
    `sensitivity.default_budget`: 0.4 of the calibration run's time, or what it left of
    40 s).
    Writes the statistics to `output` (a llama.cpp-compatible GGUF imatrix) when given. The
    inputs' covariances (in blocks of 256 columns; `cov_plan` says which) are kept too,
    within `cov_budget` bytes on disk (their float64 accumulators take twice that in memory
    while calibrating): export's output-error search uses them. `threads`: llama.cpp's threads
    and the workers adding up the sums (default: every core).
    """
    text_path = Path(text) if text else DEFAULT_TEXT
    body = text_path.read_text(encoding="utf-8", errors="replace")
    model = pipeline.open_model(source)
    a = model.adapter
    # beside the output: the intermediate model, and the checkpoint of the sums; both are
    # kept when the run is interrupted and removed when it completes
    base = Path(output) if output else Path(f"{Path(source).name}.stats.gguf")
    ckpt = base.with_name(base.name + ".checkpoint.npz")
    nodes = graph_nodes(a.arch_name)
    blocks = cov_plan(model.specs, cov_budget, nodes)
    work = segs = None
    n_calib = tokens = None  # the text's tokens, when needed before the run
    reserved = checkpoint_bytes(model.specs, blocks, nodes)  # the checkpoint of the sums
    asked = max_disk is not None
    if not asked:
        max_disk = int(FREE_DISK_SHARE * shutil.disk_usage(base.resolve().parent).free)
    if calib_model:
        gguf_path, record = Path(calib_model), intermediate.file_record(calib_model)
    elif model.source.kind == "gguf":  # llama.cpp runs every type a GGUF source may hold
        gguf_path = model.source.path
        record = intermediate.file_record(gguf_path, is_source=True,
                                          tensors=model.source.tensors.values())
        if reserved > max_disk:  # no file at all, then
            log.warning("%s %s has no room for the checkpoint of the sums (%s): an "
                        "interrupted calibration will start over",
                        "--max-disk" if asked else "the free disk space",
                        mp.format_size(max_disk), mp.format_size(reserved))
            ckpt = None
    else:
        tokens = tokenize(model.source.path, body, max_tokens)
        n_calib = len(tokens)
        n_probe = probe_token_count(n_calib, probe_tokens, n_ctx)
        probe_room = (MAX_IN_FLIGHT + 1) * probe_bytes(n_probe, a.hp.n_embd) \
            if sensitivity else 0
        cand, plan, ranges = segments.choose(model, max_disk, reserved, n_calib,
                                             forced=calib_type, probe_room=probe_room)
        record = intermediate.record(cand, plan, len(ranges))
        if len(ranges) == 1:
            work = gguf_path = base.with_name(f"{base.name}.calib.gguf")
        else:  # no whole-model copy: a segment of layers at a time
            segs = Segments(model, plan, ranges, base, threads, progress)
            gguf_path = None
            # what the probes' streams may take: all that the largest segment leaves (at
            # least the `probe_room` choose kept)
            stream_room = max_disk - reserved - segments.stream_bytes(n_calib, a.hp.n_embd) \
                - max(segments.segment_bytes(model, plan, ranges))
    log.info("calibrating on %s (%s)", gguf_path or "layer segments", record.describe())
    fingerprint = checkpoint.fingerprint(
        model.source.files + ([calib_model] if calib_model else []), body, n_ctx=n_ctx,
        max_tokens=max_tokens, calib=record.types,
        segments=None if segs is None else segs.ranges,
        cov_blocks={n: (c.block, c.per_expert, c.owner) for n, c in blocks.items()})
    if work is not None and not (work.is_file() and checkpoint.resumable(ckpt, fingerprint)):
        # itself resumable; Q8_0 by the CPU row quantizer, as the segments are
        pipeline.export(model, plan, work, progress=progress, cpu_rows=True)
    ref = probes = None
    if sensitivity:  # the probes' reference comes from this run: no base pass of their own
        if n_calib is None:
            n_calib = len(tokenize(gguf_path, body, max_tokens))
        ref = BasePass(probe_token_count(n_calib, probe_tokens, n_ctx), n_ctx)
        if segs is not None:  # they run segment by segment with the calibration
            probes = SegmentProbes(model, segs, ref, stream_room, fingerprint, probe_seconds,
                                   threads, progress=progress)
    if segs is not None and not checkpoint.resumable(ckpt, fingerprint):
        segs.remove()  # the work files of another run
        if probes is not None:
            probes.remove()
    started = time.monotonic()
    stats = collect(gguf_path, body, model.specs, a.n_layer, a.n_expert, n_ctx=n_ctx,
                    max_tokens=max_tokens, progress=progress, dataset=text_path.name,
                    cov_blocks=blocks, checkpoint_path=ckpt, fingerprint=fingerprint,
                    threads=threads, source=record, on_window=ref, segs=segs,
                    on_segment=probes, tokens=tokens if segs is not None else None,
                    arch=a.arch_name)
    if probes is not None:
        stats = probes.finish(stats)
    elif sensitivity:
        seconds = probe_seconds or default_budget(time.monotonic() - started)
        # resumed from a checkpoint, the first windows were not run: a base pass then
        tokens = ref.tokens or tokenize(gguf_path, body)[:ref.n_tokens]
        stats = measure_scales(model, stats, tokens, gguf_path, n_ctx=n_ctx, seconds=seconds,
                               progress=progress, threads=threads,
                               base=ref if ref.windows else None)
    if ckpt is not None:  # before the stats file: never both on disk
        ckpt.unlink(missing_ok=True)
    if output:
        write_stats(stats, output, chunk_size=n_ctx)
        log.info("wrote %s", output)
    if work is not None:
        work.unlink(missing_ok=True)
    if segs is not None:
        segs.remove()
    if probes is not None:
        probes.remove()
    return stats


def summary(stats: CalibStats) -> str:
    """Per-layer expert usage: how uneven, and how much the least salient experts carry."""
    from ..report.tables import table

    rows = []
    for layer, e in sorted(stats.experts.items()):
        f = e.frequency
        share = np.sort(e.energy_share)
        rows.append([str(layer), f"{f.max():.3f}", f"{f.min():.3f}",
                     f"{f.std() / max(f.mean(), 1e-12):.2f}",
                     f"{share[: max(1, e.n_expert // 4)].sum():.4f}"])
    head = f"{stats.n_tokens} tokens; {len(stats.in_sum2)} importance matrices"
    if stats.source is not None:
        head += f"; {stats.source.describe()}"
    return head + "\n" + table(rows, ["layer", "max freq", "min freq", "freq CV",
                                      "energy of least-salient 25%"])
