"""Tests for the VQGAN tokenizer parts: taming's blocks, the PatchGAN, and the GAN losses.

Each numeric test checks against an independent numpy computation written from the
taming-transformers / pix2pix definitions. Whole networks are checked with `jax.eval_shape`
(shapes and parameter trees) or with random params and one jitted apply: jitted random init
of a full VQGAN costs tens of seconds of XLA:CPU compile time.
"""

import importlib

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arcvq_jax.losses import gan
from arcvq_jax.models import discriminator, vqgan
from arcvq_jax.quantizers import registry
from arcvq_jax.quantizers.arcvq import ArcVQ
from arcvq_jax.train import state as state_lib

F16 = dict(ch_mult=(1, 1, 2, 2, 4), attn_resolutions=(4,))  # 64 / 16 = 4: taming's (16,) at 256
F8 = dict(ch_mult=(1, 2, 2, 4), attn_resolutions=(8,))  # 64 / 8 = 8: taming's (32,) at 256


def key(seed=0):
  """A PRNG key whose random bits (XLA's RngBitGenerator) compile several times faster than
  threefry's on CPU; every init here sees only the key's interface."""
  return jax.random.key(seed, impl="rbg")


def small_vqgan(**kw):
  args = dict(ch=32, num_res_blocks=2, resolution=64, z_channels=8, embed_dim=4)
  args["quantizer"] = ArcVQ(num_codes=16, embed_dim=4)
  args.update(kw)
  return vqgan.VQGAN(**args)


def random_params(shapes, seed=0, scale=0.1):
  """Random normal values with the shapes of a `jax.eval_shape(model.init, ...)` tree."""
  rng = np.random.default_rng(seed)
  return jax.tree.map(
    lambda s: jnp.asarray(rng.normal(size=s.shape).astype(np.float32) * scale), shapes
  )


# ---------------------------------------------------------------------------- numpy references


def np_conv(x, kernel, stride=1, pad=((0, 0), (0, 0)), bias=None):
  """Cross-correlation by definition, NHWC / HWIO, explicit (lo, hi) padding per axis."""
  x = np.pad(np.asarray(x, np.float64), ((0, 0), pad[0], pad[1], (0, 0)))
  kernel = np.asarray(kernel, np.float64)
  kh, kw = kernel.shape[:2]
  ho = (x.shape[1] - kh) // stride + 1
  wo = (x.shape[2] - kw) // stride + 1
  out = np.zeros((x.shape[0], ho, wo, kernel.shape[-1]))
  for i in range(ho):
    for j in range(wo):
      win = x[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]
      out[:, i, j, :] = np.einsum("bhwc,hwco->bo", win, kernel)
  return out if bias is None else out + np.asarray(bias)


