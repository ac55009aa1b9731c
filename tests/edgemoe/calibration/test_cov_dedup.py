"""Tensors that read one input share one covariance: computed once, stored once, and read
back by export exactly as separate copies were."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

import memory_planner as mp
from edgemoe import pipeline
from edgemoe.calibration.collect import calibrate, cov_bytes, cov_plan
from export.imatrix import read_stats, write_stats
from tests import arch_fixtures as af
from tests.helpers import PROMPT


def test_a_search_export_is_byte_identical_with_shared_covariances(qwen3_dir, tmp_path):
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 6)
    stats = calibrate(str(qwen3_dir), text=str(text), n_ctx=64, calib_type="F32",
                      progress=False)
    q, k = "blk.0.attn_q.weight", "blk.0.attn_k.weight"
    gate, up = "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"
    assert stats.in_cov[q] is stats.in_cov[k] and stats.in_cov[gate] is stats.in_cov[up]
    # the format before: every tensor its own copy
    copies = replace(stats, in_cov={n: v.copy() for n, v in stats.in_cov.items()})
    shared_file = write_stats(stats, tmp_path / "shared.gguf")
    copies_file = write_stats(copies, tmp_path / "copies.gguf")
    cov_once = sum(v.nbytes for v in {id(v): v for v in stats.in_cov.values()}.values())
    cov_all = sum(v.nbytes for v in stats.in_cov.values())
    saved = copies_file.stat().st_size - shared_file.stat().st_size
    assert saved >= cov_all - cov_once > 0
    back = read_stats(shared_file)
    assert back.in_cov[q] is back.in_cov[k]
    model = pipeline.open_model(qwen3_dir)
    plan = mp.uniform_plan(model.specs, "Q3_K", mp.Budget(2**62))
    a = pipeline.export(model, plan, tmp_path / "a.gguf", stats=back, progress=False,
                        search=4)
    b = pipeline.export(model, plan, tmp_path / "b.gguf", stats=read_stats(copies_file),
                        progress=False, search=4)
    c = pipeline.export(model, plan, tmp_path / "c.gguf", stats=None, progress=False)
    assert a.read_bytes() == b.read_bytes() != c.read_bytes()


def test_a_shared_expert_shares_the_routed_experts_input(bpe_tokenizer_dir, tmp_path):
    src = af.build_qwen2_moe(tmp_path / "m", bpe_tokenizer_dir)
    specs = pipeline.open_model(src).specs
    full = cov_plan(specs, 2**40)
    shared = cov_plan(specs, cov_bytes(specs, full) - 1)
    g, u = "blk.1.ffn_gate_exps.weight", "blk.1.ffn_up_exps.weight"
    sg, su = "blk.1.ffn_gate_shexp.weight", "blk.1.ffn_up_shexp.weight"
    assert full[u].owner == g and full[su].owner == sg  # per expert: two arrays
    assert {shared[n].owner for n in (g, u, sg, su)} == {g}  # one for all: one array
    text = tmp_path / "calib.txt"
    text.write_text(PROMPT * 6)
    stats = calibrate(str(src), text=str(text), n_ctx=64, calib_type="F32", progress=False,
                      cov_budget=cov_bytes(specs, shared))
    assert stats.in_cov[sg] is stats.in_cov[g] is stats.in_cov[su]
    assert "blk.1.ffn_down_shexp.weight" in stats.in_cov
    # every token reaches k = 2 routed experts and the shared one
    np.testing.assert_allclose(stats.in_sum2[g].sum(0), 2 * stats.in_sum2[sg][0], rtol=1e-5)
    assert stats.counts[sg][0] == stats.n_tokens == stats.counts[g].sum() / 2
    diag = np.diagonal(stats.in_cov[sg][0], axis1=-2, axis2=-1).reshape(-1)
    np.testing.assert_allclose(diag, stats.in_sum2[sg][0], rtol=1e-4)


def test_deepseek_v3_covariances_fit_the_default_budget():
    """From the public config: every input kept once takes 2.10 GB (each tensor its own
    copy: 3.85 GB); in the default 1 GiB the arrays serving the most weights per byte."""
    from pathlib import Path

    from edgemoe.calibration.collect import DEFAULT_COV_BUDGET
    from edgemoe.planning.from_config import read_config
    from export.arch import adapter_for

    cfg = Path(__file__).parents[2] / "fixtures" / "configs" / "deepseek-v3.json"
    a = adapter_for(read_config(cfg))
    specs = a.tensor_specs(a.n_expert)
    by = {s.name: s for s in specs}
    everything = cov_plan(specs, 10**10)  # the shared-expert level: per expert is 142 GB
    assert not any(c.per_expert for c in everything.values())
    copies = sum(4 * by[n].row_length * c.block for n, c in everything.items())
    assert round(copies / 1e9, 2) == 3.85 and round(cov_bytes(specs, everything) / 1e9, 2) == 2.1
    kept = cov_plan(specs, DEFAULT_COV_BUDGET)
    assert cov_bytes(specs, kept) <= DEFAULT_COV_BUDGET
    dropped = {by[n].kind for n in everything.keys() - kept.keys()}
    # the experts' arrays serve the most weights per byte; attention's the fewest
    assert dropped <= {"attn_q_a", "attn_kv_a_mqa", "attn_output", "ffn_down"}
    assert all(n in kept for n in everything if "_exps" in n or "shexp" in n)
    served = sum(by[n].n_elements for n in kept) / sum(by[n].n_elements for n in everything)
    assert served > 0.98
    assert kept["blk.5.ffn_up_shexp.weight"].owner == "blk.5.ffn_gate_exps.weight"
