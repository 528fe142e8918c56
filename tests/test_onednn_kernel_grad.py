"""oneDNN's backward-weights convolution through our FFI handler
(arcvq_jax/models/onednn_kernel_grad.py), against XLA's own kernel gradients."""

import importlib.metadata
import os
import platform
import shutil
import subprocess

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from arcvq_jax.models import layers, onednn, onednn_kernel_grad


def _extra_installed() -> bool:
  try:
    importlib.metadata.version("onednn-devel-cpu-gomp")
  except importlib.metadata.PackageNotFoundError:
    return False
  return True


X86 = platform.machine().lower() in ("x86_64", "amd64")
COMPILER = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
needs_handler = pytest.mark.skipif(
  not onednn_kernel_grad.available(), reason="no oneDNN handler here (the `onednn` extra)"
)


def _xla_kernel_grad(x, g, kernel_shape, strides, pads):
  conv = lambda k: lax.conv_general_dilated(
    x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  return jax.vjp(conv, jnp.zeros(kernel_shape, jnp.float32))[1](g)[0]


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def test_available_where_the_extra_is_installed():
  """The test extras install oneDNN: on an x86 machine with a compiler the handler must
  build, load and agree, or the layers would quietly keep Eigen's kernel gradients."""
  reason = onednn_kernel_grad.unavailable_reason()
  if X86 and COMPILER and _extra_installed():
    assert onednn_kernel_grad.available(), reason
  else:
    assert not onednn_kernel_grad.available() and reason


@needs_handler
@pytest.mark.parametrize("chunks_per_thread", [1, 3])  # batch 5 on 2 threads: 3 + 2, 5 x 1
@pytest.mark.parametrize(
  "x_shape, kernel_shape, strides, pads",
  [
    ((5, 14, 14, 16), (4, 4, 16, 24), (2, 2), ((1, 1), (1, 1))),  # encoder conv_2's form
    ((2, 7, 7, 24), (3, 3, 24, 8), (1, 1), ((1, 1), (1, 1))),  # the residual 3x3's
    ((2, 6, 5, 4), (1, 1, 4, 6), (1, 1), ((0, 0), (0, 0))),
    ((2, 9, 8, 3), (3, 2, 3, 5), (2, 1), ((1, 0), (0, 2))),  # uneven, non-square
    ((1, 10, 11, 2), (5, 5, 2, 3), (3, 3), ((2, 1), (0, 2))),
  ],
)
def test_kernel_grad_is_xlas(monkeypatch, chunks_per_thread, x_shape, kernel_shape, strides, pads):
  """Whatever the chunks of the batch: their partial gradients, in oneDNN's blocked layouts
  (which may differ between chunk sizes), summed."""
  monkeypatch.setattr(onednn_kernel_grad, "CHUNKS_PER_THREAD", chunks_per_thread)
  rng = np.random.default_rng(0)
  x = _rand(rng, *x_shape)
  out_hw = [
    (n + lo + hi - k) // s + 1
    for n, k, s, (lo, hi) in zip(x_shape[1:3], kernel_shape[:2], strides, pads, strict=True)
  ]
  g = _rand(rng, x_shape[0], *out_hw, kernel_shape[3])
  want = _xla_kernel_grad(x, g, kernel_shape, strides, pads)
  got = jax.jit(lambda x, g: onednn_kernel_grad.kernel_grad(x, g, kernel_shape, strides, pads))(
    x, g
  )
  assert got.shape == tuple(kernel_shape)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_handler
def test_kernel_grad_under_vmap_and_a_wrong_cotangent():
  rng = np.random.default_rng(1)
  x, g = _rand(rng, 3, 2, 6, 6, 3), _rand(rng, 3, 2, 6, 6, 4)
  spec = ((3, 3, 3, 4), (1, 1), ((1, 1), (1, 1)))
  got = jax.vmap(lambda x, g: onednn_kernel_grad.kernel_grad(x, g, *spec))(x, g)
  want = jnp.stack([_xla_kernel_grad(x[i], g[i], *spec) for i in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
  with pytest.raises(ValueError, match=r"g should be \(2, 6, 6, 4\)"):
    onednn_kernel_grad.kernel_grad(x[0], g[0, :, :5], *spec)


@needs_handler
@pytest.mark.parametrize(
  "kernel_shape, strides, padding",
  [((4, 4, 8, 16), (2, 2), (1, 1)), ((3, 3, 16, 8), (1, 1), (1, 1))],  # wide; narrowing 'same'
)
def test_conv_onednn_takes_its_kernel_gradients_from_the_handler(
  monkeypatch, no_persistent_cache, kernel_shape, strides, padding
):
  """`layers.conv_onednn`'s kernel gradient is the handler's call where it runs, and equal to
  the one it takes without it (Eigen's, or the GEMMs of the narrowing 'same' convolution)."""
  assert onednn.available()
  rng = np.random.default_rng(2)
  x, k = _rand(rng, 2, 8, 8, kernel_shape[2]), _rand(rng, *kernel_shape)

  def grads():  # a fresh function: jit's trace cache would hand back the earlier trace
    loss = lambda x, k: jnp.sum(jnp.sin(layers.conv_onednn(x, k, strides, padding)))
    fn = jax.jit(jax.grad(loss, argnums=(0, 1)))
    return fn.lower(x, k).as_text(), fn(x, k)

  hlo, (dx, dk) = grads()
  assert onednn_kernel_grad.TARGET in hlo
  monkeypatch.setattr(onednn_kernel_grad, "available", lambda: False)
  hlo_without, (dx_without, dk_without) = grads()
  assert onednn_kernel_grad.TARGET not in hlo_without
  np.testing.assert_allclose(dk, dk_without, rtol=1e-4, atol=1e-4)
  np.testing.assert_array_equal(dx, dx_without)


def test_no_onednn_says_how_to_install(monkeypatch, tmp_path):
  monkeypatch.setattr(onednn_kernel_grad.sys, "prefix", str(tmp_path))
  reason = onednn_kernel_grad._load.__wrapped__()
  if X86:
    assert "pip install -e '.[onednn]'" in reason, reason
  else:
    assert "x86" in reason, reason


@pytest.mark.skipif(not (X86 and _extra_installed()), reason="needs the `onednn` extra")
def test_no_compiler_is_named(monkeypatch, tmp_path):
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
  with pytest.raises(RuntimeError, match="no-such-g\\+\\+"):
    onednn_kernel_grad._cached_build(onednn_kernel_grad._onednn_prefix())


@pytest.mark.slow
@needs_handler
def test_build_is_cached_and_a_damaged_file_built_again(monkeypatch, tmp_path):
  """The first process compiles into the cache directory, later ones load the file; a cached
  file that does not load is set aside (kept, renamed) and compiled again."""
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
  prefix = onednn_kernel_grad._onednn_prefix()
  library = onednn_kernel_grad._cached_build(prefix)
  assert os.path.dirname(library) == str(tmp_path / "arcvq_jax")
  assert os.listdir(tmp_path / "arcvq_jax") == [os.path.basename(library)]  # no temporaries

  def no_compiler(*args, **kwargs):
    raise AssertionError("compiled again although the file is cached")

  with monkeypatch.context() as m:
    m.setattr(subprocess, "run", no_compiler)
    assert onednn_kernel_grad._cached_build(prefix) == library
  with open(library, "wb") as f:
    f.write(b"not a shared library")
  handler = onednn_kernel_grad._open(prefix)  # set aside, built again, loaded
  assert handler.__name__ == onednn_kernel_grad.SYMBOL
  with open(library + ".damaged", "rb") as f:
    assert f.read() == b"not a shared library"
  with open(library, "rb") as f:
    assert f.read(4) == b"\x7fELF"
