"""The VQGAN tokenizer of taming-transformers (docs/architecture.md, Networks), NHWC Flax linen.

Encoder and decoder follow `taming/modules/diffusionmodules/model.py` part by part, and the
parameter tree keeps taming's names, with `.i.` list indices written `_i`:

  taming state_dict key                      this parameter tree
  encoder.conv_in.weight                     encoder/conv_in/kernel
  encoder.down.1.block.0.norm1.weight        encoder/down_1/block_0/norm1/scale
  encoder.down.1.block.0.nin_shortcut.bias   encoder/down_1/block_0/nin_shortcut/bias
  encoder.down.4.attn.1.q.weight             encoder/down_4/attn_1/q/kernel
  encoder.down.0.downsample.conv.weight      encoder/down_0/downsample/conv/kernel
  encoder.mid.block_1 / attn_1 / block_2     encoder/mid/block_1 / attn_1 / block_2
  encoder.norm_out, encoder.conv_out         encoder/norm_out, encoder/conv_out
  decoder.up.3.block.2 / attn.2 / upsample   decoder/up_3/block_2 / attn_2 / upsample
  quant_conv, post_quant_conv                quant_conv, post_quant_conv
  quantize.embedding.weight (K, D)           codebook (K, D)

Conv kernels are HWIO: kernel = torch_w.permute(2, 3, 1, 0) (see layers.py); GroupNorm
weight/bias -> scale/bias. As in taming, `decoder.up[i]` is the level at resolution
resolution / 2**i, so `up_0` is the full-resolution level that runs last.

Mixed precision: `dtype` is the compute dtype of convolutions and matmuls (e.g. bfloat16);
parameters are `param_dtype` (float32). GroupNorm statistics and the attention softmax run in
float32, and `encode` / `decode` return float32 (the quantiser and the losses work in float32).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arcvq_jax.models.layers import Conv

Dtype = Any

# Where the adaptive GAN weight's "last layer" W lives in the params tree (docs/math.md, eq. 24).
LAST_LAYER = ("decoder", "conv_out")


def swish(x: jax.Array) -> jax.Array:
  """x * sigmoid(x), taming's `nonlinearity`."""
  return x * jax.nn.sigmoid(x)


def normalize(x: jax.Array, name: str, param_dtype: Dtype = jnp.float32) -> jax.Array:
  """taming's `Normalize`: GroupNorm(32 groups, eps=1e-6, affine) named `name`, in float32.

  Call inside a compact method. x: (B, H, W, C), C divisible by 32 -> same shape and dtype.
  Params `name`/scale, `name`/bias (taming's `name`.weight, `name`.bias).
  """
  # Two-pass variance as PyTorch (the fast E[x^2] - E[x]^2 form loses digits in float32).
  y = nn.GroupNorm(
    num_groups=32,
    epsilon=1e-6,
    dtype=jnp.float32,
    param_dtype=param_dtype,
    use_fast_variance=False,
    name=name,
  )(x.astype(jnp.float32))
  return y.astype(x.dtype)


class ResnetBlock(nn.Module):
  """norm1 -> swish -> conv1 (3x3) -> norm2 -> swish -> dropout -> conv2 (3x3), plus shortcut.

  x: (B, H, W, Cin) -> (B, H, W, out_channels). The shortcut is `nin_shortcut` (1x1 conv)
  when Cin != out_channels, else the identity (taming's conv_shortcut=False).
  """

  out_channels: int
  dropout: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    conv = lambda k, name: Conv(
      self.out_channels,
      k,
      padding=k // 2,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name=name,
    )
    h = swish(normalize(x, "norm1", self.param_dtype))
    h = conv(3, "conv1")(h)
    h = swish(normalize(h, "norm2", self.param_dtype))
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    h = conv(3, "conv2")(h)
    if x.shape[-1] != self.out_channels:
      x = conv(1, "nin_shortcut")(x)
    return x + h


def attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
  """Single-head softmax attention over all h*w positions, taming's AttnBlock core.

  q, k, v: (B, H, W, C) -> (B, H, W, C);
  out[i] = sum_j softmax_j(<q_i, k_j> * C^-0.5) v_j. Logits and softmax in float32.
  """
  b, h, w, c = q.shape
  q, k, v = (t.reshape(b, h * w, c) for t in (q, k, v))
  logits = jnp.einsum("bic,bjc->bij", q, k, preferred_element_type=jnp.float32) * c**-0.5
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bij,bjc->bic", weights, v).reshape(b, h, w, c)


class AttnBlock(nn.Module):
  """x + proj_out(attention(q(n), k(n), v(n))) with n = norm(x); q/k/v/proj_out are 1x1 convs.

  x: (B, H, W, C) -> (B, H, W, C).
  """

  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    c = x.shape[-1]
    conv = lambda name: Conv(c, 1, dtype=self.dtype, param_dtype=self.param_dtype, name=name)
    n = normalize(x, "norm", self.param_dtype)
    h = attention(conv("q")(n), conv("k")(n), conv("v")(n))
    return x + conv("proj_out")(h)


