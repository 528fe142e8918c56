"""ArcVQ-VAE on Fashion-MNIST (28x28x1), the paper's MNIST settings (Table 7).

Data: the four IDX files (Debian: apt-get install dataset-fashion-mnist).
Variants (paper ablations): configs/fashion_mnist.py:vanilla | cosine | bbnr |
bbnr_arc_fixed | arcvq (default) | ema | restart.
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqvae_config()
  c.data.source = "idx"
  c.data.path = "/usr/share/datasets/fashion-mnist"
  return config_lib.apply_variant(c, variant)
