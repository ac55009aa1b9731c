"""Sensitivity probes inside llama.cpp's eval callback: no model file is written.

A probe asks what the KL divergence would be if some tensors were of a low-bit type. Instead
of exporting such a model, the GGUF calibration runs is run with the eval callback adding,
to each probed weight's product, the product of its quantization error:

    out += (W_probe - W_run) @ x

x is the matmul's own input (the node's src[1], read while the product is fresh), W_run the
weight as the run GGUF holds it, W_probe the source weight quantized to the probe type by
ggml, with the importance matrix, as an export with `--search 0` quantizes it. For stacked
expert tensors (mul_mat_id) each token's slot gets the error of the expert it selected. That
is what llama.cpp computes on a file holding the probe type, up to the rounding of ggml's
own dot products (tests/edgemoe/calibration/test_perturb.py measures how close).

Where each product is perturbed (llama.cpp's names, src/llama-graph.cpp and src/models/):
  attn_q/k/v      Qcur/Kcur/Vcur-L, the MUL_MAT node of that name (the rope and bias nodes
                  that carry the same name later are skipped)
  attn_output     llama.cpp leaves the wo product unnamed: its input is read at kqv_out-L
                  and the error is added to ffn_inp-L, the residual sum right after it
  ffn_*_exps      ffn_moe_gate/up/down-L (MUL_MAT_ID; src[2] holds the selected experts)
  output          result_output (MUL_MAT)
  token_embd      norm-0, the first layer's RMS norm: its input (the GET_ROWS of the
                  embeddings) gets the error of each token's row, and the norm is redone
Every name is registered as required, so a llama.cpp that renames one fails the first decode
(HookError); a probe whose tensor was never multiplied fails the pass (ProbeError).

The pruning probe drops the least salient experts inside the callback too: on ffn_moe_probs-L
the dropped experts' probabilities are removed before the top-k (softmax gating: zeroed and
the rest renormalised, which is the softmax over the kept experts' logits, as in a pruned
file, renormalising architectures or not; other gatings: -inf, never selected).
"""

from __future__ import annotations

import struct
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Executor
from pathlib import Path

import gguf
import numpy as np

from export.quantize import dequantize, error_ratio, error_sums, quantize_rows, sample_rows
from memory_planner.names import parse_tensor_name
from memory_planner.stats import CalibStats

from ..damage import SAMPLED_ROWS
from ..llamacpp import eval_logits, open_llama
from ..runtime.textscore import ROWS, log_softmax, whole_windows
from .hooks import EvalHooks, attach
from .nodes import HookError, Node, shifted

_MATMUL = {"attn_q": "Qcur", "attn_k": "Kcur", "attn_v": "Vcur", "output": "result_output"}
_EXPERTS = {"ffn_gate_exps": "ffn_moe_gate", "ffn_up_exps": "ffn_moe_up",
            "ffn_down_exps": "ffn_moe_down"}
# tensor kinds a probe can perturb in the graph
SUPPORTED_KINDS = frozenset(_MATMUL) | frozenset(_EXPERTS) | {"attn_output", "token_embd"}
# weight errors kept between windows and probes: the statistics are in memory beside them
# (1 GiB took the 8gb benchmark's probes to 2.46 GB of anonymous memory, above 1 GB + the
# covariance budget)
CACHE_BYTES = 1 << 28


class ProbeError(RuntimeError):
    """A probe cannot be applied: an unsupported tensor, or its product never computed."""


class RunWeights:
    """The weights as the GGUF being run holds them, dequantized on demand; of a layer
    segment whose first block is block `first_block` of the model, by the model's names.
    `source`: the model's; when it is the very GGUF being run, its parsed header serves."""

    def __init__(self, path: str | Path, first_block: int = 0, source=None):
        same = getattr(source, "kind", None) == "gguf" and Path(source.path) == Path(path)
        self._tensors = (source.tensors if same else
                         {t.name: t for t in gguf.GGUFReader(path, "r").tensors})
        self.first_block = first_block

    def load(self, name: str, expert: int | None = None,
             rows: np.ndarray | None = None) -> np.ndarray:
        t = self._tensors[shifted(name, -self.first_block)]
        data = t.data if expert is None else t.data[expert]
        if rows is not None:
            data = data[rows]
        return np.asarray(gguf.quants.dequantize(np.asarray(data), t.tensor_type), np.float32)


