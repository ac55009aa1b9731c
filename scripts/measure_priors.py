"""Measure the relative quantization error of every GGUF type on synthetic weights.

Produces the table pasted into `memory_planner/priors.py`. Rows are 4096 long (a multiple of
every block size), 256 rows per distribution, quantized and read back with ggml itself
(`export.quantize.relative_error`). Two distributions bracket real LLM weights:
  gaussian      i.i.d. N(0, 1)
  heavy_tailed  i.i.d. Student-t with 4 degrees of freedom (kurtosis far above Gaussian,
                the outlier weights that make low-bit types lose precision)
No imatrix, except for types ggml refuses to quantize without one (IQ2_XXS, IQ2_XS, IQ1_S):
those get a flat imatrix of ones, which is what "no knowledge of the activations" means.

    python scripts/measure_priors.py            # prints the table as Python source
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from export.ggml import requires_imatrix  # noqa: E402
from export.quantize import relative_error  # noqa: E402

TYPES = (
    "F16", "BF16", "Q8_0", "Q6_K", "Q5_1", "Q5_K", "Q5_0", "Q4_1", "Q4_K", "IQ4_NL", "IQ4_XS",
    "Q4_0", "MXFP4", "Q3_K", "IQ3_S", "IQ3_XXS", "Q2_K", "IQ2_S", "IQ2_XS", "IQ2_XXS", "IQ1_M",
    "IQ1_S",
)
N_ROWS, N_PER_ROW, SEED = 256, 4096, 0


def samples() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(SEED)
    return {
        "gaussian": rng.standard_normal((N_ROWS, N_PER_ROW)).astype(np.float32),
        "heavy_tailed": rng.standard_t(4, (N_ROWS, N_PER_ROW)).astype(np.float32),
    }


def main() -> None:
    data = samples()
    ones = np.ones(N_PER_ROW, dtype=np.float32)
    t0 = time.perf_counter()
    print("REL_ERROR: dict[str, tuple[float, float]] = {  # type: (gaussian, heavy_tailed)")
    for t in TYPES:
        im = ones if requires_imatrix(t) else None
        g, h = (relative_error(data[k], t, imatrix=im, max_rows=N_ROWS) for k in data)
        print(f'    "{t}": ({g:.3g}, {h:.3g}),')
    print("}")
    print(f"# measured in {time.perf_counter() - t0:.1f} s", file=sys.stderr)


if __name__ == "__main__":
    main()
