"""Random weights of the right shapes for networks whose real weights are files (LPIPS), and
a model's initial params built as the train stages build theirs."""

from __future__ import annotations

import jax
import numpy as np

from arcvq_jax import sharding
from arcvq_jax.losses import lpips as lpips_lib


def init_params(model, *args, seed: int = 0):
  """model.init(PRNGKey(seed), *args)['params'] as one program with its draws hashed together
  (`sharding.init_in_place`, as the stages' fresh states): op by op, every op and every
  parameter's draw would compile a program of its own. The same random bits as model.init;
  floats equal up to rounding."""

  def fn(key):
    return model.init(key, *args)["params"]

  key = jax.random.PRNGKey(seed)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  return sharding.init_in_place(fn, key, jax.tree.map(lambda _: device, jax.eval_shape(fn, key)))


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
