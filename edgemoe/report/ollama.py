"""An ollama Modelfile for an exported GGUF: FROM, TEMPLATE and stop parameters.

ollama writes prompts with Go templates, Hugging Face models ship Jinja chat templates. A
Jinja template is not translated token by token: edgemoe renders it (with jinja2, as
llama-cpp-python does) on a probe conversation and compares the text with what each known
prompt format writes for that conversation; the Go template of the format that writes the
very same text is used. A template no known format reproduces gets no TEMPLATE line (the
Modelfile says so), rather than a guess.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf

# every role a format has to place, in an order the templates accept (ending with the user)
PROBE = ({"role": "system", "content": "Be brief."},
         {"role": "user", "content": "What is 2+2?"},
         {"role": "assistant", "content": "4"},
         {"role": "user", "content": "And 3+3?"})
PROBE_NO_SYSTEM = PROBE[1:]

Render = Callable[[Sequence[dict], str, str], str]  # messages, bos, eos -> prompt text


@dataclass(frozen=True)
class PromptFormat:
    """A known prompt format: its Go template (ollama), stop strings and the same rendering
    in Python (to compare with the model's Jinja template)."""

    name: str
    go_template: str
    stops: tuple[str, ...]
    render: Render
    system: bool = True  # has a place for a system message


def _chatml(messages, bos, eos) -> str:
    return "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n"
                   for m in messages) + "<|im_start|>assistant\n"


def _llama3(messages, bos, eos) -> str:
    return "".join(f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}"
                   "<|eot_id|>" for m in messages) + \
        "<|start_header_id|>assistant<|end_header_id|>\n\n"


def _inst(messages, bos, eos) -> str:
    return "".join(f"[INST] {m['content']} [/INST]" if m["role"] == "user"
                   else f" {m['content']}{eos}" for m in messages)


FORMATS = (
    PromptFormat(
        "chatml",
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n"
        "{{ end }}<|im_start|>assistant\n",
        ("<|im_start|>", "<|im_end|>"), _chatml),
    PromptFormat(
        "llama3",
        "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n"
        "{{ .Content }}<|eot_id|>{{ end }}<|start_header_id|>assistant<|end_header_id|>\n\n",
        ("<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"), _llama3),
    PromptFormat(
        "inst",  # Mistral / Llama 2 without a system message
        '{{- range .Messages }}{{ if eq .Role "user" }}[INST] {{ .Content }} [/INST]'
        "{{ else }} {{ .Content }}{{ .Eos }}{{ end }}{{ end }}",
        ("[INST]", "[/INST]"), _inst, system=False),
)


def _jinja_render(template: str, messages: Sequence[dict], bos: str, eos: str) -> str | None:
    """The Jinja template's text for `messages` with a generation prompt; None if it fails
    (a template that raises on this conversation is not one we can vouch for)."""
    import jinja2
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(msg):
        raise jinja2.TemplateError(msg)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)
    try:
        text = env.from_string(template).render(
            messages=list(messages), bos_token=bos, eos_token=eos, add_generation_prompt=True,
            raise_exception=raise_exception)
    except jinja2.TemplateError:
        return None
    # llama.cpp (and ollama) add BOS when tokenizing: templates that write it lose it here
    return text[len(bos):] if bos and text.startswith(bos) else text


def match_format(template: str, bos: str = "", eos: str = "") -> PromptFormat | None:
    """The known format that writes exactly what `template` writes, on a conversation with a
    system message and on one without (formats without a system place: without only)."""
    for f in FORMATS:
        probes = (PROBE, PROBE_NO_SYSTEM) if f.system else (PROBE_NO_SYSTEM,)
        if all(_jinja_render(template, p, bos, eos) == f.render(p, bos, eos) for p in probes):
            return f
    return None


def _token(reader: gguf.GGUFReader, key: str) -> str:
    field = reader.get_field(key)
    tokens = reader.get_field(gguf.Keys.Tokenizer.LIST)
    if field is None or tokens is None:
        return ""
    return str(tokens.contents(int(field.contents())))


def _quote(s: str) -> str:
    return '"' + s.replace("\\", "\\\\").replace('"', '\\"') + '"'


def modelfile(gguf_path: str | Path, ctx: int | None = None) -> str:
    """The Modelfile text for `gguf_path` (FROM its file name, relative: the Modelfile lives
    beside it), with `num_ctx` when given."""
    path = Path(gguf_path)
    reader = gguf.GGUFReader(path)
    field = reader.get_field(gguf.Keys.Tokenizer.CHAT_TEMPLATE)
    template = str(field.contents()) if field is not None else None
    bos = _token(reader, gguf.Keys.Tokenizer.BOS_ID)
    eos = _token(reader, gguf.Keys.Tokenizer.EOS_ID)
    lines = ["# ollama Modelfile written by edgemoe: ollama create NAME -f Modelfile",
             f"FROM ./{path.name}"]
    fmt = match_format(template, bos, eos) if template else None
    if fmt is not None:
        go = fmt.go_template.replace("{{ .Eos }}", eos)
        lines += [f"# prompt format: {fmt.name} (the same text as the model's chat template)",
                  f'TEMPLATE """{go}"""']
        lines += [f"PARAMETER stop {_quote(s)}" for s in fmt.stops]
    elif template:
        lines.append("# no TEMPLATE: the model's chat template is not one of the prompt formats "
                     f"edgemoe translates ({', '.join(f.name for f in FORMATS)})")
    else:
        lines.append("# no TEMPLATE: the GGUF has no chat template")
    if eos and (fmt is None or eos not in fmt.stops):
        lines.append(f"PARAMETER stop {_quote(eos)}")
    if ctx:
        lines.append(f"PARAMETER num_ctx {ctx}")
    return "\n".join(lines) + "\n"
