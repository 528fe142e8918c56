"""Every quantizer of the zoo and the paper's ablation variants on Fashion-MNIST, 3 seeds.

  python -m arcvq_jax.ablate --config=configs/fashion_mnist.py --sweep=configs/sweeps/zoo.py \
      --workdir=/tmp/arcvq_zoo

Budget: 200 steps at batch 64 per run (15 settings x 3 seeds), each evaluated on the 10k test
images. Expected: all 45 runs took 58 minutes on 2 cores of an AMD EPYC with nothing else
running (65-97 s per run, compilation and evaluation included). Result (docs/results.md,
"The quantizer zoo"): e.g. `arcvq` PSNR 16.43 dB at 80 % test-split usage, `restart` 18.84 dB
at 97 %, `fsq` 19.18 dB at 35 %; `vanilla`, `cosine`, `vq` and `ema` use 0.6-2 % of their
codes.
"""

import ml_collections


def get_config():
  c = ml_collections.ConfigDict()
  c.name = "zoo"
  # Measured on the 2-core machine (alone on it; 1-minute load average 1.5-2.3): 3.8-5.9
  # steps/s of training, 34-53 s of the 65-97 s of a run; the rest is the first step's
  # compilation (5-10 s, the compilation cache serves the later seeds), the two test-split
  # passes and the plots.
  c.note = (
    "Budget: 200 steps at batch 64 (12,800 training images, 0.21 epoch) per run of "
    "configs/fashion_mnist.py (the paper's model and optimizer), final evaluation on the "
    "10,000 test images, rFID skipped (the Inception on 2 CPU cores would take longer than the "
    "training). All 45 runs took 58 minutes on a 2-core machine with nothing else running "
    "(65-97 s per run, compilation and evaluation included)."
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
    # The residual skip these tables were measured with (x + block(x)); the default is now
    # the official code's relu(x) + block(x) (docs/math.md, section 14).
    model=dict(residual_skip="identity"),
  )
  c.skip_metrics = ("rfid",)
  return c
