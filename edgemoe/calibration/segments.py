"""Calibration of an HF source in layer segments: no whole-model copy on disk.

When no calibration GGUF of the whole model fits the disk budget, calibration runs the
model a segment of consecutive blocks at a time. A segment's GGUF holds blocks [start,
stop) renumbered from 0 (`Adapter.blocks`), at the calibration type (Q8_0 unless the budget
is smaller than one block). Every segment runs on llama.cpp's input embeddings
(`llama_batch.embd`, float32: the stream passes unchanged): the first on the token
embeddings as llama.cpp would read them from a file of that type (`Segments.inputs`: the
intermediate's quantizer and ggml's dequantizer on the source's rows), each later one on
the residual stream the one before it left, read at its last block's output (node
`l_out`). So only the last segment has a vocabulary, an output head and a tokenizer; the
others have llama.cpp's vocabulary type "none" with one dummy token (embeddings and head
of one row, written and computed for nothing). Each block's statistics are those a
whole-model run of the same file type measures, to the bit
(tests/edgemoe/calibration/test_segments.py), and the graph hooks see the whole model's
layer numbers (`EvalHooks.layer_offset`). Segments are filled from the last, which holds
the head.

On disk at any time: one segment's GGUF (the next one is written over it once it has run,
so the page cache keeps its pages) and two files of the residual stream (n_tokens x n_embd
float32, the segment's input and output). A checkpoint records the segment and the windows
run in it. The sensitivity probes run with the segments
(`edgemoe.calibration.segment_probes`): every block is probed as in a whole run.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

import memory_planner as mp
from export.arch.recipe import TensorRecipe
from export.options import export_options
from export.quantize import dequantize, quantize_rows
from export.writer import write_gguf

from .. import pipeline
from . import intermediate
from .nodes import shifted

log = logging.getLogger(__name__)


def stream_bytes(n_tokens: int, n_embd: int) -> int:
    """Disk taken by the two residual-stream files of a run of `n_tokens` tokens."""
    return 2 * (n_tokens * n_embd * 4 + 128)


def sizes(model: pipeline.Model, plan: mp.MemoryPlan
          ) -> tuple[int, int, list[tuple[int, int]]]:
    """Bytes of the last segment's file beside its blocks (embeddings, output norm and head,
    tokenizer), of another's (no vocabulary: one-row embeddings and head), and (first
    block, bytes) of each `block_period` of blocks."""
    a = model.adapter
    per_block: dict[int, int] = defaultdict(int)
    shared = []
    types = plan.by_name()
    for s in model.specs:
        t = types[s.name]
        if s.layer is None:
            shared.append(t)
        elif s.layer < a.n_layer:  # NextN blocks are not run
            per_block[s.layer] += t.nbytes + 64
    head = intermediate.file_bytes(model, replace(plan, tensors=tuple(shared)))
    free = intermediate.FILE_SLACK + sum(
        64 + (4 * a.hp.n_embd if t.name in ("token_embd.weight", "output.weight") else t.nbytes)
        for t in shared)
    steps = [(lo, sum(per_block[i] for i in range(lo, min(lo + a.block_period, a.n_layer))))
             for lo in range(0, a.n_layer, a.block_period)]
    return head, free, steps


def smallest_segment(model: pipeline.Model, plan: mp.MemoryPlan) -> int:
    """Bytes of the largest file of a run one `block_period` of blocks at a time."""
    head, free, steps = sizes(model, plan)
    return max(head + steps[-1][1], free + max(n for _, n in steps))


def segment_bytes(model: pipeline.Model, plan: mp.MemoryPlan,
                  ranges: list[tuple[int, int]]) -> list[int]:
    """Bytes of each segment's file, at most."""
    head, free, steps = sizes(model, plan)
    return [(head if k == len(ranges) - 1 else free)
            + sum(n for first, n in steps if lo <= first < hi)
            for k, (lo, hi) in enumerate(ranges)]


