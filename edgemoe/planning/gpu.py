"""GPU + CPU plans: the devices a model runs on, as llama.cpp fills them, and the plan.

`--gpu-memory 24GB` (several GPUs: `24GB,24GB` or the flag repeated) beside `--memory`
(system RAM). Every layer is offloaded (`-ngl 999`, layers shared between GPUs in proportion
to their memory by `--tensor-split`); the program then chooses per tensor its type and
whether it stays on its layer's GPU or in system RAM (memory_planner.placement).

What llama.cpp puts on each device besides weights, counted here: a GPU holds the KV cache
of its layers and its own compute buffer; system RAM holds the input embedding (always on
the CPU), a compute buffer for the operations run there, the output (logits) buffer and the
reserve. The sizes are llama.cpp's own for a CPU run (`pipeline.make_budget`); each device's
compute buffer is taken as the CPU's, as this machine has no GPU to measure one on.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import memory_planner as mp
from export.arch import Adapter
from memory_planner.placement import CPU, layer_gpus, solve_placed
from memory_planner.types import Device

# decode bandwidths when not given: dual-channel DDR5 system RAM, a current desktop GPU
DEFAULT_CPU_BANDWIDTH = 60e9
DEFAULT_GPU_BANDWIDTH = 900e9


@dataclass(frozen=True)
class GPUSetup:
    """The GPUs beside system RAM, and the speed asked for."""

    gpu_bytes: tuple[int, ...]
    cpu_bandwidth: float = DEFAULT_CPU_BANDWIDTH
    gpu_bandwidth: float = DEFAULT_GPU_BANDWIDTH
    min_tokens_per_s: float | None = None

    @classmethod
    def parse(cls, gpu_memory: Sequence[str], cpu_bandwidth: str | None = None,
              gpu_bandwidth: str | None = None, min_tokens_per_s: float | None = None):
        """From the CLI: sizes, each flag possibly comma-separated; bandwidths as sizes
        per second ("60GB")."""
        sizes = tuple(mp.parse_size(x) for arg in gpu_memory for x in arg.split(",") if x)
        if not sizes:
            raise ValueError("--gpu-memory needs at least one size")
        bw = {k: float(mp.parse_size(v)) for k, v in
              (("cpu_bandwidth", cpu_bandwidth), ("gpu_bandwidth", gpu_bandwidth)) if v}
        return cls(sizes, **bw, min_tokens_per_s=min_tokens_per_s)

    def placed(self, adapter: Adapter, memory: str | int, ctx: int, kv_type: str,
               reserve: str | int = 0) -> tuple[mp.Budget, Callable[..., mp.MemoryPlan]]:
        """The budget (all devices together, for the tables) and the solver that places each
        tensor: handed to `pipeline.make_plan` / `plan_from_config` in place of the single-pool
        ones, so that pruning is weighed the same way."""
        devs, gpus, budget = devices(adapter, self, memory, ctx, kv_type, reserve)
        # a pruned model keeps the same layers: its GPUs are the same
        solver = functools.partial(solve_placed, devices=devs, gpus_of_layer=gpus,
                                   n_used=adapter.n_expert_used,
                                   min_tokens_per_s=self.min_tokens_per_s)
        return budget, solver


def devices(adapter: Adapter, setup: GPUSetup, memory: str | int, ctx: int, kv_type: str,
            reserve: str | int = 0) -> tuple[list[Device], list[int], mp.Budget]:
    """The devices with their fixed bytes, each layer's GPU, and the plan's total budget.

    The KV cache and buffers are the single-pool budget's (llama.cpp's own allocation where
    it can simulate the arch, `pipeline.make_budget`): the KV cache shared out by layer,
    the compute buffer counted on every device, the output buffer in system RAM."""
    from ..pipeline import make_budget

    base = make_budget(adapter, memory, ctx, kv_type, reserve)
    n_layer = adapter.n_layer
    gpus = layer_gpus(n_layer, setup.gpu_bytes)
    kv_layer = base.kv_bytes / n_layer
    out = [Device(CPU, base.cap_bytes,
                  base.compute_bytes + base.output_bytes + base.reserve_bytes,
                  setup.cpu_bandwidth)]
    for g, cap in enumerate(setup.gpu_bytes):
        layers = sum(1 for il in range(n_layer) if gpus[il] == g)
        out.append(Device(f"GPU{g}", cap, round(kv_layer * layers) + base.compute_bytes,
                          setup.gpu_bandwidth))
    budget = replace(base, cap_bytes=sum(d.cap_bytes for d in out),
                     compute_bytes=base.compute_bytes * len(out),
                     memory_source=base.memory_source + "; compute buffer counted on each "
                     "device (the CPU's size: no GPU here to measure one)")
    return out, gpus, budget
