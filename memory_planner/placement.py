"""GPU + CPU plans: each tensor's type and the device it lives on, chosen in one program.

The setup llama.cpp users run big MoEs with: every layer offloaded (`-ngl 999`, several GPUs
sharing the layers by `--tensor-split`), then some tensors, usually routed experts, kept in
system RAM by `--override-tensor REGEX=CPU` (or `--n-cpu-moe N`, the experts of the first N
layers). llama.cpp keeps `token_embd` on the CPU whatever is asked, puts a layer's KV cache
on the layer's GPU, and gives each device its own compute buffer (src/llama-model.cpp,
`load_tensors`).

The program extends the planner's multiple-choice knapsack (memory_planner.planner): per
class of interchangeable tensors, integer counts per (type, device), one byte row per
device. With a decode-speed floor, one more row: the seconds a token takes, estimated as the
bytes each device reads per token (a routed expert tensor is read k/n_expert of it, the
input embedding one row) over that device's bandwidth. Among the least-damage plans, a
second solve picks the fastest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import numpy as np
from scipy.optimize import Bounds, LinearConstraint, milp
from scipy.sparse import csr_array

from .planner import Damage, PlanError, _n_experts, _options
from .quant_types import DEFAULT_LADDER, format_size
from .types import Budget, Device, MemoryPlan, TensorPlan, TensorSpec

CPU = "CPU"


def layer_gpus(n_layer: int, gpu_shares: Sequence[float]) -> list[int]:
    """The GPU of each layer 0..n_layer (n_layer: the output layer) under `-ngl` all and
    `--tensor-split gpu_shares`, as llama.cpp assigns them."""
    total = float(sum(gpu_shares))
    bounds = np.cumsum(gpu_shares) / total
    n = n_layer + 1
    return [int(np.searchsorted(bounds, il / n, side="right")) for il in range(n)]


def allowed_devices(spec: TensorSpec, gpus_of_layer: Sequence[int], n_layer: int) -> list[str]:
    """Where a tensor may live: the input embedding on the CPU (llama.cpp keeps it there),
    routed experts on their layer's GPU or in system RAM, everything else on its layer's GPU
    (splitting a layer's attention or norms off its GPU costs a copy between devices per
    layer and saves little: users move experts, `-ot exps=CPU`)."""
    if spec.kind == "token_embd":
        return [CPU]
    gpu = f"GPU{gpus_of_layer[spec.layer if spec.layer is not None else n_layer]}"
    return [CPU, gpu] if spec.n_experts else [gpu]


def active_share(spec: TensorSpec, n_used: int) -> float:
    """The share of a tensor's bytes one decoded token reads."""
    if spec.kind == "token_embd":
        return 1.0 / spec.shape[0]
    if spec.n_experts:
        return min(1.0, n_used / spec.n_experts)
    return 1.0


