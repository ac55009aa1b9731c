"""export.tokenizer: GGUF vocabularies that llama.cpp loads and that tokenize like transformers.

Each fixture tokenizer (Qwen2-style and GPT-2-style byte-level BPE, SentencePiece BPE) is
written into a tensor-less GGUF and opened with `Llama(vocab_only=True)`: llama.cpp then
reads only `general.architecture` and the tokenizer keys (it skips hyperparameters and
tensors), so no model is needed. Token ids must equal transformers' exactly.

Known upstream differences, tested as such (xfail(strict=True) marks what does not hold):
- SentencePiece text that starts with whitespace: transformers 5 (tokenizers' Metaspace)
  skips the "▁" prefix when the text already starts with a space; SentencePiece and
  llama.cpp always add it. llama.cpp agrees with SentencePiece.
- tokenizer_config.json legacy=false: transformers adds "▁" only at the start of the text,
  llama.cpp also after every special token. The fixtures use legacy=true, which matches.
- Qwen2's NFC normalizer: llama.cpp does not normalize; identical for NFC input.
- llama.cpp's "gpt-2" pre-tokenizer cleans spaces in llama_detokenize (" ." -> "."), as
  transformers 4 did; transformers 5 never cleans BPE output. token_to_piece is exact.
"""

from __future__ import annotations

import ast
import ctypes
import json
import re
import shutil
import sysconfig
import unicodedata
from pathlib import Path

import gguf
import pytest

from export.pretokenizer import (
    PRE_TOKENIZERS,
    TokenizerError,
    canonical_regex,
    recognise_pre_tokenizer,
    split_regexes,
)
from export.tokenizer import add_tokenizer, write_vocab_gguf
from tests.conftest import BUNDLED_MODEL
from tests.llama_tools import llama_cpp_file
from tests.tokenizer_fixtures import (
    MULTILINGUAL,
    PROSE,
    QWEN2_REGEX,
    make_bpe_tokenizer,
    make_spm_tokenizer,
)

ROOT = Path(__file__).resolve().parents[1]
K = gguf.Keys.Tokenizer

CODE = (
    "import os\n"
    "\n"
    "class Cache(dict):\n"
    '    """A dict that counts its misses."""\n'
    "\n"
    "    def __missing__(self, key):\n"
    "        self.misses = getattr(self, 'misses', 0) + 1\n"
    "        return key * 2  # 0x1F, 1e-3, 10_000\n"
    "\n\n"
    "def tabs(lines):\n"
    "\tfor i, line in enumerate(lines):\n"
    "\t\tif line.strip():\n"
    "\t\t\tyield f'{i:>4}: {line!r}'\t# aligned\n"
    "\n"
    "if __name__ == '__main__':\n"
    "    print(list(tabs(['a', '', '  b  '])), os.sep)   \n"
    "        \n"
    "x = [1,2 ,3]  ;  y = {'k': (4, 5)}\r\n"
)
# Real code the fixture tokenizers were not trained on.
UNSEEN_CODE = (Path(sysconfig.get_paths()["stdlib"]) / "json" / "encoder.py").read_text(
    encoding="utf-8")[:5000]
ENGLISH = PROSE + (
    "Isn't it odd? On 2024-02-29, 17 of 250 runs (6.8%) failed; the rest passed in 3.5 s.\n"
    "\"Well,\" she said, 'it's fine!!' -- then left... at 11:59 p.m. I'LL BE BACK, he'd said."
)
NON_ASCII = MULTILINGUAL + (
    "Ещё раз: съешь же ещё этих булок. Crème brûlée à la française coûte 7,50 €.\n"
    "北京欢迎你，東京タワー、ソウル 서울. Ελληνικά! 🚀🚀 👩‍💻 🇫🇷 café ☕"
)
TEXTS = {"python": CODE, "stdlib": UNSEEN_CODE, "english": ENGLISH, "non_ascii": NON_ASCII}
STYLES = ("qwen2", "gpt2", "spm")
SPECIAL_TEXTS = ("<unk>", "<s>", "</s>", "<|endoftext|>", "<|im_start|>", "<|im_end|>")


