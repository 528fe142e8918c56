"""Latents and codebooks for the blocked ArcLoss / search tests (test_blockwise.py and
blockwise_multidevice_script.py, which runs in a subprocess)."""

import numpy as np


def random_data(seed, n, k_rows, d):
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, d)).astype(np.float32) * rng.uniform(0.1, 4, (n, 1)).astype(np.float32)
  e = rng.normal(size=(k_rows, d)).astype(np.float32) * rng.uniform(0.2, 3, (k_rows, 1)).astype(
    np.float32
  )
  return z, e


def exact_units(seed, count, d=8):
  """Vectors whose normalised dot products are exact in float32 (multiples of 1/4), whatever
  the summation order: unit one-hots and (+-1/2 on 4 coordinates), times powers of two."""
  rng = np.random.default_rng(seed)
  out = np.zeros((count, d), np.float32)
  for row in out:
    if rng.random() < 0.3:
      row[rng.integers(d)] = rng.choice([-1.0, 1.0])
    else:
      row[rng.choice(d, 4, replace=False)] = rng.choice([-0.5, 0.5], 4)
    row *= 2.0 ** rng.integers(-2, 3)
  return out
