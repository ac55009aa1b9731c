"""Write a Hugging Face tokenizer into a GGUF file, the way llama.cpp reads it back.

Two vocabularies are supported, the two that MoE checkpoints ship:
- byte-level BPE (`tokenizer.json`, as in Qwen, DeepSeek, Llama 3, gpt-oss): llama.cpp's
  "gpt2" model. Its pre-tokenizer name (`tokenizer.ggml.pre`) is recognised from the split
  regexes in `tokenizer.json`, compared with the regexes llama.cpp uses for each name
  (src/llama-vocab.cpp), not from a hash of sample output (export.pretokenizer).
- SentencePiece BPE (`tokenizer.model`, as in Mixtral and Llama 2): llama.cpp's "llama"
  model, with scores and piece types from the SentencePiece model proto.

Special token ids, add_bos/add_eos and the chat template come from tokenizer_config.json,
special_tokens_map.json, config.json and generation_config.json.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
from gguf.gguf_writer import WriterState

from .pretokenizer import TokenizerError, recognise_pre_tokenizer, split_regexes
from .reads import read_json

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenizerInfo:
    """What `add_tokenizer` wrote: llama.cpp tokenizer model, pre-tokenizer, vocabulary size."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    pre: str  # tokenizer.ggml.pre
    n_tokens: int  # including padding up to the model's embedding rows


# --- vocabularies --------------------------------------------------------------------------

@dataclass
class _Vocab:
    model: str  # "gpt2" | "llama"
    pre: str
    tokens: list[str]
    types: list[int]
    scores: list[float] | None = None
    add_space_prefix: bool | None = None
    remove_extra_whitespaces: bool | None = None
    default_add_bos: bool = False


def _read_json(path: Path) -> dict | None:
    return read_json(path) if path.is_file() else None


def _is_byte_level(tok_json: Mapping) -> bool:
    def has_byte_level(node) -> bool:
        if not node:
            return False
        if node.get("type") == "ByteLevel":
            return True
        children = node.get("pretokenizers") or node.get("decoders") or []
        return any(has_byte_level(c) for c in children)

    return (tok_json.get("model", {}).get("type") == "BPE"
            and has_byte_level(tok_json.get("pre_tokenizer"))
            and has_byte_level(tok_json.get("decoder")))


def _check_normalizer(normalizer: Mapping | None) -> None:
    """llama.cpp's BPE path does not normalize: accept only Unicode normal forms."""
    steps = [] if not normalizer else (
        normalizer.get("normalizers") or [] if normalizer.get("type") == "Sequence"
        else [normalizer])
    for step in steps:
        kind = step.get("type")
        if kind in ("NFC", "NFKC", "NFD", "NFKD"):
            log.info("tokenizer normalizes text to %s, llama.cpp does not: tokens are identical "
                     "for %s-normalized input", kind, kind)
        else:
            raise TokenizerError(f"tokenizer.json normalizer {kind!r} has no llama.cpp equivalent")


def _byte_level_bpe(tok_json: Mapping) -> _Vocab:
    model = tok_json["model"]
    for key in ("continuing_subword_prefix", "end_of_word_suffix"):
        if model.get(key):
            raise TokenizerError(f"BPE {key}={model[key]!r} is not supported by llama.cpp")
    if model.get("byte_fallback"):
        raise TokenizerError("byte-level BPE with byte_fallback is not supported by llama.cpp")
    _check_normalizer(tok_json.get("normalizer"))
    pre = recognise_pre_tokenizer(split_regexes(tok_json.get("pre_tokenizer")),
                                  ignore_merges=bool(model.get("ignore_merges")))

    by_id: dict[int, tuple[str, int]] = {
        i: (t, gguf.TokenType.NORMAL) for t, i in model["vocab"].items()}
    for added in tok_json.get("added_tokens") or []:
        kind = gguf.TokenType.CONTROL if added.get("special") else gguf.TokenType.USER_DEFINED
        by_id[added["id"]] = (added["content"], kind)
    tokens, types = _dense(by_id)
    return _Vocab("gpt2", pre, tokens, types)


