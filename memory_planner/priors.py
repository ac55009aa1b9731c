"""Damage priors: a plan from tensor shapes alone, before any weight has been read.

A prior damage is (how much a type hurts a typical weight matrix) x (how much that tensor's
error reaches the model's output). Both factors are deliberately simple; measured errors
(`edgemoe.damage.measure_damage`) or calibration statistics replace them when weights are
at hand.

1. `REL_ERROR`: relative quantization error ||W - Q(W)||^2 / ||W||^2 per GGUF type, measured
   once with ggml's own quantizer by `scripts/measure_priors.py`: 256 rows of 4096 i.i.d.
   N(0, 1) weights and 256 rows of Student-t (4 degrees of freedom) weights, no imatrix
   (a flat one for IQ2_XXS, IQ2_XS and IQ1_S, which ggml refuses to quantize without).
   llama-cpp-python 0.3.36's libggml-base. The prior uses the mean of the two columns.

2. `tensor_weight`: how much of the model's output a tensor's relative error reaches, in
   the unit the rest of the planner uses (measured relative error, `memory_planner.joint`):
   the relative squared error of the output of the layer part the tensor belongs to.
   A matrix on a sublayer's path (attention or FFN; matrices in series) passes its relative
   error on to that sublayer's output: weight 1. The MoE sublayer splits between routed and
   shared experts in proportion to their active width (k * ff_exp vs n_shared * ff_exp), an
   equal split if k is not given. `output.weight` feeds the logits directly, while each of
   the 2L sublayers and the embedding is assumed to carry an equal share of the last hidden
   state: the output counts as 2L + 1 layer parts. `token_embd` counts as one.
   Routing frequency does not enter: every token reads k slices of each stacked expert
   tensor and all slices share one type, so the tensor's relative error reaches every
   token's routed output in full. (Frequencies matter for per-expert decisions: pruning.)

Damages of different tensors add up: their sum predicts the summed relative output errors.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from .quant_types import DEFAULT_LADDER, candidate_types
from .types import TensorSpec

DAMAGE_MODEL = "prior/shape-only"

# Measured by scripts/measure_priors.py (see the module docstring): (gaussian, heavy_tailed)
REL_ERROR: dict[str, tuple[float, float]] = {
    "F16": (4.31e-08, 4.27e-08),
    "BF16": (2.76e-06, 2.8e-06),
    "Q8_0": (2.87e-05, 5.43e-05),
    "Q6_K": (0.000314, 0.000521),
    "Q5_1": (0.00143, 0.00208),
    "Q5_K": (0.0013, 0.00192),
    "Q5_0": (0.00183, 0.00335),
    "Q4_1": (0.00611, 0.00881),
    "Q4_K": (0.00508, 0.00748),
    "IQ4_NL": (0.00579, 0.00869),
    "IQ4_XS": (0.00588, 0.00888),
    "Q4_0": (0.00739, 0.0133),
    "MXFP4": (0.0132, 0.0172),
    "Q3_K": (0.0228, 0.0334),
    "IQ3_S": (0.0276, 0.0395),
    "IQ3_XXS": (0.0454, 0.0658),
    "Q2_K": (0.088, 0.117),
    "IQ2_S": (0.0701, 0.12),
    "IQ2_XS": (0.0898, 0.124),
    "IQ2_XXS": (0.118, 0.18),
    "IQ1_M": (0.339, 0.358),
    "IQ1_S": (0.236, 0.338),
}


class NoPriorError(KeyError):
    """A type the prior table does not cover."""


def type_error(type_name: str) -> float:
    """Typical relative error of a type: the mean of the Gaussian and heavy-tailed rows."""
    try:
        g, h = REL_ERROR[type_name]
    except KeyError:
        raise NoPriorError(
            f"no prior error for {type_name}; known: {', '.join(REL_ERROR)}"
        ) from None
    return 0.5 * (g + h)


def tensor_weight(spec: TensorSpec, n_blocks: int, routed_share: float = 0.5) -> float:
    """How much of a layer part's output this tensor's relative error reaches (see above)."""
    kind = spec.kind
    if kind == "output":
        return 2.0 * n_blocks + 1.0  # the logits carry all 2L + 1 terms of the last state
    if kind.endswith("_exps"):
        return routed_share
    if kind.endswith("_shexp"):
        return 1.0 - routed_share
    return 1.0


def _routed_share(specs: Sequence[TensorSpec], experts_used: int | None) -> float:
    """Routed experts' share of a MoE sublayer's output: k * ff_exp / (k * ff_exp + ff_sh)."""
    ff_exp = next((s.shape[1] for s in specs if s.kind == "ffn_up_exps"), 0)
    ff_sh = next((s.shape[0] for s in specs if s.kind == "ffn_up_shexp"), 0)
    if not ff_sh:
        return 1.0
    if experts_used is None or not ff_exp:
        return 0.5
    routed = experts_used * ff_exp
    return routed / (routed + ff_sh)


def prior_damage(specs: Sequence[TensorSpec], ladder: Sequence[str] = DEFAULT_LADDER,
                 experts_used: int | None = None) -> dict[str, dict[str, float]]:
    """Damage table {tensor name: {legal type: damage}} for `solve`, from shapes alone.

    `experts_used` (top-k) splits MoE sublayers between routed and shared experts; without
    it the split is equal. Types come from `ladder` after llama.cpp's block-size fallbacks.
    """
    n_blocks = 1 + max((s.layer for s in specs if s.layer is not None), default=0)
    routed = _routed_share(specs, experts_used)
    out: dict[str, dict[str, float]] = {}
    for s in specs:
        if not s.quantizable:
            continue
        w = tensor_weight(s, n_blocks, routed)
        out[s.name] = {legal: w * type_error(legal)
                       for legal, _ in candidate_types(s, tuple(ladder)) if legal != "F32"}
    return out


# Spread of experts' output-energy shares within a layer, as the standard deviation of their
# logarithm. Measured by `edgemoe calibrate` on the bundled stdlib-moe model (8 experts per
# layer, trained with per-layer load balancing): 1.14, 0.46, 0.50, 0.69 in layers 0-3.
# Used only when no calibration exists: it says how much the least important experts carry.
EXPERT_ENERGY_LOG_SIGMA = 0.6

# KL divergence per unit of predicted damage is not the same for pruning and quantization:
# the sensitivity probes on the bundled model measured 0.107 for pruning (1 of 8 experts per
# layer) against a median of 0.0098 for quantization, a ratio of 10.9. Shape-only plans
# weigh pruning damage by this ratio.
PRUNING_COST_RATIO = 10.0


def prior_expert_shares(n_expert: int, sigma: float = EXPERT_ENERGY_LOG_SIGMA) -> np.ndarray:
    """Expected output-energy shares of a layer's experts, most important first: log-normal
    quantiles (median rank positions), normalised to sum to 1."""
    from scipy.stats import norm

    q = norm.ppf((np.arange(n_expert)[::-1] + 0.5) / n_expert)
    shares = np.exp(sigma * q)
    return shares / shares.sum()