class WeightErrors:
    """W_probe - W_run per tensor (per expert for stacked tensors), computed when first
    needed and kept up to `cache_bytes` (oldest dropped first).

    `sampled`, when given, gets each slice's relative error at its probe type on the rows
    `measure_damage` samples (`sample_rows(n, sampled_rows)`), by (name, expert): the
    probe's predicted damage without quantizing those rows again (`Predictions`)."""

    def __init__(self, model, stats: CalibStats | None, run: RunWeights,
                 types: dict[str, str], executor: Executor | None = None,
                 cache_bytes: int = CACHE_BYTES,
                 sampled: dict[tuple[str, int | None], float] | None = None,
                 sampled_rows: int = SAMPLED_ROWS):
        self.model, self.stats, self.run, self.types = model, stats, run, types
        self.recipes = {r.spec.name: r for r in model.recipes}
        self.executor = executor
        self.cache_bytes = cache_bytes
        self.sampled, self.sampled_rows = sampled, sampled_rows
        self._cache: dict[tuple[str, int | None], np.ndarray] = {}
        self._cached = 0

    def _probe_weights(self, w: np.ndarray, name: str, im: np.ndarray | None,
                       executor: Executor | None) -> np.ndarray:
        t = self.types[name]
        return dequantize(quantize_rows(w, t, im, executor=executor), t, w.shape)

    def _imatrix(self, name: str, expert: int | None) -> np.ndarray | None:
        im = None if self.stats is None else self.stats.importance_for(self.recipes[name].spec)
        return im if im is None or expert is None else im[expert]

    def probe_rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """Some rows of a dense tensor at the probe type (token_embd: the batch's tokens)."""
        uniq, inv = np.unique(rows, return_inverse=True)
        w = self.recipes[name].load_rows(self.model.source, uniq)
        return self._probe_weights(w, name, self._imatrix(name, None), self.executor)[inv]

    def rows(self, name: str, rows: np.ndarray) -> np.ndarray:
        """The error of some rows of a dense tensor."""
        return self.probe_rows(name, rows) - self.run.load(name, rows=rows)

    def _compute(self, name: str, expert: int | None, executor: Executor | None) -> np.ndarray:
        r = self.recipes[name]
        src = self.model.source
        w = r.load(src) if expert is None else r.load_expert(src, expert)
        im = self._imatrix(name, expert)
        d = self._probe_weights(w, name, im, executor)
        if self.sampled is not None:
            rows = sample_rows(len(w), self.sampled_rows)
            self.sampled[name, expert] = error_ratio(*error_sums(w[rows], d[rows], im))
        return d - self.run.load(name, expert)

    def _keep(self, key: tuple[str, int | None], d: np.ndarray) -> None:
        while self._cache and self._cached + d.nbytes > self.cache_bytes:
            self._cached -= self._cache.pop(next(iter(self._cache))).nbytes
        if d.nbytes <= self.cache_bytes:
            self._cache[key] = d
            self._cached += d.nbytes

    def get(self, name: str, expert: int | None = None) -> np.ndarray:
        """(n_out, n_in) float32: the tensor's (or expert slice's) quantization error."""
        d = self._cache.get((name, expert))
        if d is None:
            d = self._compute(name, expert, self.executor)
            self._keep((name, expert), d)
        return d

    def experts(self, name: str, experts: Iterable[int]) -> dict[int, np.ndarray]:
        """The errors of several expert slices, the missing ones computed on the threads."""
        out = {int(e): self._cache.get((name, int(e))) for e in experts}
        todo = [e for e, d in out.items() if d is None]
        if self.executor is not None and len(todo) > 1:
            for e, d in zip(todo, self.executor.map(
                    lambda e: self._compute(name, e, None), todo)):
                out[e] = d
                self._keep((name, e), d)
        for e in todo:
            if out[e] is None:
                out[e] = self.get(name, e)
        return out


