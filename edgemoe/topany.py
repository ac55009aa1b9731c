"""Runtime top-any routing: per layer, drop the experts a token barely uses.

Rule (MC's dynamic pruning, MC#'s top-any): at MoE layer l a token keeps its top expert and
drops slot j when its router weight w_j < tau_l * w_top. Applied in llama.cpp through
`edgemoe.hooks` on `ffn_moe_weights`: a dropped slot gets weight 0 (renormalisation, where
the architecture renormalises, then runs over the kept slots) and the expert id of the
token's top slot, so that `mul_mat_id` never reads the dropped expert's weights. Slots that
every token of the batch drops (always the case when decoding one token: the router's
slots are sorted, so the kept ones are a prefix) are cut from the selection's shape for the
expert matmuls, so they cost no FLOPs either; their stale outputs are zeroed after
`ffn_moe_down` and the shape restored. tau = 0 is plain llama.cpp.

The thresholds are calibrated here for a target (a share of expert activations removed, or
a damage budget on calibration text) and stored in the GGUF metadata under
`THRESHOLDS_KEY` (float32, one per block; 0 for dense blocks), so every edgemoe runtime
applies them.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np

from .hooks import EvalHooks, GGMLTensor, HookError, Node, ggml, moe_routing

log = logging.getLogger(__name__)

THRESHOLDS_KEY = "edgemoe.top_any.thresholds"
INFO_KEY = "edgemoe.top_any.info"  # JSON: how the thresholds were calibrated
WEIGHTS_NODE = "ffn_moe_weights"
DOWN_NODE = "ffn_moe_down"  # the last op that reads the selection (mul_mat_id)
# gating where ffn_moe_weights holds logits that are soft-maxed afterwards: a 0 weight
# would not remove the expert there
UNSUPPORTED_ARCHS = {"gpt-oss"}

# a rule gets (layer, weights (n_tokens, k)) and returns the slots to drop (bool) or None
DropRule = Callable[[int, np.ndarray], "np.ndarray | None"]


# -- the rule in the graph ------------------------------------------------------------------

@dataclass
class ExpertUse:
    """Expert slots seen and kept, per layer, since the last reset."""

    slots: dict[int, int] = field(default_factory=dict)  # layer -> tokens * k
    kept: dict[int, int] = field(default_factory=dict)  # layer -> slots not dropped
    tokens: dict[int, int] = field(default_factory=dict)  # layer -> tokens routed

    def add(self, layer: int, n_tokens: int, k: int, dropped: int) -> None:
        self.slots[layer] = self.slots.get(layer, 0) + n_tokens * k
        self.kept[layer] = self.kept.get(layer, 0) + n_tokens * k - dropped
        self.tokens[layer] = self.tokens.get(layer, 0) + n_tokens

    @property
    def removed_share(self) -> float:
        """Share of expert activations removed, over all layers and tokens."""
        total = sum(self.slots.values())
        return 1.0 - sum(self.kept.values()) / total if total else 0.0

    @property
    def experts_per_token(self) -> float:
        """Mean experts computed per token and MoE layer."""
        n = sum(self.tokens.values())
        return sum(self.kept.values()) / n if n else 0.0

    def layer_shares(self) -> dict[int, float]:
        return {li: 1.0 - self.kept[li] / s for li, s in sorted(self.slots.items()) if s}


class SlotDropper:
    """An `ffn_moe_weights` handler that drops the slots `rule` marks and counts expert use.

    The top slot (largest weight) of a token is never dropped, whatever the rule says.
    """

    def __init__(self, rule: DropRule | None, protect_first: int = 0, skip: bool = True):
        self.rule = rule
        self.protect_first = protect_first  # positions that always keep all their experts
        self.skip = skip
        self.use = ExpertUse()
        self.hooks: EvalHooks | None = None
        self._shrunk: dict[int, tuple[GGMLTensor, int, int]] = {}  # layer -> (topk, k, m)
        self.n_skips = 0  # (layer, batch) pairs whose selection was cut

    def install(self, hooks: EvalHooks) -> SlotDropper:
        hooks.add(WEIGHTS_NODE, self)
        if self.skip:
            hooks.add(DOWN_NODE, self._after_down, when=self._shrunk.__contains__)
            hooks.add_cleanup(self.restore)
        self.hooks = hooks
        return self

    def _shrink(self, layer: int, topk: Node, k: int, m: int) -> None:
        """Let mul_mat_id see only the first m slots: slots m..k-1 are neither read nor
        computed (a dropped slot that merely points at the top expert still costs its FLOPs).
        """
        topk.t.ne[0] = m
        self._shrunk[layer] = (topk.t, k, m)
        self.n_skips += 1

    def _after_down(self, node: Node) -> None:
        entry = self._shrunk.pop(node.layer, None)
        if entry is None:
            return
        t, k, m = entry
        t.ne[0] = k
        # [n_embd, k, n_tokens]: slots >= m were not computed and hold stale memory, maybe
        # inf or nan; zeroed, they contribute 0 * 0
        if node.type != gguf.GGMLQuantizationType.F32 or not node.contiguous:
            raise HookError(f"{node.name}: expected a contiguous F32 tensor, got {node!r}")
        row = node.nb[1]
        for i in range(node.ne[2]):
            node.memset(0, i * node.nb[2] + m * row, (k - m) * row)

    def restore(self) -> None:
        """Undo every pending shrink (after a decode, whatever happened in it)."""
        for t, k, _ in self._shrunk.values():
            t.ne[0] = k
        self._shrunk.clear()

    def _positions(self, n: int) -> np.ndarray | None:
        batch = self.hooks.batch if self.hooks is not None else None
        if batch is None:
            return None
        first, n_batch = batch
        # the last layer only sees output rows: with fewer rows, they are the batch's last
        return first + (n_batch - n) + np.arange(n)

    def __call__(self, node: Node) -> None:
        k, n = node.ne[1], node.ne[2]
        if node.type != gguf.GGMLQuantizationType.F32 or node.ne[0] != 1:
            raise HookError(f"{node.name} is {node.type_name} {node.ne}, expected F32 [1, k, n]")
        w = node.read().reshape(n, k)
        drop = self.rule(node.layer, w) if self.rule is not None else None
        n_drop = 0
        if drop is not None:
            top = w.argmax(axis=1)
            drop = np.array(np.broadcast_to(drop, w.shape), dtype=bool)  # a copy we own
            drop[np.arange(n), top] = False
            if self.protect_first:
                pos = self._positions(n)
                if pos is not None:
                    drop[pos < self.protect_first] = False
            n_drop = int(drop.sum())
        if n_drop:
            topk = node.src(1)
            if topk is None or topk.kind != "ffn_moe_topk":
                moe_routing(node)  # raises, naming what src[1] is
            ids = topk.read().reshape(n, k)
            ids[drop] = np.broadcast_to(ids[np.arange(n), top][:, None], ids.shape)[drop]
            w[drop] = 0.0
            topk.write(ids.reshape(topk.shape))
            node.write(w.reshape(node.shape))
            if self.skip:  # slots dropped by every token of the batch: skip them altogether
                m = int((k - np.argmax(~drop[:, ::-1], axis=1)).max())
                if m < k:
                    self._shrink(node.layer, topk, k, m)
        self.use.add(node.layer, n, k, n_drop)


def threshold_rule(thresholds: Sequence[float] | np.ndarray) -> DropRule:
    """Drop slot j of a token when w_j < tau_l * w_top (tau_l = thresholds[layer])."""
    tau = np.asarray(thresholds, dtype=np.float32)

    def rule(layer: int, w: np.ndarray) -> np.ndarray | None:
        t = tau[layer] if layer < len(tau) else 0.0
        if t <= 0:
            return None
        return w < t * w.max(axis=1, keepdims=True)

    return rule


class TopAny(SlotDropper):
    """The top-any rule with per-layer thresholds; `thresholds` may be changed between runs."""

    def __init__(self, thresholds: Sequence[float] | np.ndarray, protect_first: int = 0,
                 skip: bool = True):
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        super().__init__(self._rule, protect_first, skip)

    def _rule(self, layer: int, w: np.ndarray) -> np.ndarray | None:
        t = self.thresholds[layer] if layer < len(self.thresholds) else 0.0
        return w < t * w.max(axis=1, keepdims=True) if t > 0 else None

    def __call__(self, node: Node) -> None:
        if node.ne[2] != 1 or self.protect_first or node.ne[0] != 1 or \
                node.type != gguf.GGMLQuantizationType.F32:
            return super().__call__(node)
        # one token (decode): the same decisions in plain Python, without numpy's per-call
        # overhead, since this runs once per layer for every generated token
        k, layer = node.ne[1], node.layer
        tau = self.thresholds[layer] if layer < len(self.thresholds) else np.float32(0)
        if tau <= 0:
            self.use.add(layer, 1, k, 0)
            return
        g = ggml()
        w = (ctypes.c_float * k)()
        g.ggml_backend_tensor_get(node.ptr, w, 0, 4 * k)
        top = max(range(k), key=w.__getitem__)  # the first maximum, as numpy's argmax
        cut = float(tau * np.float32(w[top]))  # float32 product, as in the batched rule
        drop = [j != top and w[j] < cut for j in range(k)]
        n_drop = sum(drop)
        if n_drop:
            topk = node.src(1)
            if topk is None or topk.kind != "ffn_moe_topk" or topk.nb[0] != 4:
                moe_routing(node)  # raises, naming what src[1] is
            ids = (ctypes.c_int32 * k)()
            g.ggml_backend_tensor_get(topk.ptr, ids, 0, 4 * k)
            for j in range(k):
                if drop[j]:
                    ids[j], w[j] = ids[top], 0.0
            g.ggml_backend_tensor_set(topk.ptr, ids, 0, 4 * k)
            g.ggml_backend_tensor_set(node.ptr, w, 0, 4 * k)
            if self.skip:
                m = max(j for j in range(k) if not drop[j]) + 1
                if m < k:
                    self._shrink(layer, topk, k, m)
        self.use.add(layer, 1, k, n_drop)

    @property
    def active(self) -> bool:
        return bool((self.thresholds > 0).any())


# -- thresholds in GGUF metadata ------------------------------------------------------------

def add_top_any_metadata(writer: gguf.GGUFWriter, thresholds: Sequence[float],
                         info: dict | None = None) -> None:
    """Store per-block thresholds (and how they were found) in a GGUF being written."""
    tau = [float(x) for x in np.asarray(thresholds, dtype=np.float32)]
    if any(not 0.0 <= x <= 1.0 for x in tau):
        raise ValueError(f"top-any thresholds must be in [0, 1], got {tau}")
    writer.add_array(THRESHOLDS_KEY, tau)
    if info is not None:
        writer.add_string(INFO_KEY, json.dumps(info))


def read_top_any(path: str | Path) -> tuple[np.ndarray | None, dict]:
    """The thresholds stored in a GGUF file (None if there are none) and their info."""
    r = gguf.GGUFReader(path)
    f = r.get_field(THRESHOLDS_KEY)
    tau = None if f is None else np.asarray(f.contents(), dtype=np.float32)
    info = r.get_field(INFO_KEY)
    return tau, (json.loads(info.contents()) if info is not None else {})


def write_top_any(src: str | Path, dst: str | Path, thresholds: Sequence[float],
                  info: dict | None = None) -> Path:
    """Copy GGUF `src` to `dst` with the thresholds in its metadata (replacing old ones).

    `dst` may be `src`: the copy is written under a temporary name and renamed at the end.
    """
    src, dst = Path(src), Path(dst)
    reader = gguf.GGUFReader(src)
    arch = reader.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    part = dst.with_name(dst.name + ".part")
    writer = gguf.GGUFWriter(part, arch=arch, endianess=reader.endianess)
    try:
        for f in reader.fields.values():
            if f.name in (gguf.Keys.General.ARCHITECTURE, THRESHOLDS_KEY, INFO_KEY) or \
                    f.name.startswith("GGUF."):
                continue
            vtype = f.types[0]
            sub = f.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
            writer.add_key_value(f.name, f.contents(), vtype, sub_type=sub)
        add_top_any_metadata(writer, thresholds, info)
        for t in reader.tensors:
            writer.add_tensor_info(t.name, t.data.shape, t.data.dtype, t.data.nbytes,
                                   t.tensor_type)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        for t in reader.tensors:
            writer.write_tensor_data(t.data, tensor_endianess=reader.endianess)
        writer.close()
        del reader  # release the memory map before replacing src
        os.replace(part, dst)
    except BaseException:
        writer.close()
        part.unlink(missing_ok=True)
        raise
    return dst


def parse_spec(spec: str | float | Sequence[float] | None, n_layer: int,
               stored: np.ndarray | None) -> np.ndarray | None:
    """Thresholds from a user spec: None/"file" (stored ones), "off"/0, one tau for all
    layers ("0.3"), one per block ("0,0.2,0.3"), or a JSON file from calibrate-top-any."""
    if spec is None or (isinstance(spec, str) and spec.strip().lower() in ("", "file")):
        return stored
    if isinstance(spec, str):
        s = spec.strip()
        if s.lower() in ("off", "none"):
            return np.zeros(n_layer, np.float32)
        if s.endswith(".json") or Path(s).is_file():
            return parse_spec(json.loads(Path(s).read_text())["thresholds"], n_layer, stored)
        try:
            values = [float(x) for x in s.split(",")]
        except ValueError:
            raise ValueError(f"cannot read top-any spec {spec!r}: use 'file', 'off', a tau "
                             "like 0.3, one tau per block 0,0.2,... or a JSON file") from None
        return parse_spec(values[0] if len(values) == 1 else values, n_layer, stored)
    tau = np.asarray(spec, dtype=np.float32)
    if tau.ndim == 0:
        tau = np.full(n_layer, float(tau), np.float32)
    if tau.shape != (n_layer,):
        raise ValueError(f"{tau.size} top-any thresholds given, the model has {n_layer} blocks")
    if (tau < 0).any() or (tau > 1).any():
        raise ValueError(f"top-any thresholds must be in [0, 1], got {tau.tolist()}")
    return tau


# -- calibration ------------------------------------------------------------------------------

@dataclass(frozen=True)
class Calibration:
    """Thresholds for a target and what they measured on the calibration text."""

    thresholds: tuple[float, ...]
    method: str  # "uniform": one tau for all layers; "layer": per-layer sensitivity
    target: dict  # {"share": 0.2} or {"max_ppl_increase": 0.01} or {"max_kld": 0.01}
    removed_share: float  # measured share of expert activations removed
    ppl_base: float
    ppl: float
    kld_mean: float
    n_tokens: int  # scored calibration tokens
    layer_shares: dict[str, float] = field(default_factory=dict)

    @property
    def ppl_increase(self) -> float:
        return self.ppl / self.ppl_base - 1.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["thresholds"] = list(self.thresholds)
        d["ppl_increase"] = self.ppl_increase
        return d

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))


def slot_ratios(routing_weights: np.ndarray) -> np.ndarray:
    """w_j / w_top for every non-top slot: (n_tokens, k) -> (n_tokens, k - 1)."""
    w = np.sort(routing_weights, axis=1)[:, ::-1]
    return w[:, 1:] / np.maximum(w[:, :1], 1e-30)


def tau_for_share(ratios: np.ndarray, share: float, k: int) -> float:
    """The tau that removes `share` of all k slots given the non-top slot ratios."""
    if share <= 0:
        return 0.0
    q = share * k / (k - 1)  # only k - 1 of k slots can go
    if q >= 1:
        return 1.0
    r = np.sort(ratios.ravel())
    i = int(np.ceil(q * len(r)))  # drop r[:i]: tau just above r[i - 1]
    if i <= 0:
        return 0.0
    if i >= len(r):
        return 1.0
    return float(np.nextafter(np.float32(r[i - 1]), np.float32(1.0)))


class Evaluator:
    """A model on fixed text windows in llama.cpp, re-run with changing thresholds.

    The first run (tau = 0) keeps its log-probabilities as the reference for KL divergence
    and collects, per MoE layer, the ratios w_j / w_top of every non-top slot.
    """

    def __init__(self, path: str | Path, tokens: Sequence[int], n_ctx: int = 512,
                 threads: int | None = None, protect_first: int = 0):
        from . import textscore
        from .hooks import attach
        from .llamacpp import open_llama

        self.hooks = EvalHooks()
        self.topany = TopAny(np.zeros(0, np.float32), protect_first).install(self.hooks)
        self._ratios: dict[int, list[np.ndarray]] | None = {}
        self.hooks.add(WEIGHTS_NODE, self._collect)
        llm = open_llama(path, n_ctx=n_ctx, f32_kv=True, logits_all=True, threads=threads)
        self.llm = attach(llm, self.hooks)
        self.n_layer = textscore.n_layer(self.llm)
        self.windows = textscore.windows(tokens, n_ctx, textscore.bos_token(self.llm))
        self.base = textscore.score(self.llm, self.windows, keep_logprobs=True)
        self.ratios = {li: np.concatenate(v) for li, v in self._ratios.items()}
        self._ratios = None
        self.moe_layers = sorted(self.ratios)
        self.k = self.ratios[self.moe_layers[0]].shape[1] + 1

    def _collect(self, node: Node) -> None:
        if self._ratios is not None:
            w = node.read().reshape(node.ne[2], node.ne[1])
            self._ratios.setdefault(node.layer, []).append(slot_ratios(w))

    def run(self, thresholds: Sequence[float] | np.ndarray):
        """Score the windows with `thresholds`: (TextScore against tau = 0, ExpertUse)."""
        from . import textscore

        self.topany.thresholds = np.asarray(thresholds, np.float32)
        self.topany.use = ExpertUse()
        s = textscore.score(self.llm, self.windows, reference=self.base)
        return s, self.topany.use

    def uniform(self, share: float) -> np.ndarray:
        """One tau for every MoE layer, removing `share` of the slots on this text."""
        pooled = np.concatenate([self.ratios[li] for li in self.moe_layers])
        tau = np.zeros(self.n_layer, np.float32)
        tau[self.moe_layers] = tau_for_share(pooled, share, self.k)
        return tau

    def per_layer(self, shares: dict[int, float]) -> np.ndarray:
        """Per-layer taus removing shares[layer] of that layer's slots on this text."""
        tau = np.zeros(self.n_layer, np.float32)
        for li, s in shares.items():
            tau[li] = tau_for_share(self.ratios[li], s, self.k)
        return tau


