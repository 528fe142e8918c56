"""Run by tests/test_train_maskgit_ar.py in a subprocess with 8 simulated CPU devices.

Trains three steps of a tiny MaskGIT and a tiny AR transformer (class-conditional, label
dropout, EMA) on the same batches with a mesh of 1 device and a 2 x 4 ('data', 'fsdp') mesh
of 8 (one parameter placed by a param_rules entry, the large ones split over 'fsdp'), and
prints the loss histories, sums of the final params and EMA, and the number of state leaves
split over 'fsdp', as JSON.
"""

import json

import jax
import numpy as np

from arcvq_jax import prior_config, sharding
from arcvq_jax.train import prior_common, prior_transformer

# By name: the token embedding's columns over 'fsdp' (the rest by size, fsdp_min_size).
RULES = (("tok_embeddings/embedding$", (None, "fsdp")),)


def run(stage: str, devices, fsdp: bool, steps: int = 3) -> dict:
  c = prior_config.maskgit_config() if stage == "maskgit" else prior_config.ar_config()
  c.num_classes = 5
  c[stage].update(dict(dim=32, depth=2, num_heads=2, multiple_of=32, dropout=0.1))
  c.optimizer.lr = 1e-3
  c.ema.decay = 0.9
  if fsdp:
    c.sharding.update(dict(param_rules=RULES, fsdp_min_size=256))
    mesh = sharding.make_mesh((-1, 4), ("data", "fsdp"), devices=devices)
  else:
    mesh = sharding.make_mesh((-1,), ("data",), devices=devices)
  model = prior_transformer.model_from_config(c, num_codes=32, grid=(4, 4))
  state, _, step_fn = prior_transformer.create_state_and_step(
    c, model, prior_common.make_optimizer(c), mesh
  )
  rng = np.random.default_rng(0)
  losses = []
  for _ in range(steps):
    batch = {
      "tokens": rng.integers(0, 32, (16, 4, 4)).astype(np.int32),
      "label": rng.integers(0, 5, 16).astype(np.int32),
    }
    state, metrics = step_fn(state, sharding.global_batch(batch, sharding.batch_sharding(mesh)))
    losses.append(float(metrics["loss"]))
  total = lambda tree: float(
    sum(np.abs(np.asarray(x, np.float64)).sum() for x in jax.tree.leaves(tree))
  )
  sharded = sum("fsdp" in str(leaf.sharding.spec) for leaf in jax.tree.leaves(state))
  embedding = state.params["tok_embeddings"]["embedding"].sharding.spec
  return dict(
    losses=losses,
    params=total(state.params),
    ema=total(state.ema_params),
    fsdp_leaves=sharded,
    embedding_spec=str(embedding),
  )


def main():
  devices = jax.devices()
  assert len(devices) == 8, devices
  out = {
    stage: dict(one=run(stage, devices[:1], False), fsdp=run(stage, devices, True))
    for stage in ("maskgit", "ar")
  }
  print("RESULT" + json.dumps(out))


if __name__ == "__main__":
  main()
