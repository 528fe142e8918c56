"""The train states of a tokenizer run (autoencoder, and discriminator for a VQGAN) and the
optimizers that update them."""

from __future__ import annotations

from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from arcvq_jax import quantization


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped (all arrays).

  step: () int32, the global optimizer step t.
  params: the VQVAE's parameters; params['codebook'] is the (K, D) codebook.
  opt_state: optax state (the codebook's slot is empty when the codebook is EMA-updated).
  ema: EMA k-means statistics (used when quantizer.codebook_update == 'ema').
  usage: (K,) EMA of per-step code counts (diagnostics, dead-code restart).
  rng: (2,) uint32 PRNG key for the stochastic parts of the step (dead-code restart).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema: quantization.EMAState
  usage: jax.Array
  rng: jax.Array


@flax.struct.dataclass
class DiscState:
  """The PatchGAN discriminator: params, BatchNorm running averages, its own optimizer state."""

  params: Any
  batch_stats: Any
  opt_state: Any


@flax.struct.dataclass
class GANTrainState:
  """A VQGAN run: the autoencoder's TrainState and the discriminator's DiscState.

  `step`, `params` and `usage` read through to the autoencoder, so the tokenizer loop and
  its evaluation treat both kinds of run alike.
  """

  gen: TrainState
  disc: DiscState

  @property
  def step(self) -> jax.Array:
    return self.gen.step

  @property
  def params(self) -> Any:
    return self.gen.params

  @property
  def usage(self) -> jax.Array:
    return self.gen.usage


def learning_rate(config: ml_collections.ConfigDict) -> float:
  """config.optimizer.lr, times the global batch size when optimizer.scale_lr (taming's
  `base_learning_rate * batch size`: 4.5e-6 x 30 for the paper's ImageNet runs)."""
  o = config.optimizer
  return float(o.lr * config.batch_size if o.get("scale_lr", False) else o.lr)


def _base_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  o = config.optimizer
  lr = learning_rate(config)
  if o.name == "adam":
    tx = optax.adam(lr, b1=o.b1, b2=o.b2)
  else:
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.get("weight_decay", 1e-4))
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx


def make_disc_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The discriminator's optimizer: the same Adam settings as the autoencoder (taming)."""
  return _base_optimizer(config)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (paper: lr 3e-4; VQGAN: 4.5e-6 x batch, betas (0.5, 0.9)) with optional
  global-norm clipping.

  An EMA codebook is not a gradient-trained parameter: its slot gets no update.
  """
  tx = _base_optimizer(config)
  if config.quantizer.codebook_update == "ema":
    labels = lambda params: {k: ("frozen" if k == "codebook" else "train") for k in params}
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def init_train_state(
  key: jax.Array,
  model: flax.linen.Module,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, int, int],
) -> TrainState:
  """A fresh state; pure, so `jax.jit(..., out_shardings=...)` can build it in place."""
  init_key, rng = jax.random.split(key)
  params = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
  codebook = params["codebook"]
  num_codes = codebook.shape[0]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema=quantization.EMAState(
      # Counts of one and sums equal to the rows make the EMA codebook start at
      # the initial codebook (and keep the Laplace-smoothed division finite).
      cluster_size=jnp.ones((num_codes,), jnp.float32),
      embed_sum=codebook,
    ),
    usage=jnp.zeros((num_codes,), jnp.float32),
    rng=rng,
  )


def init_disc_state(
  key: jax.Array,
  model: flax.linen.Module,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, int, int],
) -> DiscState:
  """A fresh discriminator state; pure, like `init_train_state`."""
  variables = model.init(key, jnp.zeros((1, *image_shape), jnp.float32), train=False)
  return DiscState(
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    opt_state=tx.init(variables["params"]),
  )
