"""A tiny VQGAN on Fashion-MNIST IDX files that runs the whole GAN stage on CPU: 4 steps at
batch 8, then evaluation on the 10k test images.

taming's blocks at width 32, f4 (28x28 -> 7x7 tokens), a 2-layer PatchGAN switched on from
step 0 (disc_start = 0), the full ArcVQ quantiser. L1 only by default, so that it runs
offline: the LPIPS weights cannot be downloaded at run time. With converted weights
(docs/evaluation.md, "Weights"), --config.loss.perceptual_weight=1
--config.lpips_path=PATH adds LPIPS (grey images repeated to RGB), as taming.

  python -m arcvq_jax.main --config=configs/tiny_vqgan.py --workdir=/tmp/tiny_vqgan

Expected: about 2 min on 2 cores of an AMD EPYC shared with other jobs: 20 s to train (the
first step's compilation 13 s), the rest the evaluation; no quality target (PSNR about 9 dB
after 4 steps).
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqgan_config()
  c.model.update(
    dict(
      ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(7,), resolution=28, z_channels=8
    )
  )
  c.quantizer.num_codes, c.quantizer.embed_dim = 64, 8
  c.loss.perceptual_weight = 0.0
  c.lpips_path = ""
  c.gan.update(dict(disc_start=0, ndf=16, n_layers=2))
  c.optimizer.update(dict(lr=1e-4, scale_lr=False))
  c.data.update(
    dict(
      source="idx",
      path="/usr/share/datasets/fashion-mnist",
      name="",
      train_split="train",
      eval_split="test",
      random_crop=False,
      random_flip=False,
    )
  )
  c.data.image_size = None
  c.batch_size = 8
  c.eval_batch_size = 500
  c.num_train_steps = 4
  c.log_every_steps = 1
  c.image_every_steps = 2
  c.checkpoint_every_steps = 2
  return config_lib.apply_variant(c, variant)
