"""ArcVQ-VAE on Fashion-MNIST (28x28x1) with the paper's MNIST settings (Table 7): K 512,
D 64, batch 1024, 500 epochs (29,000 steps), then evaluation on the 10k test images.

Data: the four IDX files (Debian: apt-get install dataset-fashion-mnist).
Variants (paper ablations): configs/fashion_mnist.py:vanilla | cosine | bbnr |
bbnr_arc_fixed | arcvq (default) | ema | restart, and the other quantizers' (docs/quantizers.md).

  python -m arcvq_jax.main --config=configs/fashion_mnist.py --workdir=/tmp/arcvq_fm

Expected: the 500 epochs have not been run. A step takes 0.75 s on 2 cores of an AMD EPYC
and 1.66 s on 2 cores of an Intel Xeon (docs/performance.md, "The training loop"): about 6 h
and 13 h for the run on those CPUs (estimated from the step time). The paper reports no
Fashion-MNIST figures. Shorter budgets, measured (docs/results.md, "The quantizer zoo" and
"Vanilla against ArcVQ at 1500 steps"): 200 steps at batch 64, 3 seeds: PSNR 16.43 +- 0.50
dB, SSIM 0.659, test-split usage 80 %; 1500 steps at batch 128 (--config.batch_size=128
--config.num_train_steps=1500): PSNR 19.18 dB, SSIM 0.784, usage 79.7 %.
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqvae_config()
  c.data.source = "idx"
  c.data.path = "/usr/share/datasets/fashion-mnist"
  return config_lib.apply_variant(c, variant)
