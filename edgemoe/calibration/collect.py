"""Calibration: run the model in llama.cpp on text and measure what matters.

Through the eval callback (`edgemoe.calibration.hooks`) every MoE layer reports, per token,
the experts the router chose, their weights as the architecture normalises them, and each
expert's output; every weight matrix's input is summed squared per column (llama.cpp's
importance matrix, per expert for stacked expert tensors). The result is a `CalibStats`,
written as a llama.cpp GGUF imatrix that also carries the expert statistics.
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

import gguf
import numpy as np
from tqdm import tqdm

import memory_planner as mp
from export.imatrix import write_stats
from export.search import cov_block
from memory_planner.stats import CalibStats, ExpertStats

from .. import pipeline
from ..llamacpp import open_llama, tokenize
from .hooks import EvalHooks, attach
from .nodes import GraphNodes, Node, graph_nodes

log = logging.getLogger(__name__)

DEFAULT_TEXT = Path(__file__).parents[1] / "data" / "calibration.txt"
DEFAULT_COV_BUDGET = 1 << 30  # bytes of input covariances kept in a stats file
# the sums are saved between windows at most this often, so that an interrupted or killed
# calibration resumes from there (EDGEMOE_CHECKPOINT_SECONDS overrides it)
CHECKPOINT_SECONDS = 60.0
_SUMS = ("selected", "weight_sum", "saliency_sum", "energy_sum", "output_energy")
_TABLES = ("in_cov", "in_sum2", "counts")


class _Collector:
    """Accumulates statistics from graph nodes, one micro-batch at a time."""

    def __init__(self, n_layer: int, n_expert: int,
                 cov_blocks: dict[str, tuple[int, bool]] | None = None,
                 nodes: GraphNodes | None = None, tensors: frozenset[str] | None = None):
        self.n_expert = n_expert
        self.nodes = nodes or graph_nodes("")  # which graph node feeds which weights
        self.tensors = tensors  # the model's tensor names (None: every name the nodes give)
        # tensor name -> (covariance block in columns, one per expert or one for all)
        self.cov_blocks = cov_blocks or {}
        self.in_cov: dict[str, np.ndarray] = {}
        self.in_sum2: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        E = n_expert
        self.selected = np.zeros((n_layer, E))
        self.weight_sum = np.zeros((n_layer, E))
        self.saliency_sum = np.zeros((n_layer, E))
        self.energy_sum = np.zeros((n_layer, E))
        self.output_energy = np.zeros(n_layer)
        self.ids: dict[int, np.ndarray] = {}
        self.weights: dict[int, np.ndarray] = {}
        self.n_tokens = 0

    def _dense(self, names: tuple[str, ...], x: np.ndarray) -> None:
        """Statistics of `x`, the input all of `names` read (computed once for them all)."""
        x2 = np.square(x, dtype=np.float64).sum(axis=0)
        moments: dict[tuple[int, bool], np.ndarray] = {}
        for name in names:
            if name not in self.in_sum2:
                self.in_sum2[name] = np.zeros((1, x.shape[1]))
                self.counts[name] = np.zeros(1)
            self.in_sum2[name][0] += x2
            self.counts[name][0] += len(x)
            spec = self.cov_blocks.get(name)
            if spec is not None:
                if spec not in moments:
                    moments[spec] = _block_moments(x, spec[0])
                self._add_cov(name, 0, 1, moments[spec])

    def _add_cov(self, name: str, mat: int, n_mat: int, m: np.ndarray) -> None:
        if name not in self.in_cov:
            self.in_cov[name] = np.zeros((n_mat, *m.shape))
        self.in_cov[name][mat] += m

    def _expert_moments(self, ids: np.ndarray, x: np.ndarray, b: int,
                        per_expert: bool) -> list[tuple[int, int, np.ndarray]]:
        """(matrix, n_mat, block second moments) of the routed inputs `x`."""
        if not per_expert:  # one for all experts: every input row
            return [(0, 1, _block_moments(x.reshape(-1, x.shape[-1]), b))]
        out = []
        for e in np.unique(ids):
            hit = ids == e  # a token picks an expert at most once
            rows = x[hit] if x.ndim == 3 else x[hit.any(axis=1)]
            out.append((int(e), self.n_expert, _block_moments(rows, b)))
        return out

    def _experts(self, names: tuple[str, ...], ids: np.ndarray, x: np.ndarray) -> None:
        """x: (n_tokens, k, n) inputs per slot (or (n_tokens, n) shared by all slots), read
        by all of `names` (computed once for them all)."""
        n = x.shape[-1]
        x2 = np.square(x, dtype=np.float64)
        if x2.ndim == 2:
            x2 = np.broadcast_to(x2[:, None, :], (*ids.shape, n))
        sums = np.zeros((self.n_expert, n))
        counts = np.zeros(self.n_expert)
        np.add.at(sums, ids.reshape(-1), x2.reshape(-1, n))
        np.add.at(counts, ids.reshape(-1), 1.0)
        moments: dict[tuple[int, bool], list] = {}
        for name in names:
            if name not in self.in_sum2:
                self.in_sum2[name] = np.zeros((self.n_expert, n))
                self.counts[name] = np.zeros(self.n_expert)
            self.in_sum2[name] += sums
            self.counts[name] += counts
            spec = self.cov_blocks.get(name)
            if spec is not None:
                if spec not in moments:
                    moments[spec] = self._expert_moments(ids, x, *spec)
                for mat, n_mat, m in moments[spec]:
                    self._add_cov(name, mat, n_mat, m)

    # ---- handlers, in graph order within a layer
    def on_input(self, node: Node) -> None:
        names = [f"blk.{node.layer}.{kind}.weight" for kind in self.nodes.dense[node.kind]]
        names = tuple(n for n in names if self.tensors is None or n in self.tensors)
        if names:  # (a hybrid model's blocks read the same node with other tensors)
            self._dense(names, node.matrix())

    def on_result_norm(self, node: Node) -> None:
        x = node.matrix()
        self.n_tokens += len(x)
        self._dense(("output.weight",), x)

    def on_topk(self, node: Node) -> None:
        k, n = node.ne[0], node.ne[1]
        self.ids[node.layer] = node.read().reshape(n, k).astype(np.int64)

    def on_weights(self, node: Node) -> None:
        # later nodes (renormalised, scaled) overwrite earlier ones: the last is what is used
        # the nodes are [1, k, n] or [k, n]: shape them like the ids of the same layer
        ids = self.ids[node.layer]
        self.weights[node.layer] = node.read().reshape(ids.shape).astype(np.float64)

    def on_ffn_norm(self, node: Node) -> None:
        self.ffn_in = node.matrix()

    def on_act(self, node: Node) -> None:  # input of down_exps, per slot
        ids = self.ids[node.layer]
        self._experts((f"blk.{node.layer}.ffn_gate_exps.weight",
                       f"blk.{node.layer}.ffn_up_exps.weight"), ids, self.ffn_in)
        x = node.read().reshape(ids.shape[0], ids.shape[1], node.ne[0])
        self._experts((f"blk.{node.layer}.ffn_down_exps.weight",), ids, x)

    def on_down(self, node: Node) -> None:  # each slot's expert output, before weighting
        layer = node.layer
        ids, w = self.ids[layer], self.weights[layer]
        out = node.read().reshape(ids.shape[0], ids.shape[1], node.ne[0])
        contrib = w * np.linalg.norm(out.astype(np.float64), axis=-1)
        np.add.at(self.selected[layer], ids.reshape(-1), 1.0)
        np.add.at(self.weight_sum[layer], ids.reshape(-1), w.reshape(-1))
        np.add.at(self.saliency_sum[layer], ids.reshape(-1), contrib.reshape(-1))
        np.add.at(self.energy_sum[layer], ids.reshape(-1), np.square(contrib).reshape(-1))

    def on_moe_out(self, node: Node) -> None:
        y = node.matrix().astype(np.float64)
        self.output_energy[node.layer] += float(np.square(y).sum())

    def hooks(self) -> EvalHooks:
        """The handlers, by llama.cpp's node names for the model's architecture."""
        h = EvalHooks()
        for name in self.nodes.dense:
            h.add(name, self.on_input)
        h.add("result_norm", self.on_result_norm)
        h.add(self.nodes.ffn_input, self.on_ffn_norm)
        h.add("ffn_moe_topk", self.on_topk)
        h.add("ffn_moe_weights", self.on_weights)
        # present only where the architecture soft-maxes the top-k logits (gpt-oss),
        # renormalises or scales the weights
        for name in ("ffn_moe_weights_softmax", "ffn_moe_weights_norm",
                     "ffn_moe_weights_scaled"):
            h.add(name, self.on_weights, required=False)
        h.add(self.nodes.name("ffn_moe_swiglu"), self.on_act)
        h.add(self.nodes.name("ffn_moe_down"), self.on_down)
        h.add("ffn_moe_out", self.on_moe_out)
        return h

    def state(self) -> dict[str, np.ndarray]:
        """Every accumulator, by name, for a checkpoint (float64, exact)."""
        out = {k: getattr(self, k) for k in _SUMS}
        out["n_tokens"] = np.array(self.n_tokens)
        for table in _TABLES:
            out.update({f"{table}/{k}": v for k, v in getattr(self, table).items()})
        return out

    def load_state(self, state) -> None:
        for k in _SUMS:
            setattr(self, k, np.array(state[k]))
        self.n_tokens = int(state["n_tokens"])
        for table in _TABLES:
            setattr(self, table, {k.split("/", 1)[1]: np.array(state[k]) for k in state.files
                                  if k.startswith(f"{table}/")})

    def stats(self, datasets: tuple[str, ...]) -> CalibStats:
        # sums are accumulated in float64 and kept as the stats file stores them (float32),
        # so that planning and quantizing from these stats or from the file are the same
        f32 = np.float32
        experts = {
            layer: ExpertStats(self.selected[layer].astype(f32),
                               self.weight_sum[layer].astype(f32),
                               self.saliency_sum[layer].astype(f32),
                               self.energy_sum[layer].astype(f32),
                               float(f32(self.output_energy[layer])))
            for layer in range(len(self.selected)) if self.selected[layer].sum() > 0
        }
        return CalibStats(in_sum2={k: v.astype(f32) for k, v in self.in_sum2.items()},
                          counts={k: v.astype(f32) for k, v in self.counts.items()},
                          experts=experts, n_tokens=self.n_tokens, datasets=datasets,
                          in_cov={k: v.astype(f32) for k, v in self.in_cov.items()})


def _block_moments(x: np.ndarray, b: int) -> np.ndarray:
    """sum over rows of x x^T in diagonal blocks of b columns: (n // b, b, b)."""
    n = x.shape[-1]
    xb = x.astype(np.float64).reshape(len(x), n // b, b).transpose(1, 0, 2)
    return np.matmul(xb.transpose(0, 2, 1), xb)


def cov_plan(specs: list[mp.TensorSpec], budget: int) -> dict[str, tuple[int, bool]]:
    """Which tensors' input covariances to collect: name -> (block, one per expert).

    The first of these that fits in `budget` bytes (float32): every tensor, experts each
    their own; experts of a layer sharing one covariance of their common input (gate and
    up; export scales its correlations by each expert's imatrix), and no down projections
    (their inputs are each expert's own units); none."""
    blocks = {s.name: (b, s) for s in specs if s.quantizable and len(s.shape) > 1
              and (b := cov_block(s.row_length)) is not None}

    def size(plan: dict[str, tuple[int, bool]]) -> int:
        return sum(4 * (blocks[n][1].n_experts if per else 1) * blocks[n][1].row_length * b
                   for n, (b, per) in plan.items())

    per_expert = {n: (b, bool(s.n_experts)) for n, (b, s) in blocks.items()}
    shared = {n: (b, False) for n, (b, s) in blocks.items()
              if not s.n_experts or s.kind in ("ffn_gate_exps", "ffn_up_exps")}
    for plan in (per_expert, shared):
        if size(plan) <= budget:
            return plan
    log.info("input covariances would take %s even with shared expert ones (budget %s): "
             "not collected; export will quantize without the output-error search",
             mp.format_size(size(shared)), mp.format_size(budget))
    return {}


def collect(gguf_path: str | Path, text: str, n_layer: int, n_expert: int, n_ctx: int = 512,
            max_tokens: int | None = None, progress: bool = True,
            dataset: str = "text",
            cov_blocks: dict[str, tuple[int, bool]] | None = None,
            checkpoint: Path | None = None, fingerprint: str = "") -> CalibStats:
    """Run `gguf_path` in llama.cpp over `text` in windows of `n_ctx` tokens; statistics.

    `cov_blocks` (`cov_plan`) asks for those tensors' input covariances. With `checkpoint`
    the sums are saved there between windows (`CHECKPOINT_SECONDS`), and a checkpoint of the
    same `fingerprint` is resumed: the windows it covers are not run again, and the result
    is the same to the bit (the sums are float64, in window order)."""
    reader = gguf.GGUFReader(gguf_path)  # which graph nodes feed which of its tensors
    arch = reader.get_field("general.architecture").contents()
    col = _Collector(n_layer, n_expert, cov_blocks, nodes=graph_nodes(arch),
                     tensors=frozenset(t.name for t in reader.tensors))
    del reader
    start = _resume(col, checkpoint, fingerprint)
    llm = open_llama(gguf_path, n_ctx=n_ctx, logits_all=True, n_batch=n_ctx, n_ubatch=n_ctx)
    llm = attach(llm, col.hooks())
    tokens = tokenize(llm, text, max_tokens)
    windows = [tokens[i:i + n_ctx] for i in range(0, len(tokens), n_ctx)]
    windows = [w for w in windows if len(w) > 1]
    if not windows:
        raise ValueError("the calibration text is too short: no tokens to run")
    every = float(os.environ.get("EDGEMOE_CHECKPOINT_SECONDS", CHECKPOINT_SECONDS))
    saved, saved_at = start, time.monotonic()
    try:
        for i, w in enumerate(tqdm(windows[start:], desc="calibrating in llama.cpp",
                                   initial=start, total=len(windows), disable=not progress),
                              start + 1):
            llm.reset()
            llm.eval(w)
            if checkpoint is not None and time.monotonic() - saved_at >= every \
                    and i < len(windows):
                _save(col, checkpoint, fingerprint, i)
                saved, saved_at = i, time.monotonic()
    except KeyboardInterrupt as e:
        if checkpoint is None or not saved:
            raise
        raise type(e)(f"the sums of the first {saved} of {len(windows)} windows are kept in "
                      f"{checkpoint}: run the same command again to resume") from None
    del llm
    return col.stats((dataset,))


def _resumable(checkpoint: Path, fingerprint: str) -> bool:
    try:
        with np.load(checkpoint) as state:
            return str(state["fingerprint"]) == fingerprint
    except (OSError, ValueError, KeyError):
        return False


def _resume(col: _Collector, checkpoint: Path | None, fingerprint: str) -> int:
    """Load `checkpoint` into `col` if it is of this run; the windows it covers."""
    if checkpoint is None or not checkpoint.is_file():
        return 0
    try:
        with np.load(checkpoint) as state:
            if str(state["fingerprint"]) != fingerprint:
                log.warning("%s is from a calibration with other inputs: starting over",
                            checkpoint)
                return 0
            col.load_state(state)
            done = int(state["windows_done"])
    except (OSError, ValueError, KeyError) as e:
        log.warning("%s cannot be read (%s): starting over", checkpoint, e)
        return 0
    print(f"resuming calibration from {checkpoint.name}: {done} windows were run before",
          flush=True)
    return done


def _save(col: _Collector, checkpoint: Path, fingerprint: str, windows_done: int) -> None:
    tmp = checkpoint.with_name(checkpoint.name + ".tmp")
    with open(tmp, "wb") as f:
        np.savez(f, fingerprint=np.array(fingerprint), windows_done=np.array(windows_done),
                 **col.state())
    os.replace(tmp, checkpoint)  # a kill mid-save keeps the previous checkpoint


def _fingerprint(source_files, body: str, **settings) -> str:
    """What decides the statistics: the source files, the text, the settings."""
    h = hashlib.sha256(body.encode())
    for p in source_files:
        st = Path(p).stat()
        h.update(repr((str(Path(p).resolve()), st.st_size, st.st_mtime_ns)).encode())
    h.update(repr(sorted(settings.items())).encode())
    return h.hexdigest()


def calibrate(source: str, text: str | None = None, output: str | None = None,
              calib_model: str | None = None, n_ctx: int = 512, max_tokens: int | None = None,
              calib_type: str = "Q8_0", sensitivity: bool = False,
              probe_tokens: int = 2048, progress: bool = True,
              cov_budget: int = DEFAULT_COV_BUDGET,
              probe_seconds: float | None = None) -> CalibStats:
    """Measure expert usage and importance matrices for SOURCE (an HF model directory).

    Runs a `calib_type` GGUF of the model (written to a temporary folder, or `calib_model`
    if given) in llama.cpp over `text` (default: the text shipped with edgemoe). With
    `sensitivity`, probes measure each tensor's KL divergence per unit of predicted damage
    on the first `probe_tokens` tokens (edgemoe.calibration.sensitivity). Writes the statistics to
    `output` (a llama.cpp-compatible GGUF imatrix) when given. The inputs' covariances (in
    blocks of 256 columns; `cov_plan` says which) are kept too, within `cov_budget` bytes on
    disk (float64 accumulators take twice that in memory while calibrating): export's
    output-error search uses them.
    """
    text_path = Path(text) if text else DEFAULT_TEXT
    body = text_path.read_text(encoding="utf-8", errors="replace")
    model = pipeline.open_model(source)
    a = model.adapter
    # beside the output: the model as llama.cpp runs it, and the checkpoint of the sums;
    # both are kept when the run is interrupted and removed when it completes
    base = Path(output) if output else Path(f"{Path(source).name}.stats.gguf")
    work = base.with_name(f"{base.name}.{calib_type.lower()}.gguf")
    checkpoint = base.with_name(base.name + ".checkpoint.npz")
    blocks = cov_plan(model.specs, cov_budget)
    fingerprint = _fingerprint(model.source.files + ([calib_model] if calib_model else []),
                               body, n_ctx=n_ctx, max_tokens=max_tokens, calib_type=calib_type,
                               cov_blocks=blocks)
    gguf_path = calib_model
    if gguf_path is None:
        gguf_path = work
        if not (work.is_file() and _resumable(checkpoint, fingerprint)):
            plan = mp.uniform_plan(model.specs, calib_type, mp.Budget(cap_bytes=2**62),
                                   check_budget=False)
            pipeline.export(model, plan, work, progress=progress)  # itself resumable
    started = time.monotonic()
    stats = collect(gguf_path, body, a.n_layer, a.n_expert, n_ctx=n_ctx,
                    max_tokens=max_tokens, progress=progress, dataset=text_path.name,
                    cov_blocks=blocks, checkpoint=checkpoint, fingerprint=fingerprint)
    if sensitivity:
        from .sensitivity import MIN_PROBE_SECONDS, measure_scales

        tokens = tokenize(model.source.path, body)[:probe_tokens]
        # probes on the GGUF just run, for `probe_seconds` (default: as long as the run)
        seconds = probe_seconds or max(MIN_PROBE_SECONDS, time.monotonic() - started)
        stats = measure_scales(model, stats, tokens, gguf_path, n_ctx=n_ctx, seconds=seconds,
                               progress=progress)
    if output:
        write_stats(stats, output, chunk_size=n_ctx)
        log.info("wrote %s", output)
    checkpoint.unlink(missing_ok=True)
    if calib_model is None:
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
    return head + "\n" + table(rows, ["layer", "max freq", "min freq", "freq CV",
                                      "energy of least-salient 25%"])
