"""The latent-diffusion UNet (ldm/modules/diffusionmodules/openaimodel.py, the subset the
class-conditional LDM uses: docs/architecture.md, Networks; paper Table 8), NHWC Flax linen.

Names follow latent-diffusion's state_dict: an index joins the name before it with `_`
(`input_blocks.1.0.in_layers.2.weight` -> `diffusion_model/input_blocks_1_0/in_layers_2/kernel`),
so a checkpoint maps key by key; conv kernels are HWIO (= torch_w.permute(2, 3, 1, 0)),
Linear kernels torch_w.T, GroupNorm/LayerNorm weight -> scale. The parts:

  time_embed_0 / _2                   timestep MLP
  input_blocks_0_0                    first conv
  input_blocks_i_0, output_blocks_i_0, middle_block_0 / _2
                                      ResBlock: in_layers_0 (norm), in_layers_2 (conv),
                                      emb_layers_1, out_layers_0 (norm), out_layers_3 (conv),
                                      skip_connection
  input_blocks_i_1, output_blocks_i_1, middle_block_1
                                      SpatialTransformer: norm, proj_in, proj_out,
                                      transformer_blocks_0/{attn1,attn2}/{to_q,to_k,to_v,to_out_0},
                                      transformer_blocks_0/norm1..3, and the feed-forward
                                      ff.net.0.proj / ff.net.2 as ff_net_0_proj / ff_net_2
                                      (or AttentionBlock: norm, qkv, proj_out)
  input_blocks_i_0/op, output_blocks_i_j/conv   Downsample, Upsample
  out_0, out_2                        final norm and conv
  label_emb                           class embedding on the time embedding (no transformer)
  cond_stage_model/embedding          LDM's ClassEmbedder (cond_stage_model.embedding)

Resolutions: `attention_resolutions` are latent sides (32, 16 and 8 in paper Table 8),
compared with the actual feature map; LDM's yaml writes the same set as downsampling factors
(4, 2, 1) of the 32x32 latent. Every level's side must stay even until the last level.

Mixed precision: `dtype` is the compute dtype of convolutions, linear layers and attention
matmuls; parameters are float32; GroupNorm/LayerNorm statistics, softmax, the timestep
embedding and the output are float32 (LDM's GroupNorm32 computes in float32 too).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arcvq_jax.models import layers

Dtype = Any


# --------------------------------------------------------------------------- primitives


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
  """Sinusoidal embedding of (B,) timesteps -> (B, dim) float32, LDM's order [cos, sin]."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
  if dim % 2:
    emb = jnp.concatenate([emb, jnp.zeros_like(emb[:, :1])], axis=-1)
  return emb


class Conv2d(nn.Module):
  """torch.nn.Conv2d (PyTorch init, symmetric padding), or LDM's `zero_module` of it.

  x (B, H, W, Cin) -> (B, H', W', features). The convolution itself is layers.py's (the GEMM
  form for narrow patches on CPU).
  """

  features: int
  kernel_size: int = 3
  strides: int = 1
  padding: int = 0
  zero_init: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    shape = (k, k, x.shape[-1], self.features)
    if self.zero_init:
      kernel_init, bias_init = nn.initializers.zeros, nn.initializers.zeros
    else:
      kernel_init = layers.torch_conv_kernel_init
      bias_init = layers.torch_bias_init(layers.torch_fan_in(shape))
    kernel = self.param("kernel", kernel_init, shape, jnp.float32)
    bias = self.param("bias", bias_init, (self.features,), jnp.float32)
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    conv = layers.conv_gemm if layers.choose_conv_impl(shape) == "gemm" else layers.conv_xla
    return conv(x, kernel, (self.strides,) * 2, (self.padding,) * 2) + bias


