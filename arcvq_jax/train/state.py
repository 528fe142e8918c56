"""The train state of a tokenizer run and the optimizer that updates it."""

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


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (paper: lr 3e-4) with optional global-norm clipping.

  An EMA codebook is not a gradient-trained parameter: its slot gets no update.
  """
  o = config.optimizer
  if o.name == "adam":
    tx = optax.adam(o.lr, b1=o.b1, b2=o.b2)
  else:
    tx = optax.adamw(o.lr, b1=o.b1, b2=o.b2, weight_decay=o.get("weight_decay", 1e-4))
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  if config.quantizer.codebook_update == "ema":
    labels = lambda params: {k: ("frozen" if k == "codebook" else "train") for k in params}
    tx = optax.multi_transform({"train": tx, "frozen": optax.set_to_zero()}, labels)
  return tx


def init_train_state(
    key: jax.Array, model: flax.linen.Module, tx: optax.GradientTransformation,
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