def np_group_norm(x, scale, bias, groups=32, eps=1e-6):
  b, h, w, c = x.shape
  g = np.asarray(x, np.float64).reshape(b, h, w, groups, c // groups)
  mean = g.mean(axis=(1, 2, 4), keepdims=True)
  var = g.var(axis=(1, 2, 4), keepdims=True)
  return ((g - mean) / np.sqrt(var + eps)).reshape(b, h, w, c) * scale + bias


def np_swish(x):
  return x / (1.0 + np.exp(-x))


def np_conv_p(x, p, k, stride=1, pad=None):
  pad = pad if pad is not None else ((k // 2, k // 2),) * 2
  return np_conv(x, p["kernel"], stride, pad, p["bias"])


# ---------------------------------------------------------------------------- encoder / decoder


@pytest.mark.slow
@pytest.mark.parametrize("arch, f", [(F16, 16), (F8, 8)])
def test_vqgan_latent_and_output_shapes(arch, f):
  model = small_vqgan(**arch)
  x = jax.ShapeDtypeStruct((2, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, key(0), x)
  z = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), variables, x)
  assert z.shape == (2, 64 // f, 64 // f, 4)
  x_hat = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), variables, z)
  assert x_hat.shape == (2, 64, 64, 3)

  p = variables["params"]
  assert p["codebook"].shape == (16, 4)
  assert p["quant_conv"]["kernel"].shape == (1, 1, 8, 4)
  assert p["post_quant_conv"]["kernel"].shape == (1, 1, 4, 8)
  n = len(arch["ch_mult"])
  enc, dec = p["encoder"], p["decoder"]
  for i, mult in enumerate(arch["ch_mult"]):
    # Encoder: 2 blocks per level, widths ch * mult; attention only at the 64 / 2**i in attn.
    assert enc[f"down_{i}"]["block_1"]["conv2"]["kernel"].shape[-1] == 32 * mult
    assert "block_2" not in enc[f"down_{i}"]
    has_attn = 64 // 2**i in arch["attn_resolutions"]
    assert ("attn_1" in enc[f"down_{i}"]) == has_attn
    assert ("downsample" in enc[f"down_{i}"]) == (i != n - 1)
    # Decoder: 3 blocks per level, the same widths, upsampling everywhere but up_0.
    assert "block_2" in dec[f"up_{i}"] and "block_3" not in dec[f"up_{i}"]
    assert dec[f"up_{i}"]["block_2"]["conv2"]["kernel"].shape[-1] == 32 * mult
    assert ("attn_2" in dec[f"up_{i}"]) == has_attn
    assert ("upsample" in dec[f"up_{i}"]) == (i != 0)
  for part in (enc, dec):
    assert set(part["mid"]) == {"block_1", "attn_1", "block_2"}
  assert enc["conv_out"]["kernel"].shape == (3, 3, 32 * arch["ch_mult"][-1], 8)
  assert vqgan.last_layer_kernel(p).shape == (3, 3, 32 * arch["ch_mult"][0], 3)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = small_vqgan(dtype=jnp.bfloat16, **F8)
  x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
  variables = jax.eval_shape(model.init, key(0), x)
  dtypes = {leaf.dtype for leaf in jax.tree.leaves(variables)}
  assert dtypes == {jnp.dtype(jnp.float32)}
  z = jax.eval_shape(lambda v, x: model.apply(v, x, method="encode"), variables, x)
  x_hat = jax.eval_shape(lambda v, z: model.apply(v, z, method="decode"), variables, z)
  assert z.dtype == jnp.float32 and x_hat.dtype == jnp.float32


@pytest.mark.slow
def test_decode_is_last_layer_of_decode_features_and_bf16_is_close():
  """decode(z) == last_layer(decode_features(z), W, b): the adaptive weight's view of W."""
  kw = dict(
    ch=32,
    ch_mult=(1, 2),
    num_res_blocks=1,
    attn_resolutions=(8,),
    resolution=16,
    z_channels=8,
    embed_dim=4,
    quantizer=ArcVQ(num_codes=16, embed_dim=4),
  )
  model = vqgan.VQGAN(**kw)
  z = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8, 4)), jnp.float32)
  shapes = jax.eval_shape(lambda k: model.init(k, jnp.zeros((1, 16, 16, 3))), key(0))
  variables = random_params(shapes)

  def both(v, z):
    h = model.apply(v, z, method="decode_features")
    return model.apply(v, z, method="decode"), h

  x_hat, h = jax.jit(both)(variables, z)
  assert h.shape == (1, 16, 16, 32)
  kernel, bias = vqgan.last_layer_params(variables["params"])
  np.testing.assert_allclose(vqgan.last_layer(h, kernel, bias), x_hat, rtol=1e-5, atol=1e-5)
  assert vqgan.last_layer(h, kernel, bias, jnp.bfloat16).dtype == jnp.float32
  # Reference conv_out by definition.
  np.testing.assert_allclose(
    np_conv(h, kernel, 1, ((1, 1), (1, 1)), bias), x_hat, rtol=1e-4, atol=1e-4
  )

  bf16 = vqgan.VQGAN(dtype=jnp.bfloat16, **kw)
  x_bf16 = jax.jit(lambda v, z: bf16.apply(v, z, method="decode"))(variables, z)
  assert x_bf16.dtype == jnp.float32
  err = np.abs(np.asarray(x_bf16) - np.asarray(x_hat)).max()
  assert 0 < err < 0.05 * np.abs(np.asarray(x_hat)).max()


# ---------------------------------------------------------------------------- blocks


