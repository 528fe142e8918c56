"""The train states of a tokenizer run (autoencoder, and discriminator for a VQGAN) and the
optimizers that update them."""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

from arcvq_jax.models import discriminator, vqgan, vqvae
from arcvq_jax.quantizers import registry


@flax.struct.dataclass
class TrainState:
  """Everything a run needs to continue exactly where it stopped (all arrays).

  step: () int32, the global optimizer step t.
  params: the autoencoder's parameters, the quantizer's among them (e.g. params['codebook'],
    the (K, D) codebook of 'vq' and 'arcvq').
  opt_state: optax state (the slots of the quantizer's frozen params are empty).
  ema: the quantizer's statistics outside the gradient (`Quantizer.init_stats`: the EMA
    k-means sums of 'vq' / 'arcvq'; None for quantizers without). The field keeps the name
    it had when only the EMA codebook had any, so older checkpoints restore.
  usage: (V,) EMA of per-step token counts over the vocabulary (diagnostics, restart).
  rng: (2,) uint32 PRNG key for the stochastic parts of the step (dead-code restart).
  """

  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any
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

  The quantizer's frozen params (an EMA codebook, SimVQ's random codebook) get no update.
  """
  tx = _base_optimizer(config)
  frozen = registry.from_config(config).frozen_params()
  if frozen:
    labels = lambda params: {k: ("frozen" if k in frozen else "train") for k in params}
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def init_train_state(
  key: jax.Array,
  model: flax.linen.Module,
  tx: optax.GradientTransformation,
  image_shape: tuple[int, int, int],
) -> TrainState:
  """A fresh state; pure, so `jax.jit(..., out_shardings=...)` can build it in place.

  model: a VQVAE or VQGAN holding its quantizer (`model.quantizer`)."""
  init_key, rng = jax.random.split(key)
  params = model.init(init_key, jnp.zeros((1, *image_shape), jnp.float32))["params"]
  return TrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    opt_state=tx.init(params),
    ema=model.quantizer.init_stats(params),
    usage=jnp.zeros((model.quantizer.vocab_size,), jnp.float32),
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


def init_gan_state(
  key: jax.Array,
  model: flax.linen.Module,
  tx: optax.GradientTransformation,
  disc_model: flax.linen.Module,
  disc_tx: optax.GradientTransformation,
  image_shape: tuple[int, int, int],
) -> GANTrainState:
  """A fresh VQGAN state: the key split into the autoencoder's and the discriminator's."""
  gen_key, disc_key = jax.random.split(key)
  return GANTrainState(
    gen=init_train_state(gen_key, model=model, tx=tx, image_shape=image_shape),
    disc=init_disc_state(disc_key, model=disc_model, tx=disc_tx, image_shape=image_shape),
  )


# --------------------------------------------------------------------------- building states


def build_model(config: ml_collections.ConfigDict, channels: int) -> flax.linen.Module:
  """The autoencoder config.model.name names ('vqvae' or 'vqgan'), for `channels` channels,
  around the quantizer config.quantizer.name names."""
  quantizer = registry.from_config(config)
  if config.model.name == "vqgan":
    return vqgan.from_config(config, channels=channels, quantizer=quantizer)
  return vqvae.from_config(config, channels=channels, quantizer=quantizer)


def init_fn(
  config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]
) -> Callable[[jax.Array], TrainState | GANTrainState]:
  """The initialiser of a tokenizer run's state: key -> a fresh TrainState (VQ-VAE) or
  GANTrainState (VQGAN: the key split into the autoencoder's and the discriminator's).

  Pure, so `jax.eval_shape` gives the state's shapes and `jax.jit(..., out_shardings=...)`
  builds it in place. The train step, the converters and `api.write_workdir` all start from
  it, so a state they write is the one a fresh `main` would restore into.
  """
  model = build_model(config, channels=image_shape[-1])
  tx = make_optimizer(config)
  if config.model.name != "vqgan":
    return lambda key: init_train_state(key, model=model, tx=tx, image_shape=image_shape)
  return functools.partial(
    init_gan_state,
    model=model,
    tx=tx,
    disc_model=discriminator.from_config(config),
    disc_tx=make_disc_optimizer(config),
    image_shape=image_shape,
  )


def state_from_params(
  config: ml_collections.ConfigDict,
  image_shape: tuple[int, int, int],
  params: Any,
  *,
  step: int,
  disc_params: Any = None,
  disc_batch_stats: Any = None,
) -> TrainState | GANTrainState:
  """The train state of a fresh run of `config`, holding the given weights at `step`.

  params: the autoencoder's 'params' tree (numpy or jax arrays, cast to float32);
  disc_params / disc_batch_stats: a VQGAN's PatchGAN (None: a fresh discriminator, as a new
  run's). Optimizer states are fresh (zeros); the EMA codebook statistics start at the
  codebook (counts of one), the usage at zero, the rng as a new run's. What `api.write_workdir`
  and the checkpoint converters save.
  """
  to_f32 = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  # The keys of init_gan_state and init_train_state, without initialising the autoencoder (for a
  # converted f16 VQGAN that is seconds of work whose result would be thrown away).
  key = jax.random.PRNGKey(config.seed)
  is_gan = config.model.name == "vqgan"
  gen_key, disc_key = jax.random.split(key) if is_gan else (key, None)
  _, rng = jax.random.split(gen_key)
  params = to_f32(params)
  quantizer = registry.from_config(config)
  gen = TrainState(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    opt_state=make_optimizer(config).init(params),
    ema=quantizer.init_stats(params),
    usage=jnp.zeros((quantizer.vocab_size,), jnp.float32),
    rng=rng,
  )
  if not is_gan:
    return gen
  if disc_params is None:
    disc = init_disc_state(
      disc_key,
      model=discriminator.from_config(config),
      tx=make_disc_optimizer(config),
      image_shape=image_shape,
    )
  else:
    disc_params = to_f32(disc_params)
    disc = DiscState(
      params=disc_params,
      batch_stats=to_f32(disc_batch_stats),
      opt_state=make_disc_optimizer(config).init(disc_params),
    )
  return GANTrainState(gen=gen, disc=disc)