DEFAULT_GRID = (0, .05, .1, .15, .2, .25, .3, .35, .4, .45, .5, .6, .7, .8, .9, 1)


class Calibrator:
    """Per-layer sensitivity curves (KLD when only that layer drops a share of its slots)
    and the least-damage allocation of a total share across layers."""

    def __init__(self, evaluator: Evaluator, grid: Sequence[float] = DEFAULT_GRID,
                 progress: bool = True):
        from tqdm import tqdm

        self.ev = evaluator
        # shares of the removable slots; 0 and 1 (top-1 only) bound every allocation
        grid = np.union1d(np.clip(np.asarray(grid, dtype=np.float64), 0, 1), [0.0, 1.0])
        self.grid = grid * (evaluator.k - 1) / evaluator.k
        self.curves = {li: np.zeros(len(self.grid)) for li in evaluator.moe_layers}
        steps = [(li, i) for li in evaluator.moe_layers for i in range(1, len(self.grid))]
        for li, i in tqdm(steps, desc="layer sensitivity", disable=not progress):
            s, _ = evaluator.run(evaluator.per_layer({li: self.grid[i]}))
            self.curves[li][i] = s.kld_mean

    def thresholds(self, share: float) -> np.ndarray:
        return self.ev.per_layer(allocate(self.curves, self.grid, share))


