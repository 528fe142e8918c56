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

import functools
import math
import os
import re
from collections.abc import Callable, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from arcvq_jax.models import onednn, onednn_kernel_grad

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


def _conv_taps(
  x: Array, kh: int, kw: int, strides: tuple[int, int], padding: tuple[int, int], out_hw
) -> list[Array]:
  """The kh*kw strided slices of the zero-padded x that the taps of a conv read.

  Tap (i, j) is (B, H', W', Cin) with tap[b, m, n] = x[b, sh*m + i - ph, sw*n + j - pw]
  (zero outside x). The high side is padded (or cropped) only as far as the taps reach.
  """
  (sh, sw), (ph, pw) = strides, padding
  b, h, w, c = x.shape
  ho, wo = out_hw
  hi_h, hi_w = sh * (ho - 1) + kh - h - ph, sw * (wo - 1) + kw - w - pw
  xp = lax.pad(x, jnp.zeros((), x.dtype), ((0, 0, 0), (ph, hi_h, 0), (pw, hi_w, 0), (0, 0, 0)))
  return [
    lax.slice(
      xp, (0, i, j, 0), (b, i + sh * (ho - 1) + 1, j + sw * (wo - 1) + 1, c), (1, sh, sw, 1)
    )
    for i in range(kh)
    for j in range(kw)
  ]


def _contract_rows(a: Array, b: Array) -> Array:
  """a (..., P) and b (..., Q) with the same leading shape -> a^T b (P, Q), one GEMM."""
  return lax.dot_general(
    a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), (((0,), (0,)), ((), ()))
  )


def conv_kernel_grad(
  x: Array,
  g: Array,
  kernel_shape: Sequence[int],
  strides: tuple[int, int],
  padding: tuple[int, int],
) -> Array:
  """The kernel gradient of `conv_xla(x, kernel, strides, padding)` for the cotangent g, as GEMMs.

  x: (B, H, W, Cin); g: (B, H', W', Cout) -> (kh, kw, Cin, Cout). dW[i, j] is the sum over
  the B*H'*W' output positions of tap(i, j)^T g: one (Cin, N) x (N, Cout) GEMM per tap (XLA:CPU's
  own kernel gradient, a convolution over the batch, runs several times slower). With stride 1
  and 'same' padding (H' = H) and Cout < Cin the taps of g are sliced instead (shift g against
  x: dW[i, j] = sum x^T g[. + p - i]), one (Cin, N) x (N, kh*kw*Cout) GEMM, which copies
  kh*kw*Cout instead of kh*kw*Cin values per position.
  """
  kh, kw, cin, cout = kernel_shape
  (ph, pw) = padding
  ho, wo = g.shape[1:3]
  if strides == (1, 1) and (ho, wo) == x.shape[1:3] and cout < cin and kh * kw > 1:
    # tap'(i, j)[b, h, w] = g[b, h + ph - i, w + pw - j]: the taps of g padded by k - 1 - p,
    # in reverse order (tap' (i, j) is the slice at offset (kh - 1 - i, kw - 1 - j)).
    taps = _conv_taps(g, kh, kw, (1, 1), (kh - 1 - ph, kw - 1 - pw), (ho, wo))
    patches = jnp.concatenate(taps[::-1], axis=-1)  # (B, H, W, kh*kw*Cout), tap-major
    return _contract_rows(x, patches).reshape(cin, kh, kw, cout).transpose(1, 2, 0, 3)
  taps = _conv_taps(x, kh, kw, strides, padding, (ho, wo))
  return jnp.stack([_contract_rows(t, g) for t in taps]).reshape(kh, kw, cin, cout)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_hybrid(
  x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[int, int]
) -> Array:
  """`conv_xla` whose kernel gradient is `conv_kernel_grad` (GEMMs); the same function.

  The forward pass and the input gradient stay XLA convolutions (fast on XLA:CPU, which runs
  them through its YNNPACK fusions); only the kernel gradient is replaced.
  """
  return conv_xla(x, kernel, strides, padding)


