"""Validation of an exported GGUF in llama.cpp.

`validation_report` (the `validate` verb) measures, in llama.cpp, what a user of the file will get:
- quality on held-out text: perplexity, KL divergence to a reference (an F32/BF16 GGUF, or
  an HF directory converted to F32 on the fly; mean and 99th percentile), top-1 agreement;
- experts computed per token with the file's top-any thresholds (or `--top-any`);
- prompt and decode tokens per second;
- memory, at the plan's context length and KV type: weight bytes, llama.cpp's model, KV,
  compute and output buffers (`runtime.memory.memory_breakdown`), and the peak resident memory of
  a process that only runs the model, each set against the plan's cap.
Exit code 1 when the cap is exceeded or `max_kld` is broken, else 0.

Speed and memory are measured in a fresh child process so that neither the reference model
nor this process's own imports count; quality is measured here.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import gguf
import numpy as np

import memory_planner as mp
from export.gguf_io import read_plan
from memory_planner import format_size
from memory_planner.types import DEFAULT_CTX, DEFAULT_KV_TYPE

from ..llamacpp import tokenize
from ..report.tables import table
from . import textscore, topany, topany_metadata
from .memory import memory_breakdown, peak_rss_bytes, rss_bytes
from .model import kv_type_id, load, planned_settings

log = logging.getLogger(__name__)

DEFAULT_EVAL_CTX = 512
DEFAULT_MAX_TOKENS = 8192
PROBE_PROMPT = 256
PROBE_DECODE = 32


# -- speed and memory, in a child process -----------------------------------------------------

def measure_runtime(path: str | Path, top_any=None, ctx: int = DEFAULT_CTX,
                    kv_type: str = DEFAULT_KV_TYPE, tokens: Sequence[int] | None = None,
                    n_prompt: int = PROBE_PROMPT, n_decode: int = PROBE_DECODE,
                    threads: int | None = None, context: dict | None = None) -> dict:
    """Load `path` as `edgemoe run` does and time a prompt and a decode; memory numbers.
    `context`: n_batch, n_ubatch, flash_attn as the plan's budget has them.

    Runs in the calling process: use `probe` for clean peak-memory numbers.
    """
    import llama_cpp  # its libraries belong to the interpreter's share, not the model's

    rss_before = rss_bytes()
    t0 = time.perf_counter()
    llm = load(path, top_any=top_any, n_ctx=ctx, threads=threads,
               type_k=kv_type_id(kv_type), type_v=kv_type_id(kv_type), **(context or {}))
    load_s = time.perf_counter() - t0
    n_vocab = llm.n_vocab()
    n_prompt = max(1, min(n_prompt, ctx - n_decode - 1))
    need = n_prompt + n_decode
    if tokens is None or len(tokens) < need:  # a fixed pseudo-random token stream
        tokens = np.random.default_rng(0).integers(0, n_vocab, need).tolist()
    tokens = [int(t) for t in tokens[:need]]
    prompt, rest = tokens[:n_prompt], tokens[n_prompt:]
    t0 = time.perf_counter()
    llm.eval(prompt)
    prompt_s = time.perf_counter() - t0
    use_prompt = llm.expert_use
    if llm.dropper:
        llm.dropper.use = topany.ExpertUse()
    t0 = time.perf_counter()
    for t in rest:  # one token per llama_decode: the decode path of generation
        llm.eval([t])
    decode_s = time.perf_counter() - t0
    mem = memory_breakdown(llm)
    out = {
        "ctx": ctx, "kv_type": kv_type, "threads": threads or os.cpu_count(),
        "load_s": load_s,
        "prompt_tokens": n_prompt, "prompt_tps": n_prompt / prompt_s,
        "decode_tokens": len(rest), "decode_tps": len(rest) / decode_s,
        "weight_bytes": int(llama_cpp.llama_model_size(llm.model)),
        "model_buffer_bytes": mem["model"] + mem["repacked"], "kv_bytes": mem["context"],
        "compute_bytes": mem["compute"], "output_bytes": mem["output"],
        "rss_before_bytes": rss_before, "peak_rss_bytes": peak_rss_bytes(),
        "decode_experts_per_token": llm.expert_use.experts_per_token if llm.dropper else None,
        "prompt_experts_per_token": use_prompt.experts_per_token if llm.dropper else None,
    }
    llm.close()
    return out


def probe(path: str | Path, top_any=None, ctx: int = DEFAULT_CTX, kv_type: str = DEFAULT_KV_TYPE,
          tokens: Sequence[int] | None = None, n_prompt: int = PROBE_PROMPT,
          n_decode: int = PROBE_DECODE, threads: int | None = None,
          context: dict | None = None) -> dict:
    """`measure_runtime` in a fresh Python process: its peak memory is the model's alone
    (plus the interpreter's, reported as `rss_before_bytes`)."""
    args = {"path": str(path), "top_any": _jsonable(top_any), "ctx": ctx, "kv_type": kv_type,
            "tokens": None if tokens is None else [int(t) for t in tokens],
            "n_prompt": n_prompt, "n_decode": n_decode, "threads": threads,
            "context": context}
    root = str(Path(__file__).resolve().parents[2])
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        p for p in (root, os.environ.get("PYTHONPATH")) if p)}
    code = ("import json, sys; from edgemoe.runtime.validate import measure_runtime; "
            "print('\\nPROBE ' + json.dumps(measure_runtime(**json.loads(sys.stdin.read()))))")
    r = subprocess.run([sys.executable, "-c", code], input=json.dumps(args), env=env,
                       capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("PROBE ")]
    if r.returncode < 0:
        from ..supervise import likely_cause

        sig = signal.Signals(-r.returncode)
        raise RuntimeError(f"the speed and memory measurement of {path} crashed ({sig.name}): "
                           f"likely {likely_cause(sig)}")
    if r.returncode != 0 or not lines:
        raise RuntimeError(f"the measurement process failed ({r.returncode}): "
                           f"{r.stderr.strip()[-2000:]}")
    return json.loads(lines[-1][6:])


