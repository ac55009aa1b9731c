"""Runtime top-any routing: per layer, drop the experts a token barely uses.

Rule (MC's dynamic pruning, MC#'s top-any): at MoE layer l a token keeps its top expert and
drops slot j when its router weight w_j < tau_l * w_top. Applied in llama.cpp through
`edgemoe.calibration.hooks` on `ffn_moe_weights`: a dropped slot gets weight 0
(renormalisation, where the architecture renormalises, then runs over the kept slots; where
the node holds the selected logits, soft-maxed afterwards as in gpt-oss, a logit of -inf) and
the expert id of the token's top slot, so that `mul_mat_id` never reads the dropped
expert's weights. Slots that every token of the batch drops (always the case when decoding
one token: the router's slots are sorted, so the kept ones are a prefix) are cut from the
selection's shape for the expert matmuls, so they cost no FLOPs either; their stale outputs
are zeroed after `ffn_moe_down` and the shape restored. tau = 0 is plain llama.cpp.

The thresholds are calibrated for a target (a share of expert activations removed, or a
damage budget on calibration text) by `edgemoe.runtime.topany_calibrate` and stored in the
GGUF metadata by `edgemoe.runtime.topany_metadata`, so every edgemoe runtime applies them.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import gguf
import numpy as np

from ..calibration.hooks import EvalHooks
from ..calibration.nodes import GGMLTensor, HookError, Node, ggml, moe_routing

WEIGHTS_NODE = "ffn_moe_weights"
DOWN_NODE = "ffn_moe_down"  # the last op that reads the selection (mul_mat_id)
# architectures whose routing this dropper cannot rewrite correctly, and why (none today)
UNSUPPORTED_ARCHS: dict[str, str] = {}
# architectures whose ffn_moe_weights are the selected router logits, soft-maxed afterwards
# (llama.cpp's SOFTMAX_WEIGHT gating, gpt-oss): the rule sees their softmax, and a dropped
# slot gets a logit of -inf (weight exactly 0, the kept slots' weights renormalised), not 0
LOGIT_WEIGHT_ARCHS = frozenset({"gpt-oss"})


def routing_weights(w: np.ndarray, logits: bool) -> np.ndarray:
    """The routing weights (n_tokens, k) of an `ffn_moe_weights` node's values."""
    if not logits:
        return w
    e = np.exp(w - w.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)



class TopAnyUnsupportedError(ValueError):
    """Top-any thresholds asked for an architecture whose routing they cannot rewrite."""


def check_supported(arch: str, thresholds) -> None:
    """Raise TopAnyUnsupportedError, with the reason, if any threshold is on for `arch`."""
    if thresholds is not None and np.any(np.asarray(thresholds) > 0) \
            and arch in UNSUPPORTED_ARCHS:
        raise TopAnyUnsupportedError(f"top-any thresholds are not supported for {arch}: "
                                     f"{UNSUPPORTED_ARCHS[arch]}; run it with --top-any 0")


# a rule gets (layer, weights (n_tokens, k)) and returns the slots to drop (bool) or None
DropRule = Callable[[int, np.ndarray], "np.ndarray | None"]


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

    def snapshot(self) -> ExpertUse:
        """A copy, safe to read while another thread keeps counting."""
        # dict(d) copies under the GIL: no 'changed size during iteration' from add()
        return ExpertUse(dict(self.slots), dict(self.kept), dict(self.tokens))

    def since(self, earlier: ExpertUse) -> ExpertUse:
        """What was counted after `earlier` (a snapshot of this record)."""
        def diff(now: dict[int, int], then: dict[int, int]) -> dict[int, int]:
            return {li: n - then.get(li, 0) for li, n in now.items()}

        return ExpertUse(diff(self.slots, earlier.slots), diff(self.kept, earlier.kept),
                         diff(self.tokens, earlier.tokens))


class SlotDropper:
    """An `ffn_moe_weights` handler that drops the slots `rule` marks and counts expert use.

    The top slot (largest weight) of a token is never dropped, whatever the rule says.
    """

    def __init__(self, rule: DropRule | None, protect_first: int = 0, skip: bool = True,
                 logits: bool = False):
        self.rule = rule
        self.logits = logits  # the node holds logits (LOGIT_WEIGHT_ARCHS)
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
        values = node.read().reshape(n, k)
        w = routing_weights(values, self.logits)
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
            values[drop] = -np.inf if self.logits else 0.0
            topk.write(ids.reshape(topk.shape))
            node.write(values.reshape(node.shape))
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
                 skip: bool = True, logits: bool = False):
        self.thresholds = np.asarray(thresholds, dtype=np.float32)
        super().__init__(self._rule, protect_first, skip, logits)

    def _rule(self, layer: int, w: np.ndarray) -> np.ndarray | None:
        t = self.thresholds[layer] if layer < len(self.thresholds) else 0.0
        return w < t * w.max(axis=1, keepdims=True) if t > 0 else None

    def __call__(self, node: Node) -> None:
        if node.ne[2] != 1 or self.protect_first or node.ne[0] != 1 or self.logits or \
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
