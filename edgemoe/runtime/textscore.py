"""Score text in llama.cpp: perplexity, KL divergence to a reference, top-1 agreement.

Two window styles, each with its own numbers:
- llama-perplexity's (`perplexity_windows`, `score`): the text is cut into windows of
  `n_ctx` tokens (a BOS first when the model adds one), each evaluated from an empty cache,
  and only the second half of each window is scored, so every scored token sees at least
  n_ctx/2 tokens of context. `edgemoe validate` and top-any calibration score this way; any
  `llama_cpp.Llama` built with `logits_all=True` works, hooked or not.
- every position of plain windows (`whole_windows`, `logprobs`, `compare`): suits short
  calibration texts; the sensitivity probes and the benchmarks that compare many files
  with one cached reference score this way.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from ..llamacpp import eval_logits, open_llama


def n_layer(llm) -> int:
    import llama_cpp

    return int(llama_cpp.llama_model_n_layer(llm.model))


def bos_token(llm) -> int | None:
    """The BOS token if the model's tokenizer adds one, else None."""
    return llm.token_bos() if llm._model.add_bos_token() else None


def perplexity_windows(tokens: Sequence[int], n_ctx: int, bos: int | None = None,
                       min_len: int = 16) -> list[list[int]]:
    """Consecutive windows of n_ctx tokens (BOS included); a short tail is dropped."""
    step = n_ctx - (bos is not None)
    out = []
    for i in range(0, len(tokens), step):
        w = list(tokens[i:i + step])
        if len(w) < min_len:
            break
        out.append(([bos] if bos is not None else []) + w)
    if not out:
        raise ValueError(f"{len(tokens)} tokens of text: too few to score (need {min_len})")
    return out


ROWS = 32  # rows of logits worked on at once: float64 copies of a few MB, reused in cache


def log_softmax(x: np.ndarray) -> np.ndarray:
    """log-probabilities from logits (n_tokens x n_vocab), over the last axis (float64
    inside, float32 out). In blocks of ROWS rows, the same values as the whole array at once:
    a 512 x 32000 window took 0.5 s in fresh float64 arrays, 0.04 s so."""
    x = np.asarray(x)
    if x.ndim == 1:
        return log_softmax(x[None])[0]
    out = np.empty(x.shape, np.float32)
    for i in range(0, len(x), ROWS):
        rows = x[i:i + ROWS]
        b = rows.astype(np.float64)
        b -= rows.max(axis=-1, keepdims=True)
        b -= np.log(np.exp(b).sum(axis=-1, keepdims=True))
        out[i:i + ROWS] = b
    return out


@dataclass
class TextScore:
    """Per scored token: NLL, the argmax, and against a reference the KLD and agreement."""

    nll: np.ndarray
    top1: np.ndarray
    kld: np.ndarray | None = None
    agree: np.ndarray | None = None
    logprobs: list[np.ndarray] | None = None  # per window (scored rows), if kept

    @property
    def n_tokens(self) -> int:
        return int(self.nll.size)

    @property
    def ppl(self) -> float:
        return float(np.exp(self.nll.mean()))

    @property
    def kld_mean(self) -> float:
        return float(self.kld.mean()) if self.kld is not None else float("nan")

    @property
    def kld_p99(self) -> float:
        return float(np.percentile(self.kld, 99)) if self.kld is not None else float("nan")

    @property
    def top1_agreement(self) -> float:
        return float(self.agree.mean()) if self.agree is not None else float("nan")


def score(llm, wins: Sequence[Sequence[int]], reference: TextScore | None = None,
          keep_logprobs: bool = False) -> TextScore:
    """Score `wins` (from `perplexity_windows`); `reference` must have been scored on the
    same windows with `keep_logprobs=True`."""
    if reference is not None and reference.logprobs is None:
        raise ValueError("the reference was scored without keep_logprobs=True")
    nll, top1, kld, agree, kept = [], [], [], [], []
    for i, w in enumerate(wins):
        first = len(w) // 2
        lp = log_softmax(eval_logits(llm, w)[first - 1:len(w) - 1])
        target = np.asarray(w[first:])
        nll.append(-lp[np.arange(len(target)), target])
        top1.append(lp.argmax(axis=1))
        if reference is not None:
            ref = reference.logprobs[i]
            if ref.shape != lp.shape:
                raise ValueError(f"reference logits {ref.shape} do not match {lp.shape}: "
                                 "a different vocabulary or different windows")
            kld.append((np.exp(ref) * (ref - lp)).sum(axis=1))
            agree.append(ref.argmax(axis=1) == top1[-1])
        if keep_logprobs:
            kept.append(lp)
    cat = np.concatenate
    return TextScore(cat(nll), cat(top1), cat(kld) if kld else None,
                     cat(agree) if agree else None, kept if keep_logprobs else None)


# -- every position of plain windows ---------------------------------------------------------

def whole_windows(tokens: Sequence[int], n_ctx: int) -> list[list[int]]:
    """Non-overlapping windows of `n_ctx` tokens (the last one dropped if shorter than 2)."""
    out = [list(tokens[i:i + n_ctx]) for i in range(0, len(tokens), n_ctx)]
    return [w for w in out if len(w) > 1]


def logprobs(path: str | Path, tokens: Sequence[int], n_ctx: int = 512,
             f32_kv: bool = True, **kwargs) -> list[np.ndarray]:
    """Per window, log-probabilities (n_tokens x n_vocab, float32) from llama.cpp."""
    llm = open_llama(path, n_ctx=n_ctx, f32_kv=f32_kv, n_batch=n_ctx, **kwargs)
    try:
        return [log_softmax(eval_logits(llm, w))
                for w in whole_windows(tokens, n_ctx)]
    finally:
        llm.close()


@dataclass(frozen=True)
class Quality:
    """A candidate against a reference over every position of the same windows."""

    kld_mean: float  # mean over positions of KL(reference || candidate), nats
    kld_p99: float
    top1_agreement: float  # share of positions where both pick the same next token
    ppl: float  # candidate perplexity on the text
    ppl_reference: float
    n_positions: int

    def to_dict(self) -> dict:
        return asdict(self)


def compare(reference: list[np.ndarray], candidate: list[np.ndarray],
            tokens: Sequence[int], n_ctx: int) -> Quality:
    """KL divergence and agreement of two models' log-probabilities on the same windows."""
    klds, agree, nll_c, nll_r = [], [], [], []
    for w, ref, cand in zip(whole_windows(tokens, n_ctx), reference, candidate):
        ref, cand = ref.astype(np.float64), cand.astype(np.float64)
        klds.append((np.exp(ref) * (ref - cand)).sum(-1))
        agree.append(ref.argmax(-1) == cand.argmax(-1))
        nxt = np.asarray(w[1:])
        idx = np.arange(len(nxt))
        nll_c.append(-cand[idx, nxt])
        nll_r.append(-ref[idx, nxt])
    kld = np.concatenate(klds)
    return Quality(
        kld_mean=float(kld.mean()),
        kld_p99=float(np.percentile(kld, 99)),
        top1_agreement=float(np.concatenate(agree).mean()),
        ppl=float(np.exp(np.concatenate(nll_c).mean())),
        ppl_reference=float(np.exp(np.concatenate(nll_r).mean())),
        n_positions=int(kld.size),
    )