def _dense(by_id: Mapping[int, tuple[str, int]]) -> tuple[list[str], list[int]]:
    """Tokens and types in id order; ids nobody uses become UNUSED "[PAD{id}]" tokens."""
    n = max(by_id) + 1
    pairs = [by_id.get(i, (f"[PAD{i}]", gguf.TokenType.UNUSED)) for i in range(n)]
    return [p[0] for p in pairs], [int(p[1]) for p in pairs]


def _sentencepiece(model_dir: Path, tok_json: Mapping | None) -> _Vocab:
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    proto = sp_pb2.ModelProto()
    try:
        proto.ParseFromString((model_dir / "tokenizer.model").read_bytes())
    except Exception as e:  # protobuf raises its own DecodeError
        raise TokenizerError(
            f"{model_dir / 'tokenizer.model'} is not a SentencePiece model ({e}); "
            "tiktoken-style tokenizer.model files are not supported") from e
    trainer, norm = proto.trainer_spec, proto.normalizer_spec
    if trainer.model_type != sp_pb2.TrainerSpec.BPE:
        kind = sp_pb2.TrainerSpec.ModelType.Name(trainer.model_type)
        raise TokenizerError(f"SentencePiece {kind} model: llama.cpp's 'llama' tokenizer "
                             "reproduces SentencePiece BPE models only")
    if trainer.treat_whitespace_as_suffix:
        raise TokenizerError("SentencePiece treat_whitespace_as_suffix is not supported")
    if norm.name not in ("identity", ""):
        log.warning("SentencePiece normalizer %r is not applied by llama.cpp: tokens are "
                    "identical only for text the normalizer leaves unchanged", norm.name)
    if norm.remove_extra_whitespaces:
        log.warning("SentencePiece remove_extra_whitespaces=True: llama.cpp's SPM tokenizer (and "
                    "transformers 5) keep repeated spaces, SentencePiece collapses them")

    piece_type = sp_pb2.ModelProto.SentencePiece.Type.Name
    tokens = [p.piece for p in proto.pieces]
    scores = [p.score for p in proto.pieces]
    types = [int(gguf.TokenType[piece_type(p.type)]) for p in proto.pieces]

    # Added tokens that the proto does not hold (ids past its end, or a different text).
    config = _read_json(model_dir / "tokenizer_config.json") or {}
    added = {int(i): t for i, t in config.get("added_tokens_decoder", {}).items()}
    for t in (tok_json or {}).get("added_tokens") or []:
        added.setdefault(t["id"], t)
    for tid in sorted(added):
        content, special = added[tid]["content"], added[tid].get("special", False)
        if tid < len(tokens) and tokens[tid] == content:
            continue
        kind = gguf.TokenType.CONTROL if special else gguf.TokenType.USER_DEFINED
        if not special:  # llama.cpp matches user-defined tokens on raw text, spaces unescaped
            content = content.replace("\u2581", " ")
        if tid < len(tokens):
            log.warning("token %d: %r replaced by added token %r", tid, tokens[tid], content)
        else:
            missing = tid + 1 - len(tokens)
            tokens += [f"[PAD{i}]" for i in range(len(tokens), tid + 1)]
            scores += [-1000.0] * missing
            types += [int(gguf.TokenType.UNUSED)] * missing
        tokens[tid], scores[tid], types[tid] = content, -1000.0, int(kind)

    add_prefix = config.get("add_prefix_space")
    if not isinstance(add_prefix, bool):
        add_prefix = norm.add_dummy_prefix
    if add_prefix and config.get("legacy") is not True:
        log.warning("tokenizer_config.json has no legacy=true: transformers then adds the '\u2581' "
                    "prefix only at the start of the text, llama.cpp also after each special token")
    if not isinstance(config.get("add_bos_token"), bool) and not (tok_json or {}).get(
            "post_processor"):
        log.warning("tokenizer_config.json does not set add_bos_token: writing add_bos=true "
                    "(SentencePiece models are trained with BOS; transformers 5 adds none)")
    return _Vocab("llama", "default", tokens, types, scores=scores, add_space_prefix=add_prefix,
                  remove_extra_whitespaces=norm.remove_extra_whitespaces, default_add_bos=True)


