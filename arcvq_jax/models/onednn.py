"""oneDNN's convolution inside an XLA:CPU program (docs/architecture.md, "oneDNN convolutions").

XLA:CPU (jaxlib 0.10) links oneDNN and runs a custom call with target `__onednn$convolution`
as a oneDNN forward convolution (its `OneDnnOpThunk`), configured by the `onednn_conv_config`
field of the call's backend config. XLA only emits such calls itself from a rewriter that this
build leaves off; `conv_general` emits the call directly. It is the convolution PyTorch runs on
the CPU, and on the VQ-VAE's layers it ran the forward pass 1.1-1.4x and the stride-1 input
gradient 1.2-2.1x faster than XLA's Eigen convolution (bench/bench_conv_layers.py).

Only the forward primitive is reachable, so `layers.conv_onednn` takes its input gradient as
a forward convolution too (`input_grad_stride1`; the phase form of the transposed
convolution for a 4x4 kernel at stride 2) and leaves the kernel gradient to XLA or GEMMs:
oneDNN's forward kernels run it, with the batch as the contraction, hundreds of times slower
than Eigen's.

`supported()` says whether this jaxlib can run the call (x86 builds with oneDNN), `available()`
whether programs may use it now (not while JAX's persistent compilation cache is on); where
not, `layers` falls back to Eigen. float32 only. Under `vmap` the call runs once per mapped index;
it has no sharding rule, so on several CPU devices XLA gives it whole operands (correct, not
fast; on GPU / TPU the layers never choose it).
"""

from __future__ import annotations

import functools
import json
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.extend.core import Primitive
from jax.interpreters import batching, mlir

Array = jax.Array
Pads = tuple[tuple[int, int], tuple[int, int]]

# (batch or out-feature, feature or in-feature, spatial, spatial): the axes of each operand
# as oneDNN's config names them; NHWC activations and HWIO kernels by default.
_NHWC = (0, 3, 1, 2)
_HWIO = (2, 3, 0, 1)  # (input feature, output feature, spatial...)

_conv_p = Primitive("onednn_convolution")


def _abstract_eval(x, kernel, *, out_shape, **_):
  return jax.core.ShapedArray(out_shape, x.dtype)


def _impl(x, kernel, **params):
  # Outside jit (eager calls) the primitive runs as its own small program.
  return jax.jit(lambda x, kernel: _conv_p.bind(x, kernel, **params))(x, kernel)


def _batch(args, dims, **params):
  # Under vmap: one call per mapped index (the call has no batch dimension of its own to
  # fold a mapped one into in every layout), stacked.
  size = next(a.shape[d] for a, d in zip(args, dims, strict=True) if d is not None)
  at = lambda a, d, i: a if d is None else lax.index_in_dim(a, i, d, False)
  outs = [
    _conv_p.bind(*(at(a, d, i) for a, d in zip(args, dims, strict=True)), **params)
    for i in range(size)
  ]
  return jnp.stack(outs), 0


_conv_p.def_abstract_eval(_abstract_eval)
_conv_p.def_impl(_impl)
batching.primitive_batchers[_conv_p] = _batch


def _backend_config(lhs, rhs, out, strides, pads, rhs_dilation) -> str:
  """The call's backend config: an xla.cpu.BackendConfig with its onednn_conv_config (JSON).

  Dimensions are 0-based axes of each operand; strides, paddings and the kernel's dilation
  are the plain values (jaxlib 0.10's encoding: XLA subtracts one from the dilation itself,
  oneDNN counting 0 for an undilated kernel).
  """

  def data(axes):
    return {
      "dims": 4,
      "data": {"batch_dim": axes[0], "feature_dim": axes[1], "spatial_dims": list(axes[2:])},
    }

  filt = {"input_feature_dim": rhs[0], "output_feature_dim": rhs[1], "spatial_dims": list(rhs[2:])}
  config = {
    "dims": 4,
    "input": data(lhs),
    "kernel": {"dims": 4, "filter": filt},
    "output": data(out),
    "window": {
      "pad_left": [p[0] for p in pads],
      "pad_right": [p[1] for p in pads],
      "strides": list(strides),
      "window_dilations": list(rhs_dilation),
    },
    "feature_groups": 1,
  }
  return json.dumps({"onednn_conv_config": config})


def _lower(ctx, x, kernel, *, out_shape, lhs, rhs, out, strides, pads, rhs_dilation):
  (out_aval,) = ctx.avals_out
  # Row-major operands and result: the config's axes name positions in these layouts.
  # jax.interpreters.mlir has no public custom_call; jax's own lowering helper is used.
  from jax._src.interpreters.mlir import custom_call  # noqa: PLC0415

  op = custom_call(
    "__onednn$convolution",
    result_types=[mlir.aval_to_ir_type(ctx.module_context, out_aval)],
    operands=[x, kernel],
    backend_config=_backend_config(lhs, rhs, out, strides, pads, rhs_dilation),
    api_version=1,
    operand_layouts=[(3, 2, 1, 0), (3, 2, 1, 0)],
    result_layouts=[(3, 2, 1, 0)],
  )
  return op.results


mlir.register_lowering(_conv_p, _lower, platform="cpu")


