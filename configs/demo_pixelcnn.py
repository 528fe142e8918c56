"""The demo's second stage: a class-conditional gated PixelCNN over the tokens of the demo
tokenizer (configs/demo.py: 7x7 grids of K 512 codes on Fashion-MNIST).

The gated PixelCNN of configs/cifar10_pixelcnn.py (7x7 mask-A first, 3x3 mask-B after,
class embedding per layer, 512-wide head over the K codes), trained for 400 steps at batch
128 (0.85 of an epoch). Its tokenizer_expect is left open, so it takes any tokenizer's K and
latent grid (and the labels of its data, 10 classes): this is the prior that the summary at
the end of a tokenizer run suggests.

  python -m arcvq_jax.main --config=configs/demo.py --workdir=/tmp/arcvq_demo
  python -m arcvq_jax.main --config=configs/demo_pixelcnn.py --workdir=/tmp/arcvq_demo_pcnn \
      --config.tokenizer_workdir=/tmp/arcvq_demo
  python -m arcvq_jax.sample --workdir=/tmp/arcvq_demo_pcnn --num_samples=100

Expected on 2 cores of an AMD EPYC: 2 min 13 s for the second command (10 s of it encoding
the 60k training images once), 1.16 bits per token after the 400 steps; 64 samples in about
6 s, recognisably Fashion-MNIST's classes (docs/priors.md).
"""

from arcvq_jax import prior_config


def get_config():
  c = prior_config.pixelcnn_config()
  c.tokenizer_expect.num_codes = 0  # any tokenizer
  c.tokenizer_expect.latent_shape = ()
  c.num_train_steps = 400
  c.log_every_steps = 50
  c.checkpoint_every_steps = 200
  c.sample_every_steps = 400  # a grid of samples (10 per class) in TensorBoard at the end
  c.latents.encode_batch_size = 1000
  c.sampling.update(dict(batch_size=100, num_samples=100))
  return c
