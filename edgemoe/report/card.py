"""The files that go beside an exported GGUF on the Hub or a disk: a model card (README.md,
in the style of the Hub's GGUF model cards), the plan's heatmap and an ollama Modelfile.

Everything in them is read from the GGUF itself (its stored plan, metadata and tensors) and,
when given, from a `edgemoe validate --json` report of that file: nothing is estimated here.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf

from export.gguf_io import atomic_output, read_plan
from memory_planner import MemoryPlan
from memory_planner.quant_types import format_size

from .tables import budget_table, llama_server_command, plan_table

MARK = "<!-- written by edgemoe card -->"


class CardError(ValueError):
    """The card cannot be written (a file that edgemoe did not write is in the way)."""


def _files(first: Path) -> list[Path]:
    """The GGUF's files: itself, or all files of a split export given its first."""
    if "-00001-of-" in first.name:
        return sorted(first.parent.glob(first.name.replace("-00001-of-", "-*-of-")))
    return [first]


def _validation_section(report: dict) -> list[str]:
    from ..runtime.validate import format_report

    return ["## Measured in llama.cpp", "",
            "`edgemoe validate` on this file (quality against the reference where given, "
            "speed and memory on the machine that ran it):", "", "```",
            format_report(report), "```", ""]


def model_card(gguf_path: str | Path, validation: dict | None = None,
               heatmap: str | None = None) -> str:
    """README.md text for `gguf_path` (an edgemoe export: it holds its plan)."""
    path = Path(gguf_path)
    plan: MemoryPlan | None = read_plan(path)
    if plan is None:
        raise CardError(f"{path} holds no edgemoe plan: the card describes edgemoe exports")
    reader = gguf.GGUFReader(path)
    name_field = reader.get_field(gguf.Keys.General.NAME)
    name = str(name_field.contents()) if name_field is not None else path.stem
    files = _files(path)
    total = sum(f.stat().st_size for f in files)
    b = plan.budget
    lines = ["---", "library_name: gguf", "tags:", "- gguf", "- mixture-of-experts",
             "- edgemoe", "---", MARK, "",
             f"# {name}: GGUF for a {format_size(b.cap_bytes)} memory cap", "",
             f"{name} as one GGUF planned by edgemoe to run in llama.cpp (llama-server, "
             f"ollama, LM Studio) within **{format_size(b.cap_bytes)}** of memory with a "
             f"{b.ctx}-token context ({b.kv_type} KV cache): weights, KV cache and llama.cpp's "
             "buffers included.", ""]
    if plan.n_experts_kept and plan.n_experts_kept < plan.n_experts:
        lines += [f"Experts: {plan.n_experts_kept} of {plan.n_experts} per layer kept (the "
                  "least used ones, measured on calibration text, removed).", ""]
    lines += ["## Files", "", "| file | size |", "|---|---|"]
    lines += [f"| {f.name} | {format_size(f.stat().st_size)} |" for f in files]
    if len(files) > 1:
        lines += [f"| (all) | {format_size(total)} |", "",
                  f"llama.cpp loads the split files when given the first, `{files[0].name}`."]
    lines += ["", "## Run it", "", "```sh", llama_server_command(path, plan), "```", "",
              "With ollama: `ollama create NAME -f Modelfile` in this folder.", "",
              "## Memory plan", "", "```", budget_table(plan), "```", "",
              "Types per tensor kind:", "", "```", plan_table(plan), "```", ""]
    if heatmap:
        lines += [f"![bits per weight by layer and tensor]({heatmap})", ""]
    if validation is not None:
        lines += _validation_section(validation)
    lines += ["Made with edgemoe; the plan is stored in the file (`edgemoe inspect` shows it).",
              ""]
    return "\n".join(lines)


def _write(path: Path, text: str) -> Path:
    if path.exists() and "written by edgemoe" not in path.read_text(errors="replace"):
        raise CardError(f"{path} exists and edgemoe did not write it: move it away or give "
                        "another --output-dir")
    with atomic_output(path) as part:
        part.write_text(text, encoding="utf-8")
    return path


def write_card(gguf_path: str | Path, validation: str | Path | None = None,
               out_dir: str | Path | None = None) -> list[Path]:
    """Write README.md, the heatmap PNG and Modelfile for `gguf_path` into `out_dir` (default:
    beside it); returns their paths. Files edgemoe did not write are never replaced."""
    from .heatmap import plan_heatmap
    from .ollama import modelfile

    path = Path(gguf_path)
    out = Path(out_dir) if out_dir else path.parent
    if not out.is_dir():
        raise CardError(f"{out}: no such folder")
    report = json.loads(Path(validation).read_text()) if validation else None
    plan = read_plan(path)
    if plan is None:
        raise CardError(f"{path} holds no edgemoe plan: the card describes edgemoe exports")
    picture = plan_heatmap(plan, out / f"{path.stem}.plan.png", title=path.stem)
    card = _write(out / "README.md", model_card(path, report, picture.name))
    mf = _write(out / "Modelfile", modelfile(path, plan.budget.ctx))
    return [card, picture, mf]