@pytest.mark.slow
def test_downsample_pads_bottom_right_then_stride2_conv():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 6, 6, 3)), jnp.float32)
  block = vqgan.Downsample()
  params = block.init(key(0), x)["params"]
  y = block.apply({"params": params}, x)
  assert y.shape == (2, 3, 3, 3)
  ref = np_conv(
    x, params["conv"]["kernel"], stride=2, pad=((0, 1), (0, 1)), bias=params["conv"]["bias"]
  )
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_upsample_is_nearest_then_conv3x3():
  x = jnp.asarray(np.random.default_rng(0).normal(size=(1, 3, 4, 2)), jnp.float32)
  block = vqgan.Upsample()
  params = block.init(key(0), x)["params"]
  y = block.apply({"params": params}, x)
  up = np.asarray(x)[:, np.arange(6) // 2][:, :, np.arange(8) // 2]
  np.testing.assert_allclose(y, np_conv_p(up, params["conv"], 3), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_attn_block_matches_numpy():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(2, 3, 4, 64)) + 0.5, jnp.float32)
  block = vqgan.AttnBlock()
  params = block.init(key(1), x)["params"]
  params = dict(
    params,
    norm={
      "scale": jnp.asarray(1 + 0.1 * rng.normal(size=64), jnp.float32),
      "bias": jnp.asarray(0.1 * rng.normal(size=64), jnp.float32),
    },
  )
  y = block.apply({"params": params}, x)

  n = np_group_norm(x, params["norm"]["scale"], params["norm"]["bias"])
  q, k, v = (np_conv_p(n, params[name], 1).reshape(2, 12, 64) for name in "qkv")
  logits = np.einsum("bic,bjc->bij", q, k) / np.sqrt(64)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  h = np.einsum("bij,bjc->bic", w, v).reshape(2, 3, 4, 64)
  ref = np.asarray(x) + np_conv_p(h, params["proj_out"], 1)
  np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize("cin", [32, 64])
