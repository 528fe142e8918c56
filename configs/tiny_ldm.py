"""A tiny class-conditional LDM over the tiny tokenizer's 7x7x16 Fashion-MNIST latents, for
tests and smoke runs on CPU: 4 steps at batch 16, 16 samples of 5 DDIM steps.

  python -m arcvq_jax.main --config=configs/tiny.py --workdir=/tmp/tok
  python -m arcvq_jax.main --config=configs/tiny_ldm.py --workdir=/tmp/ldm \
      --config.tokenizer_workdir=/tmp/tok
  python -m arcvq_jax.sample --workdir=/tmp/ldm --num_samples=16

Expected for the second command: about 1.5 min on 2 cores of an AMD EPYC shared with other
jobs (the precompute pass over the 60k training images 10-30 s, the first step's compilation
42 s); no quality target.
"""

from arcvq_jax import prior_config


def get_config():
  c = prior_config.ldm_config()
  c.tokenizer_expect.num_codes = 64
  c.tokenizer_expect.latent_shape = (7, 7, 16)
  c.num_classes = 10
  # 7x7 latents: one level (no halving), attention at 7 and in the middle block.
  c.unet.update(
    dict(
      model_channels=32,
      channel_mult=(1,),
      num_res_blocks=1,
      attention_resolutions=(7,),
      num_head_channels=16,
      context_dim=32,
    )
  )
  # The tiny tokenizer's latents have std ~0.1: scale them to unit std (1 / std).
  c.diffusion.scale_factor = 0.0
  c.optimizer.lr = 1e-3
  c.ema.decay = 0.99
  c.batch_size = 16
  c.num_train_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.sample_every_steps = 4
  c.latents.encode_batch_size = 1000
  c.sampling.update(dict(ddim_steps=5, batch_size=8, num_samples=16))
  return c
