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
from ..llamacpp import tokenize
from ..runtime.textscore import whole_windows
from . import checkpoint, intermediate
from .accumulate import Collector, CovSpec, checkpoint_bytes, cov_bytes, cov_plan  # noqa: F401
from .hooks import attach
from .nodes import graph_nodes
from .perturb import BasePass, open_run

log = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).parents[1] / "data" / "calibration.txt"
DEFAULT_COV_BUDGET = 1 << 30  # bytes of input covariances kept in a stats file
FREE_DISK_SHARE = 0.9  # default --max-disk: this share of the free space beside the output


def collect(gguf_path: str | Path, text: str, specs: list[mp.TensorSpec], n_layer: int,
            n_expert: int, n_ctx: int = 512, max_tokens: int | None = None,
            progress: bool = True, dataset: str = "text",
            cov_blocks: dict[str, CovSpec] | None = None,
            checkpoint_path: Path | None = None, fingerprint: str = "",
            threads: int | None = None, source: CalibSource | None = None,
            on_window=None) -> CalibStats:
    """Run `gguf_path` (a model with tensors `specs`) in llama.cpp over `text` in windows of
    `n_ctx` tokens; statistics.

    `cov_blocks` (`cov_plan`) asks for those tensors' input covariances. With
    `checkpoint_path` the sums are saved there between windows (`checkpoint.every()`), and a
    checkpoint of the same `fingerprint` is resumed: the windows it covers are not run
    again, and the result is the same to the bit (the sums are float64, in window order,
    whatever `threads`, the workers for the sums and llama.cpp's threads).
    `on_window(tokens, llm, seconds)` is called after each window llama.cpp ran (windows
    a checkpoint covers are not run)."""
    threads = threads or os.cpu_count() or 1
    arch = gguf.GGUFReader(gguf_path).get_field("general.architecture").contents()
    col = Collector(specs, n_layer, n_expert, cov_blocks, threads=threads,
                    nodes=graph_nodes(arch))  # which graph nodes feed which tensors
    start = checkpoint.resume(col, checkpoint_path, fingerprint)
    llm = attach(open_run(gguf_path, n_ctx, threads), col.hooks())
    tokens = tokenize(llm, text, max_tokens)
    windows = whole_windows(tokens, n_ctx)
    if not windows:
        raise ValueError("the calibration text is too short: no tokens to run")
    every = checkpoint.every()
    saved, saved_at = start, time.monotonic()
    # numpy's BLAS on one thread in each worker: llama.cpp's threads hold the cores
    with threadpool_limits(1, user_api="blas"):
        try:
            for i, w in enumerate(tqdm(windows[start:], desc="calibrating in llama.cpp",
                                       initial=start, total=len(windows), disable=not progress),
                                  start + 1):
                started = time.monotonic()
                llm.reset()
                llm.eval(w)
                if on_window is not None:
                    on_window(w, llm, time.monotonic() - started)
                if checkpoint_path is not None and time.monotonic() - saved_at >= every \
                        and i < len(windows):
                    checkpoint.save(col.state(), checkpoint_path, fingerprint, i)
                    saved, saved_at = i, time.monotonic()
        except KeyboardInterrupt as e:
            col.lanes.close()
            if checkpoint_path is None or not saved:
                raise
            raise type(e)(f"the sums of the first {saved} of {len(windows)} windows are kept in "
                          f"{checkpoint_path}: run the same command again to resume") from None
        del llm
        return col.stats((dataset,), source=source)


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
    `max_disk` bytes (default: 90% of the free space there); `calib_model` runs a GGUF of
    the model you have instead. The text is `text` (default: the text shipped with
    edgemoe). With `sensitivity`, probes measure each tensor's KL divergence per unit of
    predicted damage on the first whole windows of the text (a sixteenth of the calibration
    tokens, 512 to `probe_tokens`), inside llama.cpp's eval callback on the GGUF just run
    (edgemoe.calibration.sensitivity; no file written; the reference is this run's own
    logits), for `probe_seconds` (default: `sensitivity.default_budget`, half the
    calibration run's time, at least a minute). Writes the statistics to `output` (a llama.cpp-
    compatible GGUF imatrix) when given. The inputs' covariances (in blocks of 256 columns;
    `cov_plan` says which) are kept too, within `cov_budget` bytes on disk (float64
    accumulators take twice that in memory while calibrating): export's output-error search
    uses them. `threads`: llama.cpp's threads
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
    work = None
    if calib_model:
        gguf_path, record = Path(calib_model), intermediate.file_record(calib_model)
    elif model.source.kind == "gguf":  # llama.cpp runs every type a GGUF source may hold
        gguf_path = model.source.path
        record = intermediate.file_record(gguf_path, is_source=True)
    else:
        if max_disk is None:
            free = shutil.disk_usage(base.resolve().parent).free
            max_disk = int(FREE_DISK_SHARE * free)
        reserved = checkpoint_bytes(model.specs, blocks, nodes)
        cand, plan = intermediate.choose(model, max_disk, reserved, forced=calib_type)
        record = intermediate.record(cand, plan)
        work = gguf_path = base.with_name(f"{base.name}.calib.gguf")
    log.info("calibrating on %s (%s)", gguf_path, record.describe())
    fingerprint = checkpoint.fingerprint(
        model.source.files + ([calib_model] if calib_model else []), body, n_ctx=n_ctx,
        max_tokens=max_tokens, calib=record.types,
        cov_blocks={n: (c.block, c.per_expert, c.owner) for n, c in blocks.items()})
    if work is not None and not (work.is_file() and checkpoint.resumable(ckpt, fingerprint)):
        pipeline.export(model, plan, work, progress=progress)  # itself resumable
    base = None
    if sensitivity:  # the probes' reference comes from this run: no base pass of their own
        from .sensitivity import probe_token_count

        n_calib = len(tokenize(model.source.path, body, max_tokens))
        base = BasePass(probe_token_count(n_calib, probe_tokens, n_ctx), n_ctx)
    started = time.monotonic()
    stats = collect(gguf_path, body, model.specs, a.n_layer, a.n_expert, n_ctx=n_ctx,
                    max_tokens=max_tokens, progress=progress, dataset=text_path.name,
                    cov_blocks=blocks, checkpoint_path=ckpt, fingerprint=fingerprint,
                    threads=threads, source=record, on_window=base)
    if sensitivity:
        from .sensitivity import default_budget, measure_scales

        seconds = probe_seconds or default_budget(time.monotonic() - started)
        # resumed from a checkpoint, the first windows were not run: a base pass then
        tokens = base.tokens or tokenize(model.source.path, body)[:base.n_tokens]
        stats = measure_scales(model, stats, tokens, gguf_path, n_ctx=n_ctx, seconds=seconds,
                               progress=progress, threads=threads,
                               base=base if base.windows else None)
    if output:
        write_stats(stats, output, chunk_size=n_ctx)
        log.info("wrote %s", output)
    ckpt.unlink(missing_ok=True)
    if work is not None:
        work.unlink(missing_ok=True)
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
