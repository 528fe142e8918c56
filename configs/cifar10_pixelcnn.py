"""Gated PixelCNN prior over the 8x8 token grids of the CIFAR-10 VQ-VAE tokenizer (K 512),
paper App. D.5.

The paper gives no PixelCNN settings; these are the gated PixelCNN of the common VQ-VAE prior
scripts: 15 layers of width 64 (7x7 mask-A first, 3x3 mask-B after), class-conditional on the
10 CIFAR-10 labels, 512-wide output head, Adam 3e-4, batch 128, 100k steps (256 epochs).

  python -m arcvq_jax.main --config=configs/cifar10.py --workdir=TOK      # the tokenizer
  python -m arcvq_jax.main --config=configs/cifar10_pixelcnn.py --workdir=PCNN \
      --config.tokenizer_workdir=TOK
  python -m arcvq_jax.sample --workdir=PCNN --num_samples=50000

Expected: not run for this project (no time or result measured on any hardware). The
paper's result to reproduce (Table 13): FID 43.13 of the samples on the ArcVQ-VAE tokenizer,
57.36 on a vanilla VQ-VAE one (docs/priors.md).
"""

from arcvq_jax import prior_config


def get_config():
  return prior_config.pixelcnn_config()
