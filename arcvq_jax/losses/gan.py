"""GAN losses of the VQGAN tokenizer (docs/math.md, eq. 23-27), as pure functions.

Hinge discriminator loss, the generator loss -mean(D(x_hat)), taming's
adaptive generator weight and the discriminator start switch f(t). Everything is jit-safe.
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient

# taming's VQLPIPSWithDiscriminator: d_weight = clamp(ratio, 0, 1e4) * discriminator_weight.
MAX_WEIGHT = 1e4
DISC_WEIGHT = 0.8
GRAD_NORM_EPS = 1e-4


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  """0.5 * (mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))), a float32 scalar.

  logits_real, logits_fake: discriminator logits of any shape, e.g. (B, H', W', 1) patches;
  each mean runs over all of its elements (the two may differ in shape).
  """
  loss_real = jnp.mean(jax.nn.relu(1.0 - logits_real.astype(jnp.float32)))
  loss_fake = jnp.mean(jax.nn.relu(1.0 + logits_fake.astype(jnp.float32)))
  return 0.5 * (loss_real + loss_fake)


def generator_loss(logits_fake: jax.Array) -> jax.Array:
  """g_loss = -mean(D(x_hat)) over all elements of logits_fake (B, H', W', 1); float32 scalar."""
  return -jnp.mean(logits_fake.astype(jnp.float32))


def _global_norm(tree) -> jax.Array:
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def adaptive_weight(
  rec_grad, g_grad, max_weight: float = MAX_WEIGHT, disc_weight: float = DISC_WEIGHT
) -> jax.Array:
  """lambda = clip(||rec_grad|| / (||g_grad|| + 1e-4), 0, max_weight) * disc_weight.

  rec_grad: d L_rec / d W and g_grad: d g_loss / d W, with W the decoder's last conv kernel
  (3, 3, C, out_ch) (any arrays or pytrees: the norm is the global L2 norm over all leaves).
  Returns a float32 scalar that carries no gradient (taming's `.detach()`).
  """
  rec_norm = _global_norm(sg(rec_grad))
  g_norm = _global_norm(sg(g_grad))
  ratio = jnp.clip(rec_norm / (g_norm + GRAD_NORM_EPS), 0.0, max_weight)
  return sg(ratio * disc_weight)


def adaptive_weight_from_losses(
  rec_loss_fn: Callable[[jax.Array], jax.Array],
  g_loss_fn: Callable[[jax.Array], jax.Array],
  last_kernel: jax.Array,
  max_weight: float = MAX_WEIGHT,
  disc_weight: float = DISC_WEIGHT,
) -> jax.Array:
  """`adaptive_weight` of the gradients of two scalar losses w.r.t. the last-layer kernel.

  rec_loss_fn, g_loss_fn: W (same shape as last_kernel) -> float32 scalar;
  last_kernel: the decoder's conv_out kernel W, (3, 3, C, out_ch). Returns a float32 scalar
  with no gradient.

  Only W varies; everything before it is held fixed, so a train step computes the decoder
  once up to conv_out's input and closes over it (models/vqgan.py):

      h = model.apply(v, z_q, method=VQGAN.decode_features)   # (B, H, W, C)
      kernel, bias = vqgan.last_layer_params(params)
      rec_fn = lambda w: l1(x, last_layer(h, w, bias)) + w_p * lpips(x, last_layer(h, w, bias))
      g_fn = lambda w: generator_loss(disc.apply(d_vars, last_layer(h, w, bias)))
      lam = adaptive_weight_from_losses(rec_fn, g_fn, kernel)
      loss = rec + lam * disc_factor(step, disc_start) * g_loss + ...

  taming differentiates the nll loss (L1 + perceptual) here, the same L_rec the total loss
  uses. The result is a constant of the outer gradient (stop_gradient), as in taming.
  """
  rec_grad = jax.grad(rec_loss_fn)(last_kernel)
  g_grad = jax.grad(g_loss_fn)(last_kernel)
  return adaptive_weight(rec_grad, g_grad, max_weight, disc_weight)


def disc_factor(step: jax.Array | int, disc_start: int) -> jax.Array:
  """f(t) = 1.0 once step >= disc_start, else 0.0 (taming's `adopt_weight`); float32 scalar."""
  return jnp.where(jnp.asarray(step) >= disc_start, 1.0, 0.0).astype(jnp.float32)
