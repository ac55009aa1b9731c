"""The sums calibration keeps, fed by graph nodes: expert usage, importance matrices, input
covariances.

Which weights read which node is llama.cpp's graph (src/llama-graph.cpp, src/models/): the
attention projections read `attn_norm`, the FFN's gate and up (dense, shared expert and
routed experts alike) read `ffn_norm`, and so on (`INPUT_NODE`). Tensors that read one input
share one importance sum and one covariance: each is computed once and, on disk, stored
once (`cov_plan` gives every tensor the `owner` whose array it shares).

The numpy work runs on `threads` workers while llama.cpp computes the next nodes: a layer's
sums are added on one worker in graph order, so any thread count gives the same bits.
"""

from __future__ import annotations

import logging
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

import memory_planner as mp
from export.search import cov_block
from memory_planner.stats import CalibStats, ExpertStats

from .hooks import EvalHooks
from .nodes import GraphNodes, Node, graph_nodes

log = logging.getLogger(__name__)

_SUMS = ("selected", "weight_sum", "saliency_sum", "energy_sum", "output_energy")
_TABLES = ("in_sum2", "counts", "cov")
MAX_PENDING = 64  # node copies queued for the workers before the decode waits for them

# the graph node holding each tensor kind's input (llama.cpp's names); an architecture's
# `GraphNodes` (nodes.graph_nodes) overrides the attention ones and names its FFN input
INPUT_NODE = {
    **dict.fromkeys(("attn_q", "attn_k", "attn_v", "attn_qkv", "attn_q_a", "attn_kv_a_mqa"),
                    "attn_norm"),
    "attn_output": "kqv_out",
    **dict.fromkeys(("ffn_down", "ffn_down_shexp"), "ffn_swiglu"),
    "ffn_down_exps": "ffn_moe_swiglu",
    "output": "result_norm",
}
FFN_INPUT_KINDS = ("ffn_gate", "ffn_up", "ffn_gate_shexp", "ffn_up_shexp", "ffn_gate_exps",
                   "ffn_up_exps")
_SPECIAL = ("ffn_moe_swiglu", "result_norm")  # nodes with handlers of their own


def input_nodes(nodes: GraphNodes) -> dict[str, str]:
    """Tensor kind -> the graph node holding its input, for an architecture's `nodes`."""
    out = dict(INPUT_NODE)
    out.update({kind: node for node, kinds in nodes.dense.items() for kind in kinds})
    out.update(dict.fromkeys(FFN_INPUT_KINDS, nodes.ffn_input))
    return out


@dataclass(frozen=True)
class CovSpec:
    """How one tensor's input covariance is kept: blocks of `block` columns, one per expert
    or one for all, in the array of `owner` (itself, or a tensor reading the same input)."""

    block: int
    per_expert: bool
    owner: str


def readers(specs: list[mp.TensorSpec], nodes: GraphNodes | None = None
            ) -> dict[tuple[str, int | None], tuple[str, ...]]:
    """(input node, layer) -> the names of the tensors that read it, in spec order."""
    kinds = input_nodes(nodes or graph_nodes(""))
    out: dict[tuple[str, int | None], list[str]] = {}
    for s in specs:
        node = kinds.get(s.kind)
        if node is not None and s.quantizable and len(s.shape) > 1:
            out.setdefault((node, s.layer), []).append(s.name)
    return {k: tuple(v) for k, v in out.items()}


def sum_owners(groups: dict[tuple[str, int | None], tuple[str, ...]]) -> dict[str, str]:
    """Tensor -> the tensor under whose name its importance sum is kept: the first reader
    of its input (routed experts apart from dense readers: their sums are per expert)."""
    out: dict[str, str] = {}
    for names in groups.values():
        for routed in (True, False):
            group = [n for n in names if ("_exps." in n) == routed]
            out.update({n: group[0] for n in group})
    return out


