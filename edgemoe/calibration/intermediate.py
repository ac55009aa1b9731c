"""The GGUF calibration runs in llama.cpp, and how far it is from the model.

A GGUF source is run as it is (llama.cpp runs every type edgemoe reads a GGUF in: F32, F16,
BF16, Q8_0): no file is written. An HF source is first exported to an intermediate GGUF,
the most faithful of `CANDIDATES` whose file fits the disk budget, whole or a segment of
layers at a time (`segments.choose`); the statistics record which (`CalibSource`), with the
fidelity class measured for it on the bundled model (BENCHMARKS.md, issue 11:
importance-matrix cosine, expert frequency and saliency, and the KL divergence of the plans
made from the statistics). Its Q8_0 tensors come from ggml-cpu's row quantizer, 8x faster
than the file quantizer and one step away at 0.06% of the values (rounding ties,
`export.ggml.cpu_row_quantizer`): a file only edgemoe runs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, replace
from pathlib import Path

import gguf

import memory_planner as mp
from memory_planner.stats import CalibSource

from .. import pipeline

FILE_SLACK = 1 << 20  # header, alignment, .part.json: beyond the tensors and tokenizer


class DiskBudgetError(ValueError):
    """No calibration model fits the disk budget."""


@dataclass(frozen=True)
class Candidate:
    """An intermediate: routed experts at `expert_type`, every other tensor at
    `other_type`; `fidelity` is the class measured for it."""

    expert_type: str
    other_type: str
    fidelity: str

    @property
    def label(self) -> str:
        if self.expert_type == self.other_type:
            return self.other_type
        return f"{self.expert_type} experts, {self.other_type} others"


# best first, as measured on the bundled model against a run of the F32 model (BENCHMARKS.md,
# issue 11): the experts' type first, Q8_0 for the rest when it fits. The class is the mean
# relative error of the importance matrices: near < 1%, close < 2.5%, coarse < 5%, rough
CANDIDATES = (
    Candidate("Q8_0", "Q8_0", "near"),  # 0.33%
    Candidate("Q6_K", "Q8_0", "near"),
    Candidate("Q6_K", "Q6_K", "near"),  # 0.57%
    Candidate("Q4_K", "Q8_0", "close"),  # 1.09%
    Candidate("Q4_K", "Q4_K", "close"),  # 2.10%
    Candidate("Q3_K", "Q8_0", "close"),  # 2.14%
    Candidate("Q3_K", "Q3_K", "coarse"),  # 4.05%
    Candidate("Q2_K", "Q8_0", "coarse"),  # 4.44%
    Candidate("Q2_K", "Q2_K", "rough"),  # 9.00%
)


def candidate_plan(specs: list[mp.TensorSpec], c: Candidate) -> mp.MemoryPlan:
    """The plan of intermediate `c` (llama.cpp's block-size fallbacks applied)."""
    budget = mp.Budget(cap_bytes=2**62)
    other = mp.uniform_plan(specs, c.other_type, budget, check_budget=False)
    experts = mp.uniform_plan(specs, c.expert_type, budget, check_budget=False)
    tensors = tuple(e if s.n_experts else o
                    for s, o, e in zip(specs, other.tensors, experts.tensors))
    return replace(other, tensors=tensors, solver=f"calibration model {c.label}")


def file_bytes(model: pipeline.Model, plan: mp.MemoryPlan) -> int:
    """An upper bound of the GGUF file `plan` writes: tensors with their alignment, the
    tokenizer and the metadata (about the size of the source's tokenizer files)."""
    tok = sum(p.stat().st_size for p in Path(model.source.path).glob("tokenizer*")
              if p.is_file()) if Path(model.source.path).is_dir() else 0
    return plan.weight_bytes + 64 * len(plan.tensors) + 2 * tok + FILE_SLACK


def candidates(forced: str | None = None) -> list[Candidate]:
    """The intermediates to try, most faithful first: `CANDIDATES`, or the uniform type
    `forced` alone."""
    if forced:
        return [Candidate(forced.upper(), forced.upper(), _fidelity(forced))]
    return list(CANDIDATES)


def _fidelity(type_name: str) -> str:
    t = type_name.upper()
    if t in ("F32", "F16", "BF16"):
        return "exact"
    return next((c.fidelity for c in CANDIDATES if c.other_type == t == c.expert_type),
                "unmeasured")


def record(c: Candidate, plan: mp.MemoryPlan, n_segments: int = 1) -> CalibSource:
    """The statistics' source, for a run of intermediate `c` (in `n_segments` layer
    segments: the same statistics, `edgemoe.calibration.segments`)."""
    label = c.label if n_segments == 1 else f"{c.label}, run in {n_segments} layer segments"
    return CalibSource(label, plan.bits_per_weight, c.fidelity)


def file_record(path: str | Path, is_source: bool = False,
                tensors: Iterable[gguf.ReaderTensor] | None = None) -> CalibSource:
    """The statistics' source when GGUF `path` runs: its main type and bits per weight;
    `exact` when it is the source itself or float, else the class measured for its type.
    `tensors`: the file's, when the caller has parsed its header already."""
    if tensors is None:
        tensors = gguf.GGUFReader(path).tensors
    elements: dict[str, int] = {}
    nbytes = 0
    for t in tensors:
        elements[t.tensor_type.name] = elements.get(t.tensor_type.name, 0) + int(t.n_elements)
        nbytes += int(t.n_bytes)
    main = max(elements, key=elements.get)
    fidelity = "exact" if is_source else _fidelity(main)
    what = f"the source GGUF itself ({main})" if is_source else f"{Path(path).name} ({main})"
    return CalibSource(what, 8 * nbytes / sum(elements.values()), fidelity)