def test_sample_texts_are_plain():
    """No special-token text (transformers would parse it), NFC, no leading whitespace."""
    for name, text in TEXTS.items():
        assert not any(s in text for s in SPECIAL_TEXTS), name
        assert unicodedata.is_normalized("NFC", text), name
        assert not text[0].isspace(), name


# --- helpers --------------------------------------------------------------------------------

def open_vocab(path: Path):
    llama_cpp = pytest.importorskip("llama_cpp")
    return llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)


def llama_detokenize(llm, ids: list[int], remove_special: bool = False) -> str:
    """llama.cpp's own detokenizer (llama_detokenize), as llama-server uses it."""
    import llama_cpp

    arr = (llama_cpp.llama_token * len(ids))(*ids)
    size = 64 * len(ids) + 64
    buf = ctypes.create_string_buffer(size)
    n = llama_cpp.llama_detokenize(llm._model.vocab, arr, len(ids), buf, size,
                                   remove_special, False)
    assert 0 <= n <= size
    return buf.raw[:n].decode("utf-8")


def field(reader: gguf.GGUFReader, key: str):
    f = reader.get_field(key)
    return None if f is None else f.contents()


class Vocab:
    def __init__(self, style: str, model_dir: Path, gguf_path: Path, info):
        from transformers import AutoTokenizer

        self.style, self.model_dir, self.path, self.info = style, model_dir, gguf_path, info
        self.hf = AutoTokenizer.from_pretrained(model_dir)
        self.llm = open_vocab(gguf_path)
        self.reader = gguf.GGUFReader(gguf_path)

    def llama(self, text: str, add: bool, special: bool = False) -> list[int]:
        return self.llm.tokenize(text.encode("utf-8"), add_bos=add, special=special)

    def hf_ids(self, text: str, add: bool) -> list[int]:
        return self.hf(text, add_special_tokens=add)["input_ids"]


@pytest.fixture(scope="module")
def tok_dirs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tokenizers")
    return {
        "qwen2": make_bpe_tokenizer(root / "qwen2", style="qwen2"),
        "gpt2": make_bpe_tokenizer(root / "gpt2", style="gpt2"),
        "spm": make_spm_tokenizer(root / "spm"),
    }


@pytest.fixture(scope="module", params=STYLES)
def vocab(request, tok_dirs, tmp_path_factory) -> Vocab:
    pytest.importorskip("llama_cpp")
    style = request.param
    path = tmp_path_factory.mktemp("gguf") / f"{style}.gguf"
    info = write_vocab_gguf(tok_dirs[style], path)
    return Vocab(style, tok_dirs[style], path, info)


# --- llama.cpp against transformers ----------------------------------------------------------

@pytest.mark.parametrize("add_special", [False, True])
@pytest.mark.parametrize("text_name", list(TEXTS))
def test_llama_cpp_tokenizes_like_transformers(vocab, text_name, add_special):
    text = TEXTS[text_name]
    want = vocab.hf_ids(text, add_special)
    got = vocab.llama(text, add_special)
    assert got == want
    # merges are really exercised: fewer tokens than UTF-8 bytes, and for non-ASCII text
    # tokens that hold whole multi-byte characters
    assert len(got) < {"non_ascii": 0.85}.get(text_name, 0.7) * len(text.encode("utf-8"))
    if text_name == "non_ascii":
        pieces = [vocab.hf.decode([t]).strip() for t in got]
        whole = [p for p in pieces if not p.isascii() and "\ufffd" not in p]
        assert len(whole) >= 20


@pytest.mark.parametrize("text_name", list(TEXTS))
def test_detokenize_round_trip(vocab, text_name):
    text = TEXTS[text_name]
    plain = vocab.llama(text, add=False)
    assert vocab.hf.decode(plain) == text
    # token_to_piece, piece by piece (llama-cpp-python drops the SPM prefix space after BOS)
    assert vocab.llm.detokenize(vocab.llama(text, add=True)).decode("utf-8") == text
    if vocab.info.pre == "gpt-2":
        # llama.cpp's gpt-2 clean-up removes spaces before punctuation; nothing else changes
        got = llama_detokenize(vocab.llm, plain)
        assert got.replace(" ", "") == text.replace(" ", "")
    else:
        assert llama_detokenize(vocab.llm, plain) == text


