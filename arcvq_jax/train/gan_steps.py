"""The two jitted steps of a VQGAN tokenizer run: autoencoder and PatchGAN (docs/math.md,
eq. 22-27).

The generator step minimises
    L = |x - x_hat|_1 + w_p LPIPS(x, x_hat) + lambda_adapt f(t) g_loss + L_vq + gamma(t) L_arc,
with lambda_adapt from the gradients of L_rec = |x - x_hat|_1 + w_p LPIPS and of
g_loss = -mean(D(x_hat)) w.r.t. the decoder's last conv kernel W. taming gets those two
gradients with two extra backward passes (autograd.grad through LPIPS and D, then the full
backward). Here every network is differentiated once: the decoder runs up to conv_out's
input h, and the gradients w.r.t. x_hat of L_rec (through LPIPS) and of g_loss (through D)
are pulled back through conv_out alone to get dL_rec/dW and dg/dW, then their weighted sum
once through the whole autoencoder. tests/test_gan_steps.py checks the result against the
gradient of the total loss with lambda_adapt held fixed.

The discriminator step is a separate jitted function with its own optimizer state; it takes
the reconstructions of the generator step (one autoencoder forward per step fewer than
taming, which recomputes them after the generator update).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax

from arcvq_jax import sharding
from arcvq_jax.losses import gan
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.models import vqgan
from arcvq_jax.models.discriminator import NLayerDiscriminator
from arcvq_jax.train import state as state_lib
from arcvq_jax.train import tokenizer_steps
from arcvq_jax.train.state import DiscState, GANTrainState, TrainState

sg = jax.lax.stop_gradient
Batch = dict[str, jax.Array]


def _add_at(tree: dict, path: tuple[str, ...], value: jax.Array) -> dict:
  """A copy of the nested dict `tree` with `value` added to the leaf at `path`."""
  head, *rest = path
  new = dict(tree)
  new[head] = _add_at(tree[head], tuple(rest), value) if rest else tree[head] + value
  return new


def reconstruction_loss(
  x: jax.Array,
  x_hat: jax.Array,
  lpips_params: Any,
  *,
  perceptual_weight: float,
  dtype: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """L_rec = mean|x - x_hat| + w_p mean_b LPIPS(x_b, x_hat_b), taming's nll_loss.

  x, x_hat: (B, H, W, C) float32 in [-1, 1]; lpips_params: `lpips.load_params` output (unused,
  may be None, when perceptual_weight is 0). Returns L_rec and its two terms, float32.
  """
  l1 = jnp.mean(jnp.abs(x - x_hat))
  if perceptual_weight > 0:
    p = jnp.mean(lpips_lib.lpips_distance(lpips_params, x, x_hat, dtype=dtype))
  else:
    p = jnp.zeros((), jnp.float32)
  return l1 + perceptual_weight * p, dict(loss_l1=l1, loss_lpips=p)


def generator_step(
  state: TrainState,
  disc: DiscState,
  batch: Batch,
  lpips_params: Any,
  *,
  model: vqgan.VQGAN,
  disc_model: NLayerDiscriminator,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  use_gan: bool,
  replicated: Any = None,
) -> tuple[TrainState, dict[str, jax.Array], jax.Array]:
  """One autoencoder (and codebook) update; the discriminator is only read.

  batch['image']: (B, H, W, C) float32 in [-1, 1], split along 'data'. use_gan (static):
  whether the GAN term is on (t >= gan.disc_start); without it the step skips D and the
  adaptive weight. D runs with batch statistics, as in taming's training mode; its running
  averages are the discriminator step's to update.
  Returns (state, metrics, x_hat (B, H, W, C) float32, for the discriminator step).
  """
  x = batch["image"]
  params, before = model.quantizer.before_step(state.params, state.step)
  mesh = None if replicated is None else replicated.mesh

  def autoencode(p):
    z, z_flat, quant = tokenizer_steps.encode_and_quantize(p, x, state.step, model=model, mesh=mesh)
    h = model.apply(
      {"params": p}, quant.z_ste.reshape(z.shape).astype(z.dtype), method="decode_features"
    )
    return (h, quant.loss), dict(quant.terms, indices=quant.indices, z=z_flat)

  full = sharding.gather_params(params, replicated)
  (h, loss_q), autoencode_vjp, aux = jax.vjp(autoencode, full, has_aux=True)
  kernel, bias = vqgan.last_layer_params(full)
  x_hat, last_vjp = jax.vjp(functools.partial(vqgan.last_layer, dtype=model.dtype), h, kernel, bias)

  rec_fn = functools.partial(
    reconstruction_loss,
    x,
    lpips_params=lpips_params,
    perceptual_weight=config.loss.perceptual_weight,
    dtype=model.dtype,
  )
  (loss_rec, rec_terms), d_rec = jax.value_and_grad(rec_fn, has_aux=True)(x_hat)
  aux.update(rec_terms, loss_rec=loss_rec)
  loss = loss_rec + loss_q
  d_x_hat = d_rec
  if use_gan:

    def g_loss_fn(xh):
      logits, _ = disc_model.apply(
        {"params": disc.params, "batch_stats": disc.batch_stats},
        xh,
        train=True,
        mutable=["batch_stats"],
      )
      return gan.generator_loss(logits), jnp.mean(logits)

    (loss_g, logits_fake), d_g = jax.value_and_grad(g_loss_fn, has_aux=True)(x_hat)
    # dL_rec/dW and dg/dW: each x_hat-gradient pulled back through conv_out only.
    w_rec, w_g = last_vjp(d_rec)[1], last_vjp(d_g)[1]
    d_weight = gan.adaptive_weight(w_rec, w_g, disc_weight=config.gan.disc_weight)
    g_scale = d_weight * gan.disc_factor(state.step, config.gan.disc_start)
    loss = loss + g_scale * loss_g
    d_x_hat = d_rec + g_scale * d_g
    aux.update(loss_g=loss_g, d_weight=d_weight, logits_fake_g=logits_fake)

  d_h, d_kernel, d_bias = last_vjp(d_x_hat)
  (grads,) = autoencode_vjp((d_h, jnp.ones_like(loss_q)))
  grads = _add_at(grads, (*vqgan.LAST_LAYER, "kernel"), d_kernel)
  grads = _add_at(grads, (*vqgan.LAST_LAYER, "bias"), d_bias)
  aux["loss"] = loss
  new_state, metrics = tokenizer_steps.apply_tokenizer_update(
    state,
    params,
    grads,
    aux,
    before,
    tx=tx,
    quantizer=model.quantizer,
    usage_decay=config.quantizer.usage_decay,
  )
  return new_state, metrics, x_hat


def discriminator_step(
  disc: DiscState,
  batch: Batch,
  x_hat: jax.Array,
  *,
  disc_model: NLayerDiscriminator,
  tx: optax.GradientTransformation,
) -> tuple[DiscState, dict[str, jax.Array]]:
  """One PatchGAN update with the hinge loss on real images and the generator's x_hat.

  batch['image'], x_hat: (B, H, W, C) float32, split along 'data'. As taming, D sees the real
  and the fake batch in two calls: BatchNorm normalises each with its own (global-batch)
  statistics, and both calls move the running averages.
  """
  x = batch["image"]

  def loss_fn(params):
    logits_real, updated = disc_model.apply(
      {"params": params, "batch_stats": disc.batch_stats}, x, train=True, mutable=["batch_stats"]
    )
    logits_fake, updated = disc_model.apply(
      {"params": params, "batch_stats": updated["batch_stats"]},
      sg(x_hat),
      train=True,
      mutable=["batch_stats"],
    )
    return gan.hinge_d_loss(logits_real, logits_fake), (
      updated["batch_stats"],
      jnp.mean(logits_real),
      jnp.mean(logits_fake),
    )

  (d_loss, (stats, logits_real, logits_fake)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    disc.params
  )
  updates, opt_state = tx.update(grads, disc.opt_state, disc.params)
  params = optax.apply_updates(disc.params, updates)
  metrics = dict(
    d_loss=d_loss,
    logits_real=logits_real,
    logits_fake=logits_fake,
    d_grad_norm=optax.tree.norm(grads),
  )
  return DiscState(params=params, batch_stats=stats, opt_state=opt_state), metrics


class GANSteps:
  """The jitted steps of a VQGAN run and when to call them.

  `self(state, batch, t)` (t = state.step, a Python int) runs the generator step (with the
  GAN term from gan.disc_start on) and, from gan.disc_train_start on, the discriminator
  step on its reconstructions. Each jitted function compiles on first use.
  """

  def __init__(
    self,
    generator: dict[bool, Callable],
    discriminator: Callable,
    lpips_params: Any,
    config: ml_collections.ConfigDict,
  ):
    self.generator = generator
    self.discriminator = discriminator
    self.lpips_params = lpips_params
    self.disc_start = config.gan.disc_start
    self.disc_train_start = disc_train_start(config)

  def __call__(
    self, state: GANTrainState, batch: Batch, t: int
  ) -> tuple[GANTrainState, dict[str, jax.Array]]:
    gen, metrics, x_hat = self.generator[t >= self.disc_start](
      state.gen, state.disc, batch, self.lpips_params
    )
    disc = state.disc
    if t >= self.disc_train_start:
      disc, disc_metrics = self.discriminator(disc, batch, x_hat)
      metrics = {**metrics, **disc_metrics}
    return GANTrainState(gen=gen, disc=disc), metrics


def disc_train_start(config: ml_collections.ConfigDict) -> int:
  """The step from which D learns: gan.disc_train_start, or gan.disc_start when it is < 0."""
  start = config.gan.disc_train_start
  return config.gan.disc_start if start < 0 else start


def init_fn(
  model: vqgan.VQGAN,
  disc_model: NLayerDiscriminator,
  tx: optax.GradientTransformation,
  disc_tx: optax.GradientTransformation,
  image_shape: tuple[int, int, int],
) -> Callable[[jax.Array], GANTrainState]:
  """key -> a fresh GANTrainState (for sharding.fresh_state / abstract_state)."""
  return functools.partial(
    state_lib.init_gan_state,
    model=model,
    tx=tx,
    disc_model=disc_model,
    disc_tx=disc_tx,
    image_shape=image_shape,
  )


def make_steps(
  config: ml_collections.ConfigDict,
  model: vqgan.VQGAN,
  disc_model: NLayerDiscriminator,
  tx: optax.GradientTransformation,
  disc_tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  state_sharding: Any,
  lpips_params: Any,
) -> GANSteps:
  """The jitted generator and discriminator steps for a state laid out by `state_sharding`."""
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  generator = {
    use_gan: jax.jit(
      functools.partial(
        generator_step,
        model=model,
        disc_model=disc_model,
        tx=tx,
        config=config,
        use_gan=use_gan,
        replicated=replicated,
      ),
      in_shardings=(state_sharding.gen, state_sharding.disc, batch_sharding, replicated),
      out_shardings=(state_sharding.gen, replicated, batch_sharding),
      donate_argnums=(0,),
    )
    for use_gan in (False, True)
  }
  discriminator = jax.jit(
    functools.partial(discriminator_step, disc_model=disc_model, tx=disc_tx),
    in_shardings=(state_sharding.disc, batch_sharding, batch_sharding),
    out_shardings=(state_sharding.disc, replicated),
    donate_argnums=(0,),
  )
  return GANSteps(generator, discriminator, lpips_params, config)


def create_state_and_steps(
  config: ml_collections.ConfigDict,
  model: vqgan.VQGAN,
  disc_model: NLayerDiscriminator,
  tx: optax.GradientTransformation,
  disc_tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  image_shape: tuple[int, int, int],
  lpips_params: Any,
) -> tuple[GANTrainState, Any, GANSteps]:
  """A fresh GANTrainState laid out by its shardings, the shardings, and the steps.

  Both steps take the batch split along the batch axes, donate the state they update, and
  return replicated metrics; parameters follow config.sharding (param_rules, and the 'fsdp'
  axis) like the VQ-VAE's.
  lpips_params: replicated LPIPS weights (or None with loss.perceptual_weight = 0).
  """
  state, state_sharding = sharding.fresh_state(
    init_fn(model, disc_model, tx, disc_tx, image_shape), config.seed, mesh, config.sharding
  )
  steps = make_steps(config, model, disc_model, tx, disc_tx, mesh, state_sharding, lpips_params)
  return state, state_sharding, steps