def conv_general(
  x: Array,
  kernel: Array,
  out_shape: Sequence[int],
  strides: tuple[int, int] = (1, 1),
  pads: Pads = ((0, 0), (0, 0)),
  lhs: Sequence[int] = _NHWC,
  rhs: Sequence[int] = _HWIO,
  out: Sequence[int] = _NHWC,
  rhs_dilation: tuple[int, int] = (1, 1),
) -> Array:
  """One oneDNN forward convolution (cross-correlation), no autodiff.

  x, kernel: 4-D float32; lhs / out: the (batch, feature, spatial, spatial) axes of x and of
  the result, rhs: the (input feature, output feature, spatial, spatial) axes of kernel;
  out_shape: the result's shape (the caller's arithmetic); pads: ((lo, hi), (lo, hi)) zero
  padding of x's spatial axes. oneDNN reorders the kernel to its own layout on every call,
  and x and the result are fastest in NHWC (other layouts take reference kernels).
  """
  return _conv_p.bind(
    x,
    kernel,
    out_shape=tuple(int(n) for n in out_shape),
    lhs=tuple(lhs),
    rhs=tuple(rhs),
    out=tuple(out),
    strides=tuple(strides),
    pads=tuple(tuple(p) for p in pads),
    rhs_dilation=tuple(rhs_dilation),
  )


def _out_hw(in_hw, kernel_hw, strides, pads) -> tuple[int, int]:
  return tuple(
    (n + lo + hi - k) // s + 1
    for n, k, s, (lo, hi) in zip(in_hw, kernel_hw, strides, pads, strict=True)
  )


def _conv_xla(x: Array, kernel: Array, strides, pads) -> Array:
  return lax.conv_general_dilated(
    x, kernel, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def conv(x: Array, kernel: Array, strides: tuple[int, int], pads: Pads) -> Array:
  """`lax.conv_general_dilated(x, kernel, strides, pads)` (NHWC, HWIO) on oneDNN, no autodiff.

  x: (B, H, W, Cin) float32; kernel: (kh, kw, Cin, Cout); pads ((lo, hi), (lo, hi)).
  """
  b, h, w, _ = x.shape
  kh, kw, _, cout = kernel.shape
  ho, wo = _out_hw((h, w), (kh, kw), strides, pads)
  return conv_general(x, kernel, (b, ho, wo, cout), strides, pads)


def input_grad_stride1(x_shape: Sequence[int], kernel: Array, pads: Pads, g: Array) -> Array | None:
  """The input gradient of a stride-1 `conv` for the cotangent g (B, H', W', Cout), as one
  oneDNN forward convolution: g correlated with the spatially flipped kernel, its input and
  output features swapped (oneDNN reads the kernel in any layout), padded by k - 1 - lo and
  k - 1 - hi. None where that padding would be negative."""
  kh, kw = kernel.shape[:2]
  grad_pads = tuple((k - 1 - lo, k - 1 - hi) for k, (lo, hi) in zip((kh, kw), pads, strict=True))
  if min(min(p) for p in grad_pads) < 0:
    return None
  flipped = jnp.flip(kernel, (0, 1))
  return conv_general(g, flipped, tuple(x_shape), (1, 1), grad_pads, rhs=(3, 2, 0, 1))


def available() -> bool:
  """Whether programs traced now may use `conv_general`: this jaxlib runs the call
  (`supported`) and JAX's persistent compilation cache is off.

  XLA:CPU cannot serialize a program with these calls (its serializer takes the oneDNN
  thunk for a plain custom-call thunk: jaxlib 0.10.2 raised std::bad_alloc, and reading a
  thunk as another type may do worse), so with the cache on (`jax_compilation_cache_dir`,
  e.g. from JAX_COMPILATION_CACHE_DIR) the layers take Eigen's forms instead.
  """
  return not _persistent_cache_on() and supported()


def _persistent_cache_on() -> bool:
  return bool(jax.config.jax_compilation_cache_dir) and jax.config.jax_enable_compilation_cache


@functools.cache
def supported() -> bool:
  """Whether XLA:CPU here runs `__onednn$convolution` calls, and right: compiles and runs one
  small convolution against XLA's own (once per process; never written to a persistent
  compilation cache). False off the CPU, on builds
  without oneDNN, or where the call's config format differs from the one written here."""
  if jax.default_backend() != "cpu":
    return False
  rng = np.random.default_rng(0)
  x = rng.normal(size=(2, 5, 5, 3)).astype(np.float32)
  k = rng.normal(size=(3, 3, 3, 4)).astype(np.float32)
  pads = ((1, 0), (0, 1))
  # Called while a model is traced: evaluate here, do not stage into the caller's program;
  # and never write the probe to a persistent cache (jax's thread-local setting).
  from jax._src.config import persistent_cache_min_compile_time_secs as min_secs  # noqa: PLC0415

  with jax.ensure_compile_time_eval(), min_secs(1e9):
    try:
      got = jax.jit(lambda x, k: conv_general(x, k, (2, 4, 4, 4), (1, 1), pads))(x, k)
      got = np.asarray(got)
    except Exception:  # any failure to build or run the call means "not here"
      return False
    want = np.asarray(_conv_xla(x, k, (1, 1), pads))
  return bool(np.allclose(got, want, rtol=1e-4, atol=1e-4))
