"""Calibration: run the model in llama.cpp on text and measure what the planner needs.

- `collect`: expert usage, importance matrices and input covariances (a stats file).
- `hooks`: the eval-callback layer that reads and rewrites llama.cpp graph nodes.
- `sensitivity`: probe exports measuring KL divergence per unit of predicted damage.
"""
