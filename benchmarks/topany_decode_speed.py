"""Decode tokens/s with top-any thresholds against without, on a memory-bound MoE.

The model is synthetic: a qwen3moe GGUF of a few GB with random Q8_0 weights, shaped so
that routed experts dominate the bytes a decoded token reads (k of E experts per layer), and
a random router scaled to give routing-weight spreads like a trained model's. Quality is
meaningless here; only speed is measured. The threshold is the one that removes the target
share of expert activations on this model (by default the share the curve benchmark found
within 1% perplexity on the bundled model, else 20%).

All configurations run in one process, interleaved, `--reps` times; medians are reported
(threads: 1 by default, see --threads):
  plain     llama-cpp-python, no callback
  hooked    the callback installed, tau = 0 (its overhead)
  top-any   the thresholds (dropped slots cut from the expert matmuls when the batch agrees)
  no skip   the thresholds, dropped slots pointed at the top expert (bytes saved, not FLOPs)
  k=1       expert_used_count overridden to 1 (the bound for dropping every non-top slot)

    python benchmarks/topany_decode_speed.py [--share 0.2] [--out-dir /tmp/edgemoe-bench]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import gguf
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from edgemoe.calibration.hooks import EvalHooks  # noqa: E402
from edgemoe.report.tables import table  # noqa: E402
from edgemoe.runtime.model import load  # noqa: E402
from edgemoe.runtime.topany import ExpertUse  # noqa: E402
from edgemoe.runtime.topany_calibrate import slot_ratios, tau_for_share  # noqa: E402

RESULTS = ROOT / "benchmarks" / "results"
TOKENIZER_DIR = ROOT / "models" / "stdlib-moe"
Q8_0_BLOCK = 32


def _q8_0(rng: np.random.Generator, n_elements: int, std: float) -> np.ndarray:
    """Random Q8_0 blocks (fp16 scale + 32 int8) whose values have standard deviation `std`."""
    n_blocks = n_elements // Q8_0_BLOCK
    out = np.empty((n_blocks, 34), np.uint8)
    # uniform int8 in [-127, 127] has standard deviation 73.6
    out[:, :2] = np.frombuffer(np.float16(std / 73.6).tobytes(), np.uint8)
    out[:, 2:] = np.frombuffer(rng.bytes(n_blocks * 32), np.uint8).reshape(n_blocks, 32)
    out[:, 2:][out[:, 2:] == 128] = 129  # -128 is outside Q8_0's symmetric range
    return out.reshape(-1)


def make_synthetic_moe(path: Path, n_layer: int = 12, n_embd: int = 2048, n_ff: int = 1536,
                       n_expert: int = 32, k: int = 4, n_head: int = 16, n_head_kv: int = 4,
                       head_dim: int = 128, router_logit_std: float = 1.5,
                       seed: int = 0) -> Path:
    """Write a random qwen3moe GGUF (Q8_0 matrices, F32 norms and router)."""
    from transformers import AutoTokenizer

    from export.tokenizer import add_tokenizer

    rng = np.random.default_rng(seed)
    n_vocab = len(AutoTokenizer.from_pretrained(TOKENIZER_DIR))
    n_vocab += -n_vocab % 32
    w = gguf.GGUFWriter(None, arch="qwen3moe")
    w.add_name("synthetic-moe")
    w.add_context_length(4096)
    w.add_embedding_length(n_embd)
    w.add_block_count(n_layer)
    w.add_feed_forward_length(n_ff * k)
    w.add_expert_feed_forward_length(n_ff)
    w.add_head_count(n_head)
    w.add_head_count_kv(n_head_kv)
    w.add_key_length(head_dim)
    w.add_value_length(head_dim)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_expert_count(n_expert)
    w.add_expert_used_count(k)
    w.add_file_type(int(gguf.LlamaFileType.MOSTLY_Q8_0))
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_tokenizer(w, TOKENIZER_DIR, vocab_size=n_vocab)

    Q8, F32 = gguf.GGMLQuantizationType.Q8_0, gguf.GGMLQuantizationType.F32
    specs: list[tuple[str, tuple[int, ...], gguf.GGMLQuantizationType]] = [
        ("token_embd.weight", (n_vocab, n_embd), Q8)]
    for i in range(n_layer):
        b = f"blk.{i}."
        specs += [
            (b + "attn_norm.weight", (n_embd,), F32),
            (b + "attn_q.weight", (n_head * head_dim, n_embd), Q8),
            (b + "attn_k.weight", (n_head_kv * head_dim, n_embd), Q8),
            (b + "attn_v.weight", (n_head_kv * head_dim, n_embd), Q8),
            (b + "attn_output.weight", (n_embd, n_head * head_dim), Q8),
            (b + "attn_q_norm.weight", (head_dim,), F32),
            (b + "attn_k_norm.weight", (head_dim,), F32),
            (b + "ffn_norm.weight", (n_embd,), F32),
            (b + "ffn_gate_inp.weight", (n_expert, n_embd), F32),
            (b + "ffn_gate_exps.weight", (n_expert, n_ff, n_embd), Q8),
            (b + "ffn_up_exps.weight", (n_expert, n_ff, n_embd), Q8),
            (b + "ffn_down_exps.weight", (n_expert, n_embd, n_ff), Q8),
        ]
    specs += [("output_norm.weight", (n_embd,), F32), ("output.weight", (n_vocab, n_embd), Q8)]

    def nbytes(shape, t):
        n = int(np.prod(shape))
        return n * 4 if t == F32 else n // Q8_0_BLOCK * 34

    for name, shape, t in specs:
        w.add_tensor_info(name, shape, np.dtype(np.float32), nbytes(shape, t), raw_dtype=t)
    part = path.with_name(path.name + ".part")
    w.write_header_to_file(part)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    f = w.fout[0]
    for name, shape, t in specs:
        f.write(b"\0" * (-f.tell() % w.data_alignment))
        if t == F32 and "gate_inp" in name:  # x is RMS-normed: logits ~ sqrt(n_embd) * std
            data = rng.normal(0, router_logit_std / np.sqrt(n_embd), shape).astype(np.float32)
        elif t == F32:
            data = np.ones(shape, np.float32)
        elif "exps" in name:  # expert by expert, to keep memory low
            per = int(np.prod(shape[1:]))
            for _ in range(shape[0]):
                f.write(_q8_0(rng, per, 0.02).tobytes())
            continue
        else:
            data = _q8_0(rng, int(np.prod(shape)), 0.02)
        f.write(data.tobytes())
    f.write(b"\0" * (-f.tell() % w.data_alignment))
    w.close()
    os.replace(part, path)
    return path


def warm_page_cache(path: Path) -> None:
    with open(path, "rb") as f:
        while f.read(64 << 20):
            pass


def decode_tps(llm, stream: list[int]) -> float:
    """Tokens/s decoding `stream` one token per llama_decode, after what llm already holds."""
    t0 = time.perf_counter()
    for t in stream:
        llm.eval([t])
    return len(stream) / (time.perf_counter() - t0)


def default_share() -> float:
    """The held-out share removed by the thresholds the curve benchmark calibrated for <= 1%
    perplexity on the bundled model, if it has run; else 20%."""
    f = RESULTS / "topany_curve.json"
    if f.exists():
        r = json.loads(f.read_text())
        best = r.get("calibrated_1pct_heldout") or r.get("best_within_1pct")
        if best and best["ppl_increase"] <= 0.01:
            return float(best["removed_share"])
    return 0.2


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out-dir", default="/tmp/edgemoe-bench")
    p.add_argument("--share", type=float, default=None)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--tokens", type=int, default=24, help="decoded tokens per measurement")
    p.add_argument("--threads", type=int, default=1,
                   help="decode threads (default 1: with 2 threads on 2 cores shared with "
                        "other jobs, barrier waits make runs vary 10x)")
    p.add_argument("--layers", type=int, default=12)
    args = p.parse_args(argv)
    share = args.share if args.share is not None else default_share()
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"synthetic-moe-{args.layers}L.gguf"
    if not path.exists():
        print(f"writing {path} ...", flush=True)
        make_synthetic_moe(path, n_layer=args.layers)
    size = path.stat().st_size
    warm_page_cache(path)
    r = gguf.GGUFReader(path)
    exp_bytes = sum(int(t.n_bytes) for t in r.tensors if "_exps" in t.name)
    E = int(r.get_field("qwen3moe.expert_count").contents())
    k = int(r.get_field("qwen3moe.expert_used_count").contents())
    n_layer = int(r.get_field("qwen3moe.block_count").contents())
    del r
    per_token = size - exp_bytes + exp_bytes * k / E

    rng = np.random.default_rng(1)
    prompt = rng.integers(0, 4000, 64).tolist()
    stream = rng.integers(0, 4000, 2 + args.reps * args.tokens).tolist()

    # the threshold for the share, from this model's routing while decoding the stream
    ratios: list[np.ndarray] = []
    hooks = EvalHooks()
    hooks.add("ffn_moe_weights", lambda n: ratios.append(
        slot_ratios(n.read().reshape(n.ne[2], n.ne[1]))))
    n_ctx = len(prompt) + len(stream) + 8
    probe = load(path, top_any=0, n_ctx=n_ctx, threads=args.threads, hooks=hooks)
    probe.eval(prompt)
    ratios.clear()
    for t in stream:
        probe.eval([t])
    tau = tau_for_share(np.concatenate(ratios), share, k)
    probe.close()

    configs = {
        "plain": dict(top_any=0),
        "hooked tau=0": dict(top_any=0, hooks=EvalHooks()),
        f"top-any tau={tau:.3f}": dict(top_any=tau),
        "top-any, no skip": dict(top_any=tau, skip_dropped=False),
        "k=1 override": dict(top_any=0, kv_overrides={"qwen3moe.expert_used_count": 1}),
    }
    llms = {name: load(path, n_ctx=n_ctx, threads=args.threads, **kw)
            for name, kw in configs.items()}
    speeds: dict[str, list[float]] = {name: [] for name in llms}
    for llm in llms.values():  # the same prompt in every context, then warm-up tokens
        llm.eval(prompt)
        decode_tps(llm, stream[:2])
        if llm.dropper is not None:  # count decode tokens only
            llm.dropper.use = ExpertUse()
    for rep in range(args.reps):
        chunk = stream[2 + rep * args.tokens: 2 + (rep + 1) * args.tokens]
        for name, llm in llms.items():
            speeds[name].append(decode_tps(llm, chunk))
        print(f"rep {rep + 1}/{args.reps}: " + ", ".join(
            f"{n} {s[-1]:.2f}" for n, s in speeds.items()), flush=True)
    topany_name = next(n for n in llms if n.startswith("top-any"))
    use = llms[topany_name].expert_use
    base = statistics.median(speeds["plain"])
    rows, res = [], {}
    for name, s in speeds.items():
        med = statistics.median(s)
        res[name] = {"median_tps": med, "runs": s, "speedup": med / base}
        rows.append([name, f"{med:.2f}", f"{min(s):.2f}-{max(s):.2f}", f"{med / base:.3f}x"])
    print(f"\n{path.name}: {size / 1e9:.2f} GB, {n_layer} layers, {E} experts, k={k}; experts "
          f"{100 * exp_bytes / size:.0f}% of the bytes; ~{per_token / 1e9:.2f} GB read per "
          f"token; {args.threads or os.cpu_count()} threads")
    print(f"top-any: tau {tau:.4f} for a target share {share:.3f}; measured in decode: "
          f"{100 * use.removed_share:.1f}% removed, "
          f"{use.experts_per_token:.2f} experts per token and layer\n")
    print(table(rows, ["decode", "tok/s (median)", "range", "vs plain"]))
    result = {
        "model": {"path": str(path), "bytes": size, "expert_bytes": exp_bytes, "n_layer": n_layer,
                  "n_expert": E, "k": k, "bytes_per_token_estimate": per_token},
        "threads": args.threads or os.cpu_count(), "reps": args.reps,
        "decode_tokens": args.tokens, "target_share": share, "tau": tau,
        "measured_removed_share": use.removed_share, "configs": res,
        "speedup_topany": res[topany_name]["speedup"],
        "goal": ">= 1.15x decode at the threshold", "load_average": os.getloadavg(),
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "topany_decode_speed.json").write_text(json.dumps(result, indent=1))
    return result


if __name__ == "__main__":
    main()
