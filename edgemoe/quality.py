"""Quality of a GGUF against a reference over whole windows, for the planner's probes and
benchmarks that compare many files with one cached reference.

`edgemoe.textscore` scores like llama-perplexity (second half of each window, BOS first)
for `edgemoe validate`; this module scores every position of plain windows, which suits
short calibration texts."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .llamacpp import eval_logits, open_llama
from .textscore import log_softmax


def windows(tokens: Sequence[int], n_ctx: int) -> list[list[int]]:
    """Non-overlapping windows of `n_ctx` tokens (the last one dropped if shorter than 2)."""
    out = [list(tokens[i:i + n_ctx]) for i in range(0, len(tokens), n_ctx)]
    return [w for w in out if len(w) > 1]


def logprobs(path: str | Path, tokens: Sequence[int], n_ctx: int = 512,
             f32_kv: bool = True, **kwargs) -> list[np.ndarray]:
    """Per window, log-probabilities (n_tokens x n_vocab, float32) from llama.cpp."""
    llm = open_llama(path, n_ctx=n_ctx, f32_kv=f32_kv, n_batch=n_ctx, **kwargs)
    try:
        return [log_softmax(eval_logits(llm, w))
                for w in windows(tokens, n_ctx)]
    finally:
        llm.close()


@dataclass(frozen=True)
class Quality:
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
    for w, ref, cand in zip(windows(tokens, n_ctx), reference, candidate):
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
