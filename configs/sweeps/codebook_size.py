"""Every quantizer as the codebook grows from 512 to 32,768 codes, on Fashion-MNIST, 3 seeds.

  python -m arcvq_jax.ablate --config=configs/fashion_mnist.py \
      --sweep=configs/sweeps/codebook_size.py --workdir=/tmp/arcvq_codebook_size

The paper's network and optimizer (configs/fashion_mnist.py), one epoch per run (469 steps at
batch 128: 60,032 training images), evaluated on the 10,000 test images. `codebook_size` sets
each quantizer's vocabulary its own way: a codebook of K rows (vq, ema, restart, SimVQ, ArcVQ),
FSQ's levels whose product is closest to K ((8, 8, 8), (8, 8, 8, 8), (8, 8, 8, 8, 8): exactly
K here), LFQ's log2 K bits. 8 quantizers x 3 sizes x 3 seeds = 72 runs. The sweep is
resumable: the same command again skips finished runs (`--shard=i/n` splits it over
machines or sessions); `--report` writes the report of what is finished.

Expected: not yet run to the end; docs/results.md, "Codebook size", gives the report when it
is.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "codebook_size"
  c.note = (
    "Budget: one epoch per run (469 steps at batch 128) of configs/fashion_mnist.py (the "
    "paper's model and optimizer), final evaluation on the 10,000 test images, rFID skipped. "
    "codebook_size sets each quantizer's vocabulary its own way (codebook rows, FSQ levels, "
    "LFQ bits)."
  )
  c.variants = (
    "vq",
    "ema",
    "restart",
    "simvq_rotation",
    "arcvq",
    "arcvq_rotation",
    "fsq",
    "lfq",
  )
  c.baselines = ()
  c.grid = {"codebook_size": (512, 4096, 32768)}
  c.seeds = (0, 1, 2)
  c.overrides = dict(
    num_train_steps=469,
    batch_size=128,
    log_every_steps=25,
    eval_every_steps=0,
    image_every_steps=0,
    checkpoint_every_steps=100,
  )
  c.skip_metrics = ("rfid",)
  return c
