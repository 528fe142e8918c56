"""ArcVQ-VAE on CIFAR-10 (32x32x3), paper Table 7: K 512, D 64, batch 1024, 500 epochs.

Data: TFDS's `cifar10` prepared as ArrayRecord (`tfds build cifar10
--file_format=array_record`). Paper (Table 1): VQ-VAE PSNR 23.32 / SSIM 0.8595,
ArcVQ-VAE 24.78 / 0.8989.
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqvae_config()
  c.data.source = "tfds"
  c.data.name = "cifar10"
  return config_lib.apply_variant(c, variant)