def cov_plan(specs: list[mp.TensorSpec], budget: int,
             nodes: GraphNodes | None = None) -> dict[str, CovSpec]:
    """Which tensors' input covariances to collect, and where each is kept.

    Every tensor's, experts each their own, if that fits in `budget` bytes (float32, each
    shared array counted once). Else experts of a layer share one covariance of their
    common input (gate and up, and a shared expert's; export scales its correlations by
    each expert's imatrix), routed down projections get none (their inputs are each
    expert's own units), and the arrays are taken by the weights they serve per byte,
    most first (smaller first among equals), while they fit: for DeepSeek-V3 in 1 GiB,
    the routed and shared experts', output's and half of attn_output's (99% of the
    weights with a known input)."""
    by_name = {s.name: s for s in specs}
    groups = readers(specs, nodes)

    def plan(per_expert_ok: bool) -> dict[str, CovSpec]:
        out = {}
        for (node, _), names in groups.items():
            owners: dict[tuple[int, bool], str] = {}  # the first reader of each kind of array
            for n in names:
                s = by_name[n]
                b = cov_block(s.row_length)
                if b is None or (node == "ffn_moe_swiglu" and not per_expert_ok):
                    continue
                per = bool(s.n_experts) and per_expert_ok
                out[n] = CovSpec(b, per, owners.setdefault((b, per), n))
        return out

    full = plan(True)
    if cov_bytes(specs, full) <= budget:
        return full
    shared = plan(False)
    served: dict[str, int] = {}
    for n, c in shared.items():
        served[c.owner] = served.get(c.owner, 0) + by_name[n].n_elements
    size = {o: cov_bytes(specs, {o: shared[o]}) for o in served}
    kept, used = set(), 0
    for o in sorted(served, key=lambda o: (-served[o] / size[o], size[o], o)):
        if used + size[o] <= budget:
            kept.add(o)
            used += size[o]
    if len(kept) < len(served):
        log.info("input covariances: %d of %d arrays (%s of %s) fit in %s; the others' "
                 "tensors export without the output-error search", len(kept), len(served),
                 mp.format_size(used), mp.format_size(sum(size.values())),
                 mp.format_size(budget))
    return {n: c for n, c in shared.items() if c.owner in kept}


def cov_bytes(specs: list[mp.TensorSpec], plan: dict[str, CovSpec]) -> int:
    """Bytes (float32) of the covariances `plan` keeps, each shared array once."""
    by_name = {s.name: s for s in specs}
    return sum(4 * (by_name[n].n_experts if c.per_expert else 1) * by_name[n].row_length
               * c.block for n, c in plan.items() if c.owner == n)


def checkpoint_bytes(specs: list[mp.TensorSpec], plan: dict[str, CovSpec],
                     nodes: GraphNodes | None = None) -> int:
    """About the size of a checkpoint of these sums (float32, each shared sum once)."""
    by_name = {s.name: s for s in specs}
    names = set(sum_owners(readers(specs, nodes)).values())
    im = sum(max(1, by_name[n].n_experts) * (by_name[n].row_length + 1) for n in names)
    experts = sum(5 * s.n_experts for s in specs if s.kind == "ffn_up_exps")
    return 4 * (im + experts) + cov_bytes(specs, plan) + 4096 * (len(names) + 1)


