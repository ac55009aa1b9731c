"""Small real tokenizers trained in-process, for tests that need a model directory.

`make_bpe_tokenizer` builds a byte-level BPE (Qwen2 split regex or GPT-2 ByteLevel regex) and
`make_spm_tokenizer` a SentencePiece BPE with byte fallback laid out like Llama / Mixtral.
Both train on Python standard-library source plus the prose and non-ASCII text below, so the
merges cover code, English and several scripts. Each takes about a second.
"""

from __future__ import annotations

import io
import json
import sysconfig
from pathlib import Path

# Source files present in every CPython >= 3.10; a few hundred KB of real code.
_STDLIB_FILES = (
    "textwrap.py", "argparse.py", "dataclasses.py", "functools.py", "string.py", "csv.py",
    "difflib.py", "pprint.py", "heapq.py", "fractions.py", "shlex.py", "tokenize.py",
)

PROSE = """\
The quick brown fox jumps over the lazy dog. It wasn't the first time: in 1998, 2004 and
again on 12 March 2021 the same fox -- a rather clever one -- crossed the road at 7:45 a.m.
"Why?" asked Dr. Smith, who'd measured 3.14159 metres of fence (about 10.3 ft) & counted 42
posts. Prices rose 12.5% to $1,234.56; we'll see if they're right. I'm sure you've heard it.
Mixture-of-experts models route each token to a few experts; the rest stay idle.
"""

MULTILINGUAL = """\
Café, naïve, façade, résumé, Ångström, Zürich, São Paulo, smörgåsbord, jalapeño, cañón.
Привет, как дела? Москва — столица России. Съешь же ещё этих мягких французских булок.
日本語のテキストです。東京は日本の首都です。我想在苹果公司工作。你好，世界！
한국어 문장입니다. 안녕하세요. Γειά σου Κόσμε. שלום עולם. مرحبا بالعالم. नमस्ते दुनिया।
Emoji: 🚀 ✅ 🦙🦙 😀 👍🏽 ❤️ 🎉 — and symbols: € £ ¥ © ® ™ ∑ ∞ ≤ ≥ → ←.
"""

TABBED_CODE = """\
def tabbed(x):
\tif x > 0:
\t\treturn x\t# positive
\treturn -x

all:\n\tgcc -O2 -o main main.c\t\t# build
"""

CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)

LLAMA2_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{% else %}{{ ' ' + message['content'] + eos_token }}{% endif %}{% endfor %}"
)

# Qwen2's split regex, as published in Qwen2/Qwen3 tokenizer.json files.
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

BPE_SPECIAL_TOKENS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")


def training_texts() -> list[str]:
    """Documents used to train the fixture tokenizers (stdlib source, prose, non-ASCII)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    texts = [(stdlib / name).read_text(encoding="utf-8") for name in _STDLIB_FILES]
    # Repeat the short samples so their merges make it into a small vocabulary. (Other tests
    # are calibrated on the vocabulary this exact mix gives: changing it shifts their ids.)
    return texts + [PROSE, MULTILINGUAL, TABBED_CODE] * 20


def make_bpe_tokenizer(out_dir: Path, style: str = "qwen2", vocab_size: int = 1024) -> Path:
    """Train a byte-level BPE and save it with `save_pretrained`; return `out_dir`.

    style "qwen2": Split(Qwen2 regex) + ByteLevel(use_regex=False) with an NFC normalizer, as in
    Qwen2/Qwen3 checkpoints. style "gpt2": ByteLevel(use_regex=True), as in GPT-2.
    Special tokens follow the base vocabulary (ids vocab_size-3 ...), as in Qwen.
    """
    from tokenizers import (
        Regex,
        Tokenizer,
        decoders,
        models,
        normalizers,
        pre_tokenizers,
        processors,
        trainers,
    )
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    if style == "qwen2":
        tok.normalizer = normalizers.NFC()
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(QWEN2_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif style == "gpt2":
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    else:
        raise ValueError(f"unknown style {style!r}: expected 'qwen2' or 'gpt2'")
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)

    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - len(BPE_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(training_texts(), trainer)
    tok.add_special_tokens(list(BPE_SPECIAL_TOKENS))

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        unk_token=None,
        clean_up_tokenization_spaces=False,
        chat_template=CHATML_TEMPLATE,
        model_max_length=4096,
    )
    out_dir = Path(out_dir)
    hf.save_pretrained(out_dir)
    return out_dir


def make_spm_tokenizer(out_dir: Path, vocab_size: int = 1000) -> Path:
    """Train a SentencePiece BPE model with byte fallback, laid out like Llama / Mixtral.

    Writes `tokenizer.model` and a `tokenizer_config.json` naming `LlamaTokenizer`, so
    `AutoTokenizer.from_pretrained(out_dir)` loads it offline. Return `out_dir`.
    """
    import sentencepiece as spm

    lines = [line for text in training_texts() for line in text.splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines),
        model_writer=model,
        model_type="bpe",
        vocab_size=vocab_size,
        # Llama / Mistral trainer settings: byte fallback, digits split, whitespace kept.
        byte_fallback=True,
        split_digits=True,
        allow_whitespace_only_pieces=True,
        remove_extra_whitespaces=False,
        normalization_rule_name="identity",
        add_dummy_prefix=True,
        character_coverage=0.9995,
        unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
        num_threads=1,
        minloglevel=2,
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "tokenizer.model").write_bytes(model.getvalue())

    specials = {"0": "<unk>", "1": "<s>", "2": "</s>"}
    config = {
        "tokenizer_class": "LlamaTokenizer",
        "add_bos_token": True,
        "add_eos_token": False,
        # legacy=True: Metaspace prepends "▁" to every text section, also after a special
        # token. That is what llama.cpp's SPM tokenizer does (see tests/test_tokenizer.py).
        "legacy": True,
        "add_prefix_space": None,
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "pad_token": None,
        "clean_up_tokenization_spaces": False,
        "model_max_length": 4096,
        "chat_template": LLAMA2_TEMPLATE,
        "added_tokens_decoder": {
            tid: {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                  "single_word": False, "special": True}
            for tid, content in specials.items()
        },
    }
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")
    return out_dir