def _conv_keep_inputs_fwd(x, kernel, strides, padding):
  """The forward pass of the custom-VJP forms: `conv_xla`, keeping (x, kernel) for the backward."""
  return conv_xla(x, kernel, strides, padding), (x, kernel)


def _conv_xla_input_grad(x, kernel, strides, padding, g):
  """XLA's own input gradient of `conv_xla(x, kernel, strides, padding)` for the cotangent g."""
  return jax.vjp(lambda x_: conv_xla(x_, kernel, strides, padding), x)[1](g)[0]


def _conv_hybrid_bwd(strides, padding, res, g):
  x, kernel = res
  dx = _conv_xla_input_grad(x, kernel, strides, padding, g)
  dk = conv_kernel_grad(x, g, kernel.shape, strides, padding).astype(kernel.dtype)
  return dx.astype(x.dtype), dk


conv_hybrid.defvjp(_conv_keep_inputs_fwd, _conv_hybrid_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_phase_grad(
  x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[int, int]
) -> Array:
  """`conv_xla` whose input gradient, for a 4x4 kernel at stride 2 and padding 1 on an even
  input, is the phase-form transposed convolution (`conv_transpose_4x4s2_phase`); the same
  function.

  The input gradient of conv(x, W, stride 2, padding 1) is ConvTranspose4x4S2 of the
  cotangent with W.transpose(0, 1, 3, 2): four 2x2 stride-1 convolutions instead of XLA's
  lhs-dilated one, which XLA:CPU runs without a library kernel (2.2x slower on Eigen at
  batch 1024, encoder conv_2 of the VQ-VAE). The forward pass and the kernel gradient stay
  XLA's. Other shapes take XLA's input gradient.
  """
  return conv_xla(x, kernel, strides, padding)


def _conv_phase_grad_bwd(strides, padding, res, g):
  x, kernel = res
  dk = jax.vjp(lambda k: conv_xla(x, k, strides, padding), kernel)[1](g)[0]
  if _phase_grad_applies(kernel.shape, strides, padding, x.shape[1:3], g.shape[1:3]):
    dx = conv_transpose_4x4s2_phase(g, kernel.transpose(0, 1, 3, 2))
  else:
    dx = _conv_xla_input_grad(x, kernel, strides, padding, g)
  return dx.astype(x.dtype), dk


def _narrowing_same_conv(kernel_shape, strides, padding) -> bool:
  """A stride-1 'same' convolution (odd kernel, padding (k - 1) / 2) to at most half as many
  channels. `conv_kernel_grad` takes its kernel gradient as one GEMM of the input against the
  taps of the narrow cotangent: alone about as fast as Eigen's (bench/bench_conv_layers.py),
  but it reads the input (a ReLU output) as it is, where Eigen's kernel-gradient convolution
  needs a layout transpose of it first; with the VQ-VAE's residual 3x3 (128 -> 32) in this
  form the train step at batch 1024 took 4-7 % less (bench/bench_vs_pytorch.py)."""
  kh, kw, cin, cout = kernel_shape
  same = kh % 2 == 1 and kw % 2 == 1 and tuple(padding) == ((kh - 1) // 2, (kw - 1) // 2)
  return tuple(strides) == (1, 1) and same and 2 * cout <= cin


def _phase_grad_applies(kernel_shape, strides, padding, in_hw=None, out_hw=None) -> bool:
  """A 4x4 kernel at stride 2, padding 1 (and, where known, an input twice the output)."""
  shape_ok = in_hw is None or tuple(in_hw) == tuple(2 * n for n in out_hw)
  return tuple(kernel_shape[:2]) == (4, 4) and strides == (2, 2) and padding == (1, 1) and shape_ok


conv_phase_grad.defvjp(_conv_keep_inputs_fwd, _conv_phase_grad_bwd)


# XLA:CPU (jax 0.10) compiles convolutions into YNNPACK fusions by default. Their kernel
# gradients (a convolution over the batch) run 2-4x slower than the forward pass; Eigen's
# convolutions (XLA's other CPU path) ran the VQ-VAE's wide layers' forward+backward
# 1.3-2.4x faster (batch 128, one AVX-512 core: encoder conv_2 74 -> 45 ms, conv_3 82 -> 34,
# residual 3x3 16 -> 12, decoder conv_1 42 -> 20). The flag
#   XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=-individual_convolution
# (process-wide), or EIGEN_CONV_COMPILER_OPTIONS passed to one jit, keeps convolutions on
# Eigen; 'auto' picks the forms that are fastest under each (`cpu_conv_library`).
# The options leave out YNNPACK's elementwise fusions too: they take a convolution together
# with its bias and ReLU into one YNNPACK fusion, which ran the VQ-VAE's 128-channel layers
# 2x slower than Eigen's convolution followed by XLA's own elementwise loop (encoder conv_2
# at batch 1024: 88 vs 38 ms; the train step 1070 -> 1031 ms; bench/bench_vs_pytorch.py).
CONV_LIBRARIES = ("ynn", "eigen", "onednn")
# The libraries XLA itself runs convolutions on: a program compiled for one of them
# (`compiler_options`) runs lax convolutions there ('onednn' needs the model's own forms).
XLA_CONV_LIBRARIES = ("ynn", "eigen")
EIGEN_CONV_COMPILER_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": (
    "LIBRARY_FUSION_TYPE_DOT,LIBRARY_FUSION_TYPE_REDUCE,LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"
  )
}