def allocate(curves: dict[int, np.ndarray], grid: np.ndarray, share: float) -> dict[int, float]:
    """Per-layer shares averaging `share` with the least summed damage: a Lagrangian over
    the grid, interpolated between the two bracketing multipliers."""
    layers = sorted(curves)

    def pick(lam: float) -> dict[int, float]:
        return {li: float(grid[np.argmin(curves[li] - lam * grid)]) for li in layers}

    def mean(p):
        return float(np.mean(list(p.values())))

    lo, hi = 0.0, 1.0
    while mean(pick(hi)) < share and hi < 1e9:
        hi *= 4
    for _ in range(60):
        mid = (lo + hi) / 2
        if mean(pick(mid)) >= share:
            hi = mid
        else:
            lo = mid
    a, b = pick(lo), pick(hi)
    ma, mb = mean(a), mean(b)
    t = 0.0 if mb == ma else (share - ma) / (mb - ma)
    return {li: a[li] + t * (b[li] - a[li]) for li in layers}


def calibrate(path: str | Path, tokens: Sequence[int], share: float | None = None,
              max_ppl_increase: float | None = None, max_kld: float | None = None,
              method: str = "layer", n_ctx: int = 512, grid: Sequence[float] = DEFAULT_GRID,
              threads: int | None = None, progress: bool = True) -> Calibration:
    """Per-layer thresholds for one target, measured on `tokens` in llama.cpp.

    `share`: remove this share of expert activations with the least damage (KL divergence
    to the unthresholded model). `max_ppl_increase` (relative, 0.01 = 1%) or `max_kld`:
    remove as much as the budget allows (bisection on the share, each step measured).
    `method="layer"` spends the removals where single-layer experiments found them cheap;
    `"uniform"` uses one tau for every layer.
    """
    if method not in ("layer", "uniform"):
        raise ValueError(f"unknown calibration method {method!r} (layer, uniform)")
    _check_target(share, max_ppl_increase, max_kld)
    ev = Evaluator(path, tokens, n_ctx, threads)
    thresholds = ev.uniform if method == "uniform" else \
        Calibrator(ev, grid, progress=progress).thresholds
    return fit(ev, thresholds, method, share, max_ppl_increase, max_kld, progress)


