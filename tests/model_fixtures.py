"""Random weights of the right shapes for networks whose real weights are files (LPIPS)."""

from __future__ import annotations

import numpy as np

from arcvq_jax.losses import lpips as lpips_lib


def random_lpips_params(seed: int = 0):
  """LPIPS params with He-normal VGG kernels, small biases and positive linear weights."""
  rng = np.random.default_rng(seed)
  flat = {}
  for key, shape in lpips_lib.expected_shapes().items():
    if key.startswith("lin/"):
      flat[key] = rng.uniform(0.0, 0.1, shape)
    elif key.endswith("kernel"):
      flat[key] = rng.normal(size=shape) * np.sqrt(2.0 / np.prod(shape[:-1]))
    else:
      flat[key] = rng.normal(size=shape) * 0.01
  return lpips_lib.from_flat(flat)