def bounds(model: pipeline.Model, plan: mp.MemoryPlan, room: int) -> list[tuple[int, int]]:
    """Segments of consecutive blocks, as few as fit: each segment's file at most `room`
    bytes (its blocks, and the last segment's the embeddings, head and tokenizer), each
    starting at a multiple of the adapter's `block_period`, filled from the last. ValueError
    when one period of blocks does not fit."""
    head, free, steps = sizes(model, plan)
    smallest = max(head + steps[-1][1], free + max(n for _, n in steps))
    if smallest > room:
        raise ValueError(f"{mp.format_size(smallest)} for the smallest segment, more than "
                         f"{mp.format_size(room)}")
    out: list[tuple[int, int]] = []
    stop, size, first = model.adapter.n_layer, head, steps[-1][0]
    for lo, step in reversed(steps):
        if size + step > room:
            out.append((first, stop))
            stop, size = first, free
        size += step
        first = lo
    out.append((0, stop))
    return out[::-1]


def choose(model: pipeline.Model, max_disk: int, reserved: int, n_tokens: int,
           forced: str | None = None, probe_room: int = 0
           ) -> tuple[intermediate.Candidate, mp.MemoryPlan, list[tuple[int, int]]]:
    """The calibration model of an HF source within `max_disk` bytes, `reserved` of them for
    the checkpoint: the first of `intermediate.CANDIDATES` (or the uniform type `forced`)
    that fits, as a whole file or else in layer segments (with the two stream files of
    `n_tokens` and `probe_room` for the probes' streams). The type comes first: segments
    measure the statistics and the probes' scales of a whole run of their type to the bit
    (test_segments.py, test_segment_probes.py; `benchmarks/segments_quality.py`: the same
    KLD), so Q8_0 in segments is better than a coarser whole file. Its plan and block
    ranges; DiskBudgetError with the sizes when none fits."""
    a = model.adapter
    stream = stream_bytes(n_tokens, a.hp.n_embd) + probe_room
    sized = []
    for c in intermediate.candidates(forced):
        plan = intermediate.candidate_plan(model.specs, c)
        whole = intermediate.file_bytes(model, plan)
        if whole + reserved <= max_disk:
            return c, plan, [(0, a.n_layer)]
        sized.append((whole, 0, c))
        if a.takes_input_embeddings:
            smallest = smallest_segment(model, plan)
            if smallest + reserved + stream <= max_disk:
                return c, plan, bounds(model, plan, max_disk - reserved - stream)
            sized.append((smallest, stream, c))
    size, stream, c = min(sized, key=lambda x: x[0] + x[1])
    how = (f"run {a.block_period} block(s) at a time" if stream else
           "whole" if a.takes_input_embeddings else
           f"whole (llama.cpp's {a.arch_name} graph takes no input embeddings, so it cannot "
           "run in layer segments)")
    raise intermediate.DiskBudgetError(
        f"--max-disk {mp.format_size(max_disk)} is too small to calibrate "
        f"{model.source.path.name}: the smallest calibration model ({c.label}), {how}, takes "
        f"{mp.format_size(size)}, the residual streams {mp.format_size(stream)} and the "
        f"checkpoint of the sums {mp.format_size(reserved)} (a smaller --cov-budget shrinks "
        f"it); need at least {mp.format_size(size + stream + reserved)}, or calibrate a GGUF "
        "of the model (no copy)")