def cpu_conv_library() -> str:
  """'ynn' or 'eigen': which library XLA:CPU runs convolutions with by default in this
  process: 'eigen' where XLA_FLAGS' last --xla_cpu_experimental_ynn_fusion_type removes
  (-individual_convolution) or leaves out the convolution fusions, else 'ynn'.
  """
  values = re.findall(
    r"--xla_cpu_experimental_ynn_fusion_type=(\S*)", os.environ.get("XLA_FLAGS", "")
  )
  if not values:
    return "ynn"
  items = [v.strip().lower() for v in values[-1].split(",") if v.strip()]
  conv = {"individual_convolution", "library_fusion_type_individual_convolution"}
  if items and all(v[0] in "+-" for v in items):  # edits of the default list
    return "eigen" if any(v[0] == "-" and v[1:] in conv for v in items) else "ynn"
  return "ynn" if any(v in conv for v in items) else "eigen"


def compiler_options(library: str | None) -> dict[str, str] | None:
  """The XLA options to compile a function with whose convolutions were chosen for
  `library` ('eigen' and 'onednn', whose other convolutions run on Eigen:
  EIGEN_CONV_COMPILER_OPTIONS on the CPU; None elsewhere)."""
  if library in ("eigen", "onednn") and jax.default_backend() == "cpu":
    return dict(EIGEN_CONV_COMPILER_OPTIONS)
  return None


def _library(library: str | None) -> str:
  """The library the forms are chosen for: 'onednn' becomes 'eigen' where this jaxlib cannot
  run oneDNN's convolution (`onednn.available`)."""
  if library is None:
    return cpu_conv_library()
  if library not in CONV_LIBRARIES:
    raise ValueError(f"conv library {library!r} is not one of {CONV_LIBRARIES}")
  if library == "onednn" and not onednn.available():
    return "eigen"
  return library


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _conv_onednn(x: Array, kernel: Array, strides: tuple[int, int], pads) -> Array:
  """`onednn.conv` (pads ((lo, hi), (lo, hi))) with the gradients `conv_onednn` describes."""
  return onednn.conv(x, kernel, strides, pads)


def _conv_onednn_fwd(x, kernel, strides, pads):
  return onednn.conv(x, kernel, strides, pads), (x, kernel)


