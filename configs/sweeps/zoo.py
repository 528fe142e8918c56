"""Every quantizer of the zoo and the paper's ablation variants on Fashion-MNIST, 3 seeds.

  python -m arcvq_jax.ablate --config=configs/fashion_mnist.py --sweep=configs/sweeps/zoo.py \
      --workdir=/tmp/arcvq_zoo

Budget (measured, see the note below): 200 steps at batch 64 per run; all 45 runs take about
1.6 h on this 2-core machine at load average 3-4, about 4.2 h at load 7.5 (it is shared).
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "zoo"
  # The budget, measured on the 2-core machine (shared with other work) with
  # configs/fashion_mnist.py at batch 64: one whole arcvq run of 200 steps took 131 s at a
  # 1-minute load average of 3-4 (2.44 steps/s; 14 s compilation, about 35 s for the two
  # test-split passes and the plots), and a step took 1.04 s at load 7.5 (1.41 s at batch
  # 128, 3.2 s at 256). The first seed of each setting compiles (about 30-75 s); the
  # compilation cache serves the others.
  c.note = (
    "Budget: 200 steps at batch 64 (12,800 training images, 0.21 epoch) per run of "
    "configs/fashion_mnist.py (the paper's model and optimizer), final evaluation on the "
    "10,000 test images, rFID skipped (the Inception on 2 CPU cores would take longer than the "
    "training). All 45 runs: about 1.6 h on a 2-core machine at load average 3-4, about "
    "4.2 h at load 7.5 (from one measured run and measured step times)."
  )
  c.variants = (
    "arcvq",
    "vanilla",
    "cosine",
    "bbnr",
    "bbnr_arc_fixed",
    "ema",
    "restart",
    "vq",
    "vq_rotation",
    "arcvq_rotation",
    "simvq",
    "simvq_rotation",
    "fsq",
    "fsq_64k",
    "lfq",
  )
  c.baselines = ()
  c.grid = {}
  c.seeds = (0, 1, 2)
  c.overrides = dict(
    num_train_steps=200,
    batch_size=64,
    log_every_steps=10,
    eval_every_steps=0,
    image_every_steps=0,
    checkpoint_every_steps=100,
  )
  c.skip_metrics = ("rfid",)
  return c