def solve_placed(specs: Sequence[TensorSpec], damage: Damage, budget: Budget,
                 devices: Sequence[Device], gpus_of_layer: Sequence[int], n_used: int,
                 ladder: Sequence[str] = DEFAULT_LADDER, min_tokens_per_s: float | None = None,
                 damage_model: str = "relative-error", time_limit: float = 60.0) -> MemoryPlan:
    """The least-damage plan whose tensors fit their devices (then the fastest of those).

    `devices`: CPU and GPU0.. with caps and fixed bytes; `budget` carries the totals for the
    plan's tables (its cap: all devices together). Raises PlanError naming the device that
    cannot hold its share, or the speed floor that cannot be met.
    """
    names = [d.name for d in devices]
    if CPU not in names:
        raise PlanError("a GPU + CPU plan needs the CPU device (system RAM)")
    n_layer = max((s.layer for s in specs if s.layer is not None), default=-1) + 1
    options = _options(specs, damage, ladder)
    # classes: interchangeable tensors (same options and the same devices to choose from)
    keyed: dict[tuple, list[int]] = {}
    for i, s in enumerate(specs):
        key = (tuple(options[i]), tuple(allowed_devices(s, gpus_of_layer, n_layer)),
               active_share(s, n_used))
        keyed.setdefault(key, []).append(i)
    classes = list(keyed.items())

    var_class, var_opt, var_dev, sizes, cost, seconds = [], [], [], [], [], []
    bw = {d.name: d.bandwidth for d in devices}
    for c, ((opts, devs, share), _members) in enumerate(classes):
        for k, o in enumerate(opts):
            for dev in devs:
                var_class.append(c)
                var_opt.append(k)
                var_dev.append(dev)
                sizes.append(o[2])
                cost.append(o[3])
                seconds.append(o[2] * share / bw[dev] if bw[dev] else 0.0)
    n = len(sizes)
    sizes, cost, seconds = (np.asarray(v, np.float64) for v in (sizes, cost, seconds))
    count = np.array([len(m) for _, m in classes], np.float64)
    choose = csr_array((np.ones(n), (var_class, np.arange(n))), shape=(len(classes), n))
    scale = float(2**20)
    rows = [LinearConstraint(choose, count, count)]
    for d in devices:
        mask = np.array([v == d.name for v in var_dev], np.float64)
        room = d.cap_bytes - d.fixed_bytes
        if room < 0:
            raise PlanError(f"{d.name}: its {format_size(d.cap_bytes)} cannot hold even the "
                            f"KV cache and buffers llama.cpp puts there "
                            f"({format_size(d.fixed_bytes)})")
        rows.append(LinearConstraint((mask * sizes)[None, :] / scale, -np.inf, room / scale))
    if min_tokens_per_s:
        if not all(d.bandwidth > 0 for d in devices):
            raise PlanError("a speed floor needs every device's bandwidth")
        rows.append(LinearConstraint(seconds[None, :], -np.inf, 1.0 / min_tokens_per_s))
    upper = count[var_class]
    opts = {"time_limit": time_limit, "mip_rel_gap": 1e-9}
    res = milp(cost, constraints=rows, integrality=np.ones(n), bounds=Bounds(0, upper),
               options=opts)
    if res.x is None:
        floor = f" at >= {min_tokens_per_s:g} tokens/s" if min_tokens_per_s else ""
        raise PlanError(f"no plan fits these devices{floor}: "
                        + ", ".join(f"{d.name} {format_size(d.cap_bytes)}" for d in devices)
                        + f" ({res.message})")
    best = float(cost @ np.round(res.x))
    if seconds.any():  # among the least-damage plans, the fastest
        tie = LinearConstraint(cost[None, :], -np.inf, best + 1e-9 * max(1.0, abs(best)))
        res2 = milp(seconds, constraints=[*rows, tie], integrality=np.ones(n),
                    bounds=Bounds(0, upper), options=opts)
        if res2.x is not None:
            res = res2
    x = np.round(res.x).astype(int)

    # hand counts to tensors in file order, the CPU's first: experts of the first layers go
    # to system RAM, as with llama.cpp's --n-cpu-moe
    tensors: dict[int, TensorPlan] = {}
    where: dict[str, str] = {}
    for c, ((opts_c, _devs, _share), members) in enumerate(classes):
        picks = [(var_dev[j] != CPU, var_opt[j], var_dev[j], x[j])
                 for j in range(n) if var_class[j] == c and x[j]]
        it = iter(members)
        for _gpu, k, dev, cnt in sorted(picks):
            for _ in range(cnt):
                i = next(it)
                legal, asked, nbytes, d = opts_c[k]
                s = specs[i]
                tensors[i] = TensorPlan(s.name, legal, nbytes, s.n_elements, d,
                                        asked if asked != legal else None)
                where[s.name] = dev
    plan_tensors = tuple(tensors[i] for i in range(len(specs)))
    _check_rows(plan_tensors, where, devices)
    E = _n_experts(specs)
    status = "optimal" if res.status == 0 else f"status {res.status}: {res.message}"
    return MemoryPlan(plan_tensors, budget, damage_model=damage_model, n_experts=E,
                      n_experts_kept=E, solver=f"milp/highs placed {status}",
                      devices=tuple(devices), placement=where)