def _conv_onednn_bwd(strides, pads, res, g):
  x, kernel = res
  xla = lambda x_, k_: lax.conv_general_dilated(
    x_, k_, strides, pads, dimension_numbers=_DIMENSION_NUMBERS
  )
  symmetric = all(lo == hi for lo, hi in pads)
  padding = tuple(lo for lo, _ in pads)
  dx = None
  if strides == (1, 1):
    dx = onednn.input_grad_stride1(x.shape, kernel, pads, g)
  elif symmetric and _phase_grad_applies(
    kernel.shape, strides, padding, x.shape[1:3], g.shape[1:3]
  ):
    dx = conv_transpose_4x4s2_phase(g, kernel.transpose(0, 1, 3, 2), conv=_conv_onednn)
  if dx is None:
    dx = jax.vjp(lambda x_: xla(x_, kernel), x)[1](g)[0]
  if onednn_kernel_grad.available():
    dk = onednn_kernel_grad.kernel_grad(x, g, kernel.shape, strides, pads)
  elif symmetric and _narrowing_same_conv(kernel.shape, strides, padding):
    dk = conv_kernel_grad(x, g, kernel.shape, strides, padding)
  else:
    dk = jax.vjp(lambda k_: xla(x, k_), kernel)[1](g)[0]
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


_conv_onednn.defvjp(_conv_onednn_fwd, _conv_onednn_bwd)


def conv_onednn(
  x: Array, kernel: Array, strides: tuple[int, int], padding: tuple[int, int]
) -> Array:
  """`conv_xla` as oneDNN's convolution (`models/onednn.py`) for float32 where this jaxlib
  runs it (`onednn.available`), else `conv_xla`.

  The input gradient is oneDNN's too (`onednn.input_grad_stride1`; for a 4x4 kernel at
  stride 2 the phase-form transposed convolution on oneDNN); the kernel gradient is oneDNN's
  backward-weights convolution where the `onednn` extra is installed
  (`onednn_kernel_grad.available`; 1.3-2.6x faster than the forms below,
  bench/bench_onednn_kernel_grad.py), else `conv_kernel_grad`'s GEMMs for stride-1 'same'
  convolutions to at most half the channels (as 'hybrid': no layout transposes of the
  input), else XLA's (Eigen, behind transposes of both operands).
  """
  if not (x.dtype == kernel.dtype == jnp.float32 and onednn.available()):
    return conv_xla(x, kernel, strides, padding)
  (ph, pw) = padding
  return _conv_onednn(x, kernel, tuple(strides), ((ph, ph), (pw, pw)))


# Under YNNPACK convolutions 'auto' takes the GEMM form up to this patch width (kh*kw*Cin;
# 1x1 convolutions are plain GEMMs), the hybrid form (XLA convolution forward and input
# gradient, GEMM kernel gradient) above it.
GEMM_MAX_PATCH = 576
CONV_IMPLS = ("auto", "xla", "gemm", "hybrid", "phase_grad", "onednn")
CONV_FORMS = {
  "xla": conv_xla,
  "gemm": conv_gemm,
  "hybrid": conv_hybrid,
  "phase_grad": conv_phase_grad,
  "onednn": conv_onednn,
}


def choose_conv_impl(
  kernel_shape: Sequence[int],
  backend: str | None = None,
  library: str | None = None,
  strides: tuple[int, int] = (1, 1),
  padding: tuple[int, int] = (0, 0),
) -> str:
  """The form 'auto' takes, from the kernel shape (kh, kw, Cin, Cout), strides, padding and
  the backend.

  GPU/TPU: 'xla' (their convolution kernels are fast, and the GEMM form's (B, H, W,
  kh*kw*Cin) patch tensor would cost memory: LPIPS' conv1_2 at 256x256, batch 30: 9 GB).
  CPU with YNNPACK convolutions (the default): 'gemm' for patches up to GEMM_MAX_PATCH wide,
  'hybrid' above. CPU with Eigen convolutions (`cpu_conv_library`): 'gemm' for 1x1 and for
  patches no wider than the output (kh*kw*Cin <= Cout: an image's first layer, whose patch
  tensor is then no larger than its output), 'phase_grad' for 4x4 at stride 2, padding 1,
  'hybrid' for stride-1 'same' convolutions to at most half the channels (the residual 3x3),
  else 'xla' (Eigen's kernel gradients are fast). CPU with 'onednn' (where `onednn.available`,
  else as 'eigen'): 'gemm' as for Eigen, else 'onednn' (`conv_onednn`).
  backend: jax.default_backend() when None;
  library: the CPU convolution library the function will be compiled for (None: this
  process's default, `cpu_conv_library`). Measured per layer in bench/bench_conv_layers.py
  and per step in bench/bench_vs_pytorch.py.
  """
  kh, kw, cin, cout = kernel_shape
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  lib = _library(library)
  if lib in ("eigen", "onednn"):
    if kh * kw == 1 or kh * kw * cin <= cout:
      return "gemm"
    if lib == "onednn":
      return "onednn"
    if _phase_grad_applies(kernel_shape, strides, padding):
      return "phase_grad"
    return "hybrid" if _narrowing_same_conv(kernel_shape, strides, padding) else "xla"
  return "gemm" if kh * kw * cin <= GEMM_MAX_PATCH else "hybrid"


