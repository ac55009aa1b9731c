"""GPU + CPU plans (memory_planner.placement): devices filled as llama.cpp fills them, the
speed floor, and offload flags that name exactly the tensors the plan moves."""

from __future__ import annotations

import re

import numpy as np
import pytest

import memory_planner as mp
from memory_planner.placement import (
    CPU,
    decode_seconds,
    device_weight_bytes,
    layer_gpus,
    n_cpu_moe,
    override_patterns,
    solve_placed,
)
from memory_planner.types import Device, TensorSpec

N_LAYER, E, K, D, F = 6, 8, 2, 256, 512


def specs() -> list[TensorSpec]:
    out = [TensorSpec("token_embd.weight", (1000, D), "token_embd")]
    for i in range(N_LAYER):
        out += [TensorSpec(f"blk.{i}.attn_norm.weight", (D,), "attn_norm", i, quantizable=False),
                TensorSpec(f"blk.{i}.attn_q.weight", (D, D), "attn_q", i),
                TensorSpec(f"blk.{i}.ffn_gate_inp.weight", (E, D), "ffn_gate_inp", i,
                           quantizable=False)]
        out += [TensorSpec(f"blk.{i}.ffn_{k}_exps.weight", (E, F, D) if k != "down"
                           else (E, D, F), f"ffn_{k}_exps", i, n_experts=E)
                for k in ("gate", "up", "down")]
    return out + [TensorSpec("output.weight", (1000, D), "output")]


def damage(ss) -> dict:
    """More damage for fewer bits, experts weighing less than attention."""
    bits = {"Q8_0": 8.5, "Q6_K": 6.56, "Q5_K": 5.5, "Q4_K": 4.5, "IQ4_XS": 4.25, "Q3_K": 3.44,
            "IQ3_S": 3.44, "Q2_K": 2.63, "Q4_0": 4.5, "Q5_0": 5.5, "F16": 16}
    return {s.name: {t: s.n_elements * 2.0 ** -b * (0.2 if s.n_experts else 1.0)
                     for t, b in bits.items()} for s in ss}


def devices(cpu_mb: float, gpu_mb: float, cpu_bw=50e9, gpu_bw=900e9) -> list[Device]:
    return [Device(CPU, int(cpu_mb * 1e6), 100_000, cpu_bw),
            Device("GPU0", int(gpu_mb * 1e6), 200_000, gpu_bw)]


def test_layers_split_over_gpus_as_llama_cpp_does():
    # llama.cpp: layer il (output: il = n_layer) goes to the first GPU whose cumulative share
    # exceeds il / (n_layer + 1) (src/llama-model.cpp, upper_bound over the splits)
    assert layer_gpus(3, [1, 1]) == [0, 0, 1, 1]
    assert layer_gpus(5, [24, 12]) == [0, 0, 0, 0, 1, 1]
    assert layer_gpus(4, [1]) == [0] * 5


def test_devices_hold_their_tensors_and_only_experts_leave_the_gpu():
    ss = specs()
    devs = devices(cpu_mb=8, gpu_mb=3)
    plan = solve_placed(ss, damage(ss), mp.Budget(11 * 10**6), devs, layer_gpus(N_LAYER, [1]),
                        K)
    used = device_weight_bytes(plan.tensors, plan.placement)
    for d in devs:
        assert used[d.name] + d.fixed_bytes <= d.cap_bytes
    assert plan.placement["token_embd.weight"] == CPU
    by = {s.name: s for s in ss}
    moved = {n for n, d in plan.placement.items() if d == CPU} - {"token_embd.weight"}
    assert moved and all(by[n].n_experts for n in moved)
    # the GPU is used, not left empty: less than its room would be a worse plan
    assert used["GPU0"] > 0.8 * (devs[1].cap_bytes - devs[1].fixed_bytes)


def test_speed_floor_holds_and_costs_quality():
    ss = specs()
    gpus = layer_gpus(N_LAYER, [1])
    devs = devices(cpu_mb=10, gpu_mb=2, cpu_bw=2e9, gpu_bw=50e9)
    free = solve_placed(ss, damage(ss), mp.Budget(12 * 10**6), devs, gpus, K)
    t_free = decode_seconds(free, ss, K)
    floor = 1.0 / (0.8 * t_free)  # 25% faster than the unconstrained plan
    fast = solve_placed(ss, damage(ss), mp.Budget(12 * 10**6), devs, gpus, K,
                        min_tokens_per_s=floor)
    assert decode_seconds(fast, ss, K) <= 1.0 / floor * (1 + 1e-9)
    assert fast.predicted_damage > free.predicted_damage
    with pytest.raises(mp.PlanError, match="tokens/s"):
        solve_placed(ss, damage(ss), mp.Budget(12 * 10**6), devs, gpus, K,
                     min_tokens_per_s=1000.0 / t_free)


def test_a_device_too_small_for_its_buffers_is_named():
    ss = specs()
    devs = [Device(CPU, 10**8, 0, 1e9), Device("GPU0", 100_000, 200_000, 1e9)]
    with pytest.raises(mp.PlanError, match="GPU0: its 100.00 KB cannot hold"):
        solve_placed(ss, damage(ss), mp.Budget(10**8), devs, layer_gpus(N_LAYER, [1]), K)


def _matched(patterns, names) -> set[str]:
    """What llama.cpp's loader does with --override-tensor: std::regex_search per name."""
    return {n for n in names if any(re.search(p, n) for p in patterns)}


@pytest.mark.parametrize("gpu_mb", [1.5, 2.5, 3.0, 4.0])
def test_override_patterns_match_exactly_the_tensors_on_the_cpu(gpu_mb):
    ss = specs()
    plan = solve_placed(ss, damage(ss), mp.Budget(10**8), devices(100, gpu_mb),
                        layer_gpus(N_LAYER, [1]), K)
    on_cpu = {n for n, d in plan.placement.items() if d == CPU} - {"token_embd.weight"}
    names = [s.name for s in ss] + ["blk.10.ffn_up_exps.weight", "blk.1.ffn_up_exps.bias"]
    assert _matched(override_patterns(plan), names) == on_cpu
    n = n_cpu_moe(plan)
    if n is not None:  # --n-cpu-moe N's own patterns (common/common.h) give the same set
        ncm = [rf"blk\.{i}\.ffn_(up|down|gate|gate_up)_(ch|)exps" for i in range(n)]
        assert _matched(ncm, [s.name for s in ss]) == on_cpu


def test_placement_round_trips_in_the_plan_json():
    ss = specs()
    plan = solve_placed(ss, damage(ss), mp.Budget(10**8), devices(100, 2.5),
                        layer_gpus(N_LAYER, [1]), K)
    back = mp.MemoryPlan.from_json(plan.to_json())
    assert back.placement == plan.placement and back.devices == plan.devices
    assert np.isclose(decode_seconds(back, ss, K), decode_seconds(plan, ss, K))
