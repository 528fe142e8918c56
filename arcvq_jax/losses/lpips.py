"""LPIPS with a VGG16 trunk (Zhang et al. 2018, the `lpips` package's v0.1 'vgg'), NHWC.

  d(x, y) = sum_l mean_hw( sum_c w_lc (n(f_l(x)) - n(f_l(y)))_c^2 )

f_l: VGG16 features after relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 of the input scaled as
(x - shift) / scale; n: unit length over channels, f / (||f|| + 1e-10); w_l >= 0: the v0.1
linear weights (1x1 convs without bias, `lin0..lin4`). Inputs are in [-1, 1].

The parameters are plain arrays, loaded from the file that `arcvq_jax.convert.lpips_weights`
writes from torchvision's ImageNet VGG16 and the `lpips` package's linear weights:

  params['vgg']['conv{b}_{i}'] = {'kernel': (3, 3, Cin, Cout), 'bias': (Cout,)}
      (torchvision features.{j}.weight.permute(2, 3, 1, 0) / .bias; j in VGG_CONV_INDICES)
  params['lin']['lin{l}'] = (C_l,)  (lpips' lin{l}.model.1.weight[0, :, 0, 0])

File format: one .npz with keys 'vgg/conv1_1/kernel', ..., 'lin/lin0', ... (`save_params`).
"""

from __future__ import annotations

import os
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from etils import epath

from arcvq_jax import npz_files
from arcvq_jax.models.layers import Conv

Dtype = Any

SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10

# VGG16's conv layers by block: (name, Cout); a 2x2 max-pool precedes blocks 2..5.
VGG_BLOCKS = (
  (("conv1_1", 64), ("conv1_2", 64)),
  (("conv2_1", 128), ("conv2_2", 128)),
  (("conv3_1", 256), ("conv3_2", 256), ("conv3_3", 256)),
  (("conv4_1", 512), ("conv4_2", 512), ("conv4_3", 512)),
  (("conv5_1", 512), ("conv5_2", 512), ("conv5_3", 512)),
)
# Index of each conv in torchvision's `vgg16().features` (ReLUs and pools in between).
VGG_CONV_INDICES = dict(
  zip(
    [name for block in VGG_BLOCKS for name, _ in block],
    (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28),
    strict=True,
  )
)
LIN_CHANNELS = tuple(block[-1][1] for block in VGG_BLOCKS)  # (64, 128, 256, 512, 512)

VGG16_URL = "https://download.pytorch.org/models/vgg16-397923af.pth"
CONVERT_COMMAND = "python -m arcvq_jax.convert.lpips_weights --vgg16=vgg16-397923af.pth --out={out}"
DEFAULT_PATH = "~/.cache/arcvq_jax/lpips_vgg16.npz"


class LPIPSWeightsError(ValueError):
  """An LPIPS weights file that is missing, damaged or of the wrong network."""


class VGG16Features(nn.Module):
  """torchvision's VGG16 `features` up to relu5_3: x (B, H, W, 3) (already scaled) ->
  the 5 feature maps after relu1_2 .. relu5_3, (B, H / 2^l, W / 2^l, C_l) for l = 0..4
  (max-pools floor odd sizes, as PyTorch's). Convs compute in `dtype`; params float32."""

  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, ...]:
    feats = []
    for b, block in enumerate(VGG_BLOCKS):
      if b:
        x = nn.max_pool(x, (2, 2), strides=(2, 2))
      for name, features in block:
        x = nn.relu(
          Conv(features, 3, padding=1, dtype=self.dtype, param_dtype=self.param_dtype, name=name)(x)
        )
      feats.append(x)
    return tuple(feats)


def _unit_normalize(f: jax.Array) -> jax.Array:
  """f / (||f||_c + 1e-10) in float32, lpips' `normalize_tensor`.

  The squared norm is floored at 1e-30 before the sqrt: an all-zero ReLU vector would
  otherwise give a NaN gradient (d sqrt at 0), and its value is zero either way.
  """
  f = f.astype(jnp.float32)
  norm = jnp.sqrt(jnp.maximum(jnp.sum(f * f, axis=-1, keepdims=True), 1e-30))
  return f / (norm + NORM_EPS)


