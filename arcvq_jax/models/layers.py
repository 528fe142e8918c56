"""Convolution layers with PyTorch semantics and initialisation, NHWC.

The reference ArcVQ-VAE is written in PyTorch, so its layers are reproduced here exactly:
  * `Conv` is `torch.nn.Conv2d` (symmetric integer padding, PyTorch's default init).
  * `ConvTranspose4x4S2` is `torch.nn.ConvTranspose2d(kernel_size=4, stride=2, padding=1)`,
    the decoder's 2x upsampling layer, with implementations that avoid XLA:CPU's slow
    transposed-conv kernel gradient (several times slower than PyTorch's).

PyTorch's default init (`reset_parameters`) is `kaiming_uniform_(w, a=sqrt(5))`, i.e.
U(-b, b) with b = sqrt(6 / ((1 + a^2) fan_in)) = 1 / sqrt(fan_in), and the bias is
U(-1/sqrt(fan_in), 1/sqrt(fan_in)) with the same fan_in. fan_in is computed from the
*PyTorch* weight layout (dim 1 times the receptive field): Cin*k*k for Conv2d
(weight (Cout, Cin, k, k)) but Cout*k*k for ConvTranspose2d (weight (Cin, Cout, k, k)).

Kernel layout and the PyTorch mapping (what a checkpoint importer needs):
  * `Conv.kernel` (kh, kw, Cin, Cout)           = torch_w.permute(2, 3, 1, 0)   (no flip)
  * `ConvTranspose4x4S2.kernel` (4, 4, Cin, Cout) = torch_w.permute(2, 3, 0, 1) (no flip)
  Both biases are copied as is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")

# PyTorch's kaiming_uniform_(a=sqrt(5)) on an HWIO kernel (fan_in = kh*kw*Cin).
torch_conv_kernel_init: Initializer = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform", in_axis=-2, out_axis=-1
)

# The same for a transposed-conv kernel stored (kh, kw, Cin, Cout): PyTorch takes fan_in from
# its weight's dim 1, which is Cout, so fan_in = kh*kw*Cout (in_axis is the Cout axis here).
torch_conv_transpose_kernel_init: Initializer = nn.initializers.variance_scaling(
  1.0 / 3.0, "fan_in", "uniform", in_axis=-1, out_axis=-2
)


def torch_fan_in(kernel_shape: Sequence[int], transpose: bool = False) -> int:
  """PyTorch's fan_in for an HWIO kernel shape (kh, kw, Cin, Cout); see the module docstring."""
  *window, cin, cout = kernel_shape
  return int(np.prod(window)) * (cout if transpose else cin)


def torch_bias_init(fan_in: int) -> Initializer:
  """Bias init U(-1/sqrt(fan_in), 1/sqrt(fan_in)), PyTorch's default for conv/linear layers."""
  bound = 1.0 / math.sqrt(fan_in) if fan_in > 0 else 0.0

  def init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
  if isinstance(v, int):
    return (v, v)
  v = tuple(v)
  if len(v) != 2:
    raise ValueError(f"expected an int or a pair, got {v}")
  return v


def conv_xla(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[int, int]) -> Array:
  """Plain convolution: x (B, H, W, Cin), kernel (kh, kw, Cin, Cout), symmetric zero padding."""
  (ph, pw) = padding
  return lax.conv_general_dilated(
    x, kernel, strides, ((ph, ph), (pw, pw)), dimension_numbers=_DIMENSION_NUMBERS
  )


def conv_gemm(x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[int, int]) -> Array:
  """The same convolution as im2col (kh*kw strided slices) + one GEMM.

  Holds a (B, H', W', kh*kw*Cin) patch tensor; its gradients are slices, pads and GEMMs,
  which XLA:CPU runs faster than its convolution kernels when kh*kw*Cin is small.
  """
  kh, kw, cin, cout = kernel.shape
  (sh, sw), (ph, pw) = strides, padding
  b, h, w, _ = x.shape
  xp = jnp.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))
  ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
  taps = [
    lax.slice(
      xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, cin), (1, sh, sw, 1)
    )
    for i in range(kh)
    for j in range(kw)
  ]
  patches = jnp.concatenate(taps, axis=-1)  # (B, H', W', kh*kw*Cin), tap-major like the kernel
  return (patches.reshape(-1, kh * kw * cin) @ kernel.reshape(-1, cout)).reshape(b, ho, wo, cout)