def test_metadata_read_back(vocab):
    r, hf = vocab.reader, vocab.hf
    n = len(hf)
    assert vocab.info.n_tokens == n == vocab.llm.n_vocab()
    tokens, types = field(r, K.LIST), field(r, K.TOKEN_TYPE)
    assert len(tokens) == len(types) == n
    assert field(r, K.ADD_BOS) is (vocab.style == "spm")
    assert field(r, K.ADD_EOS) is False
    assert field(r, K.CHAT_TEMPLATE) == hf.chat_template
    assert vocab.llm.metadata["tokenizer.chat_template"] == hf.chat_template
    assert field(r, K.EOS_ID) == hf.eos_token_id == vocab.llm.token_eos()
    for tid in set(hf.all_special_ids) - {hf.unk_token_id}:
        assert types[tid] == gguf.TokenType.CONTROL, tokens[tid]
    if vocab.style == "spm":
        assert (field(r, K.MODEL), field(r, K.PRE)) == ("llama", "default")
        assert field(r, K.BOS_ID) == hf.bos_token_id == vocab.llm.token_bos() == 1
        assert field(r, K.UNK_ID) == hf.unk_token_id == 0
        assert types[0] == gguf.TokenType.UNKNOWN
        assert tokens[3:259] == [f"<0x{b:02X}>" for b in range(256)]
        assert set(types[3:259]) == {gguf.TokenType.BYTE}
        assert len(field(r, K.SCORES)) == n
        assert field(r, K.ADD_PREFIX) is True
    else:
        assert field(r, K.MODEL) == "gpt2"
        assert field(r, K.PRE) == {"qwen2": "qwen2", "gpt2": "gpt-2"}[vocab.style]
        assert field(r, K.PAD_ID) == hf.pad_token_id
        # no BOS in the tokenizer: named after EOS (GPT-2's convention), never added
        assert hf.bos_token_id is None and field(r, K.BOS_ID) == field(r, K.EOS_ID)
        tj = json.loads((vocab.model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        assert len(field(r, K.MERGES)) == len(tj["model"]["merges"])
        assert tokens[-3:] == ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


def test_special_tokens_parsed_like_transformers(vocab):
    if vocab.style == "spm":
        text = "Hello</s>world and [INST] more</s>[INST] text"
    else:
        text = "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n"
    assert vocab.llama(text, add=True, special=True) == vocab.hf_ids(text, True)
    # special=False: llama.cpp tokenizes the marker as text
    assert vocab.llama(text, add=False, special=False) != vocab.hf_ids(text, False)


def test_vocab_padded_to_embedding_rows(tok_dirs, tmp_path):
    path = tmp_path / "padded.gguf"
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tok_dirs["qwen2"])
    info = write_vocab_gguf(tok_dirs["qwen2"], path, vocab_size=len(hf) + 6, arch="qwen3moe")
    assert info.n_tokens == len(hf) + 6
    r = gguf.GGUFReader(path)
    tokens, types = field(r, K.LIST), field(r, K.TOKEN_TYPE)
    assert tokens[-6:] == [f"[PAD{i}]" for i in range(len(hf), len(hf) + 6)]
    assert set(types[-6:]) == {gguf.TokenType.UNUSED}
    llm = open_vocab(path)
    assert llm.n_vocab() == len(hf) + 6
    assert llm.tokenize(ENGLISH.encode(), add_bos=False, special=False) == hf(ENGLISH)["input_ids"]


def test_spm_padded_with_scores(tok_dirs, tmp_path):
    info = write_vocab_gguf(tok_dirs["spm"], tmp_path / "p.gguf", vocab_size=1003)
    r = gguf.GGUFReader(tmp_path / "p.gguf")
    assert info.n_tokens == len(field(r, K.SCORES)) == len(field(r, K.LIST)) == 1003
    assert field(r, K.LIST)[-1] == "[PAD1002]"


# --- documented differences --------------------------------------------------------------

LEADING_SPACE = ("  leading spaces", " x = 1", "    return x\n")


@pytest.mark.parametrize("text", LEADING_SPACE)
def test_spm_leading_whitespace_follows_sentencepiece(vocab, text):
    """llama.cpp, like SentencePiece itself, always prefixes "▁" (add_dummy_prefix)."""
    if vocab.style != "spm":
        assert vocab.llama(text, add=False) == vocab.hf_ids(text, False)
        return
    import sentencepiece as spm

    sp = spm.SentencePieceProcessor(model_file=str(vocab.model_dir / "tokenizer.model"))
    assert vocab.llama(text, add=False) == sp.encode(text)


@pytest.mark.xfail(strict=True, reason="transformers 5 (tokenizers Metaspace) adds no '▁' "
                   "prefix to text that already starts with a space; SentencePiece does")
def test_spm_leading_whitespace_transformers(tok_dirs, tmp_path):
    write_vocab_gguf(tok_dirs["spm"], tmp_path / "spm.gguf")
    v = Vocab("spm", tok_dirs["spm"], tmp_path / "spm.gguf", None)
    assert v.llama(" x = 1", add=True) == v.hf_ids(" x = 1", True)


@pytest.mark.xfail(strict=True, reason="legacy=false: transformers adds '▁' only at the start "
                   "of the text, llama.cpp also after each special token")
def test_spm_legacy_false_after_special_token(tok_dirs, tmp_path):
    d = tmp_path / "spm_legacy_false"
    shutil.copytree(tok_dirs["spm"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "legacy": False}))
    write_vocab_gguf(d, tmp_path / "spm.gguf")
    v = Vocab("spm", d, tmp_path / "spm.gguf", None)
    assert v.llama("Hello</s>world", add=True, special=True) == v.hf_ids("Hello</s>world", True)