def lpips_distance(
  params: Any, x: jax.Array, y: jax.Array, dtype: Dtype | None = None
) -> jax.Array:
  """LPIPS distances between image pairs: x, y (B, H, W, C) in [-1, 1], C in {1, 3} -> (B,)
  float32. Grey images (C = 1) are repeated to RGB. `dtype` is the convs' compute dtype
  (e.g. bfloat16); normalisation, differences and the sum run in float32. Differentiable
  in x and y; the params are constants of a training run."""
  if x.shape != y.shape:
    raise ValueError(f"LPIPS needs images of one shape, got {x.shape} and {y.shape}")
  if x.shape[-1] == 1:
    x, y = (jnp.repeat(t, 3, axis=-1) for t in (x, y))
  if x.shape[-1] != 3:
    raise ValueError(f"LPIPS takes 1- or 3-channel images, got shape {x.shape}")
  shift, scale = jnp.asarray(SHIFT, jnp.float32), jnp.asarray(SCALE, jnp.float32)
  # One VGG pass over both batches: half the kernel launches, one weight read.
  both = (jnp.concatenate([x, y]).astype(jnp.float32) - shift) / scale
  feats = VGG16Features(dtype=dtype).apply({"params": params["vgg"]}, both)
  b = x.shape[0]
  total = jnp.zeros((b,), jnp.float32)
  for layer, f in enumerate(feats):
    f = _unit_normalize(f)
    diff = (f[:b] - f[b:]) ** 2  # (B, h, w, C_l)
    total = total + jnp.mean(diff @ params["lin"][f"lin{layer}"].astype(jnp.float32), axis=(1, 2))
  return total


# ---------------------------------------------------------------------------------- files


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """Flat key -> shape of every array in an LPIPS weights file."""
  shapes = {}
  cin = 3
  for block in VGG_BLOCKS:
    for name, cout in block:
      shapes[f"vgg/{name}/kernel"] = (3, 3, cin, cout)
      shapes[f"vgg/{name}/bias"] = (cout,)
      cin = cout
  for layer, c in enumerate(LIN_CHANNELS):
    shapes[f"lin/lin{layer}"] = (c,)
  return shapes


def from_flat(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  return npz_files.unflatten(flat)


def to_flat(params: Any) -> dict[str, np.ndarray]:
  return npz_files.flatten(params)


def check_params(flat: dict[str, np.ndarray], source: str) -> None:
  """Raises LPIPSWeightsError naming the first missing or wrongly shaped array."""
  npz_files.check_shapes(
    flat,
    expected_shapes(),
    source,
    LPIPSWeightsError,
    "an LPIPS VGG16 weights file",
    CONVERT_COMMAND.format(out=source),
  )
  if np.any(np.concatenate([flat[f"lin/lin{layer}"] for layer in range(len(LIN_CHANNELS))]) < 0):
    raise LPIPSWeightsError(f"{source}: the linear weights must be >= 0 (lpips v0.1).")


def load_params(path: str) -> Any:
  """The LPIPS params of a file written by `save_params` (local path or gs://)."""
  flat = npz_files.read_weights(
    path,
    LPIPSWeightsError,
    "LPIPS weights",
    "LPIPS needs ImageNet VGG16 weights, which cannot be downloaded at run time: download "
    f"torchvision's {VGG16_URL} once, then convert it (with the lpips package's v0.1 "
    f"linear weights) with: {CONVERT_COMMAND.format(out=path)}",
    CONVERT_COMMAND.format(out=path),
  )
  check_params(flat, path)
  return from_flat({k: flat[k] for k in expected_shapes()})


def provide_command(path: str) -> str:
  """The one shell command that makes the weights file at `path` (needs the internet once,
  and torch + lpips for the conversion only)."""
  return f"pip install torch lpips && wget -nc {VGG16_URL} && {CONVERT_COMMAND.format(out=path)}"


def params_for_training(config: Any) -> Any | None:
  """The LPIPS params a training run uses, or None.

  A VQGAN with loss.perceptual_weight > 0 needs them: a missing or damaged config.lpips_path
  raises LPIPSWeightsError with the command that provides the file (config.validate already
  refuses an empty path). Otherwise (perceptual weight 0, or a VQ-VAE) LPIPS only adds a
  metric to the evaluation: None where config.lpips_path is empty or names no file (a
  warning says so), the weights where the file is there.
  """
  path = config.get("lpips_path") or ""
  needed = config.model.name == "vqgan" and config.loss.perceptual_weight > 0
  if not needed:
    if not path:
      return None
    if not epath.Path(path).expanduser().exists():
      logging.warning(
        "No LPIPS weights at %s (config.lpips_path): evaluation reports no LPIPS. The file: %s",
        path,
        provide_command(path),
      )
      return None
  return load_params(os.path.expanduser(path))


def save_params(params: Any, path: str) -> None:
  """Writes params as .npz (local path or gs://), atomically: a temporary file in the same
  folder, then a rename (an interrupted write never leaves a half file at `path`)."""
  flat = to_flat(params)
  check_params(flat, path)
  npz_files.save_npz(path, flat)
