"""A small VQGAN with a VQGAN-LC-sized codebook (K = 100,000) that trains on a CPU.

configs/tiny_vqgan.py's network (taming's blocks at width 32, f4: 28x28 Fashion-MNIST images
-> 7x7 tokens, a 2-layer PatchGAN from step 0), with 100,000 codes of dimension 8, 20 steps
at batch 8. Even the 392 tokens of a batch of 8 make a K x N matrix of 39M floats (157 MB,
several of them with its gradient): the nearest-code search and ArcLoss take the blocked
forms (arcvq_jax/blockwise.py), which never hold it. On a mesh of several devices each device
takes a share of the ArcLoss rows, and the codebook is split along K over the 'data' axis
(`quantizer.codebook_axis`, with sharding.param_rules storing it there).

LPIPS is off by default (its weights are a separate download): set --config.lpips_path to
converted weights and --config.loss.perceptual_weight=1.0 for the full VQGAN loss.

  python -m arcvq_jax.main --config=configs/large_codebook.py --workdir=/tmp/large_codebook

Expected on 2 loaded CPU cores (measured with --config.num_train_steps=3): the first step
(compilation) 90 s, then about 1 s per step, the final evaluation over the 10k test images
(490k tokens searched against 100,000 codes) 3.8 min, peak RSS 2.9 GB; about 6 min for the
20 steps (estimated). It shows that K = 100,000 trains, not how well: no quality target
(docs/scaling.md, "Large codebooks").
"""

from arcvq_jax import config as config_lib


def get_config(variant: str = "arcvq"):
  c = config_lib.vqgan_config()
  c.model.update(
    dict(
      ch=32, ch_mult=(1, 1, 2), num_res_blocks=1, attn_resolutions=(7,), resolution=28, z_channels=8
    )
  )
  c.quantizer.num_codes, c.quantizer.embed_dim = 100_000, 8
  # 'auto' would pick these at this size; named here since nothing else could run.
  c.quantizer.search_impl = "blocked"
  c.arc.impl = "blocked"
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
  c.num_train_steps = 20
  c.log_every_steps = 1
  c.image_every_steps = 10
  c.checkpoint_every_steps = 10
  # On several devices the codebook is stored and searched split along K over the batch
  # axis (K / devices codes each; 100,000 splits evenly over 1, 2, 4, 8, 16 or 32 devices).
  c.quantizer.codebook_axis = "data"
  c.sharding.param_rules = (("codebook$", ("data", None)),)
  return config_lib.apply_variant(c, variant)
