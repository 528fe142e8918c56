"""A tiny class-conditional MaskGIT over the tiny tokenizer's 7x7 Fashion-MNIST token grids
(K 64), for tests and smoke runs on CPU: 2 layers of width 32, 4 steps at batch 32, 16
samples decoded in 4 steps.

  python -m arcvq_jax.main --config=configs/tiny.py --workdir=/tmp/tok
  python -m arcvq_jax.main --config=configs/tiny_maskgit.py --workdir=/tmp/maskgit \
      --config.tokenizer_workdir=/tmp/tok
  python -m arcvq_jax.sample --workdir=/tmp/maskgit --num_samples=16

Expected for the second command: seconds on 2 CPU cores after the precompute pass over the
60k training images; no quality target.
"""

from arcvq_jax import prior_config


def get_config():
  c = prior_config.maskgit_config()
  c.tokenizer_expect.num_codes = 64
  c.tokenizer_expect.latent_shape = (7, 7, 16)
  c.num_classes = 10
  c.maskgit.update(dict(dim=32, depth=2, num_heads=2, multiple_of=32, dropout=0.0))
  c.optimizer.update(dict(lr=1e-3, warmup_steps=2))
  c.ema.decay = 0.9
  c.batch_size = 32
  c.num_train_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.sample_every_steps = 4
  c.latents.encode_batch_size = 1000
  c.sampling.update(dict(batch_size=8, num_samples=16, decode_steps=4))
  return c
