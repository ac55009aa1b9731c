"""Records that cross module boundaries: what a tensor is, what the cap is, what the plan says.

All are frozen dataclasses with a JSON round trip (`to_dict` / `from_dict`). Shapes are in
numpy order (outermost first), as gguf-py writes them: `shape[-1]` is ggml's ne0, the row
length that quantization blocks run along. Stacked expert tensors have `shape[0] == n_expert`.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar

PLAN_FORMAT = "edgemoe.plan/1"

# what a budget is for unless the user says otherwise: the context and KV cache type, and
# llama-cpp-python's batch sizes, which edgemoe's runtime uses (the printed llama-server
# command passes them explicitly: llama-server's own are -b 2048 -fa auto -np 4)
DEFAULT_CTX = 4096
DEFAULT_KV_TYPE = "f16"
DEFAULT_N_BATCH = 512
DEFAULT_N_UBATCH = 512

R = TypeVar("R", bound="_FlatRecord")


class _FlatRecord:
    """The JSON round trip of a frozen dataclass whose fields are all JSON values."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls: type[R], d: dict[str, Any]) -> R:
        return cls(**d)


@dataclass(frozen=True)
class TensorSpec(_FlatRecord):
    """One GGUF tensor as the planner sees it, before any type is chosen."""

    name: str  # GGUF name, e.g. "blk.3.ffn_gate_exps.weight"
    shape: tuple[int, ...]  # numpy order; shape[-1] is the row length (ggml ne0)
    kind: str  # name without the layer: "ffn_gate_exps", "attn_q", "token_embd", ...
    layer: int | None = None  # block index, None for token_embd / output / output_norm
    n_experts: int = 0  # > 0 for stacked routed-expert tensors (shape[0])
    quantizable: bool = True  # False: kept F32 (norms, router, 1-D tensors)

    @property
    def n_elements(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def row_length(self) -> int:
        return self.shape[-1]

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["shape"] = list(self.shape)
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TensorSpec:
        return cls(**{**d, "shape": tuple(d["shape"])})


@dataclass(frozen=True)
class Budget(_FlatRecord):
    """The memory cap and everything that must fit under it besides the weights."""

    cap_bytes: int
    kv_bytes: int = 0  # KV cache (or recurrent state) for `ctx` tokens at `kv_type`
    compute_bytes: int = 0  # compute buffers of the runtime
    reserve_bytes: int = 0  # user-asked headroom (OS, other programs)
    ctx: int = DEFAULT_CTX
    kv_type: str = DEFAULT_KV_TYPE
    output_bytes: int = 0  # the logits buffer
    # the context these buffers are for: tokens per batch / micro-batch, flash attention
    n_batch: int = DEFAULT_N_BATCH
    n_ubatch: int = DEFAULT_N_UBATCH
    flash_attn: bool = False
    # where kv/compute/output come from: "llama.cpp" (its own allocation, simulated without
    # weights) or "formula" (an estimate; the reason llama.cpp was not asked follows)
    memory_source: str = "formula"

    @property
    def runtime_bytes(self) -> int:
        """What the runtime allocates beside the weights: KV cache, compute and output."""
        return self.kv_bytes + self.compute_bytes + self.output_bytes

    @property
    def weight_bytes_available(self) -> int:
        return self.cap_bytes - self.runtime_bytes - self.reserve_bytes


@dataclass(frozen=True)
class Device(_FlatRecord):
    """One memory pool of a GPU + CPU plan: what it holds besides the weights it is given."""

    name: str  # "CPU", or "GPU0", "GPU1", ... in llama.cpp's device order
    cap_bytes: int
    fixed_bytes: int = 0  # KV cache, compute buffers and reserve that llama.cpp puts here
    bandwidth: float = 0.0  # bytes/s it reads weights at while decoding (0: not modelled)


@dataclass(frozen=True)
class TensorPlan(_FlatRecord):
    """The decision for one tensor: its GGUF type and exact byte size."""

    name: str
    type: str  # gguf.GGMLQuantizationType member name: "Q4_K", "F32", ...
    nbytes: int
    n_elements: int
    damage: float = 0.0  # predicted damage of this choice, in the plan's damage units
    asked_type: str | None = None  # the ladder type before a block-size fallback, if any

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.nbytes / self.n_elements


@dataclass(frozen=True)
class MemoryPlan:
    """A whole plan: per-tensor types, which experts stay, and the memory totals."""

    tensors: tuple[TensorPlan, ...]
    budget: Budget
    damage_model: str = "relative-error"  # how `damage` was predicted
    n_experts: int = 0  # experts per MoE layer in the source
    n_experts_kept: int = 0  # experts per MoE layer in the output (== n_experts: no pruning)
    # per MoE layer index (as str, JSON keys), the source expert ids kept, in output order
    kept_experts: dict[str, tuple[int, ...]] = field(default_factory=dict)
    solver: str = ""  # e.g. "milp/highs optimal"
    pruning_damage: float = 0.0  # predicted damage of the experts removed
    # what the calibration statistics were measured on (CalibSource.describe), if any
    calibration: str = ""
    # a GPU + CPU plan (memory_planner.placement): the devices, and per tensor its device
    devices: tuple[Device, ...] = ()
    placement: dict[str, str] = field(default_factory=dict)


    def check_model(self, specs: list[TensorSpec], where: str) -> None:
        """Raise ValueError unless this plan was made for a model with `specs` (the
        source's tensors after the plan's pruning): the same tensor names and sizes."""
        want = {s.name: math.prod(s.shape) for s in specs}
        have = {t.name: t.n_elements for t in self.tensors}
        missing, extra = sorted(want.keys() - have.keys()), sorted(have.keys() - want.keys())
        if missing or extra:
            raise ValueError(f"{where} is a plan for another model: {len(extra)} of its tensors "
                             f"are not in this one ({', '.join(extra[:3]) or '-'}), "
                             f"{len(missing)} of this model's are not in it "
                             f"({', '.join(missing[:3]) or '-'})")
        for name, n in want.items():
            if have[name] != n:
                raise ValueError(f"{where} is a plan for another model: {name} has {have[name]} "
                                 f"weights in it, {n} in this model")

    @property
    def weight_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def total_bytes(self) -> int:
        b = self.budget
        return self.weight_bytes + b.runtime_bytes + b.reserve_bytes

    @property
    def predicted_damage(self) -> float:
        return float(sum(t.damage for t in self.tensors)) + self.pruning_damage

    @property
    def n_elements(self) -> int:
        return sum(t.n_elements for t in self.tensors)

    @property
    def bits_per_weight(self) -> float:
        return 8.0 * self.weight_bytes / max(1, self.n_elements)

    def by_name(self) -> dict[str, TensorPlan]:
        return {t.name: t for t in self.tensors}

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"format": PLAN_FORMAT}
        for f in fields(self):
            v = getattr(self, f.name)
            if f.name == "tensors":
                v = [t.to_dict() for t in v]
            elif f.name == "budget":
                v = v.to_dict()
            elif f.name == "kept_experts":
                v = {k: list(ids) for k, ids in v.items()}
            elif f.name == "devices":
                v = [dev.to_dict() for dev in v]
            elif f.name == "placement":
                v = dict(v)
            d[f.name] = v
        # derived totals, for people and other tools reading the JSON; ignored on load
        d["totals"] = {
            "weight_bytes": self.weight_bytes,
            "total_bytes": self.total_bytes,
            "cap_bytes": self.budget.cap_bytes,
            "bits_per_weight": self.bits_per_weight,
            "predicted_damage": self.predicted_damage,
        }
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> MemoryPlan:
        if d.get("format") != PLAN_FORMAT:
            raise ValueError(
                f"not an edgemoe plan (format {d.get('format')!r}, want {PLAN_FORMAT})"
            )
        return cls(
            tensors=tuple(TensorPlan.from_dict(t) for t in d["tensors"]),
            budget=Budget.from_dict(d["budget"]),
            damage_model=d["damage_model"],
            n_experts=d["n_experts"],
            n_experts_kept=d["n_experts_kept"],
            kept_experts={k: tuple(v) for k, v in d["kept_experts"].items()},
            solver=d["solver"],
            pruning_damage=d.get("pruning_damage", 0.0),
            calibration=d.get("calibration", ""),
            devices=tuple(Device.from_dict(x) for x in d.get("devices", ())),
            placement=dict(d.get("placement", {})),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=1)

    @classmethod
    def from_json(cls, text: str) -> MemoryPlan:
        return cls.from_dict(json.loads(text))

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json())

    @classmethod
    def load(cls, path: str | Path) -> MemoryPlan:
        """A plan saved by `save` (`edgemoe plan -o`); ValueError naming the file if not."""
        try:
            return cls.from_json(Path(path).read_text())
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{path} is not a plan JSON from `edgemoe plan -o` ({e!r})") \
                from None