def linear(
  features: int,
  in_features: int,
  name: str,
  dtype: Dtype | None = None,
  use_bias: bool = True,
  zero_init: bool = False,
) -> nn.Dense:
  """torch.nn.Linear's init (U(+-1/sqrt(fan_in)) for weight and bias) as a flax Dense."""
  if zero_init:
    return nn.Dense(
      features,
      use_bias=use_bias,
      dtype=dtype,
      name=name,
      kernel_init=nn.initializers.zeros,
      bias_init=nn.initializers.zeros,
    )
  return nn.Dense(
    features,
    use_bias=use_bias,
    dtype=dtype,
    name=name,
    kernel_init=nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform"),
    bias_init=layers.torch_bias_init(in_features),
  )


def group_norm(x: jax.Array, name: str) -> jax.Array:
  """LDM's `normalization`: GroupNorm32 (32 groups, eps 1e-5), computed in float32."""
  y = nn.GroupNorm(
    num_groups=32, epsilon=1e-5, dtype=jnp.float32, use_fast_variance=False, name=name
  )(x.astype(jnp.float32))
  return y.astype(x.dtype)


def multi_head_attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int) -> jax.Array:
  """softmax(q k^T / sqrt(d)) v per head. q: (B, N, H*d), k, v: (B, M, H*d) -> (B, N, H*d).

  Logits and softmax in float32.
  """
  b, n, inner = q.shape
  d = inner // num_heads
  q = q.reshape(b, n, num_heads, d)
  k = k.reshape(b, k.shape[1], num_heads, d)
  v = v.reshape(b, v.shape[1], num_heads, d)
  logits = jnp.einsum("bnhd,bmhd->bhnm", q, k, preferred_element_type=jnp.float32) * d**-0.5
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhnm,bmhd->bnhd", weights, v).reshape(b, n, inner)


# --------------------------------------------------------------------------- blocks


class ResBlock(nn.Module):
  """openaimodel's ResBlock with the timestep embedding.

  h = conv(silu(norm(x))); h += linear(silu(emb)) (or scale-shift norm); then
  zero-init conv(dropout(silu(norm(h)))); out = skip(x) + h, skip a 1x1 conv if the width
  changes. x (B, H, W, Cin), emb (B, E) -> (B, H, W, out_channels).
  """

  out_channels: int
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, emb: jax.Array, train: bool = False) -> jax.Array:
    c = self.out_channels
    h = nn.silu(group_norm(x, "in_layers_0"))
    h = Conv2d(c, 3, padding=1, dtype=self.dtype, name="in_layers_2")(h)
    e = linear(
      2 * c if self.use_scale_shift_norm else c, emb.shape[-1], "emb_layers_1", self.dtype
    )(nn.silu(emb))
    e = e.astype(h.dtype)[:, None, None, :]
    if self.use_scale_shift_norm:
      scale, shift = jnp.split(e, 2, axis=-1)
      h = group_norm(h, "out_layers_0") * (1 + scale) + shift
    else:
      h = group_norm(h + e, "out_layers_0")
    h = nn.Dropout(self.dropout)(nn.silu(h), deterministic=not train)
    h = Conv2d(c, 3, padding=1, zero_init=True, dtype=self.dtype, name="out_layers_3")(h)
    if x.shape[-1] != c:
      x = Conv2d(c, 1, dtype=self.dtype, name="skip_connection")(x)
    return x + h


