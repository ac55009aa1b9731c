"""The verbs that run an exported file in llama.cpp: validate, run, chat, serve,
calibrate-top-any (`edgemoe.cli` parses their flags; each keyword argument is one)."""

from __future__ import annotations

import json
import logging
import sys
from pathlib import Path

from ..llamacpp import tokenize
from ..report import tables as report
from . import serve as serving
from . import topany_calibrate, topany_metadata
from .model import load, planned_settings
from .validate import (
    DEFAULT_EVAL_CTX,
    DEFAULT_MAX_TOKENS,
    PROBE_DECODE,
    PROBE_PROMPT,
    format_report,
    validation_report,
)

log = logging.getLogger("edgemoe")


def validate(file: str, reference: str | None = None, text: str | None = None,
             top_any: str | None = None, json_path: str | None = None,
             max_kld: float | None = None, memory: str | None = None,
             ctx: int | None = None, kv_type: str | None = None,
             eval_ctx: int = DEFAULT_EVAL_CTX, max_tokens: int = DEFAULT_MAX_TOKENS,
             threads: int | None = None, n_prompt: int = PROBE_PROMPT,
             n_decode: int = PROBE_DECODE, progress: bool = True) -> int:
    """Measure FILE in llama.cpp (quality, speed, memory); exit code 1 when the memory cap
    is exceeded or --max-kld is broken."""
    r = validation_report(file, reference, text, top_any, max_kld, memory, ctx, kv_type,
                          eval_ctx, max_tokens, threads, n_prompt, n_decode, progress)
    print(format_report(r, max_kld))
    if json_path:
        Path(json_path).write_text(json.dumps(r, indent=1))
    return r["exit_code"]


def run(file: str, prompt: str, top_any: str | None = None, max_tokens: int = 256,
        temperature: float = 0.8, ctx: int | None = None, threads: int | None = None,
        seed: int | None = None, out=None, kv_type: str | None = None) -> str:
    """Complete PROMPT with FILE, streaming the text as it is generated (at the context
    length, KV cache type and batches its memory plan was made for, unless --ctx or
    --kv-type say otherwise)."""
    out = out or sys.stdout
    llm = load(file, top_any=top_any, threads=threads,
               **planned_settings(file, ctx, kv_type).llama_kwargs(),
               **({"seed": seed} if seed is not None else {}))
    pieces = []
    for chunk in llm.create_completion(prompt, max_tokens=max_tokens, temperature=temperature,
                                       stream=True):
        piece = chunk["choices"][0]["text"]
        pieces.append(piece)
        out.write(piece)
        out.flush()
    out.write("\n")
    _log_expert_use(llm)
    return "".join(pieces)


def chat(file: str, top_any: str | None = None, system: str | None = None,
         max_tokens: int = 512, temperature: float = 0.7, ctx: int | None = None,
         threads: int | None = None, inp=None, out=None,
         kv_type: str | None = None) -> list[dict]:
    """Chat with FILE in the terminal (its chat template; context and KV cache as its plan
    has them, as `run`); an empty line or EOF ends."""
    inp, out = inp or sys.stdin, out or sys.stdout
    llm = load(file, top_any=top_any, threads=threads,
               **planned_settings(file, ctx, kv_type).llama_kwargs())
    messages = [{"role": "system", "content": system}] if system else []
    while True:
        out.write("> ")
        out.flush()
        line = inp.readline()
        if not line or not line.strip():
            break
        messages.append({"role": "user", "content": line.rstrip("\n")})
        reply = []
        for chunk in llm.create_chat_completion(messages=messages, max_tokens=max_tokens,
                                                temperature=temperature, stream=True):
            piece = chunk["choices"][0]["delta"].get("content") or ""
            reply.append(piece)
            out.write(piece)
            out.flush()
        out.write("\n")
        messages.append({"role": "assistant", "content": "".join(reply)})
    _log_expert_use(llm)
    return messages


def serve(file: str, host: str = serving.DEFAULT_HOST, port: int = serving.DEFAULT_PORT,
          top_any: str | None = None, ctx: int | None = None, threads: int | None = None,
          alias: str | None = None, api_key: str | None = None,
          kv_type: str | None = None) -> None:
    """Serve FILE over an OpenAI-compatible HTTP API (llama-cpp-python's server) with its
    top-any thresholds active (context and KV cache as its plan has them, as `run`);
    experts per token in each response's usage and at /metrics."""
    app = serving.create_app(file, top_any, threads=threads, alias=alias, api_key=api_key,
                             run=planned_settings(file, ctx, kv_type))
    print(f"edgemoe: serving {file} ({serving.thresholds_summary(app)}) at "
          f"http://{host}:{port}/v1; experts per token in each response's usage and at "
          "/metrics", flush=True)
    serving.run(app, host, port)


def _log_expert_use(llm) -> None:
    if llm.dropper is not None:
        u = llm.expert_use
        log.info("experts per token %.3f, %.1f%% of expert activations removed",
                 u.experts_per_token, 100 * u.removed_share)


def calibrate_top_any(file: str, text: str, share: float | None = None,
                      max_ppl_increase: float | None = None, max_kld: float | None = None,
                      method: str = "layer", output: str | None = None,
                      json_path: str | None = None, eval_ctx: int = DEFAULT_EVAL_CTX,
                      max_tokens: int = DEFAULT_MAX_TOKENS, threads: int | None = None,
                      progress: bool = True) -> topany_calibrate.Calibration:
    """Pick per-layer top-any thresholds for FILE on calibration TEXT and store them in the
    GGUF (FILE itself unless --output is given)."""
    tokens = tokenize(file, Path(text).read_text(encoding="utf-8", errors="replace"), max_tokens)
    cal = topany_calibrate.calibrate(file, tokens, share=share,
                                     max_ppl_increase=max_ppl_increase, max_kld=max_kld,
                                     method=method, n_ctx=eval_ctx, threads=threads,
                                     progress=progress)
    rows = [[str(li), f"{cal.thresholds[int(li)]:.4f}", f"{100 * s:.1f}%"]
            for li, s in cal.layer_shares.items()]
    print(report.table(rows, ["layer", "tau", "removed"]))
    print(f"\n{100 * cal.removed_share:.1f}% of expert activations removed on "
          f"{cal.n_tokens} calibration tokens; perplexity {cal.ppl_base:.4f} -> {cal.ppl:.4f} "
          f"({100 * cal.ppl_increase:+.2f}%), KLD {cal.kld_mean:.5f}")
    dst = Path(output) if output else Path(file)
    topany_metadata.write_top_any(file, dst, cal.thresholds, cal.to_dict())
    print(f"wrote thresholds to {dst}")
    if json_path:
        cal.save(json_path)
    return cal
