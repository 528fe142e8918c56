"""Gated PixelCNN (van den Oord et al. 2016, "Conditional Image Generation with PixelCNN
Decoders") over a grid of codebook indices: the autoregressive prior of VQ-VAE (paper App.
D.5). NHWC Flax linen, following the GatedPixelCNN of the common PyTorch VQ-VAE prior scripts
(ritheshkumar95/pytorch-vqvae `modules.py`), with its names:

  embedding (K, dim) -> layers_0 (mask 'A', 7x7, no residual) -> layers_1..n-1 (mask 'B', 3x3)
  -> output_conv_0 (1x1, head_dim) -> ReLU -> output_conv_2 (1x1, K logits)

Each layer has a vertical stack (rows above; a (k//2 + 1) x k kernel over the rows up to the
current one) and a horizontal stack (1 x (k//2 + 1), the pixels to the left up to the current
one), gated tanh * sigmoid activations, the vertical stack fed into the horizontal one
(vert_to_horiz), and a class embedding added to both gates. Mask 'A' (first layer) drops the
current row of the vertical kernel and the current column of the horizontal one, so the
logits at (i, j) depend only on tokens (i', j') before (i, j) in raster order.

Conv kernels are HWIO (= torch_w.permute(2, 3, 1, 0)); the masked taps are multiplied by 0 in
every forward pass, as the reference's `make_causal` zeroes them before each use.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from arcvq_jax.models import layers


class _Conv(nn.Module):
  """A (kh, kw) convolution with explicit (top, bottom, left, right) zero padding, PyTorch
  init, and an optional 0/1 kernel mask (kh, kw)."""

  features: int
  kernel: tuple[int, int]
  padding: tuple[int, int, int, int] = (0, 0, 0, 0)
  mask: tuple[tuple[float, ...], ...] | None = None

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    shape = (*self.kernel, x.shape[-1], self.features)
    kernel = self.param("kernel", layers.torch_conv_kernel_init, shape, jnp.float32)
    bias = self.param(
      "bias", layers.torch_bias_init(layers.torch_fan_in(shape)), (self.features,), jnp.float32
    )
    if self.mask is not None:
      kernel = kernel * jnp.asarray(self.mask, kernel.dtype)[:, :, None, None]
    top, bottom, left, right = self.padding
    y = lax.conv_general_dilated(
      x, kernel, (1, 1), ((top, bottom), (left, right)), dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    return y + bias


def gate(x: jax.Array) -> jax.Array:
  """GatedActivation: tanh(first half of the channels) * sigmoid(second half)."""
  a, b = jnp.split(x, 2, axis=-1)
  return jnp.tanh(a) * jax.nn.sigmoid(b)


class GatedMaskedConv2d(nn.Module):
  """One gated layer: (x_v, x_h) (B, H, W, dim), labels (B,) or None -> (out_v, out_h).

  With num_classes > 0, class_cond_embedding(labels) (B, 2 dim) is added to both gates.
  """

  mask_type: str
  dim: int
  kernel: int
  residual: bool
  num_classes: int = 0

  @nn.compact
  def __call__(
    self, x_v: jax.Array, x_h: jax.Array, labels: jax.Array | None
  ) -> tuple[jax.Array, jax.Array]:
    k, half = self.kernel, self.kernel // 2
    vmask = hmask = None
    if self.mask_type == "A":
      vmask = np.ones((half + 1, k), np.float32)
      vmask[-1] = 0.0  # the current row
      hmask = np.ones((1, half + 1), np.float32)
      hmask[:, -1] = 0.0  # the current column
      vmask, hmask = tuple(map(tuple, vmask)), tuple(map(tuple, hmask))
    # Padding above (left) only: output row i sees rows i - k//2 .. i (the reference pads
    # both sides and keeps the first H rows, the same thing).
    h_vert = _Conv(2 * self.dim, (half + 1, k), (half, 0, half, half), vmask, name="vert_stack")(
      x_v
    )
    cond = 0.0
    if self.num_classes:
      cond = nn.Embed(
        self.num_classes,
        2 * self.dim,
        embedding_init=nn.initializers.normal(1.0),
        name="class_cond_embedding",
      )(labels)[:, None, None, :]
    out_v = gate(h_vert + cond)
    h_horiz = _Conv(2 * self.dim, (1, half + 1), (0, 0, half, 0), hmask, name="horiz_stack")(x_h)
    v2h = _Conv(2 * self.dim, (1, 1), name="vert_to_horiz")(h_vert)
    out = gate(v2h + h_horiz + cond)
    out_h = _Conv(self.dim, (1, 1), name="horiz_resid")(out)
    if self.residual:
      out_h = out_h + x_h
    return out_v, out_h


class GatedPixelCNN(nn.Module):
  """tokens (B, H, W) int32 in [0, num_codes), labels (B,) int32 (or None when num_classes
  is 0) -> logits (B, H, W, num_codes) float32 of each token given those before it."""

  num_codes: int
  dim: int = 64
  n_layers: int = 15
  num_classes: int = 0
  first_kernel: int = 7
  kernel: int = 3
  head_dim: int = 512

  def setup(self):
    self.embedding = nn.Embed(self.num_codes, self.dim, embedding_init=nn.initializers.normal(1.0))
    self.layers = [
      GatedMaskedConv2d(
        "A" if i == 0 else "B",
        self.dim,
        self.first_kernel if i == 0 else self.kernel,
        residual=i > 0,
        num_classes=self.num_classes,
        name=f"layers_{i}",
      )
      for i in range(self.n_layers)
    ]
    self.output_conv_0 = _Conv(self.head_dim, (1, 1))
    self.output_conv_2 = _Conv(self.num_codes, (1, 1))

  def from_embeddings(self, x: jax.Array, labels: jax.Array | None) -> jax.Array:
    """The network after the token embedding: x (B, H, W, dim) float -> logits."""
    if self.num_classes and labels is None:
      raise ValueError("this PixelCNN is class-conditional: pass labels")
    x_v = x_h = x
    for layer in self.layers:
      x_v, x_h = layer(x_v, x_h, labels if self.num_classes else None)
    return self.output_conv_2(nn.relu(self.output_conv_0(x_h))).astype(jnp.float32)

  def __call__(self, tokens: jax.Array, labels: jax.Array | None = None) -> jax.Array:
    return self.from_embeddings(self.embedding(tokens), labels)


def from_config(config, num_codes: int) -> GatedPixelCNN:
  p = config.pixelcnn
  return GatedPixelCNN(
    num_codes=num_codes,
    dim=p.dim,
    n_layers=p.n_layers,
    num_classes=config.num_classes,
    first_kernel=p.first_kernel,
    kernel=p.kernel,
    head_dim=p.head_dim,
  )