class TensorProbe:
    """Adds the quantization error of `names` to their products during a pass; of a stacked
    expert tensor, only the slots of the experts `experts[name]` lists (all without one)."""

    def __init__(self, errors: WeightErrors, names: Iterable[str],
                 experts: dict[str, np.ndarray] | None = None):
        self.errors = errors
        self.names = tuple(names)
        self.subset = experts or {}
        self.applied: Counter[str] = Counter()
        self.installed: set[str] = set()
        self._pending: dict[int, np.ndarray] = {}  # attn_output: layer -> error of the product

    def install(self, hooks: EvalHooks, blocks: range | None = None, head: bool = True) -> None:
        """Its handlers, for the tensors of `blocks` only (a layer segment; None: all) and
        the output head's if `head`."""
        for name in self.names:
            t = parse_tensor_name(name)
            kind, layer = t.kind, t.layer
            where = 0 if kind == "token_embd" else layer  # (its hook is on block 0's norm)
            elsewhere = blocks is not None and where not in blocks
            if (not head) if kind == "output" else elsewhere:
                continue
            layers = None if layer is None else [layer]
            self.installed.add(name)
            if kind in _MATMUL:
                hooks.add(_MATMUL[kind], self._matmul(name), layers=layers)
            elif kind in _EXPERTS:
                hooks.add(_EXPERTS[kind], self._experts(name), layers=layers)
            elif kind == "attn_output":
                hooks.add("kqv_out", self._wo_input(name), layers=layers)
                hooks.add("ffn_inp", self._wo_output(name), layers=layers)
            elif kind == "token_embd":
                hooks.add("norm", self._embeddings(name), layers=[0])
            else:
                raise ProbeError(f"{name}: no probe inside llama.cpp's graph for {kind} "
                                 f"tensors (supported: {', '.join(sorted(SUPPORTED_KINDS))})")

    def check(self) -> None:
        """After a pass: every tensor installed was perturbed at least once."""
        missing = [n for n in self.names if n in self.installed and not self.applied[n]]
        if missing:
            raise ProbeError(f"the products of {', '.join(missing)} were never computed as "
                             "expected: llama.cpp's graph changed")

    @staticmethod
    def _weight_of(node: Node, name: str) -> None:
        w = node.src(0)
        if w is None or w.name != name:
            raise HookError(f"{node.name} ({node.op_name}) multiplies "
                            f"{None if w is None else w.name}, expected {name}")

    def _matmul(self, name: str) -> Callable[[Node], None]:
        def on(node: Node) -> None:
            if node.op_name != "MUL_MAT":  # a later node of the same name (rope, bias)
                return
            self._weight_of(node, name)
            x = node.src(1).matrix()
            d = self.errors.get(name)
            node.write((node.matrix() + x @ d.T).reshape(node.shape))
            self.applied[name] += 1
        return on

    def _experts(self, name: str) -> Callable[[Node], None]:
        def on(node: Node) -> None:
            if node.op_name != "MUL_MAT_ID":
                raise HookError(f"{node.name} is {node.op_name}, expected MUL_MAT_ID")
            self._weight_of(node, name)
            n_out, k, n = node.ne[0], node.ne[1], node.ne[2]
            ids = node.src(2).read().reshape(n, k)
            xn = node.src(1)
            x = xn.read().reshape(n, -1, xn.ne[0])  # (n_tokens, 1 or k, n_in)
            y = node.read().reshape(n, k, n_out)
            hit = np.unique(ids)
            if name in self.subset:
                hit = np.intersect1d(hit, self.subset[name])
            for e, d in self.errors.experts(name, hit).items():
                t, j = np.nonzero(ids == e)
                xs = x[t, j] if x.shape[1] > 1 else x[t, 0]
                y[t, j] += xs @ d.T
            node.write(y.reshape(node.shape))
            self.applied[name] += 1
        return on

    def _wo_input(self, name: str) -> Callable[[Node], None]:
        def on(node: Node) -> None:
            self._pending[node.layer] = node.matrix() @ self.errors.get(name).T
        return on

    def _wo_output(self, name: str) -> Callable[[Node], None]:
        def on(node: Node) -> None:
            delta = self._pending.pop(node.layer)
            c = node.src(0)
            rows = None
            if c.op_name == "GET_ROWS":  # the last layer keeps only the output rows
                rows = c.src(1).read().reshape(-1)
                c = c.src(0)
            if c.op_name == "ADD":  # an output bias
                c = c.src(0)
            if c.op_name != "MUL_MAT":
                raise HookError(f"{node.name}: src[0] is {c.op_name}, expected wo's MUL_MAT")
            self._weight_of(c, name)
            if rows is not None:
                delta = delta[rows]
            node.write((node.matrix() + delta).reshape(node.shape))
            self.applied[name] += 1
        return on

    def _embeddings(self, name: str) -> Callable[[Node], None]:
        def on(node: Node) -> None:
            g = node.src(0)
            if g is None or g.op_name != "GET_ROWS" or g.src(0).name != name:
                return  # another layer-0 norm (q/k norms, ffn norm)
            if node.op_name != "RMS_NORM":
                raise HookError(f"{node.name} is {node.op_name}: only RMS_NORM is redone")
            ids = g.src(1).read().reshape(-1)
            x = g.matrix() + self.errors.rows(name, ids)
            g.write(x.reshape(g.shape))
            eps = struct.unpack("f", struct.pack("i", node.t.op_params[0]))[0]
            x64 = x.astype(np.float64)
            y = x64 / np.sqrt(np.mean(np.square(x64), axis=1, keepdims=True) + eps)
            node.write(y.astype(np.float32).reshape(node.shape))
            self.applied[name] += 1
        return on