class Conv(nn.Module):
  """`torch.nn.Conv2d` in NHWC: x (B, H, W, Cin) -> (B, H', W', features).

  padding: PyTorch-style symmetric zero padding (int or (ph, pw)); H' = (H + 2ph - kh) // sh + 1.
  Params: kernel (kh, kw, Cin, features) = torch_w.permute(2, 3, 1, 0); bias (features,).
  impl: 'xla' (lax conv), 'gemm' (im2col + GEMM), 'hybrid', 'phase_grad', 'onednn' or 'auto'
  (`choose_conv_impl`, by shape and `library`); all give the same result from the same params.
  library: the CPU convolution library ('ynn', 'eigen', 'onednn') the caller compiles for
  (`compiler_options`), which 'auto' picks the form for (None: this process's default).
  """

  features: int
  kernel_size: int | Sequence[int] = 3
  strides: int | Sequence[int] = 1
  padding: int | Sequence[int] = 0
  use_bias: bool = True
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  impl: str = "auto"
  library: str | None = None

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
      impl = choose_conv_impl(
        shape, library=self.library, strides=_pair(self.strides), padding=(ph, pw)
      )
    if impl not in CONV_FORMS:
      raise ValueError(f"Conv impl {self.impl!r} is not one of {CONV_IMPLS}")
    y = CONV_FORMS[impl](x, kernel, _pair(self.strides), (ph, pw))
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


def conv_transpose_4x4s2_phase(x: Array, kernel: Array, conv: Callable | None = None) -> Array:
  """Phase form: four 2x2 stride-1 convs (one per output phase), interleaved.

  x: (B, H, W, Cin); kernel: (4, 4, Cin, Cout). Returns (B, 2H, 2W, Cout). Exactly the
  transposed conv's multiply-adds, split over four convs. conv(x, k2, strides, pads) runs
  each (None: XLA's).
  """
  if conv is None:
    conv = lambda x, k, strides, pads: lax.conv_general_dilated(
      x, k, strides, pads, dimension_numbers=_DIMENSION_NUMBERS
    )
  b, h, w, _ = x.shape
  cout = kernel.shape[-1]
  phases = []
  for ry in (0, 1):
    ky, pad_y = _PHASE_TAPS[ry]
    for rx in (0, 1):
      kx, pad_x = _PHASE_TAPS[rx]
      k2 = kernel[np.array(ky)][:, np.array(kx)]  # (2, 2, Cin, Cout)
      phases.append(conv(x, k2, (1, 1), (pad_y, pad_x)))
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


@jax.custom_vjp
def conv_transpose_4x4s2_hybrid(x: Array, kernel: Array) -> Array:
  """Forward 'phase' (Cout >= 8) or 'matmul'; backward as the convolution it is the adjoint of.

  x: (B, H, W, Cin); kernel: (4, 4, Cin, Cout). Returns (B, 2H, 2W, Cout). The transposed conv
  is the input gradient of conv(., kernel_t, stride 2, padding 1) with kernel_t =
  kernel.transpose(0, 1, 3, 2) (4, 4, Cout, Cin), so its input gradient is that forward
  convolution of the cotangent and its kernel gradient that convolution's kernel gradient
  (`conv_kernel_grad`, GEMMs), with the roles of input and cotangent swapped. Autodiff through
  the forward forms instead gives XLA:CPU convolution kernel gradients or col2im adjoints,
  1.5-3x slower over the layer's forward+backward.
  """
  return _conv_transpose_forward(x, kernel)


