import numpy as np

from memory_planner import Budget, TensorSpec
from memory_planner.joint import (
    damage_with_kept,
    keep_grid,
    kept_by_saliency,
    pruning_damage,
    solve_joint,
)
from memory_planner.planner import uniform_plan
from memory_planner.stats import CalibStats, ExpertStats

E, D, L = 8, 256, 2
LADDER = ("Q8_0", "Q4_K", "Q2_K")
ERR = {"Q8_0": 1e-5, "Q4_K": 4e-3, "Q2_K": 6e-2}


def specs_for(n):
    out = []
    for i in range(L):
        out.append(TensorSpec(f"blk.{i}.attn_q.weight", (D, D), "attn_q", i))
        out.append(TensorSpec(f"blk.{i}.ffn_gate_inp.weight", (n, D), "ffn_gate_inp", i,
                              quantizable=False))
        out.append(TensorSpec(f"blk.{i}.ffn_down_exps.weight", (n, D, D), "ffn_down_exps", i,
                              n_experts=n))
    return out


def stats_with_dead_experts(n_dead: int) -> CalibStats:
    experts = {}
    for i in range(L):
        energy = np.linspace(1.0, 2.0, E)
        energy[:n_dead] = 1e-6  # experts that almost never matter
        sal = np.sqrt(energy)
        experts[i] = ExpertStats(np.full(E, 10.0), np.full(E, 5.0), sal * 10, energy * 10,
                                 float(energy.sum() * 10))
    return CalibStats(experts=experts, n_tokens=100)


def tables(stats):
    dense = {f"blk.{i}.attn_q.weight": dict(ERR) for i in range(L)}
    per_expert = {f"blk.{i}.ffn_down_exps.weight":
                  {t: np.full(E, v) * stats.experts[i].energy_share for t, v in ERR.items()}
                  for i in range(L)}
    return dense, per_expert


def test_least_salient_experts_go():
    s = stats_with_dead_experts(2)
    kept = kept_by_saliency(s, 6)
    assert kept[0] == tuple(range(2, 8))
    dmg = pruning_damage(s, kept)
    assert dmg[0] < 1e-6
    dmg = pruning_damage(s, kept_by_saliency(s, 4))
    assert 0.1 < dmg[0] < 0.5


def test_damage_table_sums_kept_experts_only():
    s = stats_with_dead_experts(0)
    dense, per_expert = tables(s)
    kept = {0: (0, 1), 1: (6, 7)}
    t = damage_with_kept(specs_for(2), dense, per_expert, kept)
    share = s.experts[1].energy_share
    assert np.isclose(t["blk.1.ffn_down_exps.weight"]["Q4_K"], ERR["Q4_K"] * share[6:].sum())
    assert "blk.0.ffn_gate_inp.weight" not in t


def test_tight_cap_prunes_dead_experts_generous_cap_keeps_all():
    s = stats_with_dead_experts(2)
    dense, per_expert = tables(s)
    grid = keep_grid(E, 2)
    assert grid[0] == E and grid[-1] >= 2
    full_q4 = uniform_plan(specs_for(E), "Q4_K", Budget(10**12)).weight_bytes
    tight, rows = solve_joint(specs_for, dense, per_expert, s, Budget(full_q4 * 3 // 4), grid,
                              ladder=LADDER)
    assert tight.n_experts_kept == 6 and tight.kept_experts["0"] == tuple(range(2, 8))
    assert tight.weight_bytes <= full_q4 * 3 // 4
    assert {r.n_keep for r in rows} == set(grid)
    best = min((r for r in rows if r.feasible), key=lambda r: r.total_damage)
    assert best.n_keep == 6
    assert np.isclose(tight.predicted_damage, best.total_damage)

    roomy, _ = solve_joint(specs_for, dense, per_expert, stats_with_dead_experts(0),
                           Budget(10**9), grid, ladder=LADDER)
    assert roomy.n_experts_kept == E and roomy.kept_experts == {}


def test_grouped_routing_keeps_the_same_number_per_group():
    grid = keep_grid(16, 2, n_groups=4)
    assert all(n % 4 == 0 for n in grid) and grid[0] == 16
    e = ExpertStats(np.ones(16), np.ones(16), np.arange(16.0)[::-1], np.ones(16), 16.0)
    kept = kept_by_saliency(CalibStats(experts={0: e}), 8, n_groups=4)
    # saliency falls with the id: each group of 4 keeps its first two
    assert kept[0] == (0, 1, 4, 5, 8, 9, 12, 13)
