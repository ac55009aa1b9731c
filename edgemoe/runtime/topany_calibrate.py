"""Top-any thresholds for a target, measured on calibration text in llama.cpp.

A target is a share of expert activations to remove (with the least damage), or a damage
budget (relative perplexity increase, or mean KL divergence) to remove as much as it allows.
`method="layer"` spends the removals where single-layer experiments found them cheap
(`Calibrator`, `allocate`); `"uniform"` uses one tau for every layer.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import gguf
import numpy as np

from ..calibration.hooks import EvalHooks, attach
from ..calibration.nodes import Node
from ..llamacpp import open_llama
from . import textscore
from .topany import (
    LOGIT_WEIGHT_ARCHS,
    WEIGHTS_NODE,
    ExpertUse,
    TopAny,
    check_supported,
    routing_weights,
)


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


def _arch(path: str | Path) -> str:
    return str(gguf.GGUFReader(path).get_field(gguf.Keys.General.ARCHITECTURE).contents())


class Evaluator:
    """A model on fixed text windows in llama.cpp, re-run with changing thresholds.

    The first run (tau = 0) keeps its log-probabilities as the reference for KL divergence
    and collects, per MoE layer, the ratios w_j / w_top of every non-top slot.
    """

    def __init__(self, path: str | Path, tokens: Sequence[int], n_ctx: int = 512,
                 threads: int | None = None, protect_first: int = 0):
        self.hooks = EvalHooks()
        self.logits = _arch(path) in LOGIT_WEIGHT_ARCHS
        self.topany = TopAny(np.zeros(0, np.float32), protect_first,
                             logits=self.logits).install(self.hooks)
        self._ratios: dict[int, list[np.ndarray]] | None = {}
        self.hooks.add(WEIGHTS_NODE, self._collect)
        llm = open_llama(path, n_ctx=n_ctx, f32_kv=True, logits_all=True, threads=threads)
        self.llm = attach(llm, self.hooks)
        self.n_layer = textscore.n_layer(self.llm)
        self.windows = textscore.perplexity_windows(tokens, n_ctx, textscore.bos_token(self.llm))
        self.base = textscore.score(self.llm, self.windows, keep_logprobs=True)
        self.ratios = {li: np.concatenate(v) for li, v in self._ratios.items()}
        self._ratios = None
        self.moe_layers = sorted(self.ratios)
        self.k = self.ratios[self.moe_layers[0]].shape[1] + 1

    def _collect(self, node: Node) -> None:
        if self._ratios is not None:
            w = routing_weights(node.read().reshape(node.ne[2], node.ne[1]), self.logits)
            self._ratios.setdefault(node.layer, []).append(slot_ratios(w))

    def run(self, thresholds: Sequence[float] | np.ndarray):
        """Score the windows with `thresholds`: (TextScore against tau = 0, ExpertUse)."""
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
    check_supported(_arch(path), [1.0])  # any threshold: refused before measuring anything
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