def _check_target(share, max_ppl_increase, max_kld) -> dict:
    targets = {"share": share, "max_ppl_increase": max_ppl_increase, "max_kld": max_kld}
    given = {k: v for k, v in targets.items() if v is not None}
    if len(given) != 1:
        raise ValueError(f"give exactly one calibration target, got {given or 'none'}")
    return given


def fit(ev: Evaluator, thresholds: Callable[[float], np.ndarray], method: str,
        share: float | None = None, max_ppl_increase: float | None = None,
        max_kld: float | None = None, progress: bool = True) -> Calibration:
    """Thresholds for one target, from `thresholds(share)` (Evaluator.uniform or
    Calibrator.thresholds), measured with `ev`."""
    from tqdm import tqdm

    given = _check_target(share, max_ppl_increase, max_kld)
    max_share = (ev.k - 1) / ev.k
    if share is not None:
        if not 0 <= share < max_share:
            raise ValueError(f"share {share} out of range: with k={ev.k} at most "
                             f"{max_share:.3f} of activations can go (the top expert stays)")
        tau = thresholds(share)
        score, use = ev.run(tau)
    else:
        def ok(score) -> bool:
            if max_kld is not None:
                return score.kld_mean <= max_kld
            return score.ppl / ev.base.ppl - 1.0 <= max_ppl_increase

        lo, hi = 0.0, max_share * 0.999
        tau = np.zeros(ev.n_layer, np.float32)
        score, use = ev.run(tau)
        for _ in tqdm(range(10), desc="damage budget search", disable=not progress):
            mid = (lo + hi) / 2
            cand = thresholds(mid)
            s, u = ev.run(cand)
            if ok(s):
                lo, tau, score, use = mid, cand, s, u
            else:
                hi = mid
    return Calibration(
        thresholds=tuple(float(x) for x in tau), method=method, target=given,
        removed_share=use.removed_share, ppl_base=ev.base.ppl, ppl=score.ppl,
        kld_mean=score.kld_mean, n_tokens=score.n_tokens,
        layer_shares={str(li): v for li, v in use.layer_shares().items()},
    )
