"""The VQGAN's generator and discriminator steps (arcvq_jax/train/gan_steps.py).

The generator step assembles its gradient by hand (one backward per network); it is checked
against jax.grad of the whole loss with the adaptive weight held fixed, the weight itself
coming from `gan.adaptive_weight_from_losses` on the full decoder, an independent path.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_fixtures import random_lpips_params

from arcvq_jax import config as config_lib
from arcvq_jax import sharding
from arcvq_jax.losses import gan
from arcvq_jax.models import discriminator, vqgan
from arcvq_jax.train import gan_steps, tokenizer_steps
from arcvq_jax.train import state as state_lib
from arcvq_jax.train.state import make_disc_optimizer, make_optimizer

IMAGE_SHAPE = (16, 16, 3)


def small_config(**gan_overrides):
  c = config_lib.vqgan_config()
  c.model.update(
    dict(
      ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(8,), resolution=16, z_channels=8
    )
  )
  c.quantizer.num_codes, c.quantizer.embed_dim = 32, 8
  c.gan.update({"disc_start": 0, "ndf": 8, "n_layers": 1, **gan_overrides})
  c.optimizer.update(dict(lr=1e-3, scale_lr=False))
  c.batch_size = 4
  return c


def images(seed=0, n=4):
  return jnp.asarray(np.random.default_rng(seed).uniform(-1, 1, (n, *IMAGE_SHAPE)), jnp.float32)


def capture_grads() -> optax.GradientTransformation:
  """An 'optimizer' that leaves params alone and keeps the last gradient as its state."""
  return optax.GradientTransformation(
    init=lambda params: jax.tree.map(jnp.zeros_like, params),
    update=lambda g, s, p=None: (jax.tree.map(jnp.zeros_like, g), g),
  )


@pytest.fixture(scope="module")
def setup():
  """One config, state and set of compiled steps for the whole module (each distinct config
  would compile the steps again): D learns from step 1, the GAN term reaches the autoencoder
  from step 2. Tests pass copies of `state` to the steps, which donate their input."""
  c = small_config(disc_start=2, disc_train_start=1)
  mesh = sharding.make_mesh((-1,), ("data",))
  model = state_lib.build_model(c, channels=3)
  disc_model = discriminator.from_config(c)
  lpips_params = random_lpips_params()
  state, _, steps = gan_steps.create_state_and_steps(
    c, model, disc_model, make_optimizer(c), make_disc_optimizer(c), mesh, IMAGE_SHAPE, lpips_params
  )
  return c, model, disc_model, lpips_params, state, steps


@pytest.mark.slow
def test_generator_gradient_equals_grad_of_the_total_loss(setup):
  c, model, disc_model, lpips_params, state, _ = setup
  c = c.copy_and_resolve_references()
  c.quantizer.bbnr = "off"  # params as stored (BBNR's projection is tested elsewhere)
  model = state_lib.build_model(c, channels=3)  # its quantizer without BBNR
  x = images(1)
  # D with non-trivial running stats and params, as mid-training.
  disc = state.disc.replace(
    **{
      k: jax.tree.map(lambda a: a * 1.1 + 0.01, getattr(state.disc, k))
      for k in ("params", "batch_stats")
    }
  )
  gen = state.gen.replace(
    opt_state=capture_grads().init(state.gen.params), step=jnp.asarray(7, jnp.int32)
  )
  step = jax.jit(
    functools.partial(
      gan_steps.generator_step,
      model=model,
      disc_model=disc_model,
      tx=capture_grads(),
      config=c,
      use_gan=True,
    )
  )
  new_gen, metrics, x_hat = step(gen, disc, {"image": x}, lpips_params)
  got = new_gen.opt_state

  params = gen.params
  d_vars = {"params": disc.params, "batch_stats": disc.batch_stats}

  def decode_with_kernel(p, w):
    p = dict(p, decoder=dict(p["decoder"], conv_out=dict(p["decoder"]["conv_out"], kernel=w)))
    z, z_flat, quant = tokenizer_steps.encode_and_quantize(p, x, gen.step, model=model)
    x_hat = model.apply({"params": p}, quant.z_ste.reshape(z.shape), method="decode")
    return x_hat, z_flat, quant, p

  def rec_of_w(w):
    xh = decode_with_kernel(params, w)[0]
    return gan_steps.reconstruction_loss(x, xh, lpips_params, perceptual_weight=1.0)[0]

  def g_of_w(w):
    xh = decode_with_kernel(params, w)[0]
    logits, _ = disc_model.apply(d_vars, xh, train=True, mutable=["batch_stats"])
    return gan.generator_loss(logits)

  def total(p, lam):
    xh, _z_flat, quant, p = decode_with_kernel(p, vqgan.last_layer_kernel(p))
    rec = gan_steps.reconstruction_loss(x, xh, lpips_params, perceptual_weight=1.0)[0]
    logits, _ = disc_model.apply(d_vars, xh, train=True, mutable=["batch_stats"])
    return rec + lam * gan.generator_loss(logits) + quant.loss

  def reference(p):
    # lambda at the last layer's kernel, then d(total)/dp with lambda held constant
    lam = gan.adaptive_weight_from_losses(rec_of_w, g_of_w, vqgan.last_layer_kernel(p))
    return lam, jax.value_and_grad(total)(p, jax.lax.stop_gradient(lam))

  # One jitted program (op by op, the VGG's backward compiles hundreds of small programs;
  # in one program the two passes share their forward computations).
  lam, (want_loss, want) = jax.jit(reference)(params)
  np.testing.assert_allclose(metrics["d_weight"], lam, rtol=1e-4)
  np.testing.assert_allclose(metrics["loss"], want_loss, rtol=1e-5)
  assert float(lam) > 0 and float(metrics["loss_g"]) != 0.0
  scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree.leaves(want))
  for (path, a), b in zip(
    jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want), strict=True
  ):
    np.testing.assert_allclose(
      a, b, atol=1e-4 * scale, rtol=1e-3, err_msg=jax.tree_util.keystr(path)
    )
  # Every part of the autoencoder and the codebook gets a gradient.
  assert float(jnp.max(jnp.abs(got["codebook"]))) > 0
  assert float(jnp.max(jnp.abs(got["decoder"]["conv_out"]["kernel"]))) > 0
  assert float(jnp.max(jnp.abs(got["encoder"]["conv_in"]["kernel"]))) > 0
  assert x_hat.shape == x.shape and x_hat.dtype == jnp.float32


def changed(a, b) -> list[bool]:
  return [
    not np.array_equal(u, v) for u, v in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True)
  ]


@pytest.mark.slow
def test_each_stage_updates_only_its_own_network(setup):
  _c, _model, _disc_model, lpips_params, state, steps = setup
  fresh = jax.tree.map(jnp.copy, state)
  before = jax.device_get(fresh)
  batch = {"image": images(2)}

  s1, m1 = steps(fresh, batch, 0)  # t = 0: autoencoder only, no GAN term, D untouched
  s1_host = jax.device_get(s1)
  assert all(changed(before.gen.params, s1_host.gen.params))
  assert not any(changed(before.disc, s1_host.disc))
  assert "loss_g" not in m1 and "d_loss" not in m1

  s2, m2 = steps(s1, batch, 1)  # t = 1: D learns, the generator does not feel it yet
  s2_host = jax.device_get(s2)
  assert "d_loss" in m2 and "loss_g" not in m2
  # Every D parameter moves but the last conv's bias: while all |logits| < 1 the hinge
  # gradient on it is -1/2 + 1/2 = 0 (as many real as fake logits).
  moved = dict(
    zip(
      (
        jax.tree_util.keystr(p) for p, _ in jax.tree_util.tree_leaves_with_path(s1_host.disc.params)
      ),
      changed(s1_host.disc.params, s2_host.disc.params),
      strict=True,
    )
  )
  assert moved.pop("['main_5']['bias']") is False and all(moved.values())
  assert all(changed(s1_host.disc.batch_stats, s2_host.disc.batch_stats))
  # The discriminator step leaves the autoencoder's state as the generator step left it:
  # replaying the generator step alone gives the same autoencoder.
  gen_only, _, _ = steps.generator[False](
    jax.device_put(s1_host.gen), jax.device_put(s1_host.disc), batch, lpips_params
  )
  assert not any(changed(jax.device_get(gen_only), s2_host.gen))

  s3, m3 = steps(s2, batch, 2)  # t = 2 = disc_start: the GAN term reaches the autoencoder
  assert {"loss_g", "d_weight", "d_loss", "logits_real", "logits_fake"} <= set(m3)
  assert float(m3["d_weight"]) > 0
  assert int(s3.step) == 3


@pytest.mark.slow
def test_discriminator_step_is_the_hinge_loss_on_two_batchnorm_calls(setup):
  c, _, disc_model, _, state, _ = setup
  x, x_hat = images(3), images(4)
  disc = state.disc
  tx = make_disc_optimizer(c)
  new, metrics = jax.jit(
    functools.partial(gan_steps.discriminator_step, disc_model=disc_model, tx=tx)
  )(disc, {"image": x}, x_hat)
  variables = {"params": disc.params, "batch_stats": disc.batch_stats}
  # jitted: op by op, every op (and its gradient) would compile a program of its own
  d_train = jax.jit(functools.partial(disc_model.apply, train=True, mutable=["batch_stats"]))
  real, upd = d_train(variables, x)
  fake, upd = d_train({"params": disc.params, **upd}, x_hat)
  hinge = 0.5 * (
    np.mean(np.maximum(0, 1 - np.asarray(real))) + np.mean(np.maximum(0, 1 + np.asarray(fake)))
  )
  np.testing.assert_allclose(metrics["d_loss"], hinge, rtol=1e-5)
  for a, b in zip(
    jax.tree.leaves(new.batch_stats), jax.tree.leaves(upd["batch_stats"]), strict=True
  ):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
  # One Adam step from zero moments moves every parameter by about lr (sign of its gradient).
  grads = jax.jit(
    jax.grad(
      lambda p: gan.hinge_d_loss(
        d_train({"params": p, "batch_stats": disc.batch_stats}, x)[0],
        d_train({"params": p, "batch_stats": upd["batch_stats"]}, x_hat)[0],
      )
    )
  )(disc.params)
  updates, _ = jax.jit(tx.update)(grads, disc.opt_state, disc.params)
  for a, b, u in zip(
    jax.tree.leaves(new.params), jax.tree.leaves(disc.params), jax.tree.leaves(updates), strict=True
  ):
    np.testing.assert_allclose(np.asarray(a) - np.asarray(b), u, atol=1e-7)


@pytest.mark.slow
def test_bfloat16_generator_step_keeps_float32_state_and_is_close(setup):
  c, _, _disc_model, lpips_params, state, steps = setup
  batch = {"image": images(5)}
  gen = state.gen.replace(step=jnp.asarray(c.gan.disc_start, jnp.int32))  # the GAN term on
  # float32: the stage's own generator step (test_each_stage_... compiles the same program)
  _, want, _ = steps.generator[True](jax.tree.map(jnp.copy, gen), state.disc, batch, lpips_params)
  cd = c.copy_and_resolve_references()
  cd.model.dtype = "bfloat16"
  step = jax.jit(
    functools.partial(
      gan_steps.generator_step,
      model=state_lib.build_model(cd, channels=3),
      disc_model=discriminator.from_config(cd),
      tx=make_optimizer(cd),
      config=cd,
      use_gan=True,
    )
  )
  new, metrics, x_hat = step(jax.tree.map(jnp.copy, gen), state.disc, batch, lpips_params)
  assert all(leaf.dtype == jnp.float32 for leaf in jax.tree.leaves(new.params))
  assert x_hat.dtype == jnp.float32
  for key in ("loss", "loss_l1", "loss_lpips", "loss_vq", "loss_arc", "loss_g"):
    assert metrics[key].dtype == jnp.float32 and np.isfinite(metrics[key]), key
    np.testing.assert_allclose(metrics[key], want[key], rtol=0.05, atol=0.02, err_msg=key)