def _jsonable(top_any):
    if isinstance(top_any, np.ndarray):
        return top_any.tolist()
    return top_any


# -- quality ----------------------------------------------------------------------------------

def convert_reference(hf_dir: str | Path, out_dir: str | Path, threads: int | None = None,
                      progress: bool = False) -> Path:
    """An F32 GGUF of an HF checkpoint (the KL reference)."""
    from .. import pipeline

    model = pipeline.open_model(hf_dir)
    plan = mp.uniform_plan(model.specs, "F32", mp.Budget(cap_bytes=1 << 62), check_budget=False)
    out = Path(out_dir) / f"{Path(hf_dir).name}-F32-reference.gguf"
    return pipeline.export(model, plan, out, threads=threads, progress=progress)


def reference_scores(reference: str | Path, wins, n_ctx: int, threads: int | None,
                     progress: bool) -> tuple[textscore.TextScore, str]:
    """Log-probabilities of the reference on `wins` (F32 KV cache), and its GGUF path."""
    ref = Path(reference)
    with tempfile.TemporaryDirectory(prefix="edgemoe-ref-") as tmp:
        if ref.is_dir():
            log.info("converting %s to an F32 GGUF for reference", ref)
            ref = convert_reference(ref, tmp, threads=threads, progress=progress)
        llm = load(ref, top_any=0, n_ctx=n_ctx, threads=threads, logits_all=True,
                           type_k=0, type_v=0)
        s = textscore.score(llm, wins, keep_logprobs=True)
        llm.close()
    return s, str(reference)


def measure_quality(path: str | Path, text: str, top_any=None, reference=None,
                    n_ctx: int = DEFAULT_EVAL_CTX, max_tokens: int = DEFAULT_MAX_TOKENS,
                    kv_type: str = "f16", threads: int | None = None,
                    progress: bool = False) -> dict:
    """Perplexity (and KLD / top-1 agreement against `reference`) of `path` on `text`."""
    llm = load(path, top_any=top_any, n_ctx=n_ctx, threads=threads, logits_all=True,
               type_k=kv_type_id(kv_type), type_v=kv_type_id(kv_type))
    tokens = tokenize(llm, text, max_tokens)
    wins = textscore.perplexity_windows(tokens, n_ctx, textscore.bos_token(llm))
    ref = None
    if reference is not None:
        llm.close()  # one model in memory at a time
        ref, _ = reference_scores(reference, wins, n_ctx, threads, progress)
        llm = load(path, top_any=top_any, n_ctx=n_ctx, threads=threads, logits_all=True,
                   type_k=kv_type_id(kv_type), type_v=kv_type_id(kv_type))
    s = textscore.score(llm, wins, reference=ref)
    use = llm.expert_use
    k = int(llm.metadata.get(f"{llm.metadata.get('general.architecture')}.expert_used_count",
                             0))
    out = {
        "text_tokens": len(tokens), "scored_tokens": s.n_tokens, "eval_ctx": n_ctx,
        "ppl": s.ppl, "ppl_reference": ref.ppl if ref is not None else None,
        "kld_mean": s.kld_mean if ref is not None else None,
        "kld_p99": s.kld_p99 if ref is not None else None,
        "top1_agreement": s.top1_agreement if ref is not None else None,
        "expert_used_count": k,
        "experts_per_token": use.experts_per_token if llm.dropper else float(k),
        "removed_share": use.removed_share if llm.dropper else 0.0,
        "layer_removed_share": {str(li): v for li, v in use.layer_shares().items()},
        "thresholds": [float(x) for x in llm.thresholds],
    }
    llm.close()
    return out


