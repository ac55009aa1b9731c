"""export_options: the statistics of each tensor the file holds, sliced to the kept experts."""

from __future__ import annotations

import numpy as np

from export.arch import TensorRecipe
from export.options import ExportOptions, export_options
from memory_planner.stats import CalibStats
from memory_planner.types import TensorSpec

E, N, B = 4, 64, 64  # experts, row length, covariance block (one block per row)


def _recipes(n_experts: int) -> list[TensorRecipe]:
    specs = [
        TensorSpec("blk.0.ffn_up_exps.weight", (n_experts, 8, N), "ffn_up_exps", 0, n_experts),
        TensorSpec("blk.0.ffn_down_exps.weight", (n_experts, 8, N), "ffn_down_exps", 0,
                   n_experts),
        TensorSpec("blk.0.attn_q.weight", (8, N), "attn_q", 0),
        TensorSpec("blk.0.attn_norm.weight", (N,), "attn_norm", 0, quantizable=False),
    ]
    return [TensorRecipe(s, (s.name,)) for s in specs]


def _stats() -> CalibStats:
    rng = np.random.default_rng(0)
    up, down, q = (r.spec.name for r in _recipes(E)[:3])
    return CalibStats(
        in_sum2={up: rng.random((E, N)) + 0.5, down: rng.random((1, N)) + 0.5,
                 q: rng.random((1, N)) + 0.5},
        counts={up: np.array([3.0, 0.0, 5.0, 2.0]), down: np.array([10.0]),
                q: np.array([10.0])},
        # per-expert covariances for ffn_up, one shared by the experts for ffn_down
        in_cov={up: rng.random((E, 1, B, B)), down: rng.random((1, 1, B, B)),
                q: rng.random((1, 1, B, B))},
    )


def test_statistics_follow_the_kept_experts():
    stats, full = _stats(), _recipes(E)
    kept = {0: (1, 3)}
    opts = export_options(stats, full, _recipes(2), kept, search=8, threads=2,
                          progress=False)
    up, down, q, norm = (r.spec.name for r in full)
    im = stats.importance_for(full[0].spec)
    np.testing.assert_array_equal(opts.imatrix[up], im[[1, 3]])
    assert opts.imatrix[up][0].tolist() == [1.0] * N  # expert 1 saw no token: ones
    # one measured row, shared: broadcast to every kept expert
    assert opts.imatrix[down].shape == (2, N)
    np.testing.assert_array_equal(opts.imatrix[q], stats.importance(q)[0])
    assert norm not in opts.imatrix  # kept F32
    np.testing.assert_array_equal(opts.covariance[up], stats.covariance(up)[[1, 3]])
    assert opts.covariance[down].shape == (1, B, B)  # shared: not sliced
    assert opts.covariance[q].shape == (1, B, B)
    assert (opts.search, opts.threads, opts.progress) == (8, 2, False)


def test_no_search_no_covariances_and_no_stats_no_statistics():
    opts = export_options(_stats(), _recipes(E), _recipes(E), None, search=1)
    assert opts.covariance == {} and len(opts.imatrix) == 3
    assert opts.imatrix["blk.0.ffn_up_exps.weight"].shape == (E, N)
    assert export_options(None, _recipes(E), _recipes(E)) == ExportOptions()
