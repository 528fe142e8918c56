"""ArcVQ-VAE on MNIST (28x28x1), paper Table 7 / Table 1: K 512, D 64, batch 1024, 500
epochs (29,000 steps), then evaluation on the 10k test images.

Data: TFDS's `mnist` prepared as ArrayRecord (`tfds build mnist --data_dir=DIR
--file_format=array_record`, then --config.data.data_dir=DIR), or the four MNIST IDX files
(--config.data.source=idx --config.data.path=DIR); docs/training.md, "Data".

  python -m arcvq_jax.main --config=configs/mnist.py --workdir=/tmp/arcvq_mnist \
      --config.data.data_dir=DIR

Expected: not run for this project. Its shapes are configs/fashion_mnist.py's, so a step
costs the same (0.75 s on 2 cores of an AMD EPYC: about 6 h for the run, estimated). The
paper's result to reproduce (Table 1): ArcVQ-VAE PSNR 28.01 dB, SSIM 0.9840, LPIPS 0.0217,
rFID 1.68 (vanilla VQ-VAE: 26.48 dB, 0.9777, 0.0282, 3.43).
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqvae_config()
  c.data.source = "tfds"
  c.data.name = "mnist"
  return config_lib.apply_variant(c, variant)