# -- the report -------------------------------------------------------------------------------

def validation_report(file: str, reference: str | None = None, text: str | None = None,
                      top_any: str | None = None, max_kld: float | None = None,
                      memory: str | None = None, ctx: int | None = None,
                      kv_type: str | None = None, eval_ctx: int = DEFAULT_EVAL_CTX,
                      max_tokens: int = DEFAULT_MAX_TOKENS, threads: int | None = None,
                      n_prompt: int = PROBE_PROMPT, n_decode: int = PROBE_DECODE,
                      progress: bool = True) -> dict:
    """Measure FILE in llama.cpp (quality, speed, memory): the report (`format_report` shows
    it), with checks and an exit code, 1 when the memory cap is exceeded or `max_kld` is
    broken."""
    path = Path(file)
    if not path.is_file():
        raise FileNotFoundError(f"{file}: no such GGUF file")
    plan = read_plan(path)
    budget = plan.budget if plan is not None else None
    cap = mp.parse_size(memory) if memory is not None else (budget.cap_bytes if budget else None)
    reserve = budget.reserve_bytes if budget else 0
    settings = planned_settings(path, ctx, kv_type, plan)
    ctx, kv_type = settings.ctx, settings.kv_type
    if max_kld is not None and reference is None:
        raise ValueError("--max-kld needs a --reference to measure KL divergence against")

    stored, info = topany_metadata.read_top_any(path)
    header = gguf.GGUFReader(path)
    arch = header.get_field(gguf.Keys.General.ARCHITECTURE).contents()
    n_layer = int(header.get_field(f"{arch}.block_count").contents())
    del header
    tau = topany_metadata.parse_spec(top_any, n_layer, stored)
    topany.check_supported(arch, tau)  # before any measurement
    report: dict = {"file": str(path), "top_any": {
        "spec": top_any, "thresholds": None if tau is None else [float(x) for x in tau],
        "stored_in_file": stored is not None, "info": info}}
    if text is not None:
        body = Path(text).read_text(encoding="utf-8", errors="replace")
        report["quality"] = measure_quality(path, body, top_any, reference, eval_ctx,
                                            max_tokens, kv_type, threads, progress)
        report["quality"]["text"] = str(text)
        report["quality"]["reference"] = reference
        prompt_tokens = tokenize(path, body, n_prompt + n_decode)
    else:
        report["quality"] = None
        prompt_tokens = None
    # the batch and flash-attention setting the plan's memory is for
    sp = probe(path, top_any, ctx, kv_type, prompt_tokens, n_prompt, n_decode, threads,
               settings.batches)
    report["speed"] = {k: sp[k] for k in ("prompt_tokens", "prompt_tps", "decode_tokens",
                                          "decode_tps", "threads", "load_s",
                                          "decode_experts_per_token")}
    alloc = (sp["model_buffer_bytes"] + sp["kv_bytes"] + sp["compute_bytes"]
             + sp["output_bytes"])
    rss_model = sp["peak_rss_bytes"] - sp["rss_before_bytes"]
    mem = {
        "ctx": ctx, "kv_type": kv_type, "cap_bytes": cap, "reserve_bytes": reserve,
        "weight_bytes": sp["weight_bytes"], "model_buffer_bytes": sp["model_buffer_bytes"],
        "kv_bytes": sp["kv_bytes"], "compute_bytes": sp["compute_bytes"],
        "output_bytes": sp["output_bytes"], "llama_total_bytes": alloc,
        "total_bytes": alloc + reserve,
        "peak_rss_bytes": sp["peak_rss_bytes"], "interpreter_rss_bytes": sp["rss_before_bytes"],
        "peak_rss_model_bytes": rss_model,
        "planned": None if plan is None else {
            "weight_bytes": plan.weight_bytes, "kv_bytes": budget.kv_bytes,
            "compute_bytes": budget.compute_bytes, "output_bytes": budget.output_bytes,
            "total_bytes": plan.total_bytes, "memory_source": budget.memory_source},
    }
    mem["fits"] = None if cap is None else (alloc + reserve <= cap and rss_model + reserve <= cap)
    report["memory"] = mem
    q = report["quality"]
    checks = {"memory_cap": mem["fits"]}
    if max_kld is not None:
        checks["max_kld"] = bool(q is not None and q["kld_mean"] is not None
                                 and q["kld_mean"] <= max_kld)
    report["checks"] = checks
    code = 1 if any(v is False for v in checks.values()) else 0
    report["exit_code"] = code
    return report