class PruneProbe:
    """Drops the experts not in `kept` (layer -> kept expert ids) from every token's choice."""

    def __init__(self, kept: dict[int, Sequence[int]]):
        self.kept = {int(k): np.asarray(v, dtype=np.int64) for k, v in kept.items()}
        self.applied: Counter[int] = Counter()
        self.installed: set[int] = set()

    def install(self, hooks: EvalHooks, blocks: range | None = None, head: bool = True) -> None:
        """Its handlers, in the layers of `blocks` only (a layer segment; None: all)."""
        layers = [x for x in self.kept if blocks is None or x in blocks]
        if layers:
            hooks.add("ffn_moe_probs", self._on_probs, layers=layers)
            self.installed.update(layers)

    def _on_probs(self, node: Node) -> None:
        p = node.matrix()  # (n_tokens, n_expert)
        drop = np.ones(p.shape[1], dtype=bool)
        drop[self.kept[node.layer]] = False
        if node.op_name == "SOFT_MAX":
            p[:, drop] = 0.0
            p /= p.sum(axis=1, keepdims=True)
        else:
            p[:, drop] = -np.inf
        node.write(p.reshape(node.shape))
        self.applied[node.layer] += 1

    def check(self) -> None:
        missing = sorted(self.installed - set(self.applied))
        if missing:
            raise ProbeError(f"no router probabilities were seen in layers {missing}")


class BasePass:
    """The probes' reference, taken from calibration's own run of the GGUF: the
    log-probabilities of its first whole windows, up to `n_tokens` tokens
    (`collect(on_window=...)`). The probes run llama.cpp with the same settings
    (`open_run`), so a pass without a probe gives these values again and the probes need no
    base pass of their own."""

    def __init__(self, n_tokens: int, n_ctx: int):
        self.n_tokens, self.n_ctx = n_tokens, n_ctx
        self.windows: list[list[int]] = []
        self.logprobs: list[np.ndarray] = []
        self.seconds = 0.0  # the run's time on these windows: what a probe pass costs

    def __call__(self, window: Sequence[int], logits: np.ndarray, seconds: float) -> None:
        if len(window) == self.n_ctx and len(self.windows) * self.n_ctx < self.n_tokens:
            self.windows.append(list(window))
            self.logprobs.append(log_softmax(np.array(logits[:len(window)], np.float32)))
            self.seconds += seconds

    @property
    def tokens(self) -> list[int]:
        return [t for w in self.windows for t in w]


def open_run(path: str | Path, n_ctx: int, threads: int | None = None):
    """llama.cpp on `path` as calibration and the probes run it: windows of `n_ctx` tokens in
    one micro-batch, every position's logits."""
    return open_llama(path, n_ctx=n_ctx, logits_all=True, n_batch=n_ctx, n_ubatch=n_ctx,
                      threads=threads)


class ProbeRunner:
    """One llama.cpp model, run over the same windows with and without probes."""

    def __init__(self, path: str | Path, tokens: Sequence[int], n_ctx: int = 512,
                 threads: int | None = None):
        self.tokens, self.n_ctx = list(tokens), n_ctx
        self.windows = whole_windows(self.tokens, n_ctx)
        if not self.windows:
            raise ValueError("too few tokens to probe")
        self.llm = open_run(path, n_ctx, threads)

    def logprobs(self, probe: TensorProbe | PruneProbe | None = None) -> list[np.ndarray]:
        """Per window, log-probabilities (n_tokens x n_vocab) with `probe` applied."""
        hooks = EvalHooks()
        if probe is not None:
            probe.install(hooks)
        attach(self.llm, hooks)
        out = [log_softmax(eval_logits(self.llm, w)) for w in self.windows]
        if probe is not None:
            probe.check()
        return out

    def close(self) -> None:
        self.llm.close()


def kld(reference: list[np.ndarray], candidate: list[np.ndarray]) -> float:
    """Mean KL(reference || candidate) over every position (of log-probabilities). The terms
    are worked out `textscore.ROWS` rows at a time, then summed as one array."""
    total = n = 0.0
    for r, c in zip(reference, candidate):
        terms = np.empty(r.shape, np.float64)
        for i in range(0, len(r), ROWS):
            r64 = r[i:i + ROWS].astype(np.float64)
            t = terms[i:i + ROWS]
            np.exp(r64, out=t)
            r64 -= c[i:i + ROWS]
            t *= r64
        total += float(terms.sum())
        n += len(r)
    return total / n
