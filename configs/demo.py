"""A CPU demo of about a minute: ArcVQ-VAE on Fashion-MNIST from Debian's IDX files.

The paper's network, quantiser and schedules (Table 7, MNIST column), trained for 300 steps
at batch 128 (about 2/3 of an epoch) instead of 500 epochs at batch 1024, then evaluated on
the 10k test images.

  python -m arcvq_jax.main --config=configs/demo.py --workdir=/tmp/arcvq_demo

Expected (the whole command, after set-up): 64.5-70.3 s on 2 cores of an AMD EPYC (Zen 4);
peak RSS 1.2-1.3 GB. Test PSNR 16.39 dB, SSIM 0.650, codebook usage 55.1 % (one machine repeats
its run exactly; other CPUs add in another order). docs/results.md, "The demo".
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqvae_config()
  c.data.source = "idx"
  c.data.path = "/usr/share/datasets/fashion-mnist"
  c.batch_size = 128
  c.num_train_steps = 300
  c.log_every_steps = 25
  c.image_every_steps = 100
  c.checkpoint_every_steps = 100
  c.eval_batch_size = 500
  return config_lib.apply_variant(c, variant)