# 'auto' takes the GEMM form up to this patch width: measured on a 2-core AVX-512 CPU
# (encoder conv_1 1->64 4x4 and decoder conv_1 64->128 3x3 fwd+bwd 1.6-2.5x faster at batch
# 128 and 1024); wider patches (Cin = 128) are faster as XLA convolutions at batch 128 and
# only ~6 % faster as GEMMs at batch 1024, for 1.4x the step's memory.
GEMM_MAX_PATCH = 576
CONV_IMPLS = ("auto", "xla", "gemm")


def choose_conv_impl(kernel_shape: Sequence[int], backend: str | None = None) -> str:
  """'gemm' or 'xla' for 'auto', from the kernel shape (kh, kw, Cin, Cout) and the backend.

  The GEMM form is a CPU measure only: on GPU/TPU the convolution kernels are fast, and the
  (B, H, W, kh*kw*Cin) patch tensor would cost memory (LPIPS' conv1_2 at 256x256, batch 30:
  9 GB). backend: jax.default_backend() when None.
  """
  kh, kw, cin, _ = kernel_shape
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  return "gemm" if kh * kw > 1 and kh * kw * cin <= GEMM_MAX_PATCH else "xla"


class Conv(nn.Module):
  """`torch.nn.Conv2d` in NHWC: x (B, H, W, Cin) -> (B, H', W', features).

  padding: PyTorch-style symmetric zero padding (int or (ph, pw)); H' = (H + 2ph - kh) // sh + 1.
  Params: kernel (kh, kw, Cin, features) = torch_w.permute(2, 3, 1, 0); bias (features,).
  impl: 'xla' (lax conv), 'gemm' (im2col + GEMM) or 'auto' (`choose_conv_impl`, by shape);
  all give the same result from the same params.
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  impl: str = "auto"

  @nn.compact
  def __call__(self, x: Array) -> Array:
    kh, kw = _pair(self.kernel_size)
    ph, pw = _pair(self.padding)
    shape = (kh, kw, x.shape[-1], self.features)
    kernel = self.param("kernel", torch_conv_kernel_init, shape, self.param_dtype)
    bias = (
      self.param("bias", torch_bias_init(torch_fan_in(shape)), (self.features,), self.param_dtype)
      if self.use_bias
      else None
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    impl = self.impl
    if impl == "auto":
      impl = choose_conv_impl(shape)
    if impl not in ("xla", "gemm"):
      raise ValueError(f"Conv impl {self.impl!r} is not one of {CONV_IMPLS}")
    conv = conv_gemm if impl == "gemm" else conv_xla
    y = conv(x, kernel, _pair(self.strides), (ph, pw))
    if bias is not None:
      y = y + bias
    return y


# ---------------------------------------------------------------------------------------------
# ConvTranspose2d(k=4, s=2, p=1) as pure functions of (x, kernel).
#
# PyTorch: out[o] = sum_{i, k : o = 2i - 1 + k} x[i] w[k]   (per spatial axis, k in 0..3).
# Write o = 2m + r (phase r in {0, 1}); then k = 2(m - i) + 1 + r, so each output phase sees
# only two input taps, at offsets d = i - m:
#   r = 0: d = -1 -> w[3],  d = 0 -> w[1]
#   r = 1: d =  0 -> w[2],  d = +1 -> w[0]
# ---------------------------------------------------------------------------------------------


def conv_transpose_4x4s2_xla(x: Array, kernel: Array) -> Array:
  """Reference: XLA's transposed conv (lhs-dilated forward conv with the flipped kernel).

  x: (B, H, W, Cin); kernel: (4, 4, Cin, Cout) in the layout of the module docstring.
  Returns (B, 2H, 2W, Cout). Dilate x by 2, pad by k - 1 - p = 2 on each side, and correlate
  with the spatially flipped kernel (j = 3 - k in the formula above).
  """
  return lax.conv_general_dilated(
    x,
    jnp.flip(kernel, (0, 1)),
    window_strides=(1, 1),
    padding=((2, 2), (2, 2)),
    lhs_dilation=(2, 2),
    dimension_numbers=_DIMENSION_NUMBERS,
  )


# _SUBPIXEL_SELECT[t, r, k] = 1 iff 3x3-window tap t (offset d = t - 1) feeds phase r from w[k].
_SUBPIXEL_SELECT = np.zeros((3, 2, 4), np.float32)
for _t, _r, _k in ((0, 0, 3), (1, 0, 1), (1, 1, 2), (2, 1, 0)):
  _SUBPIXEL_SELECT[_t, _r, _k] = 1.0


def _depth_to_space2(y: Array, features: int) -> Array:
  """(B, H, W, 2*2*C) with channels ordered (ry, rx, c) -> (B, 2H, 2W, C)."""
  b, h, w, _ = y.shape
  y = y.reshape(b, h, w, 2, 2, features).transpose(0, 1, 3, 2, 4, 5)
  return y.reshape(b, 2 * h, 2 * w, features)


def subpixel_kernel(kernel: Array) -> Array:
  """(4, 4, Cin, Cout) transposed-conv kernel -> (3, 3, Cin, 4*Cout) forward-conv kernel.

  Output channels are ordered (ry, rx, Cout). The assembly is an einsum with a 0/1 matrix, so
  it is exact and its gradient is the matching gather-sum back onto the 4x4 kernel.
  """
  cin, cout = kernel.shape[2:]
  sel = jnp.asarray(_SUBPIXEL_SELECT, kernel.dtype)
  k3 = jnp.einsum("ark,bsl,klio->abirso", sel, sel, kernel)
  return k3.reshape(3, 3, cin, 4 * cout)


def conv_transpose_4x4s2_subpixel(x: Array, kernel: Array) -> Array:
  """Sub-pixel form: one 3x3 stride-1 'SAME' conv to 4*Cout channels, then depth-to-space.

  x: (B, H, W, Cin); kernel: (4, 4, Cin, Cout). Returns (B, 2H, 2W, Cout). Does 36/16 of
  the transposed conv's multiply-adds (the zero taps), but as one plain forward conv.
  """
  y = lax.conv_general_dilated(
    x, subpixel_kernel(kernel), (1, 1), ((1, 1), (1, 1)), dimension_numbers=_DIMENSION_NUMBERS
  )
  return _depth_to_space2(y, kernel.shape[-1])


# Per phase r: (taps of w in window order, padding (lo, hi)) of a 2-tap stride-1 conv.
_PHASE_TAPS = {0: ((3, 1), (1, 0)), 1: ((2, 0), (0, 1))}


def conv_transpose_4x4s2_phase(x: Array, kernel: Array) -> Array:
  """Phase form: four 2x2 stride-1 convs (one per output phase), interleaved.

  x: (B, H, W, Cin); kernel: (4, 4, Cin, Cout). Returns (B, 2H, 2W, Cout). Exactly the
  transposed conv's multiply-adds, split over four convs.
  """
  b, h, w, _ = x.shape
  cout = kernel.shape[-1]
  phases = []
  for ry in (0, 1):
    ky, pad_y = _PHASE_TAPS[ry]
    for rx in (0, 1):
      kx, pad_x = _PHASE_TAPS[rx]
      k2 = kernel[np.array(ky)][:, np.array(kx)]  # (2, 2, Cin, Cout)
      phases.append(
        lax.conv_general_dilated(
          x, k2, (1, 1), (pad_y, pad_x), dimension_numbers=_DIMENSION_NUMBERS
        )
      )
  y = jnp.stack(phases, axis=3).reshape(b, h, w, 2, 2, cout)
  return y.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, cout)


def _shift(a: Array, axis: int, offset: int) -> Array:
  """b[m] = a[m + offset] along `axis`, zero where m + offset is out of range (|offset| = 1)."""
  pad = [(0, 0)] * a.ndim
  pad[axis] = (0, 1) if offset > 0 else (1, 0)
  a = jnp.pad(a, pad)
  start = 1 if offset > 0 else 0
  return lax.slice_in_dim(a, start, start + a.shape[axis] - 1, axis=axis)


def _overlap_add_axis(t: Array, axis: int, tap_axis: int) -> Array:
  """Sum the 4 taps of one spatial axis into its 2 output phases (the table above).

  t: taps on `tap_axis` (size 4) for input positions on `axis`; returns t with the tap axis
  replaced by a phase axis (size 2): phase 0 = w1 x[m] + w3 x[m-1], phase 1 = w2 x[m] + w0 x[m+1].
  """
  tap = lambda k: lax.index_in_dim(t, k, tap_axis, keepdims=False)
  axis = axis if axis < tap_axis else axis - 1
  phase0 = tap(1) + _shift(tap(3), axis, -1)
  phase1 = tap(2) + _shift(tap(0), axis, +1)
  return jnp.stack([phase0, phase1], axis=tap_axis)


def conv_transpose_4x4s2_matmul(x: Array, kernel: Array) -> Array:
  """GEMM + col2im form (PyTorch's own CPU algorithm): one matmul to all 16 taps, overlap-add.

  x: (B, H, W, Cin); kernel: (4, 4, Cin, Cout). Returns (B, 2H, 2W, Cout). Exactly the
  transposed conv's multiply-adds in one (B*H*W, Cin) x (Cin, 16*Cout) matmul; its gradient is
  im2col (shifted slices) + matmuls. Holds a (B, H, W, 4, 4, Cout) intermediate.
  """
  b, h, w, _ = x.shape
  cout = kernel.shape[-1]
  t = jnp.einsum("bhwi,klio->bhwklo", x, kernel)  # (B, H, W, ky, kx, Cout)
  t = _overlap_add_axis(t, axis=1, tap_axis=3)  # (B, H, W, ry, kx, Cout)
  t = _overlap_add_axis(t, axis=2, tap_axis=4)  # (B, H, W, ry, rx, Cout)
  return t.transpose(0, 1, 3, 2, 4, 5).reshape(b, 2 * h, 2 * w, cout)


CONV_TRANSPOSE_4X4S2_IMPLS = {
  "matmul": conv_transpose_4x4s2_matmul,
  "xla": conv_transpose_4x4s2_xla,
  "subpixel": conv_transpose_4x4s2_subpixel,
  "phase": conv_transpose_4x4s2_phase,
}


def choose_conv_transpose_impl(features: int) -> str:
  """impl='auto': the fastest forward+backward form on XLA:CPU (bench/bench_conv_transpose.py).

  'phase' for wide outputs (Cin=128 -> Cout=64: ~10x faster than 'xla', whose kernel gradient
  dominates); 'matmul' for narrow ones (Cout = 1..4, the image-output layer), where the 2x2 /
  3x3 forward convs with few output channels are slow in Eigen and 'xla' is about as fast.
  """
  return "phase" if features >= 8 else "matmul"


class ConvTranspose4x4S2(nn.Module):
  """`torch.nn.ConvTranspose2d(Cin, features, kernel_size=4, stride=2, padding=1)` in NHWC.

  x (B, H, W, Cin) -> (B, 2H, 2W, features).
  Params: kernel (4, 4, Cin, features) = torch_w.permute(2, 3, 0, 1), *no* spatial flip
  (torch_w is (Cin, Cout, 4, 4)); bias (features,) = torch_b. Init matches PyTorch, with
  fan_in = 16 * features as PyTorch computes it for transposed convs.
  (flax.linen.ConvTranspose(features, (4, 4), (2, 2), padding=((2, 2), (2, 2))) computes the
  same map with kernel = jnp.flip(our_kernel, (0, 1)).)

  impl: how it is computed; all give the same output from the same params.
    'xla'      lax lhs-dilated conv, the reference; its kernel gradient is slow on XLA:CPU.
    'subpixel' one 3x3 forward conv to 4*features channels + depth-to-space.
    'phase'    four 2x2 forward convs, one per output phase, interleaved.
    'matmul'   one GEMM to all 16 taps + overlap-add (col2im), PyTorch's CPU algorithm.
    'auto'     (default) `choose_conv_transpose_impl(features)`.
  """

  features: int
  use_bias: bool = True
  impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    impl = choose_conv_transpose_impl(self.features) if self.impl == "auto" else self.impl
    if impl not in CONV_TRANSPOSE_4X4S2_IMPLS:
      raise ValueError(
        f"impl={self.impl!r}; expected 'auto' or one of {sorted(CONV_TRANSPOSE_4X4S2_IMPLS)}"
      )
    shape = (4, 4, x.shape[-1], self.features)
    kernel = self.param("kernel", torch_conv_transpose_kernel_init, shape, self.param_dtype)
    bias = (
      self.param(
        "bias",
        torch_bias_init(torch_fan_in(shape, transpose=True)),
        (self.features,),
        self.param_dtype,
      )
      if self.use_bias
      else None
    )
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    y = CONV_TRANSPOSE_4X4S2_IMPLS[impl](x, kernel)
    if bias is not None:
      y = y + bias
    return y
