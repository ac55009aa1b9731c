"""Score text in llama.cpp: perplexity, KL divergence to a reference, top-1 agreement.

Windows follow llama-perplexity: the text is cut into windows of `n_ctx` tokens (a BOS
first when the model adds one), each evaluated from an empty cache, and only the second
half of each window is scored, so every scored token sees at least n_ctx/2 tokens of
context. Any `llama_cpp.Llama` built with `logits_all=True` works, hooked or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from .llamacpp import eval_logits
from .llamacpp import tokenize as llama_tokenize


def n_layer(llm) -> int:
    import llama_cpp

    return int(llama_cpp.llama_model_n_layer(llm.model))


def bos_token(llm) -> int | None:
    """The BOS token if the model's tokenizer adds one, else None."""
    return llm.token_bos() if llm._model.add_bos_token() else None


def tokenize(llm, text: str, max_tokens: int | None = None) -> list[int]:
    tokens = llm.tokenize(text.encode("utf-8"), add_bos=False, special=False)
    return tokens[:max_tokens] if max_tokens else tokens


def tokenize_file(path, text: str, max_tokens: int | None = None) -> list[int]:
    """Tokens of `text` with the tokenizer of GGUF `path` (loads the vocabulary only)."""
    tokens = llama_tokenize(path, text)
    return tokens[:max_tokens] if max_tokens else tokens


def windows(tokens: Sequence[int], n_ctx: int, bos: int | None = None,
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


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64) - x.max(axis=-1, keepdims=True)
    return (x - np.log(np.exp(x).sum(axis=-1, keepdims=True))).astype(np.float32)


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
    """Score `wins` (from `windows`); `reference` must have been scored on the same windows
    with `keep_logprobs=True`."""
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
