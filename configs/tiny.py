"""A tiny ArcVQ-VAE on Fashion-MNIST IDX files, for tests and smoke runs: 6 steps at batch 32,
then evaluation on the 10k test images.

  python -m arcvq_jax.main --config=configs/tiny.py --workdir=/tmp/tok

Expected: 15-16 s on 2 cores of an AMD EPYC (compilation included); test PSNR about 7 dB: it
checks that everything runs, not quality.
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqvae_config()
  c.data.source = "idx"
  c.data.path = "/usr/share/datasets/fashion-mnist"
  c.model.hidden, c.model.res_hidden, c.model.num_res_layers = 32, 8, 1
  c.quantizer.num_codes, c.quantizer.embed_dim = 64, 16
  c.batch_size = 32
  c.eval_batch_size = 1000
  c.num_train_steps = 6
  c.log_every_steps = 1
  c.image_every_steps = 3
  c.checkpoint_every_steps = 3
  return config_lib.apply_variant(c, variant)
