"""A tiny class-conditional PixelCNN over the tiny tokenizer's 7x7 Fashion-MNIST token grids
(K 64), for tests and smoke runs on CPU: 4 steps at batch 32, 16 samples.

  python -m arcvq_jax.main --config=configs/tiny.py --workdir=/tmp/tok
  python -m arcvq_jax.main --config=configs/tiny_pixelcnn.py --workdir=/tmp/pcnn \
      --config.tokenizer_workdir=/tmp/tok
  python -m arcvq_jax.sample --workdir=/tmp/pcnn --num_samples=16

Expected for the second command: about 40 s on 2 cores of an AMD EPYC shared with other jobs
(the precompute pass over the 60k training images included); no quality target.
"""

from arcvq_jax import prior_config


def get_config():
  c = prior_config.pixelcnn_config()
  c.tokenizer_expect.num_codes = 64
  c.tokenizer_expect.latent_shape = (7, 7, 16)
  c.pixelcnn.update(dict(dim=16, n_layers=3, head_dim=32))
  c.optimizer.lr = 1e-3
  c.ema.decay = 0.9
  c.batch_size = 32
  c.num_train_steps = 4
  c.log_every_steps = 1
  c.checkpoint_every_steps = 2
  c.sample_every_steps = 4
  c.latents.encode_batch_size = 1000
  c.sampling.update(dict(batch_size=8, num_samples=16))
  return c
