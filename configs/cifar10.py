"""ArcVQ-VAE on CIFAR-10 (32x32x3), paper Table 7 / Table 1: K 512, D 64, batch 1024, 500
epochs (24,000 steps), then evaluation on the 10k test images.

Data: TFDS's `cifar10` prepared as ArrayRecord (`tfds build cifar10 --data_dir=DIR
--file_format=array_record`); docs/training.md, "Data".

  python -m arcvq_jax.main --config=configs/cifar10.py --workdir=/tmp/arcvq_cifar10 \
      --config.data.data_dir=DIR

Expected: not run for this project (no time or result measured on any hardware). The
paper's result to reproduce (Table 1): ArcVQ-VAE PSNR 24.78 dB, SSIM 0.8989, LPIPS 0.1857,
rFID 26.91 (vanilla VQ-VAE: 23.32 dB, 0.8595, 0.2504, 39.67).
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqvae_config()
  c.data.source = "tfds"
  c.data.name = "cifar10"
  return config_lib.apply_variant(c, variant)
