"""The latent-diffusion UNet (arcvq_jax/models/unet.py): size of the Table 8 network, the
pieces against numpy, attention placement, conditioning, precision."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import init_params

from arcvq_jax import prior_config
from arcvq_jax.models import unet


def small(**kw):
  args = dict(
    latent_channels=3,
    num_classes=5,
    context_dim=16,
    model_channels=32,
    channel_mult=(1, 2),
    num_res_blocks=1,
    attention_resolutions=(4,),
    num_head_channels=16,
  )
  args.update(kw)
  return unet.LatentDiffusionUNet(**args)


def inputs(b=2, side=8, c=3, seed=0):
  k1, k2 = jax.random.split(jax.random.PRNGKey(seed))
  x = jax.random.normal(k1, (b, side, side, c))
  t = jax.random.randint(k2, (b,), 0, 1000)
  y = jnp.arange(b, dtype=jnp.int32) % 5
  return x, t, y


def perturbed(params, seed=1, scale=0.05):
  """Params with every leaf moved off its (partly zero) init, so every path carries signal.

  numpy's generator: a JAX draw per leaf shape would compile a program per shape.
  """
  rng = np.random.default_rng(seed)
  return jax.tree.map(lambda p: p + scale * rng.normal(size=p.shape).astype(np.float32), params)


@functools.partial(jax.jit, static_argnums=0)  # one program per model and input shapes
def apply(model, params, *args):
  return model.apply({"params": params}, *args)


def test_table8_network_has_ldm_cin_size_and_layout():
  c = prior_config.ldm_config()
  model = unet.from_config(c, latent_channels=16)
  shapes = jax.eval_shape(
    lambda: model.init(
      jax.random.PRNGKey(0),
      jnp.zeros((1, 32, 32, 16)),
      jnp.zeros((1,), jnp.int32),
      jnp.zeros((1,), jnp.int32),
    )
  )["params"]
  count = sum(math.prod(x.shape) for x in jax.tree.leaves(shapes))
  # latent-diffusion's cin-ldm-vq-f8 UNet has 395M parameters (LDM paper, Tab. 18 "LDM-8"
  # (cin): 395M); ours with 16 latent channels: 395,039,504, plus 1001 x 512 class rows.
  assert count == 395_552_016
  assert shapes["cond_stage_model"]["embedding"]["embedding"].shape == (1001, 512)
  d = shapes["diffusion_model"]
  # Input blocks: conv, (res, transformer) x2 per level, downsample between levels.
  assert "input_blocks_3_0" in d and "op" in d["input_blocks_3_0"]
  assert all(f"input_blocks_{i}_1" in d for i in (1, 2, 4, 5, 7, 8))  # attention at 32, 16, 8
  assert d["input_blocks_7_0"]["in_layers_2"]["kernel"].shape == (3, 3, 512, 1024)
  block = d["input_blocks_1_1"]["transformer_blocks_0"]
  assert block["attn2"]["to_k"]["kernel"].shape == (512, 256)  # cross-attn to the class emb
  assert block["ff_net_0_proj"]["kernel"].shape == (256, 2048)  # GEGLU, 4x inner
  assert d["output_blocks_2_2"]["conv"]["kernel"].shape == (3, 3, 1024, 1024)  # upsample
  assert d["out_2"]["kernel"].shape == (3, 3, 256, 16)


def test_timestep_embedding_matches_the_formula():
  t = jnp.asarray([0, 1, 17, 999])
  got = np.asarray(unet.timestep_embedding(t, 8))
  freqs = np.exp(-math.log(10000.0) * np.arange(4) / 4)
  args = np.asarray(t)[:, None] * freqs[None]
  np.testing.assert_allclose(
    got, np.concatenate([np.cos(args), np.sin(args)], -1), rtol=1e-5, atol=1e-5
  )


def test_multi_head_attention_matches_a_per_head_loop():
  rng = np.random.default_rng(0)
  q, k, v = rng.normal(size=(2, 5, 12)), rng.normal(size=(2, 7, 12)), rng.normal(size=(2, 7, 12))
  got = np.asarray(unet.multi_head_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), 3))
  want = np.zeros_like(q)
  for b in range(2):
    for h in range(3):
      sl = slice(4 * h, 4 * h + 4)
      logits = q[b, :, sl] @ k[b, :, sl].T / 2.0
      w = np.exp(logits - logits.max(-1, keepdims=True))
      w /= w.sum(-1, keepdims=True)
      want[b, :, sl] = w @ v[b, :, sl]
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_zero_init_output_and_attention_placement():
  model = small()
  x, t, y = inputs()
  params = init_params(model, x, t, y)
  # LDM zero-initialises the last conv (and every residual branch's last layer).
  assert float(jnp.max(jnp.abs(apply(model, params, x, t, y)))) == 0.0
  d = params["diffusion_model"]
  # 8x8 latents, levels at 8 and 4: attention only at 4 (and in the middle block).
  assert "input_blocks_1_1" not in d and "input_blocks_3_1" in d and "middle_block_1" in d
  assert "output_blocks_0_1" in d and "output_blocks_3_1" not in d


@pytest.mark.slow
def test_class_conditioning_and_batch_independence():
  model = small()
  x, t, y = inputs(b=3)
  params = perturbed(init_params(model, x, t, y))
  out = apply(model, params, x, t, y)
  assert out.shape == x.shape and out.dtype == jnp.float32
  other = apply(model, params, x, t, (y + 1) % 6)  # 5 = the null class
  assert float(jnp.max(jnp.abs(other - out))) > 1e-3
  # Each sample depends on its own inputs only (guidance batches [uncond; cond] together).
  single = apply(model, params, x[1:2], t[1:2], y[1:2])
  np.testing.assert_allclose(np.asarray(single[0]), np.asarray(out[1]), rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_attention_block_path_with_label_embedding():
  model = small(use_spatial_transformer=False, attention_resolutions=(8, 4))
  x, t, y = inputs()
  params = init_params(model, x, t, y)
  d = params["diffusion_model"]
  assert "cond_stage_model" not in params
  assert d["label_emb"]["embedding"].shape == (6, 128)  # 5 classes + null, 4 x 32 wide
  assert d["input_blocks_1_1"]["qkv"]["kernel"].shape == (1, 1, 32, 96)
  params = perturbed(params)
  a = apply(model, params, x, t, y)
  b = apply(model, params, x, t, jnp.full_like(y, 5))
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3


@pytest.mark.slow
def test_bfloat16_compute_is_close_to_float32():
  x, t, y = inputs()
  f32 = small()
  params = perturbed(init_params(f32, x, t, y), scale=0.02)
  want = apply(f32, params, x, t, y)
  got = apply(small(dtype=jnp.bfloat16), params, x, t, y)
  assert got.dtype == jnp.float32
  rel = float(jnp.linalg.norm(got - want) / jnp.linalg.norm(want))
  assert rel < 0.05, rel


@pytest.mark.slow
def test_sides_that_do_not_halve_are_refused():
  model = small(attention_resolutions=(7,), channel_mult=(1, 2))
  x, t, y = inputs(side=7)
  with pytest.raises(ValueError, match="divisible by 2"):
    init_params(model, x, t, y)
  with pytest.raises(ValueError, match=r"pass labels|needs labels"):
    init_params(small(), *inputs()[:2])
