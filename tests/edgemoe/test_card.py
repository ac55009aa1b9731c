"""`edgemoe card`: the model card, heatmap and ollama Modelfile beside an export."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest

from edgemoe import pipeline
from edgemoe.cli import main
from edgemoe.report.card import CardError, write_card
from edgemoe.report.ollama import FORMATS, PROBE, PROBE_NO_SYSTEM, _jinja_render, match_format
from export.split import SplitSpec
from tests.tokenizer_fixtures import CHATML_TEMPLATE, LLAMA2_TEMPLATE

# Meta's published Llama 3 Instruct template
LLAMA3_TEMPLATE = (
    "{% set loop_messages = messages %}{% for message in loop_messages %}"
    "{% set content = '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n'"
    " + message['content'] | trim + '<|eot_id|>' %}{% if loop.index0 == 0 %}"
    "{% set content = bos_token + content %}{% endif %}{{ content }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\n\n' }}"
    "{% endif %}")
# ChatML that adds a default system prompt: no known format writes that
QWEN25_LIKE = (
    "{% if messages[0]['role'] != 'system' %}{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n'"
    " }}{% endif %}" + CHATML_TEMPLATE)


@pytest.mark.parametrize("template,bos,eos,want", [
    (CHATML_TEMPLATE, "", "<|endoftext|>", "chatml"),
    (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>", "llama3"),
    (LLAMA2_TEMPLATE, "<s>", "</s>", "inst"),
    (QWEN25_LIKE, "", "<|endoftext|>", None),
    ("{{ messages[0]['content'] }}", "", "", None),
])
def test_template_matched_only_when_it_writes_the_same_text(template, bos, eos, want):
    found = match_format(template, bos, eos)
    assert (found.name if found else None) == want


GO_RENDER = """package main
import ("encoding/json"; "os"; "text/template")
type Message struct { Role string; Content string }
func main() {
    var in struct { Template string; Messages []Message }
    if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil { panic(err) }
    t := template.Must(template.New("t").Parse(in.Template))
    if err := t.Execute(os.Stdout, map[string]any{"Messages": in.Messages}); err != nil {
        panic(err)
    }
}
"""


@pytest.mark.skipif(shutil.which("go") is None,
                    reason="needs Go to run ollama's template language (apt install golang-go)")
@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_go_templates_write_what_the_jinja_templates_write(fmt, tmp_path):
    """Each Go template, run by Go's text/template (what ollama runs), writes the same prompt
    as the Jinja template it stands for."""
    jinja, bos, eos = {"chatml": (CHATML_TEMPLATE, "", "<|endoftext|>"),
                       "llama3": (LLAMA3_TEMPLATE, "<|begin_of_text|>", "<|eot_id|>"),
                       "inst": (LLAMA2_TEMPLATE, "<s>", "</s>")}[fmt.name]
    src = tmp_path / "render.go"
    src.write_text(GO_RENDER)
    for messages in ((PROBE, PROBE_NO_SYSTEM) if fmt.system else (PROBE_NO_SYSTEM,)):
        stdin = json.dumps({"Template": fmt.go_template.replace("{{ .Eos }}", eos),
                            "Messages": [{"Role": m["role"], "Content": m["content"]}
                                         for m in messages]})
        r = subprocess.run(["go", "run", str(src)], input=stdin, capture_output=True,
                           text=True, cwd=tmp_path, env={"HOME": str(tmp_path),
                                                         "PATH": "/usr/bin:/bin",
                                                         "GOCACHE": str(tmp_path / "cache")})
        assert r.returncode == 0, r.stderr
        assert r.stdout == _jinja_render(jinja, messages, bos, eos)


@pytest.fixture(scope="module")
def export_dir(qwen3_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("card")
    model = pipeline.open_model(qwen3_dir)
    budget = pipeline.make_budget(model.adapter, "12MB", ctx=256)
    plan, _ = pipeline.make_plan(model, budget, progress=False)
    pipeline.export(model, plan, out / "m.gguf", progress=False)
    return out


def test_card_and_modelfile_beside_the_export(export_dir, capsys):
    gguf_path = export_dir / "m.gguf"
    report = export_dir / "m.validate.json"
    # (the 12 MB cap is for the planned buffers; the process around them needs more)
    assert main(["validate", str(gguf_path), "--json", str(report), "--memory", "1GB"]) == 0
    assert main(["card", str(gguf_path), "--validation", str(report)]) == 0
    readme = (export_dir / "README.md").read_text()
    assert "library_name: gguf" in readme and "12.00 MB memory cap" in readme
    assert "llama-server -m" in readme and "ffn_down_exps" in readme
    assert "m.plan.png" in readme and (export_dir / "m.plan.png").stat().st_size > 1000
    shown = json.loads(report.read_text())
    assert f"{shown['speed']['decode_tps']:.2f} tok/s" in readme
    modelfile = (export_dir / "Modelfile").read_text()
    assert "FROM ./m.gguf" in modelfile and "# prompt format: chatml" in modelfile
    assert 'PARAMETER stop "<|im_end|>"' in modelfile and "PARAMETER num_ctx 256" in modelfile
    # written again: edgemoe's own files are replaced, anyone else's are not
    assert main(["card", str(gguf_path)]) == 0
    (export_dir / "README.md").write_text("my notes")
    with pytest.raises(CardError, match="edgemoe did not write it"):
        write_card(gguf_path)
    assert (export_dir / "README.md").read_text() == "my notes"


def test_card_of_a_split_export_lists_every_file(qwen3_dir, tmp_path):
    model = pipeline.open_model(qwen3_dir)
    budget = pipeline.make_budget(model.adapter, "1GB", ctx=256)
    plan, _ = pipeline.make_plan(model, budget, "Q8_0", progress=False)
    first = pipeline.export(model, plan, tmp_path / "s.gguf", progress=False,
                            split=SplitSpec(plan.weight_bytes // 2))
    write_card(first)
    readme = (tmp_path / "README.md").read_text()
    files = sorted(tmp_path.glob("s-*-of-*.gguf"))
    assert len(files) >= 2 and all(f.name in readme for f in files)
    assert f"given the first, `{files[0].name}`" in readme
    assert f"FROM ./{files[0].name}" in (tmp_path / "Modelfile").read_text()