def test_qwen2_nfc_input_only(tok_dirs, tmp_path):
    """Qwen2 normalizes to NFC, llama.cpp does not: equal once the input is NFC."""
    write_vocab_gguf(tok_dirs["qwen2"], tmp_path / "q.gguf")
    v = Vocab("qwen2", tok_dirs["qwen2"], tmp_path / "q.gguf", None)
    nfd = unicodedata.normalize("NFD", "Crème brûlée, Ångström, café")
    assert v.llama(unicodedata.normalize("NFC", nfd), add=False) == v.hf_ids(nfd, False)
    assert v.llama(nfd, add=False) != v.hf_ids(nfd, False)


# --- special tokens from the other config files -----------------------------------------

def test_special_token_sources(tok_dirs, tmp_path):
    d = tmp_path / "q"
    shutil.copytree(tok_dirs["qwen2"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    del cfg["eos_token"]
    (d / "tokenizer_config.json").write_text(json.dumps(cfg))
    (d / "special_tokens_map.json").write_text(json.dumps(
        {"eos_token": {"content": "<|endoftext|>", "special": True}}))
    (d / "config.json").write_text(json.dumps({"bos_token_id": 1021, "pad_token_id": 5}))
    (d / "generation_config.json").write_text(json.dumps({"eos_token_id": [1021, 1023]}))
    write_vocab_gguf(d, tmp_path / "q.gguf")
    r = gguf.GGUFReader(tmp_path / "q.gguf")
    assert field(r, K.EOS_ID) == 1021  # special_tokens_map.json
    assert field(r, K.BOS_ID) == 1021  # config.json
    assert field(r, K.PAD_ID) == 1021  # tokenizer_config.json beats config.json
    assert field(r, K.EOT_ID) == 1023  # generation_config stop id used by the chat template


def test_add_bos_flag_from_tokenizer_config(tok_dirs, tmp_path):
    d = tmp_path / "spm"
    shutil.copytree(tok_dirs["spm"], d)
    cfg = json.loads((d / "tokenizer_config.json").read_text())
    (d / "tokenizer_config.json").write_text(json.dumps({**cfg, "add_bos_token": False,
                                                         "add_eos_token": True}))
    write_vocab_gguf(d, tmp_path / "s.gguf")
    v = Vocab("spm", d, tmp_path / "s.gguf", None)
    assert (field(v.reader, K.ADD_BOS), field(v.reader, K.ADD_EOS)) == (False, True)
    assert v.llama(ENGLISH, add=True) == v.hf_ids(ENGLISH, True)
    assert v.llama(ENGLISH, add=True)[-1] == 2


# --- errors --------------------------------------------------------------------------------

def _edit_pre_tokenizer(src: Path, dst: Path, pre_tokenizer: dict) -> Path:
    shutil.copytree(src, dst)
    tj = json.loads((dst / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = pre_tokenizer
    (dst / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    return dst


def test_unknown_pre_tokenizer_regex_raises(tok_dirs, tmp_path):
    odd = r"\p{L}+|\p{N}{1,2}|[^\s\p{L}\p{N}]+|\s+"
    d = _edit_pre_tokenizer(tok_dirs["qwen2"], tmp_path / "odd", {
        "type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": odd}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
             "use_regex": False}]})
    with pytest.raises(TokenizerError, match="not known to llama.cpp") as e:
        add_tokenizer(gguf.GGUFWriter(None, "llama"), d)
    assert repr(odd) in str(e.value)


def test_missing_tokenizer_files_raise(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "model.safetensors").write_bytes(b"")
    with pytest.raises(TokenizerError, match="no tokenizer found") as e:
        add_tokenizer(gguf.GGUFWriter(None, "llama"), tmp_path)
    assert "config.json, model.safetensors" in str(e.value)


def test_unsupported_tokenizer_json_raises(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    with pytest.raises(TokenizerError, match="WordLevel tokenizer"):
        add_tokenizer(gguf.GGUFWriter(None, "llama"), tmp_path)


def test_vocab_larger_than_model_raises(tok_dirs):
    with pytest.raises(TokenizerError, match="1024 tokens but the model has only 1000"):
        add_tokenizer(gguf.GGUFWriter(None, "llama"), tok_dirs["qwen2"], vocab_size=1000)


def test_writer_past_header_raises(tok_dirs, tmp_path):
    w = gguf.GGUFWriter(None, "llama")
    w.write_header_to_file(tmp_path / "x.gguf")
    with pytest.raises(ValueError, match="before its header"):
        add_tokenizer(w, tok_dirs["qwen2"])
    w.close()


@pytest.mark.parametrize("step, message", [
    ({"type": "Split", "pattern": {"Regex": r"\s+"}, "behavior": "Removed", "invert": False},
     "only isolates"),
    ({"type": "ByteLevel", "add_prefix_space": True, "use_regex": True}, "prefix space"),
    ({"type": "Whitespace"}, "'Whitespace' has no llama.cpp equivalent"),
])
def test_unsupported_pre_tokenizer_steps(step, message):
    with pytest.raises(TokenizerError, match=message):
        split_regexes(step)


# --- recognising pre-tokenizers from their regexes ---------------------------------------

def _bytelevel(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
            "use_regex": use_regex}


def _split(rx: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": rx}, "behavior": "Isolated", "invert": False}


LLAMA3_HF = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
             r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")
# DeepSeek-V3's tokenizer.json, after json.load: literal CR/LF inside the classes.
DEEPSEEK_V3_HF = [
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
]
GPT4O_HF = (r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
            r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+"
            r"[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?|\p{N}{1,3}"
            r"| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+")


@pytest.mark.parametrize("pre_tokenizer, ignore_merges, name", [
    (_bytelevel(True), False, "gpt-2"),
    ({"type": "Sequence", "pretokenizers": [_split(QWEN2_REGEX), _bytelevel(False)]}, False,
     "qwen2"),
    ({"type": "Sequence", "pretokenizers": [_split(LLAMA3_HF), _bytelevel(False)]}, True,
     "llama-bpe"),
    ({"type": "Sequence", "pretokenizers": [_split(LLAMA3_HF), _bytelevel(False)]}, False,
     "dbrx"),
    ({"type": "Sequence", "pretokenizers": [*map(_split, DEEPSEEK_V3_HF), _bytelevel(False)]},
     False, "deepseek-v3"),
    ({"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                            _bytelevel(True)]}, False, "starcoder"),
    ({"type": "Sequence", "pretokenizers": [_split(GPT4O_HF), _bytelevel(False)]}, False,
     "gpt-4o"),
])
def test_recognise_pre_tokenizer(pre_tokenizer, ignore_merges, name):
    assert recognise_pre_tokenizer(split_regexes(pre_tokenizer), ignore_merges) == name


def test_canonical_regex_expands_case_insensitive_groups():
    assert canonical_regex(r"'(?i:[sdmt]|ll|ve|re)|\p{L}+") == (
        r"'(?:[sSdDmMtT]|[lL][lL]|[vV][eE]|[rR][eE])|\p{L}+")
    assert canonical_regex("[\r\n]+") == r"[\r\n]+"


def _cpp_strings(code: str) -> tuple[str, ...]:
    lines = [ln for ln in code.splitlines() if not ln.strip().startswith("//")]
    return tuple(ast.literal_eval('"' + s + '"')
                 for s in re.findall(r'"((?:[^"\\]|\\.)*)"', "\n".join(lines)))


def test_table_matches_llama_cpp_source():
    """Every name in PRE_TOKENIZERS runs exactly our regexes in the pinned llama.cpp source:
    the sdist of the installed llama-cpp-python (tests/llama_tools.py fetches it, or set
    EDGEMOE_LLAMA_SDIST to a copy)."""
    src = llama_cpp_file("src/llama-vocab.cpp").read_text(encoding="utf-8")
    ctor = src[src.index("llm_tokenizer_bpe(const llama_vocab & vocab)"):]
    ctor = ctor[:ctor.index("std::vector<std::string> regex_exprs;")]
    regexes = {}
    for m in re.finditer(r"((?:\s*case LLAMA_VOCAB_PRE_TYPE_\w+:)+)\s*(?://[^\n]*\n\s*)*"
                         r"regex_exprs = \{(.*?)\};", ctor, re.S):
        for case in re.findall(r"LLAMA_VOCAB_PRE_TYPE_(\w+)", m.group(1)):
            regexes[case] = _cpp_strings(m.group(2))
    load = src[src.index("void llama_vocab::impl::load"):]
    names = {}
    for m in re.finditer(r"if \(\s*((?:tokenizer_pre == \"[^\"]+\"\s*(?:\|\|\s*)?)+)\)\s*\{\s*"
                         r"pre_type = LLAMA_VOCAB_PRE_TYPE_(\w+);(.*?)\}", load, re.S):
        for name in re.findall(r'"([^"]+)"', m.group(1)):
            names[name] = (m.group(2), "ignore_merges = true" in m.group(3))
    for p in PRE_TOKENIZERS:
        case, ignore_merges = names[p.name]
        assert tuple(map(canonical_regex, regexes[case])) == tuple(
            map(canonical_regex, p.regexes)), p.name
        assert ignore_merges == p.ignore_merges, p.name


# --- the bundled model --------------------------------------------------------------------

@pytest.mark.parametrize("add_special", [False, True])
def test_bundled_model_tokenizer(tmp_path, add_special):
    config_file = BUNDLED_MODEL / "config.json"
    n_vocab = json.loads(config_file.read_text())["vocab_size"] if config_file.is_file() else None
    info = write_vocab_gguf(BUNDLED_MODEL, tmp_path / "b.gguf", vocab_size=n_vocab)
    assert info.model == "gpt2" and info.pre == "qwen2"
    v = Vocab("bundled", BUNDLED_MODEL, tmp_path / "b.gguf", info)
    for name, text in TEXTS.items():
        ids = v.hf_ids(text, add_special)
        assert v.llama(text, add_special) == ids, name
        assert v.llm.detokenize(ids).decode("utf-8") == text, name