@dataclass
class Segments:
    """A segmented run: the model, its calibration types (`plan`, whole model), the block
    ranges, and the work files beside `base` (the statistics' output path)."""

    model: pipeline.Model
    plan: mp.MemoryPlan
    ranges: list[tuple[int, int]]
    base: Path
    threads: int | None = None
    progress: bool = True

    def __len__(self) -> int:
        return len(self.ranges)

    def gguf_path(self, k: int) -> Path:
        return self.base.with_name(f"{self.base.name}.calib-{k + 1}of{len(self)}.gguf")

    def stream_path(self, k: int) -> Path:
        """The residual stream at the start of segment k (k >= 1), which segment k - 1
        writes."""
        return self.base.with_name(f"{self.base.name}.stream-{k % 2}.npy")

    def stream(self, k: int, n_tokens: int = 0, write: bool = False) -> np.ndarray:
        """Segment k's input stream (read), or its output stream of `n_tokens` rows (write:
        segment k + 1's input; kept if the file has that shape, a resumed run),
        memory-mapped, n_tokens x n_embd float32."""
        if not write:
            return np.load(self.stream_path(k), mmap_mode="r")
        path = self.stream_path(k + 1)
        shape = (n_tokens, self.model.adapter.hp.n_embd)
        if path.is_file() and np.load(path, mmap_mode="r").shape == shape:
            return np.load(path, mmap_mode="r+")
        return np.lib.format.open_memmap(path, mode="w+", dtype=np.float32, shape=shape)

    def inputs(self, k: int, tokens: list[int], rows: slice) -> np.ndarray:
        """What segment k runs on for the calibration tokens `tokens` (at `rows` of the
        text): the residual stream the segment before left, or for the first segment the
        token embeddings as llama.cpp reads them from a file of the calibration type
        (ggml's quantizer and dequantizer on the source's rows)."""
        if k:
            return self.stream(k)[rows]
        r = next(r for r in self.model.recipes if r.spec.kind == "token_embd")
        t = self.plan.by_name()[r.spec.name].type
        uniq, inv = np.unique(np.asarray(tokens), return_inverse=True)
        w = r.load_rows(self.model.source, uniq)
        if t != "F32":
            w = dequantize(quantize_rows(w, t, cpu_rows=True), t, w.shape)
        return np.asarray(w, np.float32)[inv]

    def write(self, k: int) -> Path:
        """Segment k's GGUF (kept if already complete: a resumed run), written over segment
        k - 1's file when that is still there (the page cache keeps its pages). A segment
        but the last has no vocabulary (`_vocabulary_free`): it runs on `inputs`, and
        neither the embeddings nor the head."""
        path = self.gguf_path(k)
        if path.is_file():
            return path
        start, stop = self.ranges[k]
        a, source = self.model.adapter.blocks(start, stop), self.model.source

        def inside(s: mp.TensorSpec) -> bool:
            return s.layer is None or start <= s.layer < stop

        kept = [r for r in self.model.recipes if inside(r.spec)]
        recipes = [_renamed(r, -start) for r in kept]
        types = self.plan.by_name()
        tensors = [replace(types[r.spec.name], name=n.spec.name) for r, n in zip(kept, recipes)]
        free = k < len(self) - 1
        if free:
            recipes, tensors = _vocabulary_free(recipes, tensors)
            a.hp = replace(a.hp, n_vocab=1)
        # written over the segment run before it, if still there: its pages stay cached
        options = replace(export_options(None, recipes, recipes, search=0,
                                         threads=self.threads, progress=self.progress,
                                         cpu_rows=True),
                          overwrite=self.gguf_path(k - 1) if k else None)

        def metadata(w) -> None:
            w.add_name(f"{source.name} blocks {start}-{stop - 1}")
            a.add_metadata(w, None)
            if not free:
                a.add_tokenizer(w, source)
                return
            # llama.cpp's vocabulary type "none" with one dummy token (src/llama-vocab.cpp)
            w.add_tokenizer_model("none")
            if not any(f"{a.arch_name}.vocab_size" in kv for kv in w.kv_data):
                w.add_vocab_size(1)

        log.info("writing layer segment %d of %d: blocks %d-%d", k + 1, len(self), start,
                 stop - 1)
        write_gguf(path, arch_name=a.arch_name, recipes=recipes, source=source,
                   plan=replace(self.plan, tensors=tuple(tensors)), add_metadata=metadata,
                   options=options)
        return path

    def remove(self) -> None:
        """Delete every work file (a segment's `.part` too)."""
        for i in range(len(self)):
            self.gguf_path(i).unlink(missing_ok=True)
            for part in (".part", ".part.json"):
                self.gguf_path(i).with_name(self.gguf_path(i).name + part).unlink(
                    missing_ok=True)
        for i in range(2):
            self.stream_path(i).unlink(missing_ok=True)


def _vocabulary_free(recipes: list[TensorRecipe], tensors: list[mp.TensorPlan]
                     ) -> tuple[list[TensorRecipe], list[mp.TensorPlan]]:
    """The embeddings and head cut to one row (F32), for a model of one dummy token: a
    segment that runs on the residual stream and whose logits nobody reads."""
    out_r, out_t = [], []
    for r, t in zip(recipes, tensors):
        if r.spec.kind in ("token_embd", "output"):
            d = r.spec.shape[-1]
            r = replace(r, spec=replace(r.spec, shape=(1, d), quantizable=False),
                        rows=(0,), hf_shape=r.source_shape)
            t = replace(t, type="F32", nbytes=4 * d, n_elements=d, asked_type=None)
        out_r.append(r)
        out_t.append(t)
    return out_r, out_t


def _renamed(r: TensorRecipe, offset: int) -> TensorRecipe:
    s = r.spec
    if s.layer is None:
        return r
    return replace(r, spec=replace(s, name=shifted(s.name, offset), layer=s.layer + offset))
