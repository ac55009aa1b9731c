"""A picture of a plan: layers x tensor kinds, colour = bits per weight."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from memory_planner import MemoryPlan
from memory_planner.names import parse_tensor_name


def plan_heatmap(plan: MemoryPlan, path: str | Path, title: str = "") -> Path:
    """Write a PNG heatmap of the plan's bits per weight (F32 tensors left out)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells: dict[tuple[int, str], float] = {}
    extra = []
    for t in plan.tensors:
        if t.type == "F32":
            continue
        kind, layer = parse_tensor_name(t.name)
        if layer is not None:
            cells[(layer, kind)] = t.bits_per_weight
        else:
            extra.append(f"{kind} {t.type} ({t.bits_per_weight:.2f} bpw)")
    layers = sorted({k[0] for k in cells})
    kinds = list(dict.fromkeys(k[1] for k in cells))
    grid = np.full((len(layers), len(kinds)), np.nan)
    for (layer, kind), bpw in cells.items():
        grid[layers.index(layer), kinds.index(kind)] = bpw
    types = {(n.layer, n.kind): t.type for t in plan.tensors
             if (n := parse_tensor_name(t.name)).layer is not None and t.type != "F32"}

    fig, ax = plt.subplots(figsize=(1.1 * len(kinds) + 2.5, 0.35 * len(layers) + 2.2))
    im = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=1.5,
                   vmax=max(9.0, float(np.nanmax(grid)) if grid.size else 9.0))
    ax.set_xticks(range(len(kinds)), kinds, rotation=40, ha="right")
    ax.set_yticks(range(len(layers)), [str(x) for x in layers])
    ax.set_ylabel("layer")
    if len(layers) * len(kinds) <= 400:
        for (layer, kind), name in types.items():
            ax.text(kinds.index(kind), layers.index(layer), name, ha="center", va="center",
                    fontsize=7, color="white")
    fig.colorbar(im, ax=ax, label="bits per weight")
    pruned = ""
    if plan.n_experts and plan.n_experts_kept < plan.n_experts:
        share = 1 - plan.n_experts_kept / plan.n_experts
        pruned = f"; experts kept {plan.n_experts_kept}/{plan.n_experts} ({share:.0%} pruned)"
    ax.set_title((title + "\n" if title else "")
                 + f"{plan.bits_per_weight:.2f} bpw overall{pruned}", fontsize=10)
    if extra:
        fig.text(0.01, 0.01, "; ".join(extra), fontsize=7)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