# --- special tokens ------------------------------------------------------------------------

# Special token kinds with a GGUF key (gguf.Keys.Tokenizer.*_ID) and a GGUFWriter method.
_SPECIAL_TYPES = ("bos", "eos", "unk", "sep", "pad", "mask")


def _token_content(entry) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, Mapping) and isinstance(entry.get("content"), str):
        return entry["content"]
    return None


def _ids(value) -> list[int]:
    if isinstance(value, bool):
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def _special_token_ids(model_dir: Path, tokens: Sequence[str], chat_template) -> dict[str, int]:
    """Special token ids: named tokens in tokenizer_config.json / special_tokens_map.json
    first (what transformers uses), then *_token_id in config.json / generation_config.json."""
    token_to_id = {t: i for i, t in enumerate(tokens)}
    tok_cfg = _read_json(model_dir / "tokenizer_config.json") or {}
    st_map = _read_json(model_dir / "special_tokens_map.json") or {}
    config = _read_json(model_dir / "config.json") or {}
    gen = _read_json(model_dir / "generation_config.json") or {}
    by_id_sources = (config, config.get("text_config") or {}, gen)

    ids: dict[str, int] = {}
    for typ in _SPECIAL_TYPES:
        named = [c for c in (_token_content(s.get(f"{typ}_token")) for s in (tok_cfg, st_map))
                 if c is not None]
        for content in named:
            if content in token_to_id:
                ids[typ] = token_to_id[content]
                break
            log.warning("%s_token %r is not in the vocabulary", typ, content)
        if typ in ids:
            continue
        for source in by_id_sources:
            found = [i for i in _ids(source.get(f"{typ}_token_id")) if 0 <= i < len(tokens)]
            if found:
                ids[typ] = found[0]
                break

    # generation_config may list more stop ids than the tokenizer's eos: the one that ends a
    # chat turn (it appears in the chat template) becomes llama.cpp's end-of-turn token.
    templates = [chat_template] if isinstance(chat_template, str) else [
        t.get("template", "") for t in chat_template or []]
    for tid in _ids(gen.get("eos_token_id")):
        if (tid != ids.get("eos") and 0 <= tid < len(tokens)
                and any(tokens[tid] in t for t in templates)):
            ids["eot"] = tid
            break
    return ids


# --- entry point ---------------------------------------------------------------------------

def _describe_files(model_dir: Path) -> str:
    if not model_dir.is_dir():
        return f"{model_dir} is not a directory"
    names = sorted(p.name for p in model_dir.iterdir() if p.is_file())
    shown = ", ".join(names[:20]) + (f" and {len(names) - 20} more" if len(names) > 20 else "")
    return f"files in {model_dir}: {shown or 'none'}"


def _load_vocab(model_dir: Path) -> _Vocab:
    tok_json = _read_json(model_dir / "tokenizer.json")
    if tok_json is not None and _is_byte_level(tok_json):
        return _byte_level_bpe(tok_json)
    if (model_dir / "tokenizer.model").is_file():
        return _sentencepiece(model_dir, tok_json)
    if tok_json is not None:
        model = tok_json.get("model", {}).get("type")
        raise TokenizerError(
            f"{model_dir / 'tokenizer.json'} is a {model} tokenizer without a byte-level "
            "pre-tokenizer and decoder, and there is no tokenizer.model: only byte-level BPE "
            f"and SentencePiece BPE are supported ({_describe_files(model_dir)})")
    raise TokenizerError("no tokenizer found: need tokenizer.json (byte-level BPE) or "
                         f"tokenizer.model (SentencePiece); {_describe_files(model_dir)}")


