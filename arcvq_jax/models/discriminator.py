"""The PatchGAN discriminator of pix2pix, as taming-transformers' `NLayerDiscriminator`, NHWC.

With n_layers = 3 and ndf = 64 (taming's defaults), taming's `main` Sequential is

  index  layer                                   here (params)
  0      Conv2d(C, 64, 4, stride 2, pad 1)       main_0 / kernel, bias
  1      LeakyReLU(0.2)
  2      Conv2d(64, 128, 4, s2, p1, bias=False)  main_2 / kernel
  3      BatchNorm2d(128)                        main_3 / scale, bias; batch_stats main_3 / mean,
                                                 var
  4      LeakyReLU(0.2)
  5, 6, 7  the same to 256 channels              main_5, main_6
  8, 9, 10 the same to 512 channels, stride 1    main_8, main_9
  11     Conv2d(512, 1, 4, stride 1, pad 1)      main_11 / kernel, bias

so a checkpoint maps by `main.i.weight -> main_i/kernel` (permute(2, 3, 1, 0)) for convs and
`weight, bias, running_mean, running_var -> scale, bias, mean, var` for BatchNorm.

Init as taming's `weights_init`: conv kernels N(0, 0.02), BatchNorm scale N(1, 0.02) and bias 0;
the two conv biases keep PyTorch's default U(-1/sqrt(fan_in), 1/sqrt(fan_in)).

BatchNorm: flax momentum 0.9 is PyTorch's momentum 0.1. One difference remains: PyTorch
updates running_var with the unbiased batch variance, flax with the biased one (a factor
n/(n-1), n = B*H*W, negligible for the 30x30 maps of a 256x256 input).
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arcvq_jax.models.layers import torch_bias_init, torch_fan_in

Dtype = Any

LEAKY_SLOPE = 0.2


def _bn_scale_init(key: jax.Array, shape, dtype=jnp.float32) -> jax.Array:
  """N(1, 0.02), taming's `nn.init.normal_(m.weight.data, 1.0, 0.02)` for BatchNorm."""
  return 1.0 + 0.02 * jax.random.normal(key, shape, dtype)


class NLayerDiscriminator(nn.Module):
  """x: (B, H, W, C) images in [-1, 1] -> patch logits (B, H', W', 1).

  Each 4x4 conv with padding 1 maps a size n to (n + 2 - 4) // stride + 1, so 256 -> 128 ->
  64 -> 32 -> 31 -> 30 (H' = 30 for a 256x256 input, 6 for 64x64). BatchNorm uses batch
  statistics and updates the 'batch_stats' collection when `train` (apply with
  `mutable=['batch_stats']`), running averages otherwise. BatchNorm runs in float32; the convs
  in `dtype`; the logits are float32.
  """

  ndf: int = 64
  n_layers: int = 3
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  def _conv(self, features: int, stride: int, use_bias: bool, index: int, cin: int) -> nn.Conv:
    fan_in = torch_fan_in((4, 4, cin, features))
    return nn.Conv(
      features,
      (4, 4),
      strides=(stride, stride),
      padding=((1, 1), (1, 1)),
      use_bias=use_bias,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      kernel_init=nn.initializers.normal(0.02),
      bias_init=torch_bias_init(fan_in),
      name=f"main_{index}",
    )

  def _bn(self, x: jax.Array, train: bool, index: int) -> jax.Array:
    y = nn.BatchNorm(
      use_running_average=not train,
      momentum=0.9,
      epsilon=1e-5,
      dtype=jnp.float32,
      param_dtype=self.param_dtype,
      scale_init=_bn_scale_init,
      bias_init=nn.initializers.zeros,
      use_fast_variance=False,
      name=f"main_{index}",
    )(x.astype(jnp.float32))
    return y.astype(x.dtype)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    index = 0
    h = self._conv(self.ndf, 2, True, index, x.shape[-1])(x)
    h = nn.leaky_relu(h, LEAKY_SLOPE)
    index += 2
    mult = 1
    for n in range(1, self.n_layers + 1):
      # Layers 1..n_layers-1 halve the size; the last BN'd conv (n = n_layers) has stride 1.
      prev, mult = mult, min(2**n, 8)
      stride = 2 if n < self.n_layers else 1
      h = self._conv(self.ndf * mult, stride, False, index, self.ndf * prev)(h)
      h = self._bn(h, train, index + 1)
      h = nn.leaky_relu(h, LEAKY_SLOPE)
      index += 3
    h = self._conv(1, 1, True, index, self.ndf * mult)(h)
    return h.astype(jnp.float32)


def from_config(config: Any) -> NLayerDiscriminator:
  """The PatchGAN that config.gan describes, computing in config.model.dtype."""
  return NLayerDiscriminator(
    ndf=config.gan.ndf, n_layers=config.gan.n_layers, dtype=jnp.dtype(config.model.dtype)
  )
