"""Random weights of the right shapes for networks whose real weights are files (LPIPS), and
a model's initial params built as the train stages build theirs."""

from __future__ import annotations

import jax
import numpy as np
from ml_collections import ConfigDict

from arcvq_jax import sharding
from arcvq_jax.losses import lpips as lpips_lib


def init_params(model, *args, seed: int = 0):
  """model.init(PRNGKey(seed), *args)['params'] on one device, built by `sharding.fresh_state`
  as the stages build their states (one program, its draws hashed together): op by op, every
  op and every parameter's draw would compile a program of its own. The same random bits as
  model.init; floats equal up to rounding."""
  mesh = sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  params, _ = sharding.fresh_state(
    lambda key: model.init(key, *args)["params"], seed, mesh, ConfigDict(dict(param_rules=()))
  )
  return params


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
