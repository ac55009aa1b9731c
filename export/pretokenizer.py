"""Which llama.cpp pre-tokenizer a Hugging Face tokenizer.json splits text like.

llama.cpp names each pre-tokenizer it implements (`tokenizer.ggml.pre`) and runs fixed
regexes for it (src/llama-vocab.cpp). A tokenizer.json's split steps are read as regexes
(`split_regexes`), normalised (`canonical_regex`) and compared with those of every name
(`recognise_pre_tokenizer`): the name comes from the regexes, not from a hash of sample
output.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

log = logging.getLogger(__name__)


class TokenizerError(ValueError):
    """The tokenizer is missing, or llama.cpp cannot reproduce it."""


@dataclass(frozen=True)
class _PreTokenizer:
    name: str  # value of tokenizer.ggml.pre
    regexes: tuple[str, ...]  # the split regexes llama.cpp runs for this name, in order
    # tokenizer.json spellings that llama.cpp documents as the source of a rewritten regex
    hf_regexes: tuple[tuple[str, ...], ...] = ()
    ignore_merges: bool = False  # llama.cpp looks up whole words in the vocab before merging


# GPT-2's regex. tokenizers' ByteLevel(use_regex=True) ends it with "|\s+"; llama.cpp leaves
# that alternative out because its hand-written GPT-2 splitter (src/unicode.cpp) implements it.
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_HF_BYTELEVEL = _GPT2 + r"|\s+"
_CONTRACTIONS = r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_DEEPSEEK3 = (
    r"\p{N}{1,3}",
    "[一-龥\u3040-ゟ゠-ヿ]+",
    r"""[!"#$%&'()*+,\-./:;<=>?@\[\\\]^_`{|}~][A-Za-z]+|[^\r\n\p{L}\p{P}\p{S}]?[\p{L}\p{M}]+"""
    r"| ?[\p{P}\p{S}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+",
)
_CJK_DEEPSEEK = "[一-龥ࠀ-一가-\ud7ff]+"
_DEEPSEEK_LLM = (  # letters outside NFC written as escapes, so no editor can normalize them
    r"[\r\n]",
    r"\s?[A-Za-zµÀ-ÖØ-öø-ƺƼ-ƿǄ-ʓʕ-ʯͰ-ͳͶͷͻ-ͽͿΆΈ-ΊΌΎ-ΡΣ-ϵϷ-ҁҊ-ԯԱ-ՖႠ-ჅᎠ-Ᏽᏸ-ᏽᲐ-ᲺᲽ-Ჿᴀ-ᴫᵫ-ᵷᵹ-ᶚḀ-ἕἘ-Ἕ"
    "ἠ-ὅὈ-Ὅὐ-ὗὙὛὝὟ-\u1f7dᾀ-ᾴᾶ-ᾼ\u1fbeῂ-ῄῆ-ῌῐ-\u1fd3ῖ-\u1fdbῠ-Ῥῲ-ῴῶ-ῼℂℇℊ-ℓℕℙ-ℝℤ\u2126ℨ\u212a-ℭℯ-ℴℹℼ-ℿ"
    "ⅅ-ⅉⅎↃↄⰀ-ⱻⱾ-ⳤⳫ-ⳮⳲⳳꙀ-ꙭꚀ-ꚛꜢ-ꝯꝱ-ꞇꞋ-ꞎꭰ-ꮿﬀ-ﬆﬓ-ﬗＡ-Ｚａ-ｚ𐐀-𐑏𐒰-𐓓𐓘-𐓻𐲀-𐲲𐳀-𐳲𑢠-𑣟𞤀-𞥃]+",
    "\\s?[!-/:-~！-／：-～‘-‟\u3000-。]+",
    r"\s+$",
    _CJK_DEEPSEEK,
    r"\p{N}+",
)
_DEEPSEEK_CODER = (r"[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK_DEEPSEEK, r"\p{N}")
# o200k (gpt-oss, Llama 4): llama.cpp runs a lookahead rewrite of the tokenizer.json regex.
_GPT4O_HF = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O = (
    r"[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))*((?=[\p{L}])([^A-Z]))+" + _CONTRACTIONS + "?"
    r"|[^\r\n\p{L}\p{N}]?((?=[\p{L}])([^a-z]))+((?=[\p{L}])([^A-Z]))*" + _CONTRACTIONS + "?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# Names llama.cpp accepts, with the regexes it runs for them (src/llama-vocab.cpp). Where
# several names share regexes, the first whose ignore_merges matches the tokenizer wins.
PRE_TOKENIZERS: tuple[_PreTokenizer, ...] = (
    _PreTokenizer("gpt-2", (_GPT2,), hf_regexes=((_HF_BYTELEVEL,),)),
    _PreTokenizer("qwen2", (_QWEN2,)),
    _PreTokenizer("qwen35", (_QWEN35,)),
    _PreTokenizer("llama-bpe", (_LLAMA3,), ignore_merges=True),
    _PreTokenizer("dbrx", (_LLAMA3,)),
    _PreTokenizer("deepseek-v3", _DEEPSEEK3),
    _PreTokenizer("deepseek-llm", _DEEPSEEK_LLM),
    _PreTokenizer("deepseek-coder", _DEEPSEEK_CODER),
    _PreTokenizer("starcoder", (r"\p{N}", _GPT2), hf_regexes=((r"\p{N}", _HF_BYTELEVEL),)),
    _PreTokenizer("gpt-4o", (_GPT4O,), hf_regexes=((_GPT4O_HF,),)),
)


def _group_end(rx: str, start: int) -> int:
    """Index of the ")" closing the group whose body starts at `start`."""
    depth, in_class, i = 0, False, start
    while i < len(rx):
        c = rx[i]
        if c == "\\":
            i += 2
            continue
        if in_class:
            in_class = c != "]"
        elif c == "[":
            in_class = True
        elif c == "(":
            depth += 1
        elif c == ")":
            if depth == 0:
                return i
            depth -= 1
        i += 1
    raise TokenizerError(f"unbalanced group in pre-tokenizer regex {rx!r}")


def _both_cases(body: str) -> str:
    """`body` with each ASCII letter matching both cases, without an inline flag."""
    out, in_class, i = [], False, 0
    while i < len(body):
        c = body[i]
        if c == "\\":  # an escape, or a whole \p{...} class: copied as is
            end = body.index("}", i) + 1 if body.startswith(("\\p{", "\\P{"), i) else i + 2
            out.append(body[i:end])
            i = end
            continue
        if c.isascii() and c.isalpha() and c.lower() != c.upper():
            pair = c.lower() + c.upper()
            out.append(pair if in_class else f"[{pair}]")
        else:
            out.append(c)
            if in_class and c == "]":
                in_class = False
            elif not in_class and c == "[":
                in_class = True
        i += 1
    return "".join(out)


def canonical_regex(rx: str) -> str:
    """A regex in the spelling llama.cpp uses: "(?i:'s|...)" groups expanded to "(?:'[sS]|...)"
    (std::regex has no inline flags) and literal CR/LF written as \\r / \\n escapes."""
    out, i = [], 0
    while i < len(rx):
        if rx[i] == "\\":
            out.append(rx[i:i + 2])
            i += 2
        elif rx.startswith("(?i:", i):
            end = _group_end(rx, i + 4)
            out.append("(?:" + _both_cases(rx[i + 4:end]) + ")")
            i = end + 1
        else:
            out.append(rx[i])
            i += 1
    return "".join(out).replace("\r", r"\r").replace("\n", r"\n")


def split_regexes(pre_tokenizer: Mapping | None) -> list[str]:
    """The regexes a tokenizer.json `pre_tokenizer` splits text with, in order.

    Split(Regex, Isolated) gives its regex, Digits gives \\p{N} or \\p{N}+, and
    ByteLevel(use_regex=True) the GPT-2 regex. Anything llama.cpp cannot run raises.
    """
    if not pre_tokenizer:
        raise TokenizerError("tokenizer.json has no pre_tokenizer: llama.cpp needs split regexes")
    steps = (pre_tokenizer.get("pretokenizers") or []
             if pre_tokenizer.get("type") == "Sequence" else [pre_tokenizer])
    out = []
    for n, step in enumerate(steps):
        kind = step.get("type")
        if kind == "Split":
            pattern = step.get("pattern") or {}
            if "Regex" not in pattern:
                raise TokenizerError(f"pre-tokenizer Split on {pattern} (not a regex) is not "
                                     "supported by llama.cpp")
            if step.get("behavior") != "Isolated" or step.get("invert"):
                raise TokenizerError(
                    f"pre-tokenizer Split({pattern['Regex']!r}) with behavior "
                    f"{step.get('behavior')!r}, invert={step.get('invert')}: llama.cpp only "
                    "isolates regex matches")
            out.append(pattern["Regex"])
        elif kind == "Digits":
            out.append(r"\p{N}" if step.get("individual_digits") else r"\p{N}+")
        elif kind == "ByteLevel":
            if n != len(steps) - 1:
                raise TokenizerError("ByteLevel is not the last pre-tokenizer step: later splits "
                                     "would see byte-encoded text, which llama.cpp does not do")
            if step.get("add_prefix_space"):
                raise TokenizerError("ByteLevel(add_prefix_space=True) is not supported: "
                                     "llama.cpp's BPE tokenizer never adds a prefix space")
            if step.get("use_regex", True):
                out.append(_HF_BYTELEVEL)
        else:
            raise TokenizerError(f"pre-tokenizer step {kind!r} has no llama.cpp equivalent")
    return out


def recognise_pre_tokenizer(regexes: Sequence[str], ignore_merges: bool = False) -> str:
    """The llama.cpp pre-tokenizer name whose regexes are `regexes` (tokenizer.json spelling)."""
    have = tuple(canonical_regex(r) for r in regexes)
    matches = [
        p for p in PRE_TOKENIZERS
        if have == tuple(canonical_regex(r) for r in p.regexes)
        or any(have == tuple(canonical_regex(r) for r in alt) for alt in p.hf_regexes)
    ]
    if not matches:
        raise TokenizerError(
            "pre-tokenizer regex not known to llama.cpp: "
            + ", ".join(repr(r) for r in regexes)
            + f" (known: {', '.join(p.name for p in PRE_TOKENIZERS)})")
    same = [p for p in matches if p.ignore_merges == ignore_merges]
    if not same:
        log.warning("tokenizer has ignore_merges=%s but llama.cpp's %r has %s: words in the vocab "
                    "that merges do not reach may tokenize differently", ignore_merges,
                    matches[0].name, matches[0].ignore_merges)
    return (same or matches)[0].name