def _conv_transpose_forward(x: Array, kernel: Array) -> Array:
  if kernel.shape[-1] >= 8:
    return conv_transpose_4x4s2_phase(x, kernel)
  return conv_transpose_4x4s2_matmul(x, kernel)


def _conv_transpose_hybrid_fwd(x, kernel):
  return _conv_transpose_forward(x, kernel), (x, kernel)


def _conv_transpose_hybrid_bwd(res, g):
  x, kernel = res
  kernel_t = kernel.transpose(0, 1, 3, 2)
  conv = conv_gemm if choose_conv_impl(kernel_t.shape) == "gemm" else conv_xla
  dx = conv(g, kernel_t, (2, 2), (1, 1))
  dk = conv_kernel_grad(g, x, kernel_t.shape, (2, 2), (1, 1)).transpose(0, 1, 3, 2)
  return dx.astype(x.dtype), dk.astype(kernel.dtype)


conv_transpose_4x4s2_hybrid.defvjp(_conv_transpose_hybrid_fwd, _conv_transpose_hybrid_bwd)


def conv_transpose_4x4s2_phase_onednn(x: Array, kernel: Array) -> Array:
  """The phase form on oneDNN's convolution (`conv_onednn`'s, gradients included) for
  float32 where this jaxlib runs it, else `conv_transpose_4x4s2_phase`."""
  if x.dtype == kernel.dtype == jnp.float32 and onednn.available():
    return conv_transpose_4x4s2_phase(x, kernel, conv=_conv_onednn)
  return conv_transpose_4x4s2_phase(x, kernel)


CONV_TRANSPOSE_4X4S2_IMPLS = {
  "matmul": conv_transpose_4x4s2_matmul,
  "xla": conv_transpose_4x4s2_xla,
  "subpixel": conv_transpose_4x4s2_subpixel,
  "phase": conv_transpose_4x4s2_phase,
  "hybrid": conv_transpose_4x4s2_hybrid,
  "phase_onednn": conv_transpose_4x4s2_phase_onednn,
}


def choose_conv_transpose_impl(
  features: int, backend: str | None = None, library: str | None = None
) -> str:
  """impl='auto': the fastest forward+backward form (bench/bench_conv_transpose.py).

  On the CPU 'hybrid' (with oneDNN's, 'phase_onednn' for Cout >= 8 and 'matmul' below; with
  Eigen convolutions, `cpu_conv_library`, 'phase' for Cout >= 8,
  whose autodiff gradients are then Eigen kernel gradients: 2x faster than 'hybrid', and
  'matmul' below: 70.6 -> 58.6 ms for the VQ-VAE's image output at batch 1024).
  Elsewhere 'phase' for wide outputs (Cin=128 -> Cout=64: ~10x faster than 'xla' on XLA:CPU,
  whose kernel gradient dominates) and 'matmul' for narrow ones (Cout = 1..4, the
  image-output layer). backend: jax.default_backend() when None.
  """
  if (backend or jax.default_backend()) == "cpu":
    lib = _library(library)
    if lib == "onednn":
      return "phase_onednn" if features >= 8 else "matmul"
    if lib == "eigen":
      return "phase" if features >= 8 else "matmul"
    return "hybrid"
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
    'phase_onednn' 'phase' on oneDNN's convolution (`conv_onednn`), float32 on the CPU.
    'auto'     (default) `choose_conv_transpose_impl(features)`.
  """

  features: int
  use_bias: bool = True
  impl: str = "auto"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  library: str | None = None  # as Conv's

  @nn.compact
  def __call__(self, x: Array) -> Array:
    impl = (
      choose_conv_transpose_impl(self.features, library=self.library)
      if self.impl == "auto"
      else self.impl
    )
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
