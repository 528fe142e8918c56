"""A few-minute CPU demo: ArcVQ-VAE on Fashion-MNIST from the local IDX files.

The paper's network, quantiser and schedules (Table 7, MNIST column), trained for 300
steps at batch 128 (about 2/3 of an epoch) instead of 500 epochs at batch 1024.
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
