"""Peak memory of an export against the per-slice bound, on a synthetic checkpoint of a few GB.

Builds (once, in --work) a qwen3_moe Hugging Face checkpoint in bf16 with random weights,
written shard by shard so the whole model is never in memory, and a real BPE tokenizer. Then
exports it with each type and thread count in a child process of its own and records:

- peak RSS of that child (VmHWM), and the peaks of its anonymous and file-backed parts
  (sampled every 10 ms: file-backed RSS is what a memory-mapped checkpoint costs);
- the baseline: VmHWM of a child that only imports edgemoe (imports cost memory too);
- the per-slice bound: the largest expert slice (source bytes + float32 + quantized bytes)
  times the slices in flight (threads + 1), plus the largest dense row block;
- checkpoint and output sizes, wall time, and the output's sha256 (the same bytes with any
  thread count, and across code versions under other --label values).

Each output is checked once per type: tensor count and types read back with gguf-py, and the
file's vocabulary loaded by llama.cpp. Prints a table and merges the runs, under --label,
into benchmarks/results/export_peak_rss.json.

    python benchmarks/export_peak_rss.py [--work /tmp/edgemoe-rss] [--label current]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

RESULTS = ROOT / "benchmarks" / "results" / "export_peak_rss.json"
MB = 1 << 20


@dataclass(frozen=True)
class Shape:
    """The synthetic model: a scaled-down Qwen3-30B-A3B (same head layout and expert width
    ratio), ~2 G parameters in 4 GB of bf16 with the defaults."""

    hidden: int = 2048
    moe_ff: int = 768
    experts: int = 64
    layers: int = 6
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 4
    head_dim: int = 128


# ---------------------------------------------------------------------------------------------
# The checkpoint
# ---------------------------------------------------------------------------------------------


def build_checkpoint(work: Path, shape: Shape) -> Path:
    """A qwen3_moe checkpoint in `work`/model, one shard per layer; reused if already built."""
    out = work / "model"
    stamp = out / "edgemoe-synthetic.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == asdict(shape):
        return out
    import torch
    from safetensors.torch import save_file
    from transformers import AutoTokenizer, Qwen3MoeConfig

    from tests.tokenizer_fixtures import make_bpe_tokenizer

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    tok = make_bpe_tokenizer(work / "tokenizer", style="qwen2")
    for f in tok.iterdir():
        shutil.copy(f, out / f.name)
    eos = AutoTokenizer.from_pretrained(tok).eos_token_id
    Qwen3MoeConfig(
        vocab_size=shape.vocab, hidden_size=shape.hidden, intermediate_size=6 * shape.moe_ff,
        moe_intermediate_size=shape.moe_ff, num_hidden_layers=shape.layers,
        num_attention_heads=shape.heads, num_key_value_heads=shape.kv_heads,
        head_dim=shape.head_dim, num_experts=shape.experts,
        num_experts_per_tok=min(8, shape.experts), norm_topk_prob=True,
        max_position_embeddings=4096, rms_norm_eps=1e-6,
        eos_token_id=eos, tie_word_embeddings=False, torch_dtype="bfloat16",
        architectures=["Qwen3MoeForCausalLM"],  # what llama.cpp's converter looks up
    ).save_pretrained(out)

    g = torch.Generator().manual_seed(0)
    d, ff, hd = shape.hidden, shape.moe_ff, shape.head_dim

    def weight(*dims: int) -> torch.Tensor:
        return torch.randn(dims, generator=g, dtype=torch.bfloat16) * 0.02

    def norm(n: int) -> torch.Tensor:
        return (1 + 0.1 * torch.randn(n, generator=g)).to(torch.bfloat16)

    weight_map: dict[str, str] = {}
    n_shards = shape.layers
    for i in range(shape.layers):
        shard = f"model-{i + 1:05d}-of-{n_shards:05d}.safetensors"
        p = f"model.layers.{i}."
        tensors = {
            p + "input_layernorm.weight": norm(d),
            p + "post_attention_layernorm.weight": norm(d),
            p + "self_attn.q_proj.weight": weight(shape.heads * hd, d),
            p + "self_attn.k_proj.weight": weight(shape.kv_heads * hd, d),
            p + "self_attn.v_proj.weight": weight(shape.kv_heads * hd, d),
            p + "self_attn.o_proj.weight": weight(d, shape.heads * hd),
            p + "self_attn.q_norm.weight": norm(hd),
            p + "self_attn.k_norm.weight": norm(hd),
            p + "mlp.gate.weight": weight(shape.experts, d) * 25,
        }
        for e in range(shape.experts):
            q = f"{p}mlp.experts.{e}."
            tensors[q + "gate_proj.weight"] = weight(ff, d)
            tensors[q + "up_proj.weight"] = weight(ff, d)
            tensors[q + "down_proj.weight"] = weight(d, ff)
        if i == 0:
            tensors["model.embed_tokens.weight"] = weight(shape.vocab, d)
        if i == shape.layers - 1:
            tensors["model.norm.weight"] = norm(d)
            tensors["lm_head.weight"] = weight(shape.vocab, d)
        save_file(tensors, out / shard, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, shard))
        del tensors
        print(f"  wrote {shard}", flush=True)
    index = {"metadata": {}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index, indent=1))
    stamp.write_text(json.dumps(asdict(shape)))
    return out


def checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Child processes: what is measured
# ---------------------------------------------------------------------------------------------


def _status() -> dict[str, int]:
    """/proc/self/status memory lines, in bytes."""
    out = {}
    with open("/proc/self/status") as fh:
        for line in fh:
            key, _, rest = line.partition(":")
            if key in ("VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class _Sampler(threading.Thread):
    """The largest anonymous and file-backed RSS seen, every 10 ms (VmHWM has only the sum)."""

    def __init__(self) -> None:
        super().__init__(daemon=True)
        self.peak = {"RssAnon": 0, "RssFile": 0}
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.wait(0.01):
            s = _status()
            for k in self.peak:
                self.peak[k] = max(self.peak[k], s[k])


def child_baseline() -> dict:
    import edgemoe.pipeline  # noqa: F401  # everything an export imports
    import export.writer  # noqa: F401

    return {"hwm": _status()["VmHWM"], "rss": _status()["VmRSS"]}


def slice_bound(model, plan, threads: int) -> dict[str, int]:
    """Bytes the design allows in flight: (threads + 1) of the largest expert slice (source
    bytes + float32 + quantized bytes) plus the largest dense row block, whose rows are capped
    at one expert slice's weights."""
    import gguf
    import numpy as np

    def source_bytes(name: str, n: int) -> int:  # n elements as stored in the source
        dtype = model.source.dtype(name)
        if dtype == "F8_E4M3":
            return n
        block, size = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType[dtype]]
        return n * size // block

    types = plan.by_name()
    slice_bytes, slice_elems = 0, 0
    for r in model.recipes:
        if r.spec.n_experts:
            n = int(np.prod(r.spec.shape[1:]))
            q = types[r.spec.name].nbytes // r.spec.n_experts
            slice_bytes = max(slice_bytes, source_bytes(r.hf_names[0], n) + 4 * n + q)
            slice_elems = max(slice_elems, n)
    dense = 0
    for r in model.recipes:
        if not r.spec.n_experts:
            n, row = int(np.prod(r.spec.shape)), r.spec.shape[-1]
            n_block = min(n, max(row, slice_elems // row * row))
            q = types[r.spec.name].nbytes * n_block // n
            dense = max(dense, source_bytes(r.hf_names[0], n_block) + 4 * n_block + q)
    return {"slice": slice_bytes, "dense_block": dense,
            "bound": (threads + 1) * slice_bytes + dense}


def child_export(model_dir: str, out: str, type_name: str, threads: int) -> dict:
    from edgemoe import pipeline

    sampler = _Sampler()
    sampler.start()
    rss_imports = _status()["VmRSS"]
    model = pipeline.open_model(model_dir)
    budget = pipeline.make_budget(model.adapter, "1TB", ctx=4096)
    plan, _ = pipeline.make_plan(model, budget, type_name, progress=False)
    rss_ready = _status()["VmRSS"]
    t0 = time.perf_counter()
    pipeline.export(model, plan, out, threads=threads, progress=False)
    seconds = time.perf_counter() - t0
    sampler.stop.set()
    sampler.join()
    s = _status()
    return {"hwm": s["VmHWM"], "rss_end": s["VmRSS"], "rss_imports": rss_imports,
            "rss_ready": rss_ready, "peak_anon": sampler.peak["RssAnon"],
            "peak_file": sampler.peak["RssFile"], "seconds": seconds,
            "tensors": len(model.recipes), **slice_bound(model, plan, threads),
            "types": {t.name: t.type for t in plan.tensors}}


def run_child(*args: str) -> dict:
    proc = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True,
                          text=True, cwd=ROOT)
    if proc.returncode:
        raise RuntimeError(f"child {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------
# Checks of the output
# ---------------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(16 * MB):
            h.update(chunk)
    return h.hexdigest()


def verify(path: Path, types: dict[str, str]) -> str:
    """Tensor names and types read back with gguf-py; the vocabulary loaded by llama.cpp."""
    import gguf

    from edgemoe.llamacpp import tokenize

    reader = gguf.GGUFReader(path)
    got = {t.name: t.tensor_type.name for t in reader.tensors}
    if got != types:
        bad = [n for n in types if got.get(n) != types[n]]
        raise AssertionError(f"{path}: {len(got)} tensors, expected {len(types)}; "
                             f"first mismatches {bad[:3]}")
    ids = tokenize(path, "Mixture-of-experts models route each token.")
    if not ids:
        raise AssertionError(f"{path}: llama.cpp tokenized nothing")
    return f"{len(got)} tensors ok, llama.cpp vocab ok ({len(ids)} tokens)"


# ---------------------------------------------------------------------------------------------
# Driver
# ---------------------------------------------------------------------------------------------


def fmt(n: int) -> str:
    return f"{n / MB:,.0f}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--work", type=Path, default=Path("/tmp/edgemoe-rss"))
    ap.add_argument("--label", default="current", help="key of these runs in the results file")
    ap.add_argument("--types", default="Q8_0,Q4_K", help="types exported from the checkpoint")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--layers", type=int, default=Shape.layers)
    ap.add_argument("--experts", type=int, default=Shape.experts)
    ap.add_argument("--no-gguf-source", dest="gguf_source", action="store_false",
                    help="skip the re-export from a Q8_0 GGUF of the checkpoint")
    ap.add_argument("--keep-outputs", action="store_true")
    args = ap.parse_args()

    shape = Shape(layers=args.layers, experts=args.experts)
    args.work.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint in {args.work / 'model'} ...", flush=True)
    model_dir = build_checkpoint(args.work, shape)
    ckpt = checkpoint_bytes(model_dir)
    base = run_child("baseline")
    print(f"checkpoint {fmt(ckpt)} MB; a child that only imports edgemoe peaks at "
          f"{fmt(base['hwm'])} MB", flush=True)

    threads_list = [int(t) for t in args.threads.split(",")]
    src_gguf = args.work / "source-Q8_0.gguf"  # the GGUF source: this checkpoint in Q8_0
    src_gguf.unlink(missing_ok=True)
    jobs = [("hf", model_dir, t) for t in args.types.split(",") if t]
    if args.gguf_source:
        jobs.append(("gguf", src_gguf, "Q8_0"))
    rows = []
    for source, path, type_name in jobs:
        if source == "gguf" and not src_gguf.is_file():
            run_child("export", str(model_dir), str(src_gguf), "Q8_0", str(max(threads_list)))
        size = checkpoint_bytes(path) if source == "hf" else path.stat().st_size
        digests = set()
        for threads in threads_list:
            out = args.work / f"out-{source}-{type_name}-t{threads}.gguf"
            r = run_child("export", str(path), str(out), type_name, str(threads))
            types = r.pop("types")
            r.update(source=source, type=type_name, threads=threads, checkpoint=size,
                     output=out.stat().st_size, sha256=sha256(out))
            if not digests:  # one check per type: the other thread counts must match it
                r["verified"] = verify(out, types)
            digests.add(r["sha256"])
            keep_as_source = (args.gguf_source and source == "hf" and type_name == "Q8_0"
                              and not src_gguf.is_file())
            if keep_as_source:
                out.rename(src_gguf)
            elif not args.keep_outputs:
                out.unlink()
            rows.append(r)
            print(f"  {source} {type_name} x{threads}: peak {fmt(r['hwm'])} MB, bound "
                  f"{fmt(r['bound'])} MB, {r['seconds']:.1f} s", flush=True)
        if len(digests) != 1:
            raise AssertionError(f"{type_name}: the thread counts wrote different bytes")
    if not args.keep_outputs:
        src_gguf.unlink(missing_ok=True)

    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {"runs": {}}
    same: dict[tuple, set[str]] = {}
    for label, run in results["runs"].items():
        if label != args.label and run.get("shape") == asdict(shape):
            for r in run["rows"]:
                key = (r.get("source", "hf"), r["type"], r["sha256"])
                same.setdefault(key, set()).add(label)
    for r in rows:
        r["same_bytes_as"] = sorted(same.get((r["source"], r["type"], r["sha256"]), ()))

    head = (f"{'src':<5}{'type':<6}{'thr':>4}{'in MB':>7}{'out MB':>8}{'peak MB':>9}{'base MB':>9}"
            f"{'peak-base':>10}{'bound MB':>9}{'anon MB':>9}{'file MB':>9}{'wall s':>8}")
    print(f"\n[{args.label}]")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['source']:<5}{r['type']:<6}{r['threads']:>4}{fmt(r['checkpoint']):>7}"
              f"{fmt(r['output']):>8}"
              f"{fmt(r['hwm']):>9}{fmt(base['hwm']):>9}{fmt(r['hwm'] - base['hwm']):>10}"
              f"{fmt(r['bound']):>9}{fmt(r['peak_anon']):>9}{fmt(r['peak_file']):>9}"
              f"{r['seconds']:>8.1f}")
    for r in rows:
        what = f"{r['source']} {r['type']} x{r['threads']}"
        if "verified" in r:
            print(f"{what}: {r['verified']}")
        if r["same_bytes_as"]:
            print(f"{what}: same bytes as under {', '.join(r['same_bytes_as'])}")

    meta = {"python": platform.python_version(), "cpus": os.cpu_count(),
            "machine": platform.machine()}
    results["meta"] = meta
    results["runs"][args.label] = {"shape": asdict(shape), "baseline": base, "rows": rows}
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {RESULTS.relative_to(ROOT)}")


def child_main(argv: list[str]) -> None:
    if argv[0] == "baseline":
        result = child_baseline()
    else:
        model_dir, out, type_name, threads = argv[1:]
        result = child_export(model_dir, out, type_name, int(threads))
    print(json.dumps(result))


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child_main(sys.argv[2:])
    else:
        main()