def _check_rows(tensors: Sequence[TensorPlan], where: Mapping[str, str],
                devices: Sequence[Device]) -> None:
    """Solver tolerances must not let a device overflow by a byte: fail loudly if so."""
    used = device_weight_bytes(tensors, where)
    for d in devices:
        if used.get(d.name, 0) + d.fixed_bytes > d.cap_bytes:
            raise PlanError(f"{d.name}: the solver's plan overshoots by "
                            f"{used[d.name] + d.fixed_bytes - d.cap_bytes} bytes")


def device_weight_bytes(tensors: Sequence[TensorPlan], where: Mapping[str, str]) -> dict:
    out: dict[str, int] = {}
    for t in tensors:
        out[where[t.name]] = out.get(where[t.name], 0) + t.nbytes
    return out


def decode_seconds(plan: MemoryPlan, specs: Sequence[TensorSpec], n_used: int) -> float:
    """Estimated seconds per decoded token: bytes read on each device over its bandwidth."""
    bw = {d.name: d.bandwidth for d in plan.devices}
    by_name = {s.name: s for s in specs}
    return sum(t.nbytes * active_share(by_name[t.name], n_used) / bw[plan.placement[t.name]]
               for t in plan.tensors if bw.get(plan.placement[t.name]))


def _alternation(items: Sequence[str]) -> str:
    return items[0] if len(items) == 1 else "(" + "|".join(items) + ")"


def override_patterns(plan: MemoryPlan) -> list[str]:
    """Regexes (llama.cpp `--override-tensor`, searched in tensor names) that match exactly
    the tensors the plan puts in system RAM, token_embd left out (always on the CPU)."""
    kinds_by_layers: dict[tuple[int, ...], list[str]] = {}
    layers_by_kind: dict[str, list[int]] = {}
    single = []
    for name, dev in plan.placement.items():
        if dev != CPU or name.startswith("token_embd."):
            continue
        m = re.fullmatch(r"blk\.(\d+)\.(.+)", name)
        if m:
            layers_by_kind.setdefault(m.group(2), []).append(int(m.group(1)))
        else:
            single.append("^" + re.escape(name) + "$")
    for kind, layers in layers_by_kind.items():
        kinds_by_layers.setdefault(tuple(sorted(layers)), []).append(kind)
    out = []
    for layers, kinds in sorted(kinds_by_layers.items()):
        out.append(r"^blk\." + _alternation([str(x) for x in layers]) + r"\."
                   + _alternation([re.escape(k) for k in sorted(kinds)]) + "$")
    return out + sorted(single)


# llama.cpp's --n-cpu-moe N moves the tensors whose names contain
# `blk.I.ffn_(up|down|gate|gate_up)_(ch|)exps` for I < N (common/common.h, common/arg.cpp)
def n_cpu_moe(plan: MemoryPlan) -> int | None:
    """N when the plan's system-RAM tensors are exactly those `--n-cpu-moe N` moves there
    (names matching llama.cpp's expert regex in layers 0..N-1), else None."""
    on_cpu = {n for n, d in plan.placement.items() if d == CPU and not n.startswith("token_embd.")}
    if not on_cpu:
        return 0
    layer_of = {}
    for t in plan.tensors:
        m = re.search(r"^blk\.(\d+)\.ffn_(up|down|gate|gate_up)_(ch|)exps", t.name)
        if m:
            layer_of[t.name] = int(m.group(1))
    for n in range(1, max(layer_of.values(), default=-1) + 2):
        if on_cpu == {name for name, layer in layer_of.items() if layer < n}:
            return n
    return None