class Downsample(nn.Module):
  """Pad (0, 1) at the bottom and right, then a 3x3 stride-2 conv with no padding.

  x: (B, H, W, C) -> (B, ceil(H/2), ceil(W/2), C) (H/2 for even H), taming's
  `F.pad(x, (0, 1, 0, 1))` + `Conv2d(C, C, 3, stride=2, padding=0)`.
  """

  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0)))
    return Conv(
      x.shape[-1],
      3,
      strides=2,
      padding=0,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="conv",
    )(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv (padding 1). (B, H, W, C) -> (B, 2H, 2W, C)."""

  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv(
      x.shape[-1], 3, padding=1, dtype=self.dtype, param_dtype=self.param_dtype, name="conv"
    )(x)


class _Level(nn.Module):
  """One resolution level: `num_blocks` ResnetBlocks, each followed by an AttnBlock when
  `with_attn`, then `resample` ('down', 'up' or None). taming's `down[i]` / `up[i]`."""

  out_channels: int
  num_blocks: int
  with_attn: bool
  resample: str | None
  dropout: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    for i in range(self.num_blocks):
      x = ResnetBlock(self.out_channels, self.dropout, name=f"block_{i}", **kw)(x, train)
      if self.with_attn:
        x = AttnBlock(name=f"attn_{i}", **kw)(x)
    if self.resample == "down":
      x = Downsample(name="downsample", **kw)(x)
    elif self.resample == "up":
      x = Upsample(name="upsample", **kw)(x)
    return x


class _Mid(nn.Module):
  """taming's `mid`: block_1 -> attn_1 -> block_2, at constant width."""

  dropout: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    c = x.shape[-1]
    x = ResnetBlock(c, self.dropout, name="block_1", **kw)(x, train)
    x = AttnBlock(name="attn_1", **kw)(x)
    return ResnetBlock(c, self.dropout, name="block_2", **kw)(x, train)


class Encoder(nn.Module):
  """taming's Encoder: (B, H, W, Cin) -> (B, H/f, W/f, z_channels (x2 if double_z)),
  f = 2**(len(ch_mult) - 1).

  Attention follows every ResnetBlock of a level whose nominal resolution
  (`resolution` / 2**level, from the config as in taming, not from the input) is in
  `attn_resolutions`, and sits in the middle block.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  z_channels: int = 16
  double_z: bool = False
  dropout: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n_levels = len(self.ch_mult)
    h = Conv(self.ch, 3, padding=1, name="conv_in", **kw)(x)
    res = self.resolution
    for i, mult in enumerate(self.ch_mult):
      last = i == n_levels - 1
      h = _Level(
        self.ch * mult,
        self.num_res_blocks,
        res in self.attn_resolutions,
        None if last else "down",
        self.dropout,
        name=f"down_{i}",
        **kw,
      )(h, train)
      if not last:
        res //= 2
    h = _Mid(self.dropout, name="mid", **kw)(h, train)
    h = swish(normalize(h, "norm_out", self.param_dtype))
    out = 2 * self.z_channels if self.double_z else self.z_channels
    return Conv(out, 3, padding=1, name="conv_out", **kw)(h)


class Decoder(nn.Module):
  """taming's Decoder: (B, h, w, z_channels) -> (B, h*f, w*f, out_ch).

  conv_in -> mid -> levels from the coarsest (`up_{L-1}`) to the finest (`up_0`), each with
  num_res_blocks + 1 ResnetBlocks (+ AttnBlocks at attn_resolutions) and an Upsample except
  `up_0` -> norm_out -> swish -> conv_out. With `pre_conv_out=True` the call stops before
  conv_out and returns its input (B, H, W, ch * ch_mult[0]): the adaptive GAN weight needs the
  loss as a function of conv_out's kernel alone (see `last_layer`).
  """

  ch: int = 128
  out_ch: int = 3
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  dropout: float = 0.0
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, z: jax.Array, train: bool = False, pre_conv_out: bool = False) -> jax.Array:
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    n_levels = len(self.ch_mult)
    res = self.resolution // 2 ** (n_levels - 1)
    h = Conv(self.ch * self.ch_mult[-1], 3, padding=1, name="conv_in", **kw)(z)
    h = _Mid(self.dropout, name="mid", **kw)(h, train)
    for i in reversed(range(n_levels)):
      h = _Level(
        self.ch * self.ch_mult[i],
        self.num_res_blocks + 1,
        res in self.attn_resolutions,
        "up" if i != 0 else None,
        self.dropout,
        name=f"up_{i}",
        **kw,
      )(h, train)
      if i != 0:
        res *= 2
    h = swish(normalize(h, "norm_out", self.param_dtype))
    if pre_conv_out:
      return h
    return Conv(self.out_ch, 3, padding=1, name="conv_out", **kw)(h)


def last_layer(
  h: jax.Array, kernel: jax.Array, bias: jax.Array, dtype: Dtype | None = None
) -> jax.Array:
  """The decoder's conv_out as a function of its params: (B, H, W, C) -> (B, H, W, out_ch).

  h: `VQGAN.decode_features` output; kernel: (3, 3, C, out_ch); bias: (out_ch,).
  `last_layer(decode_features(z_q), *last_layer_params(params))` equals `decode(z_q)`
  (both float32).
  """
  y = Conv(kernel.shape[-1], 3, padding=1, dtype=dtype).apply(
    {"params": {"kernel": kernel, "bias": bias}}, h
  )
  return y.astype(jnp.float32)


def last_layer_params(params) -> tuple[jax.Array, jax.Array]:
  """(kernel (3, 3, C, out_ch), bias (out_ch,)) of the decoder's conv_out in a VQGAN's
  'params' collection: params['decoder']['conv_out']."""
  p = params
  for key in LAST_LAYER:
    p = p[key]
  return p["kernel"], p["bias"]


def last_layer_kernel(params) -> jax.Array:
  """The adaptive-weight W: params['decoder']['conv_out']['kernel'], (3, 3, C, out_ch)."""
  return last_layer_params(params)[0]


class VQGAN(nn.Module):
  """Encoder -> 1x1 `quant_conv` -> [quantiser] -> 1x1 `post_quant_conv` -> decoder,
  plus the quantizer's parameters (e.g. the codebook (num_codes, embed_dim)), as taming's
  VQModel.

  As `VQVAE`, the quantisation itself is the quantizer's (arcvq_jax/quantizers), called by
  the train step between `encode` and `decode` (through `apply(..., method=...)`);
  `__call__` exists to create all parameters at init. `channels` is the image channel count
  (in and out); `quantizer` (None: none) names the parameters to create.
  """

  ch: int = 128
  ch_mult: Sequence[int] = (1, 1, 2, 2, 4)
  num_res_blocks: int = 2
  attn_resolutions: Sequence[int] = (16,)
  resolution: int = 256
  z_channels: int = 16
  embed_dim: int = 16
  channels: int = 3
  dropout: float = 0.0
  quantizer: Any = None
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def setup(self):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    arch = dict(
      ch=self.ch,
      ch_mult=tuple(self.ch_mult),
      num_res_blocks=self.num_res_blocks,
      attn_resolutions=tuple(self.attn_resolutions),
      resolution=self.resolution,
      dropout=self.dropout,
    )
    self.encoder = Encoder(z_channels=self.z_channels, double_z=False, **arch, **kw)
    self.quant_conv = Conv(self.embed_dim, 1, **kw)
    self.post_quant_conv = Conv(self.z_channels, 1, **kw)
    self.decoder = Decoder(out_ch=self.channels, **arch, **kw)
    inits = self.quantizer.param_inits() if self.quantizer is not None else {}
    self.quantizer_params = {
      name: self.param(name, lambda key, init=init: init(key).astype(self.param_dtype))
      for name, init in inits.items()
    }

  @property
  def downsample_factor(self) -> int:
    return 2 ** (len(self.ch_mult) - 1)

  def encode(self, x: jax.Array, train: bool = False) -> jax.Array:
    """x: (B, H, W, C) in [-1, 1] -> z: (B, H/f, W/f, embed_dim) float32, pre-quantisation."""
    return self.quant_conv(self.encoder(x, train)).astype(jnp.float32)

  def decode_features(self, z_q: jax.Array, train: bool = False) -> jax.Array:
    """z_q: (B, h, w, embed_dim) -> the decoder's conv_out input (B, h*f, w*f, ch*ch_mult[0])."""
    return self.decoder(self.post_quant_conv(z_q), train, pre_conv_out=True)

  def decode(self, z_q: jax.Array, train: bool = False) -> jax.Array:
    """z_q: (B, h, w, embed_dim) -> x_hat: (B, h*f, w*f, C) float32."""
    return self.decoder(self.post_quant_conv(z_q), train).astype(jnp.float32)

  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    return self.decode(self.encode(x, train), train)


def from_config(config, channels: int, quantizer: Any) -> VQGAN:
  """The VQGAN that `config.model` describes around `quantizer`, for `channels` channels.

  Reads config.model.{ch, ch_mult, num_res_blocks, attn_resolutions, resolution, z_channels,
  dropout, dtype}; the latent width is the quantizer's `dim`. `model.resolution` is the
  nominal training image size that places the attention blocks (taming's `resolution`);
  `model.dtype` is the compute dtype by name ('float32', 'bfloat16'); params stay float32.
  """
  m = config.model
  return VQGAN(
    ch=m.ch,
    ch_mult=tuple(m.ch_mult),
    num_res_blocks=m.num_res_blocks,
    attn_resolutions=tuple(m.attn_resolutions),
    resolution=m.resolution,
    z_channels=m.z_channels,
    embed_dim=quantizer.dim,
    channels=channels,
    dropout=m.dropout,
    quantizer=quantizer,
    dtype=jnp.dtype(m.dtype),
  )