class AttentionBlock(nn.Module):
  """openaimodel's AttentionBlock: multi-head self-attention over all positions.

  x + proj_out(attn(qkv(norm(x)))), qkv one 1x1 conv whose 3C outputs are ordered
  (head, [q, k, v], d) as QKVAttentionLegacy reads them. x (B, H, W, C) -> same.
  """

  num_heads: int
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    b, hh, ww, c = x.shape
    qkv = Conv2d(3 * c, 1, dtype=self.dtype, name="qkv")(group_norm(x, "norm"))
    qkv = qkv.reshape(b, hh * ww, self.num_heads, 3, c // self.num_heads)
    q, k, v = (qkv[:, :, :, i].reshape(b, hh * ww, c) for i in range(3))
    h = multi_head_attention(q, k, v, self.num_heads).reshape(b, hh, ww, c)
    return x + Conv2d(c, 1, zero_init=True, dtype=self.dtype, name="proj_out")(h)


class CrossAttention(nn.Module):
  """ldm.modules.attention.CrossAttention: to_q/to_k/to_v (no bias), to_out_0 (Linear).

  x (B, N, query_dim), context (B, M, context_dim) or None (self-attention) -> (B, N, query_dim).
  """

  heads: int
  dim_head: int
  dropout: float = 0.0
  dtype: Dtype | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, context: jax.Array | None = None, train: bool = False
  ) -> jax.Array:
    inner = self.heads * self.dim_head
    context = x if context is None else context.astype(x.dtype)
    q = linear(inner, x.shape[-1], "to_q", self.dtype, use_bias=False)(x)
    k = linear(inner, context.shape[-1], "to_k", self.dtype, use_bias=False)(context)
    v = linear(inner, context.shape[-1], "to_v", self.dtype, use_bias=False)(context)
    h = multi_head_attention(q, k, v, self.heads)
    h = linear(x.shape[-1], inner, "to_out_0", self.dtype)(h)
    return nn.Dropout(self.dropout)(h, deterministic=not train)


class BasicTransformerBlock(nn.Module):
  """Self-attention, cross-attention to the context, GEGLU feed-forward (4x), pre-LayerNorm.

  x (B, N, dim), context (B, M, context_dim) -> (B, N, dim).
  """

  heads: int
  dim_head: int
  dropout: float = 0.0
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None, train: bool = False) -> jax.Array:
    dim = x.shape[-1]
    norm = lambda name, h: nn.LayerNorm(epsilon=1e-5, dtype=jnp.float32, name=name)(
      h.astype(jnp.float32)
    ).astype(h.dtype)
    attn = lambda name: CrossAttention(
      self.heads, self.dim_head, self.dropout, self.dtype, name=name
    )
    x = x + attn("attn1")(norm("norm1", x), None, train)
    x = x + attn("attn2")(norm("norm2", x), context, train)
    # FeedForward(dim, glu=True): GEGLU proj to 2 x 4 dim, x * gelu(gate), dropout, Linear.
    h = linear(8 * dim, dim, "ff_net_0_proj", self.dtype)(norm("norm3", x))
    h, gate = jnp.split(h, 2, axis=-1)
    h = h * nn.gelu(gate, approximate=False)
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    return x + linear(dim, 4 * dim, "ff_net_2", self.dtype)(h)


class SpatialTransformer(nn.Module):
  """ldm.modules.attention.SpatialTransformer: norm, 1x1 proj_in, `depth` transformer
  blocks over the H*W positions, zero-init 1x1 proj_out, residual.

  x (B, H, W, C), context (B, M, context_dim) -> (B, H, W, C).
  """

  heads: int
  dim_head: int
  depth: int = 1
  dropout: float = 0.0
  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array, context: jax.Array | None, train: bool = False) -> jax.Array:
    b, hh, ww, c = x.shape
    inner = self.heads * self.dim_head
    h = Conv2d(inner, 1, dtype=self.dtype, name="proj_in")(group_norm(x, "norm"))
    h = h.reshape(b, hh * ww, inner)
    for i in range(self.depth):
      h = BasicTransformerBlock(
        self.heads, self.dim_head, self.dropout, self.dtype, name=f"transformer_blocks_{i}"
      )(h, context, train)
    h = h.reshape(b, hh, ww, inner)
    return x + Conv2d(c, 1, zero_init=True, dtype=self.dtype, name="proj_out")(h)


class Downsample(nn.Module):
  """3x3 conv, stride 2, padding 1 (openaimodel's Downsample with conv_resample)."""

  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    return Conv2d(x.shape[-1], 3, strides=2, padding=1, dtype=self.dtype, name="op")(x)


class Upsample(nn.Module):
  """Nearest-neighbour x2, then a 3x3 conv (padding 1)."""

  dtype: Dtype | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    x = jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2)
    return Conv2d(x.shape[-1], 3, padding=1, dtype=self.dtype, name="conv")(x)


