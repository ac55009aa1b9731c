"""Train edgemoe's bundled reference model, `models/stdlib-moe/`, on the Python standard library.

A tiny Qwen3-MoE (4 layers, 8 experts, top-2, ~9.2M parameters) with its own 4096-token
byte-level BPE, small enough to ship in the repository (< 20 MB in bfloat16) and real enough
that quantization, expert pruning and llama.cpp validation show measurable effects: it is
trained, not random, so held-out perplexity moves when the exporter damages it.

Stages, each leaving a file in the output folder:
  1. data        stdlib *.py split by path hash -> heldout.txt, calib.txt
  2. tokenizer   byte-level BPE with Qwen2's pre-tokenizer -> tokenizer.json, tokenizer_config.json
  3. training    AdamW, warmup + cosine over a wall-clock budget (--minutes) or fixed --steps
  4. saving      bfloat16 safetensors + config.json + generation_config.json
  5. evaluation  held-out perplexity vs a unigram baseline, expert usage -> training_report.json
  6. model card  README.md, written from the report so the numbers cannot drift

Usage:
  python scripts/train_default_model.py --minutes 1 --out /tmp/stdlib-moe-smoke   # smoke test
  python scripts/train_default_model.py --minutes 30                              # the real one
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import math
import os
import random
import sysconfig
import time
from pathlib import Path

# Everything is built locally; never let transformers reach for the hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
# On a shared machine spinning OpenMP workers stall on a descheduled peer at every barrier
# (measured: ~5 s/step instead of ~2.7 s/step next to another busy process).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers  # noqa: E402
from tqdm import tqdm  # noqa: E402
from tqdm.contrib.logging import logging_redirect_tqdm  # noqa: E402
from transformers import (  # noqa: E402
    AutoModelForCausalLM,
    AutoTokenizer,
    GenerationConfig,
    PreTrainedTokenizerFast,
    Qwen3MoeConfig,
    Qwen3MoeForCausalLM,
)

log = logging.getLogger("train_default_model")

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "models" / "stdlib-moe"

# Qwen2's split pattern, so llama.cpp's "qwen2" pre-tokenizer matches ours exactly.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
END_OF_TEXT = "<|endoftext|>"
SPECIAL_TOKENS = [END_OF_TEXT, "<|im_start|>", "<|im_end|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

HELDOUT_PERCENT = 2  # of files, chosen by path hash
HELDOUT_BYTES = 150_000
HELDOUT_BYTES_PER_FILE = 12_000  # many files rather than one long one
CALIB_BYTES = 50_000
CALIB_BYTES_PER_FILE = 4_000
MAX_FOLDER_BYTES = 20_000_000
# Greedy smoke prompts. A prompt ending in a space ends on a lone " " token, which in
# training mostly precedes digits, so "def " alone shows the tokenizer's seam, not the model.
SAMPLE_PROMPTS = ["def ", "class ", "import os\n\n\ndef main():\n"]


# ----------------------------------------------------------------------------- 1. data


def _path_hash(rel: str, salt: str) -> int:
    return int(hashlib.sha256(f"{salt}:{rel}".encode()).hexdigest(), 16)


def is_heldout(rel: str) -> bool:
    """Deterministic ~2% split on the path relative to the stdlib root."""
    return _path_hash(rel, "split") % 100 < HELDOUT_PERCENT


def read_stdlib() -> dict[str, str]:
    """All stdlib *.py files (not site-packages) as {relative path: text}, sorted by path."""
    root = Path(sysconfig.get_paths()["stdlib"])
    paths = sorted(
        p for p in root.rglob("*.py") if "site-packages" not in p.relative_to(root).parts
    )
    sources: dict[str, str] = {}
    skipped = []
    for p in paths:
        rel = p.relative_to(root).as_posix()
        try:
            sources[rel] = p.read_bytes().decode("utf-8")
        except UnicodeDecodeError:  # a few test files are deliberately not UTF-8
            skipped.append(rel)
    log.info(
        "read %d stdlib files (%.1f MB) from %s; skipped %d not UTF-8: %s",
        len(sources), sum(len(t) for t in sources.values()) / 1e6, root,
        len(skipped), ", ".join(skipped),
    )
    return sources


def _head(text: str, max_chars: int) -> str:
    """At most max_chars of text, cut at a line boundary."""
    if len(text) <= max_chars:
        return text
    cut = text.rfind("\n", 0, max_chars)
    return text[: cut + 1] if cut > 0 else text[:max_chars]


def is_generated_codec(text: str) -> bool:
    """encodings/*.py charmap tables written by gencodec.py: near-copies of one another."""
    return "gencodec.py" in text[:300]


def _sample_text(texts: list[str], per_file: int, total: int) -> str:
    parts: list[str] = []
    size = 0
    for text in texts:
        if is_generated_codec(text):  # a held-out codec table is all but in the train set
            continue
        part = _head(text, min(per_file, total - size)).strip("\n")
        if part:
            parts.append(part + "\n")
            size += len(part) + 2
        if size >= total - 200:
            break
    return "\n".join(parts)


def split_data(sources: dict[str, str], out: Path) -> tuple[list[str], dict]:
    """Write heldout.txt and calib.txt; return the train texts and a summary."""
    train = {rel: t for rel, t in sources.items() if not is_heldout(rel)}
    heldout = {rel: t for rel, t in sources.items() if is_heldout(rel)}

    heldout_text = _sample_text(list(heldout.values()), HELDOUT_BYTES_PER_FILE, HELDOUT_BYTES)
    # Calibration comes from train files in a hash order of their own, so it is spread over
    # the library and never overlaps the held-out text.
    calib_order = sorted(train, key=lambda rel: _path_hash(rel, "calib"))
    calib_text = _sample_text([train[r] for r in calib_order], CALIB_BYTES_PER_FILE, CALIB_BYTES)

    (out / "heldout.txt").write_text(heldout_text, encoding="utf-8")
    (out / "calib.txt").write_text(calib_text, encoding="utf-8")
    summary = {
        "source": f"Python {sysconfig.get_python_version()} standard library *.py",
        "train_files": len(train),
        "heldout_files": len(heldout),
        "train_chars": sum(len(t) for t in train.values()),
        "heldout_txt_chars": len(heldout_text),
        "calib_txt_chars": len(calib_text),
        "heldout_file_list": sorted(heldout),
        "heldout_codec_tables_skipped": sum(is_generated_codec(t) for t in heldout.values()),
    }
    log.info(
        "split: %d train files, %d held out; heldout.txt %d chars, calib.txt %d chars",
        len(train), len(heldout), len(heldout_text), len(calib_text),
    )
    return list(train.values()), summary


# ----------------------------------------------------------------------------- 2. tokenizer


def train_tokenizer(texts: list[str], vocab_size: int, out: Path) -> PreTrainedTokenizerFast:
    """Byte-level BPE with Qwen2's pre-tokenizer, saved so AutoTokenizer loads it offline."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte representable
        min_frequency=2,
        show_progress=True,
    )
    tok.train_from_iterator(texts, trainer, length=len(texts))
    if tok.get_vocab_size() != vocab_size:
        raise RuntimeError(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {vocab_size}")

    hf_tok = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token=END_OF_TEXT,  # what the model emits between files
        pad_token=END_OF_TEXT,
        unk_token=None,
        model_max_length=2048,
        chat_template=CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )
    hf_tok.save_pretrained(out)
    log.info("tokenizer: %d tokens, saved to %s", tok.get_vocab_size(), out)
    return hf_tok


def encode_stream(tok: PreTrainedTokenizerFast, texts: list[str]) -> np.ndarray:
    """All train files as one token stream, <|endoftext|> between files."""
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    encoded = tok.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
    stream = np.fromiter(
        (i for enc in encoded for i in (*enc.ids, eot)), dtype=np.int32
    )
    log.info("train stream: %d tokens (%.2f chars/token)", len(stream),
             sum(len(t) for t in texts) / len(stream))
    return stream


# ----------------------------------------------------------------------------- 3. training


def build_config(tok: PreTrainedTokenizerFast, args: argparse.Namespace) -> Qwen3MoeConfig:
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    return Qwen3MoeConfig(
        vocab_size=len(tok),
        hidden_size=256,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        num_experts=8,
        num_experts_per_tok=2,
        moe_intermediate_size=256,  # a multiple of 256, so K-quants apply to down_proj rows
        intermediate_size=512,
        norm_topk_prob=True,  # llama.cpp's qwen3moe always renormalises the top-k weights
        tie_word_embeddings=False,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        output_router_logits=True,  # adds the load-balancing loss: keeps all experts in use
        router_aux_loss_coef=args.aux_loss_coef,
        bos_token_id=eot,
        eos_token_id=eot,
        pad_token_id=eot,
    )


def lr_at(progress: float, peak: float, warmup: float) -> float:
    """Linear warmup over the first `warmup` fraction, then cosine down to 10% of peak."""
    if progress < warmup:
        return peak * max(progress, 1e-3) / warmup
    t = min(1.0, (progress - warmup) / (1.0 - warmup))
    return peak * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * t)))


def layer_balance_loss(router_logits: tuple[torch.Tensor, ...], top_k: int) -> torch.Tensor:
    """Switch-style load-balancing loss per MoE layer, averaged over layers; 1.0 when even.

    transformers' own aux loss pools the selections of all layers before multiplying, so one
    layer can starve an expert while the pooled counts look even (our first run left two of
    layer 1's experts with under 0.1% of the picks). Balancing each layer prevents that.
    """
    losses = []
    for logits in router_logits:  # (tokens, experts), one per layer
        n_experts = logits.shape[-1]
        probs = logits.float().softmax(dim=-1)
        picks = torch.nn.functional.one_hot(probs.topk(top_k, dim=-1).indices, n_experts)
        picked_share = picks.float().sum(dim=1).mean(dim=0) / top_k  # sums to 1
        losses.append(n_experts * (picked_share * probs.mean(dim=0)).sum())
    return torch.stack(losses).mean()


def train(model: Qwen3MoeForCausalLM, stream: np.ndarray, args: argparse.Namespace) -> dict:
    """Train on random windows of the stream until the time or step budget is spent.

    Progress (for the schedule) is elapsed/budget when training by time, so a machine shared
    with other jobs still gets a full warmup and decay, just fewer steps.
    """
    rng = np.random.default_rng(args.seed)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
        lr=args.lr, betas=(0.9, 0.95),
    )
    budget_s = args.minutes * 60.0
    model.train()
    step = 0
    lm_losses: list[float] = []
    aux_losses: list[float] = []
    ema = None
    start = time.monotonic()
    bar = tqdm(total=args.steps or int(budget_s), unit="step" if args.steps else "s",
               desc="train (steps)" if args.steps else "train (seconds)", mininterval=5.0)
    while True:
        elapsed = time.monotonic() - start
        progress = step / args.steps if args.steps else elapsed / budget_s
        if progress >= 1.0:
            break
        lr = lr_at(progress, args.lr, args.warmup)
        for group in opt.param_groups:
            group["lr"] = lr

        starts = rng.integers(0, len(stream) - args.seq_len, size=args.batch_size)
        batch = np.stack([stream[s : s + args.seq_len] for s in starts]).astype(np.int64)
        batch = torch.from_numpy(batch)
        # No labels: transformers would add its pooled aux loss; we add a per-layer one instead.
        out = model(input_ids=batch, output_router_logits=True)
        lm_loss = torch.nn.functional.cross_entropy(
            out.logits[:, :-1].flatten(0, 1).float(), batch[:, 1:].flatten()
        )
        balance = layer_balance_loss(out.router_logits, model.config.num_experts_per_tok)
        opt.zero_grad(set_to_none=True)
        (lm_loss + args.aux_loss_coef * balance).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()

        lm, aux = lm_loss.item(), balance.item()
        lm_losses.append(lm)
        aux_losses.append(aux)
        ema = lm if ema is None else 0.98 * ema + 0.02 * lm
        step += 1
        bar.set_postfix(loss=f"{ema:.3f}", balance=f"{aux:.3f}", lr=f"{lr:.2e}", step=step,
                        refresh=False)  # the bar redraws on its own every mininterval
        bar.update(1 if args.steps else int(time.monotonic() - start) - bar.n)
        if step % args.log_every == 0:
            log.info("step %d  loss %.4f (ema %.4f)  balance %.4f  lr %.2e  %.0fs",
                     step, lm, ema, aux, lr, time.monotonic() - start)
    bar.close()
    minutes = (time.monotonic() - start) / 60.0
    tail = lm_losses[-50:]
    stats = {
        "steps": step,
        "tokens_seen": step * args.batch_size * args.seq_len,
        "train_minutes": round(minutes, 2),
        "final_train_loss": round(float(np.mean(tail)), 4),  # mean LM loss, last 50 steps
        "final_balance_loss": round(float(np.mean(aux_losses[-50:])), 4),  # 1.0 = even
        "first_train_loss": round(lm_losses[0], 4),
    }
    log.info("trained %d steps, %d tokens in %.1f min; final loss %.4f",
             step, stats["tokens_seen"], minutes, stats["final_train_loss"])
    return stats


# ----------------------------------------------------------------------------- 4/5. eval


def eval_windows(ids: np.ndarray, seq_len: int) -> np.ndarray:
    """Non-overlapping windows (the tail shorter than seq_len is dropped)."""
    n_windows = len(ids) // seq_len
    return ids[: n_windows * seq_len].reshape(n_windows, seq_len).astype(np.int64)


@torch.no_grad()
def evaluate(model, ids: np.ndarray, seq_len: int, batch_size: int = 8) -> dict:
    """Token-level perplexity over non-overlapping windows, and top-k expert usage per layer."""
    model.eval()
    windows = torch.from_numpy(eval_windows(ids, seq_len))
    n_windows = len(windows)
    cfg = model.config
    counts = np.zeros((cfg.num_hidden_layers, cfg.num_experts), dtype=np.int64)
    nll_sum, n_pred = 0.0, 0
    for i in tqdm(range(0, n_windows, batch_size), desc="eval", mininterval=5.0):
        batch = windows[i : i + batch_size]
        out = model(input_ids=batch, output_router_logits=True)
        logp = torch.log_softmax(out.logits[:, :-1].float(), dim=-1)
        nll_sum -= logp.gather(-1, batch[:, 1:, None]).sum().item()
        n_pred += batch[:, 1:].numel()
        for layer, logits in enumerate(out.router_logits):  # (tokens, experts) per layer
            top = torch.topk(logits, cfg.num_experts_per_tok, dim=-1).indices
            counts[layer] += np.bincount(top.flatten().numpy(), minlength=cfg.num_experts)
    shares = counts / counts.sum(axis=1, keepdims=True)
    usage = [
        {
            "layer": layer,
            "share": [round(float(s), 4) for s in row],
            "max_share": round(float(row.max()), 4),
            "min_share": round(float(row.min()), 4),
            "cv": round(float(row.std() / row.mean()), 4),
        }
        for layer, row in enumerate(shares)
    ]
    return {"ppl": math.exp(nll_sum / n_pred), "predicted_tokens": n_pred,
            "windows": n_windows, "expert_usage": usage}


def unigram_ppl(train_stream: np.ndarray, ids: np.ndarray, seq_len: int, vocab_size: int) -> float:
    """Add-one-smoothed train-token frequencies, scored on the tokens `evaluate` predicts."""
    counts = np.bincount(train_stream, minlength=vocab_size).astype(np.float64)
    logp = np.log((counts + 1.0) / (counts.sum() + vocab_size))
    targets = eval_windows(ids, seq_len)[:, 1:]
    return float(math.exp(-logp[targets].mean()))


def save_model(model: Qwen3MoeForCausalLM, tok: PreTrainedTokenizerFast, out: Path) -> None:
    """bfloat16 safetensors, an inference config and a greedy generation config."""
    eot = tok.convert_tokens_to_ids(END_OF_TEXT)
    model.config.output_router_logits = False  # the aux loss is a training-time term
    model.generation_config = GenerationConfig(
        bos_token_id=eot, eos_token_id=eot, pad_token_id=eot, do_sample=False,
        max_new_tokens=128,
    )
    model.to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    # transformers 5 writes num_local_experts and rope_parameters; official Qwen3-MoE
    # checkpoints (and older converters) use num_experts and rope_theta. Write both.
    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config.setdefault("num_experts", model.config.num_experts)
    config.setdefault("rope_theta", model.config.rope_parameters["rope_theta"])
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    log.info("saved bfloat16 model to %s", out)


def folder_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


# ----------------------------------------------------------------------------- 6. model card


def write_model_card(report: dict, out: Path) -> None:
    c, t, e, d = report["config"], report["training"], report["eval"], report["data"]
    samples = "\n".join(
        f"```python\n{text.rstrip()}\n```" for text in report["sample_generations"].values()
    )
    usage_rows = "\n".join(
        f"| {u['layer']} | {u['max_share']:.3f} | {u['min_share']:.3f} | {u['cv']:.3f} |"
        for u in e["expert_usage"]
    )
    card = f"""# stdlib-moe

edgemoe's bundled reference model: a tiny Qwen3-MoE trained from scratch on the Python
standard library. It is here so the exporter, planner and llama.cpp validation can be tested
end to end on a real, trained Mixture-of-Experts model that fits in the repository.
It writes Python-looking code; it is not useful as a language model.

## Data
{d['source']}: {d['train_files']} train files, {d['train_chars'] / 1e6:.1f} M characters.
A hash of each file's path holds out {d['heldout_files']} files ({HELDOUT_PERCENT}%).
- `heldout.txt`: up to 12 KB from each held-out file, {d['heldout_txt_chars']} characters.
  Every number below is measured on it.
- `calib.txt`: up to 4 KB from each of a hash-ordered sample of *train* files,
  {d['calib_txt_chars']} characters, for calibration statistics (imatrix, expert usage).
- Neither text includes the charmap tables `gencodec.py` generated in `encodings/`: they are
  near-copies of one another, so a held-out one would flatter the perplexity.

## Tokenizer
Byte-level BPE with {c['vocab_size']} tokens, including `<|endoftext|>`, `<|im_start|>` and
`<|im_end|>`. Qwen2's pre-tokenizer split pattern (llama.cpp pre-tokenizer `qwen2`),
no normalizer, all 256 bytes in the base alphabet.
`<|endoftext|>` separates files in training and is the eos and pad token.
A plain ChatML chat template is included but was not used in training.

## Architecture
`Qwen3MoeForCausalLM`, {c['parameters'] / 1e6:.2f} M parameters, stored in bfloat16.
- hidden size {c['hidden_size']}, {c['num_hidden_layers']} layers
- attention: {c['num_attention_heads']} query heads, {c['num_key_value_heads']} KV heads, \
head dim {c['head_dim']}, RoPE theta {c['rope_theta']:g}, context {c['max_position_embeddings']}
- MoE: {c['num_experts']} experts, top-{c['num_experts_per_tok']} routing with \
`norm_topk_prob=true`, expert FFN size {c['moe_intermediate_size']}
- untied input and output embeddings

## Training
- AdamW, peak lr {t['lr']:g}, warmup then cosine decay to 10%, seed {t['seed']}
- {t['batch_size']} random windows of {t['seq_len']} tokens per step; \
per-layer load-balancing loss weight {t['aux_loss_coef']}
- {t['steps']} steps, {t['tokens_seen'] / 1e6:.1f} M tokens \
({t['epochs']:.2f} epochs of the {t['train_stream_tokens'] / 1e6:.1f} M-token train stream)
- {t['train_minutes']:.1f} minutes on 2 shared CPU cores; final train loss \
{t['final_train_loss']:.3f}

## Measured
From `training_report.json`, with the weights as saved (bfloat16).

| | held-out perplexity |
|---|---|
| this model | **{e['heldout_ppl']:.2f}** |
| unigram baseline (train token frequencies, add-one) | {e['unigram_ppl']:.2f} |

{e['predicted_tokens']} predicted tokens in {e['windows']} non-overlapping windows of \
{t['seq_len']} tokens; {e['heldout_bytes_per_token']:.2f} bytes per token, so \
{e['heldout_bits_per_byte']:.3f} bits per byte.
Before rounding to bfloat16 the held-out perplexity was {e['heldout_ppl_fp32']:.2f}.

Expert usage on the held-out text, as each expert's share of the \
top-{c['num_experts_per_tok']} selections (perfectly even: {1 / c['num_experts']:.3f} each, CV 0):

| layer | max share | min share | CV |
|---|---|---|---|
{usage_rows}

Greedy continuations (48 tokens) of three prompts:
{samples}

## Retrain
```
python scripts/train_default_model.py --minutes 30
```
The schedule follows the wall-clock budget, so the step count depends on the machine;
pass `--steps N` for a run that repeats exactly.
"""
    (out / "README.md").write_text(card, encoding="utf-8")


# ----------------------------------------------------------------------------- main


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="output model folder")
    parser.add_argument("--minutes", type=float, default=30.0, help="training time budget")
    parser.add_argument("--steps", type=int, default=0,
                        help="train exactly this many steps instead of by time (reproducible)")
    parser.add_argument("--vocab-size", type=int, default=4096)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--warmup", type=float, default=0.03,
                        help="fraction of the budget spent warming up")
    parser.add_argument("--aux-loss-coef", type=float, default=0.01)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--log-every", type=int, default=100)
    args = parser.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    wall_start = time.monotonic()
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    with logging_redirect_tqdm():
        train_texts, data_summary = split_data(read_stdlib(), out)
        tok = train_tokenizer(train_texts, args.vocab_size, out)
        stream = encode_stream(tok, train_texts)

        config = build_config(tok, args)
        model = Qwen3MoeForCausalLM(config)
        n_params = sum(p.numel() for p in model.parameters())
        log.info("model: %.2f M parameters", n_params / 1e6)
        train_stats = train(model, stream, args)

        heldout_text = (out / "heldout.txt").read_text(encoding="utf-8")
        heldout_ids = np.array(
            tok.backend_tokenizer.encode(heldout_text, add_special_tokens=False).ids
        )
        fp32_eval = evaluate(model, heldout_ids, args.seq_len)
        log.info("held-out ppl (fp32 weights): %.3f", fp32_eval["ppl"])

        save_model(model, tok, out)
        del model

        # Everything below uses the folder as shipped, loaded the way users will load it.
        loaded_tok = AutoTokenizer.from_pretrained(out)
        loaded = AutoModelForCausalLM.from_pretrained(out, dtype=torch.bfloat16)
        loaded = loaded.float()  # bf16-rounded weights, fp32 arithmetic (as a GGUF F32 path)
        if loaded_tok("def f(x):\n")["input_ids"] != tok("def f(x):\n")["input_ids"]:
            raise RuntimeError("reloaded tokenizer encodes differently from the trained one")
        shipped = evaluate(loaded, heldout_ids, args.seq_len)
        unigram = unigram_ppl(stream, heldout_ids, args.seq_len, len(tok))

        samples = {}
        for prompt in SAMPLE_PROMPTS:
            ids = loaded_tok(prompt, return_tensors="pt")
            gen = loaded.generate(**ids, max_new_tokens=48, do_sample=False)
            samples[prompt] = loaded_tok.decode(gen[0], skip_special_tokens=False)
            log.info("greedy sample:\n%s", samples[prompt])

    heldout_bytes = len(heldout_text.encode("utf-8"))
    report = {
        "config": {
            "model_type": config.model_type,
            "parameters": n_params,
            **{k: getattr(config, k) for k in (
                "vocab_size", "hidden_size", "num_hidden_layers", "num_attention_heads",
                "num_key_value_heads", "head_dim", "num_experts", "num_experts_per_tok",
                "moe_intermediate_size", "intermediate_size", "norm_topk_prob",
                "tie_word_embeddings", "max_position_embeddings")},
            "rope_theta": config.rope_parameters["rope_theta"],
            "dtype": "bfloat16",
        },
        "data": data_summary,
        "training": {
            **train_stats,
            "epochs": train_stats["tokens_seen"] / len(stream),
            "train_stream_tokens": int(len(stream)),
            "lr": args.lr, "warmup_fraction": args.warmup, "batch_size": args.batch_size,
            "seq_len": args.seq_len, "aux_loss_coef": args.aux_loss_coef, "seed": args.seed,
            "threads": args.threads, "minutes_budget": args.minutes, "steps_budget": args.steps,
        },
        "eval": {
            "heldout_ppl": round(shipped["ppl"], 3),
            "heldout_ppl_fp32": round(fp32_eval["ppl"], 3),
            "unigram_ppl": round(unigram, 3),
            "ppl_ratio_unigram_over_model": round(unigram / shipped["ppl"], 2),
            "predicted_tokens": shipped["predicted_tokens"],
            "windows": shipped["windows"],
            "heldout_tokens": int(len(heldout_ids)),
            "heldout_bytes_per_token": heldout_bytes / len(heldout_ids),
            "heldout_bits_per_byte": math.log2(shipped["ppl"]) * len(heldout_ids) / heldout_bytes,
            "expert_usage": shipped["expert_usage"],
        },
        "sample_generations": samples,
        "wall_minutes": round((time.monotonic() - wall_start) / 60.0, 2),
    }
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    write_model_card(report, out)

    size = folder_bytes(out)
    report["folder_bytes"] = size
    (out / "training_report.json").write_text(json.dumps(report, indent=2) + "\n")
    log.info("held-out ppl %.2f vs unigram %.2f (%.1fx better); folder %.2f MB",
             shipped["ppl"], unigram, unigram / shipped["ppl"], size / 1e6)
    if size > MAX_FOLDER_BYTES:
        log.error("%s is %.2f MB, over the %.0f MB limit; retrain with --vocab-size 3072",
                  out, size / 1e6, MAX_FOLDER_BYTES / 1e6)
        return 1
    if unigram / shipped["ppl"] < 2.0:
        log.warning("held-out perplexity %.2f is not clearly below the unigram baseline %.2f",
                    shipped["ppl"], unigram)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
