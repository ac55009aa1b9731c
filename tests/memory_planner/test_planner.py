import itertools

import numpy as np
import pytest

from memory_planner import (
    Budget,
    BudgetTooSmallError,
    MemoryPlan,
    TensorSpec,
    format_size,
    legal_type,
    parse_size,
    solve,
    tensor_nbytes,
    uniform_plan,
)
from memory_planner.quant_types import candidate_types

LADDER = ("Q8_0", "Q6_K", "Q4_K", "Q2_K")


def _problem(seed: int, n: int = 5):
    rng = np.random.default_rng(seed)
    specs = [TensorSpec(f"blk.{i}.attn_q.weight", (int(rng.choice([256, 512])), 256), "attn_q", i)
             for i in range(n)]
    specs.append(TensorSpec("output_norm.weight", (256,), "output_norm", quantizable=False))
    bits = {"Q8_0": 8.5, "Q6_K": 6.56, "Q4_K": 4.5, "Q2_K": 2.62}
    # damage falls with bits, with a per-tensor sensitivity
    damage = {s.name: {t: float(rng.uniform(0.5, 2.0)) * 2.0 ** -b for t, b in bits.items()}
              for s in specs if s.quantizable}
    return specs, damage


def _brute_force(specs, damage, avail):
    options = [candidate_types(s, LADDER) for s in specs]
    best = None
    for combo in itertools.product(*options):
        nbytes = sum(tensor_nbytes(s.n_elements, s.row_length, t)
                     for s, (t, _) in zip(specs, combo))
        if nbytes > avail:
            continue
        d = sum(damage[s.name][t] for s, (t, _) in zip(specs, combo) if s.quantizable)
        if best is None or d < best[0] - 1e-15:
            best = (d, nbytes)
    return best


@pytest.mark.parametrize("seed", range(6))
def test_milp_matches_brute_force(seed):
    specs, damage = _problem(seed)
    lo = uniform_plan(specs, "Q2_K", Budget(10**12)).weight_bytes
    hi = uniform_plan(specs, "Q8_0", Budget(10**12)).weight_bytes
    avail = int(lo + (hi - lo) * (0.2 + 0.12 * seed))
    plan = solve(specs, damage, Budget(avail), ladder=LADDER)
    best_d, _ = _brute_force(specs, damage, avail)
    assert plan.weight_bytes <= avail
    assert plan.predicted_damage == pytest.approx(best_d, rel=1e-9)


def test_higher_cap_buys_more_bits_and_less_damage():
    specs, damage = _problem(7, n=8)
    lo = uniform_plan(specs, "Q2_K", Budget(10**12)).weight_bytes
    hi = uniform_plan(specs, "Q8_0", Budget(10**12)).weight_bytes
    plans = [solve(specs, damage, Budget(int(lo + (hi - lo) * f)), ladder=LADDER)
             for f in (0.1, 0.5, 0.9)]
    bpw = [p.bits_per_weight for p in plans]
    dmg = [p.predicted_damage for p in plans]
    assert bpw[0] < bpw[1] < bpw[2]
    assert dmg[0] > dmg[1] > dmg[2]


def test_cap_below_minimum_names_the_minimum():
    specs, damage = _problem(1)
    budget = Budget(cap_bytes=1000, kv_bytes=500)
    with pytest.raises(BudgetTooSmallError) as e:
        solve(specs, damage, budget, ladder=LADDER)
    minimum = uniform_plan(specs, "Q2_K", Budget(10**12)).weight_bytes + 500
    assert e.value.minimum_total_bytes == minimum
    assert format_size(minimum) in str(e.value)


def test_non_quantizable_tensors_stay_f32():
    specs, damage = _problem(2)
    plan = solve(specs, damage, Budget(10**9), ladder=LADDER)
    assert plan.by_name()["output_norm.weight"].type == "F32"


def test_plan_json_round_trip(tmp_path):
    specs, damage = _problem(3)
    plan = solve(specs, damage, Budget(10**9, kv_bytes=123, compute_bytes=7, ctx=64),
                 ladder=LADDER)
    plan.save(tmp_path / "p.json")
    again = MemoryPlan.load(tmp_path / "p.json")
    assert again == plan
    assert TensorSpec.from_dict(specs[0].to_dict()) == specs[0]


@pytest.mark.parametrize("text,expected", [
    ("128GB", 128 * 10**9), ("120GiB", 120 * 2**30), ("500MB", 500 * 10**6),
    ("1.5TB", 1.5e12), ("64 gb", 64 * 10**9), ("2048", 2048), ("10KiB", 10240),
])
def test_parse_size(text, expected):
    assert parse_size(text) == expected


@pytest.mark.parametrize("text", ["", "GB", "12XB", "-3GB", "1e9"])
def test_parse_size_rejects(text):
    with pytest.raises(ValueError):
        parse_size(text)


@pytest.mark.parametrize("asked,row,legal", [
    ("Q4_K", 256, "Q4_K"), ("Q4_K", 128, "Q5_0"), ("Q5_K", 128, "Q5_1"), ("Q6_K", 96, "Q8_0"),
    ("Q2_K", 128, "Q4_0"), ("IQ2_XXS", 128, "IQ4_NL"), ("IQ4_XS", 64, "IQ4_NL"),
    ("Q4_K", 48, "F16"), ("Q8_0", 40, "F16"), ("F32", 7, "F32"),
])
def test_block_size_fallbacks(asked, row, legal):
    assert legal_type(asked, row) == legal


def test_exact_bytes():
    # Q4_K: 256 elements in 144 bytes
    assert tensor_nbytes(8 * 256 * 256, 256, "Q4_K") == 8 * 256 * 144
    assert tensor_nbytes(1000, 1000, "F32") == 4000
    with pytest.raises(ValueError):
        tensor_nbytes(128, 128, "Q4_K")