def test_resnet_block_matches_numpy(cin):
  rng = np.random.default_rng(cin)
  x = jnp.asarray(rng.normal(size=(1, 4, 4, cin)), jnp.float32)
  block = vqgan.ResnetBlock(64)
  params = block.init(key(0), x)["params"]
  assert ("nin_shortcut" in params) == (cin != 64)
  y = block.apply({"params": params}, x)

  h = np_conv_p(np_swish(np_group_norm(x, **params["norm1"])), params["conv1"], 3)
  h = np_conv_p(np_swish(np_group_norm(h, **params["norm2"])), params["conv2"], 3)
  skip = np_conv_p(x, params["nin_shortcut"], 1) if cin != 64 else np.asarray(x)
  np.testing.assert_allclose(y, skip + h, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------------------- discriminator


def test_discriminator_output_is_30x30_patches_for_256_inputs():
  disc = discriminator.NLayerDiscriminator()
  x = jax.ShapeDtypeStruct((1, 256, 256, 3), jnp.float32)
  variables = jax.eval_shape(disc.init, key(0), x)
  assert jax.eval_shape(disc.apply, variables, x).shape == (1, 30, 30, 1)


@pytest.fixture(scope="module")
def disc_variables():
  return jax.jit(discriminator.NLayerDiscriminator().init)(key(0), jnp.zeros((1, 32, 32, 3)))


@pytest.mark.slow
def test_discriminator_init_statistics(disc_variables):
  p = disc_variables["params"]
  for name in ("main_0", "main_2", "main_5", "main_8", "main_11"):
    kernel = np.asarray(p[name]["kernel"])
    assert kernel.shape[:2] == (4, 4)
    assert abs(kernel.std() - 0.02) < (0.004 if kernel.size < 5000 else 0.001), name
    assert abs(kernel.mean()) < 0.002, name
  for name in ("main_2", "main_5", "main_8"):  # followed by BatchNorm: no conv bias
    assert set(p[name]) == {"kernel"}
  scales = np.concatenate([np.asarray(p[n]["scale"]) for n in ("main_3", "main_6", "main_9")])
  assert scales.size == 128 + 256 + 512
  assert abs(scales.mean() - 1.0) < 0.005 and 0.015 < scales.std() < 0.025
  for n in ("main_3", "main_6", "main_9"):
    np.testing.assert_array_equal(p[n]["bias"], 0.0)
  stats = disc_variables["batch_stats"]
  np.testing.assert_array_equal(stats["main_3"]["mean"], 0.0)
  np.testing.assert_array_equal(stats["main_9"]["var"], 1.0)


@pytest.mark.slow
def test_discriminator_batch_stats_train_vs_eval(disc_variables):
  disc = discriminator.NLayerDiscriminator()
  x = jnp.asarray(np.random.default_rng(0).normal(size=(3, 64, 64, 3)), jnp.float32)

  logits, updates = disc.apply(disc_variables, x, train=True, mutable=["batch_stats"])
  assert logits.shape == (3, 6, 6, 1)  # 64 -> 32 -> 16 -> 8 -> 7 -> 6
  for name in ("main_3", "main_6", "main_9"):
    old, new = disc_variables["batch_stats"][name], updates["batch_stats"][name]
    assert not np.allclose(new["mean"], old["mean"]), name
    assert not np.allclose(new["var"], old["var"]), name
  # Train mode normalises with batch statistics: a sample's logits depend on the batch.
  alone = disc.apply(disc_variables, x[:1], train=True, mutable=["batch_stats"])[0]
  assert not np.allclose(alone, logits[:1], atol=1e-4)

  eval_logits, eval_updates = disc.apply(disc_variables, x, train=False, mutable=["batch_stats"])
  jax.tree.map(
    np.testing.assert_array_equal, eval_updates["batch_stats"], disc_variables["batch_stats"]
  )
  # Eval mode uses the running averages: per-sample, independent of the batch.
  np.testing.assert_allclose(
    disc.apply(disc_variables, x[:1]), eval_logits[:1], rtol=1e-5, atol=1e-5
  )


# ---------------------------------------------------------------------------- losses


def test_hinge_and_generator_losses_by_hand():
  real = np.array([[2.0, 0.5], [-1.0, 1.0]], np.float32)  # relu(1 - r): 0, .5, 2, 0
  fake = np.array([-3.0, -0.25, 0.5], np.float32)  # relu(1 + f): 0, .75, 1.5
  expected = 0.5 * ((0 + 0.5 + 2 + 0) / 4 + (0 + 0.75 + 1.5) / 3)
  np.testing.assert_allclose(
    gan.hinge_d_loss(jnp.asarray(real), jnp.asarray(fake)), expected, rtol=1e-6
  )
  np.testing.assert_allclose(gan.generator_loss(jnp.asarray(fake)), (3 + 0.25 - 0.5) / 3, rtol=1e-6)


def toy_problem(a_scale):
  """A linear 'decoder' x_hat = h @ W and a linear 'discriminator' D(y) = y @ a."""
  rng = np.random.default_rng(0)
  h = rng.normal(size=(5, 3))
  w = rng.normal(size=(3, 2))
  x = rng.normal(size=(5, 2))
  a = rng.normal(size=2) * a_scale
  rec = lambda w_: 0.5 * jnp.sum((jnp.asarray(h) @ w_ - jnp.asarray(x)) ** 2)
  g = lambda w_: gan.generator_loss(jnp.asarray(h) @ w_ @ jnp.asarray(a))
  # Analytic gradients: d rec / dW = h^T (hW - x); d g / dW = -(1/N) outer(sum_n h_n, a).
  rec_norm = np.linalg.norm(h.T @ (h @ w - x))
  g_norm = np.linalg.norm(np.outer(h.sum(0), a)) / 5
  return rec, g, jnp.asarray(w, jnp.float32), rec_norm, g_norm


def test_adaptive_weight_on_a_linear_toy():
  rec, g, w, rec_norm, g_norm = toy_problem(1.0)
  expected = rec_norm / (g_norm + 1e-4) * 0.8
  assert expected < 0.8 * 1e4
  np.testing.assert_allclose(gan.adaptive_weight_from_losses(rec, g, w), expected, rtol=1e-5)
  np.testing.assert_allclose(
    gan.adaptive_weight(jax.grad(rec)(w), jax.grad(g)(w)), expected, rtol=1e-5
  )


def test_adaptive_weight_clips_at_1e4_times_0p8():
  rec, g, w, rec_norm, g_norm = toy_problem(1e-9)
  assert rec_norm / (g_norm + 1e-4) > 1e4
  np.testing.assert_allclose(gan.adaptive_weight_from_losses(rec, g, w), 1e4 * 0.8, rtol=1e-6)
  # By hand on arrays with known norms: ||(3, 4)|| = 5, ||(0, 2)|| = 2.
  lam = gan.adaptive_weight(jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0]), disc_weight=0.5)
  np.testing.assert_allclose(lam, 5.0 / (2.0 + 1e-4) * 0.5, rtol=1e-6)


