"""The VQ-VAE of the public ArcVQ-VAE / CVQ-VAE code (docs/architecture.md, "Networks"), NHWC.

The module holds the encoder, the decoder and the quantizer's parameters (the codebook);
the quantisation itself is the quantizer's (arcvq_jax/quantizers), called by the train step
between `encode` and `decode`, so the math can be read (and tested) without Flax.
"""

from __future__ import annotations

import functools
from typing import Any

import flax.linen as nn
import jax

from arcvq_jax.models.layers import Conv, ConvTranspose4x4S2

# The skip path of a residual layer (config.model.residual_skip): 'relu' is the official
# code's value, whose first ReLU is in place (nn.ReLU(True)) and so rewrites x before
# `x + block(x)` reads it; 'identity' is the textbook x + block(x), what arcvq-jax computed
# before it was held against the official training (docs/math.md, section 14).
RESIDUAL_SKIPS = ("relu", "identity")


class ResidualLayer(nn.Module):
  """skip(x) + conv1x1(relu(conv3x3(relu(x)))), skip = relu ('relu') or the identity."""

  hidden: int
  res_hidden: int
  library: str | None = None  # the XLA:CPU convolution library (models/layers.Conv)
  skip: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Conv(self.res_hidden, 3, padding=1, library=self.library, name="conv3x3")(nn.relu(x))
    skip = nn.relu(x) if self.skip == "relu" else x
    return skip + Conv(self.hidden, 1, library=self.library, name="conv1x1")(nn.relu(h))


class ResidualStack(nn.Module):
  """`num_layers` residual layers, then a ReLU (as the reference code)."""

  hidden: int
  res_hidden: int
  num_layers: int
  library: str | None = None
  skip: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    for i in range(self.num_layers):
      x = ResidualLayer(self.hidden, self.res_hidden, self.library, self.skip, name=f"layer_{i}")(x)
    return nn.relu(x)


class Encoder(nn.Module):
  """(B, H, W, C) -> (B, H/4, W/4, hidden)."""

  hidden: int
  res_hidden: int
  num_res_layers: int
  library: str | None = None
  skip: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    conv = functools.partial(Conv, library=self.library)
    x = nn.relu(conv(self.hidden // 2, 4, strides=2, padding=1, name="conv_1")(x))
    x = nn.relu(conv(self.hidden, 4, strides=2, padding=1, name="conv_2")(x))
    x = conv(self.hidden, 3, padding=1, name="conv_3")(x)
    return ResidualStack(
      self.hidden, self.res_hidden, self.num_res_layers, self.library, self.skip, name="res_stack"
    )(x)


class Decoder(nn.Module):
  """(B, h, w, D) -> (B, 4h, 4w, channels)."""

  hidden: int
  res_hidden: int
  num_res_layers: int
  channels: int
  deconv_impl: str = "auto"
  library: str | None = None
  skip: str = "relu"

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    deconv = functools.partial(ConvTranspose4x4S2, impl=self.deconv_impl, library=self.library)
    x = Conv(self.hidden, 3, padding=1, library=self.library, name="conv_1")(x)
    x = ResidualStack(
      self.hidden, self.res_hidden, self.num_res_layers, self.library, self.skip, name="res_stack"
    )(x)
    x = nn.relu(deconv(self.hidden // 2, name="conv_trans_1")(x))
    return deconv(self.channels, name="conv_trans_2")(x)


class VQVAE(nn.Module):
  """Encoder -> 1x1 `quant_conv` -> [quantiser] -> decoder, plus the quantizer's parameters
  (e.g. the codebook (K, D)); `quantizer` (None: none) names them.

  Call `encode` and `decode` through `apply(..., method=...)`; `__call__` only exists to
  create all parameters at init.
  """

  hidden: int
  res_hidden: int
  num_res_layers: int
  embed_dim: int
  channels: int
  quantizer: Any = None
  deconv_impl: str = "auto"
  # Which CPU library the convolutions are chosen for ('ynn', 'eigen', 'onednn'; None: the
  # process's default); compile with layers.compiler_options(conv_library) to match.
  conv_library: str | None = None
  residual_skip: str = "relu"  # RESIDUAL_SKIPS

  def setup(self):
    lib, skip = self.conv_library, self.residual_skip
    self.encoder = Encoder(self.hidden, self.res_hidden, self.num_res_layers, lib, skip)
    self.quant_conv = Conv(self.embed_dim, 1, library=lib)
    self.decoder = Decoder(
      self.hidden, self.res_hidden, self.num_res_layers, self.channels, self.deconv_impl, lib, skip
    )
    inits = self.quantizer.param_inits() if self.quantizer is not None else {}
    self.quantizer_params = {name: self.param(name, init) for name, init in inits.items()}

  def encode(self, x: jax.Array) -> jax.Array:
    """x: (B, H, W, C) in [-1, 1] -> z: (B, H/4, W/4, D) pre-quantisation latents."""
    return self.quant_conv(self.encoder(x))

  def decode(self, z_q: jax.Array) -> jax.Array:
    """z_q: (B, h, w, D) -> x_hat: (B, 4h, 4w, C)."""
    return self.decoder(z_q)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.decode(self.encode(x))


def from_config(config, channels: int, quantizer: Any) -> VQVAE:
  """The VQVAE that `config.model` describes around `quantizer`, for `channels` channels."""
  return VQVAE(
    hidden=config.model.hidden,
    res_hidden=config.model.res_hidden,
    num_res_layers=config.model.num_res_layers,
    embed_dim=quantizer.dim,
    channels=channels,
    quantizer=quantizer,
    deconv_impl=config.model.deconv_impl,
    conv_library=config.model.get("cpu_conv_library") or None,
    # A config written without the key (before it existed) trained the identity form.
    residual_skip=config.model.get("residual_skip", "identity"),
  )