def _pct(x, cap) -> str:
    return f"{100 * x / cap:.1f}% of cap" if cap else ""


def format_report(r: dict, max_kld: float | None = None) -> str:
    """The report as tables for people."""
    out = [f"validation of {r['file']}"]
    q = r["quality"]
    if q is not None:
        rows = [["perplexity", f"{q['ppl']:.4f}",
                 f"{q['scored_tokens']} tokens of {Path(q['text']).name}"]]
        if q["ppl_reference"] is not None:
            rows.append(["perplexity, reference", f"{q['ppl_reference']:.4f}",
                         f"{100 * (q['ppl'] / q['ppl_reference'] - 1):+.2f}%"])
            kld_note = "" if max_kld is None else (
                f"max {max_kld:g}: " + ("ok" if q["kld_mean"] <= max_kld else "BROKEN"))
            rows += [["KL divergence, mean", f"{q['kld_mean']:.5f}", kld_note],
                     ["KL divergence, p99", f"{q['kld_p99']:.5f}", ""],
                     ["top-1 agreement", f"{100 * q['top1_agreement']:.2f}%", ""]]
        rows.append(["experts per token", f"{q['experts_per_token']:.3f}",
                     f"of {q['expert_used_count']}; {100 * q['removed_share']:.1f}% removed"])
        out += ["", table(rows, ["quality", "value", ""])]
    s = r["speed"]
    out += ["", table([
        ["prompt", f"{s['prompt_tps']:.1f} tok/s", f"{s['prompt_tokens']} tokens"],
        ["decode", f"{s['decode_tps']:.2f} tok/s", f"{s['decode_tokens']} tokens, "
                                                   f"{s['threads']} threads"],
    ], ["speed", "", ""])]
    m = r["memory"]
    cap = m["cap_bytes"]
    rows = [
        ["weights", format_size(m["weight_bytes"]), _pct(m["weight_bytes"], cap)],
        ["model buffers", format_size(m["model_buffer_bytes"]), ""],
        [f"KV cache ({m['ctx']} tokens, {m['kv_type']})", format_size(m["kv_bytes"]),
         _pct(m["kv_bytes"], cap)],
        ["compute buffers", format_size(m["compute_bytes"]), _pct(m["compute_bytes"], cap)],
        ["output buffer", format_size(m["output_bytes"]), ""],
        ["reserve", format_size(m["reserve_bytes"]), ""],
        ["total (llama.cpp + reserve)", format_size(m["total_bytes"]),
         _pct(m["total_bytes"], cap)],
        ["peak process memory", format_size(m["peak_rss_bytes"]),
         f"{format_size(m['interpreter_rss_bytes'])} interpreter before loading"],
        ["peak memory of the model", format_size(m["peak_rss_model_bytes"]),
         _pct(m["peak_rss_model_bytes"], cap)],
    ]
    if cap is not None:
        rows.append(["cap", format_size(cap), "fits" if m["fits"] else "OVER THE CAP"])
    out += ["", table(rows, ["memory", "bytes", ""])]
    if m["planned"] is not None:
        p = m["planned"]
        out.append(f"planned: weights {format_size(p['weight_bytes'])}, KV "
                   f"{format_size(p['kv_bytes'])}, compute {format_size(p['compute_bytes'])}, "
                   f"output {format_size(p.get('output_bytes', 0))} "
                   f"({p.get('memory_source', 'formula')})")
    out.append(f"\nexit code {r['exit_code']}")
    return "\n".join(out)