def test_adaptive_weight_carries_no_gradient():
  rg, gg = jnp.array([3.0, 4.0]), jnp.array([0.0, 2.0])
  d_rec = jax.grad(lambda s: gan.adaptive_weight(s * rg, gg))(1.0)
  d_g = jax.grad(lambda s: gan.adaptive_weight(rg, s * gg))(1.0)
  assert d_rec == 0.0 and d_g == 0.0


def test_disc_factor_switches_on_at_disc_start():
  f = jax.jit(gan.disc_factor, static_argnums=1)
  got = [float(f(jnp.asarray(s), 250001)) for s in (0, 250000, 250001, 10**6)]
  assert got == [0.0, 0.0, 1.0, 1.0]
  assert float(gan.disc_factor(0, 0)) == 1.0


def test_from_config_reads_model_and_quantizer():
  c = ml_collections.ConfigDict()
  c.model = dict(
    ch=32,
    ch_mult=[1, 2, 2, 4],
    num_res_blocks=1,
    attn_resolutions=[8],
    resolution=64,
    z_channels=8,
    dropout=0.0,
    dtype="bfloat16",
  )
  c.quantizer = dict(num_codes=32, embed_dim=4, init="uniform")
  model = vqgan.from_config(c, channels=1, quantizer=registry.from_config(c))
  assert (model.ch, model.ch_mult, model.num_res_blocks, model.attn_resolutions) == (
    32,
    (1, 2, 2, 4),
    1,
    (8,),
  )
  assert (model.resolution, model.z_channels, model.embed_dim) == (64, 8, 4)
  assert model.quantizer.vocab_size == 32 and model.quantizer.dim == 4
  assert model.quantizer.init == "uniform" and model.channels == 1
  assert model.dtype == jnp.bfloat16 and model.downsample_factor == 8


@pytest.mark.parametrize("name, tokens, attn_level", [("imagenet", 32, 3), ("imagenet_f16", 16, 4)])
def test_imagenet_configs_build_taming_f8_and_f16(name, tokens, attn_level):
  """256x256 images -> 32x32 (f8) or 16x16 (f16) tokens of 16 channels and back; attention
  at resolution 32 / 16 sits in taming's down[attn_level] and up[attn_level] levels."""
  c = importlib.import_module(f"configs.{name}").get_config()
  model = state_lib.build_model(c, channels=3)
  x = jax.ShapeDtypeStruct((2, 256, 256, 3), jnp.float32)
  params = jax.eval_shape(model.init, key(), x)["params"]
  z = jax.eval_shape(lambda p, x: model.apply({"params": p}, x, method="encode"), params, x)
  assert z.shape == (2, tokens, tokens, 16) and z.dtype == jnp.float32
  x_hat = jax.eval_shape(lambda p, z: model.apply({"params": p}, z, method="decode"), params, z)
  assert x_hat.shape == (2, 256, 256, 3)
  assert params["codebook"].shape == (1024, 16)
  assert params["quant_conv"]["kernel"].shape == (1, 1, 16, 16)
  assert params["post_quant_conv"]["kernel"].shape == (1, 1, 16, 16)
  levels = len(c.model.ch_mult)
  for i in range(levels):
    has_attn = any(k.startswith("attn") for k in params["encoder"][f"down_{i}"])
    assert has_attn == (i == attn_level), i
    assert len([k for k in params["decoder"][f"up_{i}"] if k.startswith("block")]) == 3
  assert "attn_1" in params["encoder"]["mid"] and "attn_1" in params["decoder"]["mid"]
  disc = discriminator.from_config(c)
  logits = jax.eval_shape(lambda x: disc.init_with_output(key(), x)[0], x)
  assert logits.shape == (2, 30, 30, 1)