def add_tokenizer(writer: gguf.GGUFWriter, model_dir: Path, vocab_size: int | None = None,
                  special_defaults: Mapping[str, str] | None = None) -> TokenizerInfo:
    """Write the tokenizer of the HF checkpoint in `model_dir` into `writer`'s metadata.

    `vocab_size` is the number of embedding rows: the vocabulary is padded up to it with
    UNUSED "[PAD{i}]" tokens, as llama.cpp's converter does. `special_defaults` names, by
    content, special tokens (kind -> token) a family's converter sets where the tokenizer
    files name none (GLM's [gMASK] BOS, say). Must run before the header is
    written. Raises TokenizerError when the tokenizer is missing or llama.cpp cannot run it.
    """
    if writer.state not in (WriterState.NO_FILE, WriterState.EMPTY):
        raise ValueError(f"add_tokenizer needs a writer before its header, not in {writer.state}")
    model_dir = Path(model_dir)
    vocab = _load_vocab(model_dir)
    tokens, types, scores = vocab.tokens, vocab.types, vocab.scores

    if vocab_size is not None:
        if vocab_size < len(tokens):
            raise TokenizerError(
                f"the tokenizer has {len(tokens)} tokens but the model has only {vocab_size} "
                "embedding rows")
        for i in range(len(tokens), vocab_size):
            tokens.append(f"[PAD{i}]")
            types.append(int(gguf.TokenType.UNUSED))
            if scores is not None:
                scores.append(-1000.0)
    first: dict[str, int] = {}
    for i, t in enumerate(tokens):
        if first.setdefault(t, i) != i:
            raise TokenizerError(f"tokens {first[t]} and {i} are both {t!r}: llama.cpp needs "
                                 "unique token texts")

    special = gguf.SpecialVocab(model_dir, load_merges=vocab.model == "gpt2",
                                special_token_types=_SPECIAL_TYPES, n_vocab=len(tokens))
    if vocab.model == "gpt2" and not special.merges:
        raise TokenizerError(f"no BPE merges in {model_dir / 'tokenizer.json'}")
    template_file = model_dir / "chat_template.jinja"
    if special.chat_template is None and template_file.is_file():
        # SpecialVocab only looks for it next to a tokenizer_config.json
        special.chat_template = template_file.read_text(encoding="utf-8")
    ids = _special_token_ids(model_dir, tokens, special.chat_template)
    for typ, content in (special_defaults or {}).items():
        if typ not in ids and content in first:
            ids[typ] = first[content]
    # add_bos/add_eos: tokenizer_config.json's flags, else tokenizer.json's TemplateProcessing
    # (both read by SpecialVocab, in transformers' order), else the tokenizer class default.
    add = {"bos": vocab.default_add_bos, "eos": False, **special.add_special_token}
    for typ in ("bos", "eos"):
        if add[typ] and typ not in ids:
            log.warning("add_%s_token is set but there is no %s token: not adding one", typ, typ)
            add[typ] = False
    if vocab.model == "gpt2" and "bos" not in ids and "eos" in ids:
        # llama.cpp falls back to id 11 for a BPE vocab without BOS; GPT-2's convention is
        # bos = eos. add_bos stays false, so this only names the token.
        ids["bos"] = ids["eos"]
    special.special_token_ids = ids
    special.add_special_token = add

    writer.add_tokenizer_model(vocab.model)
    writer.add_tokenizer_pre(vocab.pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    if scores is not None:
        writer.add_token_scores(scores)
    if vocab.add_space_prefix is not None:
        writer.add_add_space_prefix(vocab.add_space_prefix)
    if vocab.remove_extra_whitespaces is not None:
        writer.add_remove_extra_whitespaces(vocab.remove_extra_whitespaces)
    special.add_to_gguf(writer, quiet=True)  # merges, special ids, add_bos/eos, chat template

    log.info("tokenizer: %s, pre %r, %d tokens, special %s, add %s", vocab.model, vocab.pre,
             len(tokens), ids, add)
    return TokenizerInfo(model=vocab.model, pre=vocab.pre, n_tokens=len(tokens))


def write_vocab_gguf(model_dir: Path, path: Path, vocab_size: int | None = None,
                     arch: str = "llama") -> TokenizerInfo:
    """A GGUF holding only `general.architecture` and the tokenizer of the HF checkpoint in
    `model_dir`: llama.cpp opens it vocabulary-only (`vocab_only`), reading no
    hyperparameters and no tensors, and tokenizes as it would the exported model."""
    w = gguf.GGUFWriter(path=None, arch=arch)
    info = add_tokenizer(w, model_dir, vocab_size=vocab_size)
    w.write_header_to_file(path)
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    w.close()
    return info