# --------------------------------------------------------------------------- the network


class UNetModel(nn.Module):
  """openaimodel.UNetModel (2-D, eps prediction).

  __call__(x (B, h, w, in_channels), timesteps (B,) int, context (B, M, context_dim) or None,
  y (B,) int class or None) -> eps (B, h, w, out_channels) float32.

  context feeds the SpatialTransformers' cross-attention (use_spatial_transformer); y, with
  num_classes > 0, adds `label_emb(y)` to the timestep embedding (openaimodel's class path).
  """

  in_channels: int
  out_channels: int
  model_channels: int = 256
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (32, 16, 8)
  num_head_channels: int = 32
  use_spatial_transformer: bool = True
  transformer_depth: int = 1
  num_classes: int = 0
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  dtype: Dtype | None = None

  def _attention(self, h, context, name: str, train: bool):
    c = h.shape[-1]
    heads = max(1, c // self.num_head_channels)
    if self.use_spatial_transformer:
      return SpatialTransformer(
        heads, c // heads, self.transformer_depth, self.dropout, self.dtype, name=name
      )(h, context, train)
    return AttentionBlock(heads, self.dtype, name=name)(h)

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    timesteps: jax.Array,
    context: jax.Array | None = None,
    y: jax.Array | None = None,
    train: bool = False,
  ) -> jax.Array:
    mc, dt = self.model_channels, self.dtype
    emb_dim = 4 * mc
    emb = linear(emb_dim, mc, "time_embed_0", dt)(timestep_embedding(timesteps, mc))
    emb = linear(emb_dim, emb_dim, "time_embed_2", dt)(nn.silu(emb))
    if self.num_classes:
      if y is None:
        raise ValueError("this UNet is class-conditional (num_classes > 0): pass y")
      emb = emb + nn.Embed(self.num_classes, emb_dim, name="label_emb")(y).astype(emb.dtype)

    def res(h, out_channels, name):
      return ResBlock(out_channels, self.dropout, self.use_scale_shift_norm, dt, name=name)(
        h, emb, train
      )

    h = x.astype(dt or jnp.float32)
    h = Conv2d(mc, 3, padding=1, dtype=dt, name="input_blocks_0_0")(h)
    skips, block = [h], 1
    for level, mult in enumerate(self.channel_mult):
      for _ in range(self.num_res_blocks):
        h = res(h, mult * mc, f"input_blocks_{block}_0")
        if h.shape[1] in self.attention_resolutions:
          h = self._attention(h, context, f"input_blocks_{block}_1", train)
        skips.append(h)
        block += 1
      if level != len(self.channel_mult) - 1:
        if h.shape[1] % 2 or h.shape[2] % 2:
          raise ValueError(
            f"the UNet halves {h.shape[1]}x{h.shape[2]} features at level "
            f"{level}: latent sides must be divisible by "
            f"{2 ** (len(self.channel_mult) - 1)} for channel_mult "
            f"{tuple(self.channel_mult)}"
          )
        h = Downsample(dt, name=f"input_blocks_{block}_0")(h)
        skips.append(h)
        block += 1

    h = res(h, h.shape[-1], "middle_block_0")
    h = self._attention(h, context, "middle_block_1", train)
    h = res(h, h.shape[-1], "middle_block_2")

    block = 0
    for level, mult in reversed(list(enumerate(self.channel_mult))):
      for i in range(self.num_res_blocks + 1):
        h = jnp.concatenate([h, skips.pop()], axis=-1)
        h = res(h, mult * mc, f"output_blocks_{block}_0")
        j = 1
        if h.shape[1] in self.attention_resolutions:
          h = self._attention(h, context, f"output_blocks_{block}_{j}", train)
          j += 1
        if level and i == self.num_res_blocks:
          h = Upsample(dt, name=f"output_blocks_{block}_{j}")(h)
        block += 1

    h = nn.silu(group_norm(h, "out_0"))
    return Conv2d(self.out_channels, 3, padding=1, zero_init=True, dtype=dt, name="out_2")(
      h
    ).astype(jnp.float32)