def block_moments(x: np.ndarray, b: int) -> np.ndarray:
    """sum over rows of x x^T in diagonal blocks of b columns: (n // b, b, b), float32 (one
    micro-batch's; the caller adds it to float64 sums)."""
    n = x.shape[-1]
    xb = x.astype(np.float32, copy=False).reshape(len(x), n // b, b).transpose(1, 0, 2)
    return np.matmul(xb.transpose(0, 2, 1), xb)


class _Lanes:
    """Jobs on `threads` workers; the jobs of one lane run in submission order on one
    worker (threads <= 1: at once, on the caller's thread)."""

    def __init__(self, threads: int):
        self.pools = [ThreadPoolExecutor(1, thread_name_prefix="calib")
                      for _ in range(threads)] if threads > 1 else []
        self.pending: deque = deque()

    def submit(self, lane: int, fn, *args) -> None:
        if not self.pools:
            fn(*args)
            return
        self.pending.append(self.pools[lane % len(self.pools)].submit(fn, *args))
        while len(self.pending) > MAX_PENDING:
            self.pending.popleft().result()

    def wait(self) -> None:
        """Until every job is done; re-raises the first job error."""
        while self.pending:
            self.pending.popleft().result()

    def close(self) -> None:
        for p in self.pools:
            p.shutdown(wait=True, cancel_futures=True)


def _expert_sums(ids: np.ndarray, values: np.ndarray, n: int) -> np.ndarray:
    """sums[e] = sum of the rows of `values` in the slots that chose expert e: `values`
    (n_tokens, k, m) one row per slot, or (n_tokens, m) one row a token's k slots share.
    One product with a 0/1 matrix (float32, on BLAS), float64 out."""
    t, k = ids.shape
    if values.ndim == 2:  # a token picks an expert at most once: one 1 per (expert, token)
        hit = np.zeros((n, t), np.float32)
        hit[ids, np.arange(t)[:, None]] = 1.0
    else:
        hit = np.zeros((n, t * k), np.float32)
        hit[ids.reshape(-1), np.arange(t * k)] = 1.0
        values = values.reshape(t * k, -1)
    return (hit @ values.astype(np.float32, copy=False)).astype(np.float64)


class Collector:
    """Accumulates statistics from graph nodes, one micro-batch at a time."""

    def __init__(self, specs: list[mp.TensorSpec], n_layer: int, n_expert: int,
                 cov_blocks: dict[str, CovSpec] | None = None, threads: int = 1,
                 nodes: GraphNodes | None = None):
        self.n_layer, self.n_expert = n_layer, n_expert
        self.nodes = nodes or graph_nodes("")  # which graph node feeds which weights
        self.readers = readers(specs, self.nodes)
        self.cov_blocks = cov_blocks or {}
        # importance sums of tensors reading one input are one sum, under the first's name
        self.in_sum2: dict[str, np.ndarray] = {}
        self.counts: dict[str, np.ndarray] = {}
        self.sum_of = sum_owners(self.readers)
        # the tables each lane adds to (any of a reader group's names may own one)
        self.lane_tables: dict[int, set[str]] = {}
        for (_, layer), names in self.readers.items():
            self.lane_tables.setdefault(self._lane(layer), set()).update(names)
        self.cov: dict[str, np.ndarray] = {}  # by owner
        E = n_expert
        self.selected = np.zeros((n_layer, E))
        self.weight_sum = np.zeros((n_layer, E))
        self.saliency_sum = np.zeros((n_layer, E))
        self.energy_sum = np.zeros((n_layer, E))
        self.output_energy = np.zeros(n_layer)
        self.ids: dict[int, np.ndarray] = {}
        self.weights: dict[int, np.ndarray] = {}
        self.ffn_in: dict[int, np.ndarray] = {}
        self.n_tokens = 0
        self.lanes = _Lanes(threads)

    # ---- accumulation (on a worker)
    def _table(self, name: str, n_mat: int, n: int) -> None:
        if name not in self.in_sum2:
            self.in_sum2[name] = np.zeros((n_mat, n))
            self.counts[name] = np.zeros(n_mat)

    def _add_cov(self, owner: str, m: np.ndarray, mat: int = 0, n_mat: int = 1) -> None:
        if owner not in self.cov:
            self.cov[owner] = np.zeros((n_mat, *m.shape))
        self.cov[owner][mat] += m

    def _dense(self, names: tuple[str, ...], x: np.ndarray) -> None:
        """Statistics of `x`, the input all of `names` read (kept once, under names[0])."""
        self._table(names[0], 1, x.shape[1])
        self.in_sum2[names[0]][0] += np.square(x, dtype=np.float64).sum(axis=0)
        self.counts[names[0]][0] += len(x)
        for name in names:
            c = self.cov_blocks.get(name)
            if c is not None and c.owner == name:
                self._add_cov(name, block_moments(x, c.block))

    def _experts(self, names: tuple[str, ...], ids: np.ndarray, x: np.ndarray) -> None:
        """x: (n_tokens, k, n) inputs per slot (or (n_tokens, n) shared by all slots), read
        by all of `names` (computed once for them all)."""
        n, E = x.shape[-1], self.n_expert
        flat = ids.reshape(-1)
        self._table(names[0], E, n)
        self.in_sum2[names[0]] += _expert_sums(ids, np.square(x, dtype=np.float32), E)
        self.counts[names[0]] += np.bincount(flat, minlength=E)
        for name in names:
            c = self.cov_blocks.get(name)
            if c is None or c.owner != name:
                continue
            if not c.per_expert:  # one for all experts: every input row
                self._add_cov(name, block_moments(x.reshape(-1, n), c.block))
                continue
            for e in np.unique(ids):
                hit = ids == e  # a token picks an expert at most once
                rows = x[hit] if x.ndim == 3 else x[hit.any(axis=1)]
                self._add_cov(name, block_moments(rows, c.block), int(e), E)

    def _routing(self, layer: int, ids: np.ndarray, w: np.ndarray, out: np.ndarray) -> None:
        contrib = w * np.sqrt(np.einsum("tkn,tkn->tk", out, out).astype(np.float64))
        flat = ids.reshape(-1)
        E = self.n_expert
        self.selected[layer] += np.bincount(flat, minlength=E)
        self.weight_sum[layer] += np.bincount(flat, w.reshape(-1), minlength=E)
        self.saliency_sum[layer] += np.bincount(flat, contrib.reshape(-1), minlength=E)
        self.energy_sum[layer] += np.bincount(flat, np.square(contrib).reshape(-1),
                                              minlength=E)

    def _energy(self, layer: int, y: np.ndarray) -> None:
        self.output_energy[layer] += float(np.square(y.astype(np.float64)).sum())

    # ---- handlers (on the decode thread): copy the node, queue the work on its layer's lane
    def _lane(self, layer: int | None) -> int:
        return self.n_layer if layer is None else layer

    def on_input(self, node: Node) -> None:
        names = self.readers.get((node.kind, node.layer))
        if names:
            self.lanes.submit(self._lane(node.layer), self._dense, names, node.matrix())

    def on_result_norm(self, node: Node) -> None:
        x = node.matrix()
        self.n_tokens += len(x)
        names = self.readers.get(("result_norm", None))
        if names:
            self.lanes.submit(self.n_layer, self._dense, names, x)

    def on_topk(self, node: Node) -> None:
        k, n = node.ne[0], node.ne[1]
        self.ids[node.layer] = node.read().reshape(n, k).astype(np.int64)

    def on_weights(self, node: Node) -> None:
        # later nodes (renormalised, scaled) overwrite earlier ones: the last is what is used
        # the nodes are [1, k, n] or [k, n]: shape them like the ids of the same layer
        ids = self.ids[node.layer]
        self.weights[node.layer] = node.read().reshape(ids.shape).astype(np.float64)

    def on_ffn_norm(self, node: Node) -> None:
        x = node.matrix()
        self.ffn_in[node.layer] = x
        dense = tuple(n for n in self.readers.get((node.kind, node.layer), ())
                      if "_exps." not in n)  # (sharing one sum, apart from the routed one)
        if dense:  # a dense FFN or a shared expert
            self.lanes.submit(node.layer, self._dense, dense, x)

    def on_act(self, node: Node) -> None:  # input of down_exps, per slot
        layer = node.layer
        ids = self.ids[layer]
        names = self.readers.get((self.nodes.ffn_input, layer), ())
        routed = tuple(n for n in names if "_exps." in n)
        if routed:
            self.lanes.submit(layer, self._experts, routed, ids, self.ffn_in[layer])
        x = node.read().reshape(ids.shape[0], ids.shape[1], node.ne[0])
        down = self.readers.get(("ffn_moe_swiglu", layer))
        if down:
            self.lanes.submit(layer, self._experts, down, ids, x)

    def on_down(self, node: Node) -> None:  # each slot's expert output, before weighting
        layer = node.layer
        ids, w = self.ids[layer], self.weights[layer]
        out = node.read().reshape(ids.shape[0], ids.shape[1], node.ne[0])
        self.lanes.submit(layer, self._routing, layer, ids, w, out)

    def on_moe_out(self, node: Node) -> None:
        self.lanes.submit(node.layer, self._energy, node.layer, node.matrix())

    def hooks(self, layers: range | None = None, output: bool = True) -> EvalHooks:
        """The handlers, by llama.cpp's node names for the model's architecture. A layer
        segment (`edgemoe.calibration.segments`) runs blocks `layers` only, and the output
        head's input is counted in the segment that holds the real head (`output`)."""
        h = EvalHooks()

        def present(name: str, routed: bool = False) -> bool:  # a node the run must compute
            return any(lay is not None and (layers is None or lay in layers)
                       and (not routed or any("_exps." in n for n in names))
                       for (node, lay), names in self.readers.items() if node == name)

        moe = present(self.nodes.ffn_input, routed=True)
        dense = {node for node, _ in self.readers} - {self.nodes.ffn_input, *_SPECIAL}
        for name in sorted(dense | set(self.nodes.dense)):
            # dense FFNs and shared experts exist in some layers of some models only
            h.add(name, self.on_input, required=name in self.nodes.dense and present(name))
        if output:
            h.add("result_norm", self.on_result_norm)
        h.add(self.nodes.ffn_input, self.on_ffn_norm)
        h.add("ffn_moe_topk", self.on_topk, required=moe)
        h.add("ffn_moe_weights", self.on_weights, required=moe)
        # present only where the architecture soft-maxes the top-k logits (gpt-oss),
        # renormalises or scales the weights
        for name in ("ffn_moe_weights_softmax", "ffn_moe_weights_norm",
                     "ffn_moe_weights_scaled"):
            h.add(name, self.on_weights, required=False)
        h.add(self.nodes.name("ffn_moe_swiglu"), self.on_act, required=moe)
        h.add(self.nodes.name("ffn_moe_down"), self.on_down, required=moe)
        h.add("ffn_moe_out", self.on_moe_out, required=moe)
        return h

    # ---- results
    def state(self) -> dict[str, np.ndarray]:
        """Every accumulator, by name, for a checkpoint (float64 holding float32 values after
        `end_window`)."""
        self.lanes.wait()
        out = {k: getattr(self, k) for k in _SUMS}
        out["n_tokens"] = np.array(self.n_tokens)
        for table in _TABLES:
            out.update({f"{table}/{k}": v for k, v in getattr(self, table).items()})
        return out

    def load_state(self, state: dict[str, np.ndarray]) -> None:
        """Go on from `state` (a checkpoint's arrays: float32 values, float64 again here)."""
        for k in _SUMS:
            setattr(self, k, np.array(state[k], dtype=np.float64))
        self.n_tokens = int(state["n_tokens"])
        for table in _TABLES:
            setattr(self, table, {k.split("/", 1)[1]: np.array(state[k], dtype=np.float64)
                                  for k in state if k.startswith(f"{table}/")})

    def end_window(self) -> None:
        """Round every sum to float32 once a window's work is queued, on the lane that adds
        to it (so after this window's terms and before the next's, whatever the threads):
        a float32 checkpoint then holds the sums exactly, and a resumed run goes on from
        the numbers a run that was not stopped has (the stats file is float32 anyway)."""
        for lane in range(self.n_layer + 1):
            self.lanes.submit(lane, self._round, lane)

    def _round(self, lane: int) -> None:
        for name in self.lane_tables.get(lane, ()):
            for table in (self.in_sum2, self.counts, self.cov):
                a = table.get(name)
                if a is not None:
                    for row in a.reshape(len(a), -1):  # in place, a row's copy at a time
                        row[...] = row.astype(np.float32)
        if lane < self.n_layer:
            for k in _SUMS:
                row = getattr(self, k)[lane: lane + 1]
                row[...] = row.astype(np.float32)

    def stats(self, datasets: tuple[str, ...], source=None) -> CalibStats:
        """The statistics of the run; the workers end."""
        self.lanes.wait()
        self.lanes.close()
        return self._stats(datasets, source)

    def snapshot(self) -> CalibStats:
        """The statistics so far, without covariances; the run goes on (a layer segment's
        blocks have theirs complete once it ran every window)."""
        self.lanes.wait()
        return self._stats((), covariances=False)

    def _stats(self, datasets: tuple[str, ...], source=None,
               covariances: bool = True) -> CalibStats:
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
        sums = {k: v.astype(f32) for k, v in self.in_sum2.items()}
        cov = {owner: v.astype(f32) for owner, v in self.cov.items()} if covariances else {}
        # tensors sharing an input share one array (a covariance is written once)
        in_cov = {n: cov[c.owner] for n, c in self.cov_blocks.items()
                  if c.owner in cov and self.sum_of.get(n) in sums}
        counts = {k: v.astype(f32) for k, v in self.counts.items()}
        names = [n for n, first in self.sum_of.items() if first in sums]
        return CalibStats(in_sum2={n: sums[self.sum_of[n]] for n in names},
                          counts={n: counts[self.sum_of[n]] for n in names},
                          experts=experts, n_tokens=self.n_tokens, datasets=datasets,
                          in_cov=in_cov, source=source)
