"""Run by tests/test_prior_sharding.py in a subprocess with 8 simulated CPU devices.

Trains three steps of a tiny LDM and a tiny PixelCNN on the same batches with meshes of 1
device, 8 devices ('data') and 2 x 4 ('data', 'fsdp'), and prints the loss histories, sums of
the final params and EMA, and the number of state leaves split over 'fsdp', as JSON.
"""

import json

import jax
import numpy as np

from arcvq_jax import prior_config, sharding
from arcvq_jax.models import pixelcnn, unet
from arcvq_jax.train import prior_common, prior_ldm, prior_pixelcnn


def mesh_for(devices, c, fsdp: bool):
  if fsdp:
    c.sharding.fsdp_min_size = 256
    return sharding.make_mesh((-1, 4), ("data", "fsdp"), devices=devices)
  return sharding.make_mesh((-1,), ("data",), devices=devices)


def run(stage: str, devices, fsdp: bool, steps: int = 3):
  rng = np.random.default_rng(0)
  if stage == "ldm":
    c = prior_config.ldm_config()
    c.num_classes = 5
    c.unet.update(
      dict(
        model_channels=32,
        channel_mult=(1, 2),
        num_res_blocks=1,
        attention_resolutions=(),  # the middle block's transformer only: 3 fewer to compile
        num_head_channels=16,
        context_dim=32,
      )
    )
    c.optimizer.lr = 1e-3
    mesh = mesh_for(devices, c, fsdp)
    model = unet.from_config(c, latent_channels=4)
    state, _, step_fn = prior_ldm.create_state_and_step(
      c, model, prior_common.make_optimizer(c), mesh, (8, 8, 4), 1.0
    )
    batches = [
      {
        "latent": rng.normal(size=(16, 8, 8, 4)).astype(np.float32),
        "label": rng.integers(0, 5, 16).astype(np.int32),
      }
      for _ in range(steps)
    ]
  else:
    c = prior_config.pixelcnn_config()
    c.num_classes = 5
    c.pixelcnn.update(dict(dim=16, n_layers=3, head_dim=32))
    c.ema.decay = 0.9
    mesh = mesh_for(devices, c, fsdp)
    model = pixelcnn.from_config(c, num_codes=32)
    state, _, step_fn = prior_pixelcnn.create_state_and_step(
      c, model, prior_common.make_optimizer(c), mesh, (6, 6)
    )
    batches = [
      {
        "tokens": rng.integers(0, 32, (16, 6, 6)).astype(np.int32),
        "label": rng.integers(0, 5, 16).astype(np.int32),
      }
      for _ in range(steps)
    ]
  losses = []
  for batch in batches:
    state, metrics = step_fn(state, sharding.global_batch(batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
  total = lambda tree: float(
    sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(tree))
  )
  sharded = sum("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(state))
  return dict(
    losses=losses, params=total(state.params), ema=total(state.ema_params), fsdp_leaves=sharded
  )


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  out = {}
  for stage in ("ldm", "pixelcnn"):
    out[stage] = dict(
      one=run(stage, devices[:1], False),
      eight=run(stage, devices, False),
      fsdp=run(stage, devices, True),
    )
  print("RESULT" + json.dumps(out))


if __name__ == "__main__":
  main()