class ClassEmbedder(nn.Module):
  """ldm.modules.encoders.modules.ClassEmbedder: y (B,) -> context (B, 1, embed_dim).

  num_classes + 1 rows: the last one is the null class of classifier-free guidance
  (LDM's cin samplers pass class 1000 as the unconditional label).
  """

  num_classes: int
  embed_dim: int = 512

  @nn.compact
  def __call__(self, y: jax.Array) -> jax.Array:
    table = nn.Embed(
      self.num_classes + 1,
      self.embed_dim,
      embedding_init=nn.initializers.normal(1.0),
      name="embedding",
    )
    return table(y)[:, None, :]


class LatentDiffusionUNet(nn.Module):
  """The eps-network of a (class-conditional) latent diffusion model.

  __call__(x (B, h, w, D) float32, t (B,) int32, y (B,) int32 in [0, num_classes], where
  num_classes is the null class; None when num_classes == 0) -> eps (B, h, w, D) float32.

  With use_spatial_transformer the class reaches the UNet through a learned context_dim
  embedding and cross-attention (LDM's cin-ldm-vq-f8); otherwise through label_emb added to
  the timestep embedding.
  """

  latent_channels: int
  num_classes: int = 0
  context_dim: int = 512
  model_channels: int = 256
  channel_mult: Sequence[int] = (1, 2, 4)
  num_res_blocks: int = 2
  attention_resolutions: Sequence[int] = (32, 16, 8)
  num_head_channels: int = 32
  use_spatial_transformer: bool = True
  transformer_depth: int = 1
  dropout: float = 0.0
  use_scale_shift_norm: bool = False
  dtype: Dtype | None = None

  @nn.compact
  def __call__(
    self, x: jax.Array, t: jax.Array, y: jax.Array | None = None, train: bool = False
  ) -> jax.Array:
    context, label_classes = None, 0
    if self.num_classes:
      if y is None:
        raise ValueError(
          f"a class-conditional model needs labels y (the null class is {self.num_classes})"
        )
      if self.use_spatial_transformer:
        context = ClassEmbedder(self.num_classes, self.context_dim, name="cond_stage_model")(y)
      else:
        label_classes = self.num_classes + 1
    unet = UNetModel(
      in_channels=self.latent_channels,
      out_channels=self.latent_channels,
      model_channels=self.model_channels,
      channel_mult=tuple(self.channel_mult),
      num_res_blocks=self.num_res_blocks,
      attention_resolutions=tuple(self.attention_resolutions),
      num_head_channels=self.num_head_channels,
      use_spatial_transformer=self.use_spatial_transformer,
      transformer_depth=self.transformer_depth,
      num_classes=label_classes,
      dropout=self.dropout,
      use_scale_shift_norm=self.use_scale_shift_norm,
      dtype=self.dtype,
      name="diffusion_model",
    )
    return unet(x, t, context, y if label_classes else None, train)


def from_config(config, latent_channels: int) -> LatentDiffusionUNet:
  """The network config.unet describes, for latents with `latent_channels` channels."""
  u = config.unet
  return LatentDiffusionUNet(
    latent_channels=latent_channels,
    num_classes=config.num_classes,
    context_dim=u.context_dim,
    model_channels=u.model_channels,
    channel_mult=tuple(u.channel_mult),
    num_res_blocks=u.num_res_blocks,
    attention_resolutions=tuple(u.attention_resolutions),
    num_head_channels=u.num_head_channels,
    use_spatial_transformer=u.use_spatial_transformer,
    transformer_depth=u.transformer_depth,
    dropout=u.dropout,
    use_scale_shift_norm=u.use_scale_shift_norm,
    dtype=jnp.bfloat16 if u.dtype == "bfloat16" else None,
  )
