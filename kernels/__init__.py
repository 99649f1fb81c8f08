"""Numba kernels: pure functions over float32 arrays, no model knowledge.

Conventions: arrays are C-contiguous float32 (int64 for token ids); `*_forward` returns nothing
and writes into `out` arrays given by the caller; `*_backward` accumulates (+=) parameter
gradients, so callers can sum over micro-batches, and writes the input gradient, except the
norms' backward, which adds it into dx (the residual stream's gradient is already there).
Every public function checks its arguments (checks.py) before the compiled code runs: the kernels
index without bounds checks, so wrong shapes or dtypes and out-of-range indices raise ValueError.
"""
