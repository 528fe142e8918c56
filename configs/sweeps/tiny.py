"""A two-quantizer, two-seed, three-step sweep of the tiny config: the tests' and a smoke run.

  python -m arcvq_jax.ablate --config=configs/tiny.py --sweep=configs/sweeps/tiny.py \
      --workdir=/tmp/arcvq_ablate_tiny

Expected: 4 runs in about 100 s on 2 cores of an AMD EPYC shared with other jobs (9-22 s per
run, compilation once per quantizer included); no quality target.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "tiny"
  c.note = "Smoke test: 3 steps at batch 8 of configs/tiny.py; the numbers mean nothing."
  c.variants = ("arcvq", "vq")
  c.baselines = ()
  c.grid = {}
  c.seeds = (0, 1)
  c.overrides = dict(
    num_train_steps=3,
    batch_size=8,
    eval_batch_size=50,
    log_every_steps=1,
    checkpoint_every_steps=1,
    image_every_steps=0,
    checkpoint_async=False,
  )
  c.skip_metrics = ()
  return c
