"""Run by tests/test_sharding.py in a subprocess with 8 simulated CPU devices.

Trains a few steps of a small ArcVQ-VAE on the same batches with a mesh of 1 device and a
mesh of 8 devices, and prints both loss histories (and final params) as JSON.
"""

import json
import sys

import jax
import numpy as np

from arcvq_jax import config as config_lib
from arcvq_jax import sharding
from arcvq_jax.models import discriminator
from arcvq_jax.train import gan_steps, tokenizer_steps
from arcvq_jax.train import state as state_lib
from arcvq_jax.train.state import make_disc_optimizer, make_optimizer


def make_mesh(devices, c, fsdp: bool):
  """Pure data parallelism, or (with fsdp, on 8 devices) a 2 x 4 ('data', 'fsdp') mesh that
  splits every parameter of >= 256 elements and its Adam moments over 'fsdp'."""
  if fsdp and len(devices) > 1:
    c.sharding.fsdp_min_size = 256
    return sharding.make_mesh((-1, 4), ("data", "fsdp"), devices=devices)
  return sharding.make_mesh((-1,), ("data",), devices=devices)


def num_fsdp_sharded(state) -> int:
  """Leaves of the state split over the 'fsdp' axis."""
  return sum("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(state))


def run_vqgan(devices, steps: int = 3, fsdp: bool = False):
  """The VQGAN's generator and discriminator steps (GAN on from step 0, no LPIPS); attention
  in the middle block only (per image: nothing of it crosses devices)."""
  c = config_lib.vqgan_config()
  c.model.update(
    dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(), resolution=16, z_channels=8)
  )
  c.quantizer.num_codes, c.quantizer.embed_dim = 32, 8
  c.gan.update(dict(disc_start=0, ndf=8, n_layers=1))
  # A small lr: Adam moves a parameter whose gradient is ~0 by +-lr on the sign of its
  # rounding noise, which the GAN terms (d_weight: a ratio of gradient norms) amplify.
  c.optimizer.update(dict(lr=1e-5, scale_lr=False))
  c.loss.perceptual_weight = 0.0
  mesh = make_mesh(devices, c, fsdp)
  model = state_lib.build_model(c, channels=3)
  state, _, steps_fn = gan_steps.create_state_and_steps(
    c,
    model,
    discriminator.from_config(c),
    make_optimizer(c),
    make_disc_optimizer(c),
    mesh,
    (16, 16, 3),
    None,
  )
  sharded = num_fsdp_sharded(state)
  rng = np.random.default_rng(0)
  losses = []
  for t in range(steps):
    x = rng.uniform(-1, 1, size=(16, 16, 16, 3)).astype(np.float32)
    batch = sharding.global_batch({"image": x}, sharding.batch_sharding(mesh))
    state, m = steps_fn(state, batch, t)
    losses.append({k: float(v) for k, v in m.items()})
  flat = [np.asarray(leaf).ravel() for leaf in jax.tree.leaves(jax.device_get(state.disc))]
  return (
    losses,
    float(np.concatenate(flat).astype(np.float64).sum()),
    np.asarray(state.params["codebook"]).tolist(),
    sharded,
  )


def run(devices, variant: str, steps: int = 3):
  fsdp = variant.endswith("_fsdp")
  variant = variant.removesuffix("_fsdp")
  if variant == "vqgan":
    return run_vqgan(devices, steps, fsdp)
  blocked = variant.endswith("_blocked")
  c = config_lib.apply_variant(config_lib.vqvae_config(), variant.removesuffix("_blocked"))
  if blocked:  # ArcLoss and the search through blocks, as large codebooks do: on 8 devices
    # they run in shard_map with the codebook split along 'data' (blockwise.*_sharded)
    c.quantizer.codebook_axis = "data"
    c.arc.impl = c.quantizer.search_impl = "blocked"
  c.model.hidden, c.model.res_hidden, c.model.num_res_layers = 32, 8, 1
  if c.quantizer.name in ("arcvq", "vq", "simvq"):  # fsq and lfq: their variant's width
    c.quantizer.num_codes, c.quantizer.embed_dim = 64, 16
  if variant == "restart":
    c.quantizer.restart_threshold = 0.5
  mesh = make_mesh(devices, c, fsdp)
  model = state_lib.build_model(c, channels=1)
  state, _, step_fn = tokenizer_steps.create_state_and_step(
    c, model, make_optimizer(c), mesh, (28, 28, 1), data_variance=0.3
  )
  sharded = num_fsdp_sharded(state)
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    x = rng.uniform(-1, 1, size=(16, 28, 28, 1)).astype(np.float32)
    batch = sharding.global_batch({"image": x}, sharding.batch_sharding(mesh))
    state, m = step_fn(state, batch)
    losses.append({k: float(v) for k, v in m.items()})
  flat = [np.asarray(leaf).ravel() for leaf in jax.tree.leaves(jax.device_get(state.params))]
  codebook = model.quantizer.codebook(state.params)  # None for fsq and lfq
  return (
    losses,
    float(np.concatenate(flat).astype(np.float64).sum()),
    [] if codebook is None else np.asarray(codebook).tolist(),
    sharded,
  )


if __name__ == "__main__":
  assert jax.device_count() == 8, jax.devices()
  out = {}
  for variant in sys.argv[1:]:
    base = variant.removesuffix("_fsdp")
    # On one device there is no 'fsdp' axis: the base variant's run is the reference.
    one = out[base]["one"] if base in out else run(jax.devices()[:1], variant)
    eight = run(jax.devices(), variant)
    out[variant] = {"one": one, "eight": eight}
  print("RESULT" + json.dumps(out))
