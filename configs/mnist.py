"""ArcVQ-VAE on MNIST (28x28x1), paper Table 7: K 512, D 64, batch 1024, 500 epochs.

Data: either the four MNIST IDX files (--config.data.path=DIR), or TFDS's `mnist`
prepared as ArrayRecord (--config.data.source=tfds, see README). Paper (Table 1):
VQ-VAE PSNR 26.48 / SSIM 0.9777, ArcVQ-VAE 28.01 / 0.9840.
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqvae_config()
  c.data.source = "tfds"
  c.data.name = "mnist"
  return config_lib.apply_variant(c, variant)
