"""oneDNN's convolution through XLA:CPU's custom call (arcvq_jax/models/onednn.py), against
XLA's own convolution and its autodiff gradients."""

import os
import platform
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from device_env import ROOT, without_compilation_cache
from jax import lax

from arcvq_jax.models import layers, onednn
from arcvq_jax.models.vqvae import VQVAE

pytestmark = pytest.mark.skipif(
  not onednn.supported(), reason="this jaxlib cannot run oneDNN's convolution"
)


@pytest.fixture(autouse=True)
def _onednn_allowed(no_persistent_cache):
  """conftest's shared persistent cache keeps the layers off oneDNN: off for these tests."""


def _xla(x, k, strides, pads, rhs_dilation=(1, 1)):
  return lax.conv_general_dilated(
    x, k, strides, pads, rhs_dilation=rhs_dilation, dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _rand(rng, *shape):
  return jnp.asarray(rng.normal(size=shape), jnp.float32)


def test_available_where_jaxlib_links_onednn():
  """x86-64 jaxlib links oneDNN: if a jaxlib upgrade changes the call's config format, the
  probe turns False and the layers silently fall back to Eigen; this says so loudly. With a
  persistent compilation cache the layers do not take it (XLA cannot serialize the call)."""
  assert onednn.available() == (platform.machine().lower() in ("x86_64", "amd64"))
  saved_dir = jax.config.jax_compilation_cache_dir
  jax.config.update("jax_enable_compilation_cache", True)  # the fixture restores it
  jax.config.update("jax_compilation_cache_dir", saved_dir or "/nonexistent/cache")
  try:
    assert not onednn.available()
  finally:
    jax.config.update("jax_compilation_cache_dir", saved_dir)


@pytest.mark.parametrize(
  "strides,pads,rhs_dilation",
  [
    ((1, 1), ((1, 1), (1, 1)), (1, 1)),
    ((2, 1), ((1, 0), (0, 2)), (1, 1)),
    ((1, 1), ((2, 2), (0, 1)), (2, 1)),
  ],
)
def test_conv_general_matches_xla(strides, pads, rhs_dilation):
  rng = np.random.default_rng(0)
  x, k = _rand(rng, 2, 9, 8, 3), _rand(rng, 3, 2, 3, 5)
  want = _xla(x, k, strides, pads, rhs_dilation)
  got = jax.jit(
    lambda x, k: onednn.conv_general(x, k, want.shape, strides, pads, rhs_dilation=rhs_dilation)
  )(x, k)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  # Eager: the primitive runs as its own program.
  eager = onednn.conv_general(x, k, want.shape, strides, pads, rhs_dilation=rhs_dilation)
  np.testing.assert_allclose(eager, want, rtol=1e-5, atol=1e-5)


def test_conv_general_reads_any_axis_order():
  """Operands and result in other layouts than NHWC / HWIO, named by their axes."""
  rng = np.random.default_rng(1)
  x, k = _rand(rng, 2, 7, 6, 4), _rand(rng, 3, 3, 4, 5)
  want = _xla(x, k, (1, 1), ((1, 1), (1, 1)))
  x_nchw, k_oihw = x.transpose(0, 3, 1, 2), k.transpose(3, 2, 0, 1)
  got = onednn.conv_general(
    x_nchw,
    k_oihw,
    (2, 5, 7, 6),
    pads=((1, 1), (1, 1)),
    lhs=(0, 1, 2, 3),
    rhs=(1, 0, 2, 3),
    out=(0, 1, 2, 3),
  )
  np.testing.assert_allclose(got, want.transpose(0, 3, 1, 2), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("pads", [((1, 1), (1, 1)), ((1, 0), (0, 1)), ((0, 2), (2, 0))])
def test_input_grad_stride1_is_xlas(pads):
  rng = np.random.default_rng(2)
  x, k = _rand(rng, 2, 6, 7, 3), _rand(rng, 3, 3, 3, 4)
  y, vjp = jax.vjp(lambda x: _xla(x, k, (1, 1), pads), x)
  g = _rand(rng, *y.shape)
  got = onednn.input_grad_stride1(x.shape, k, pads, g)
  np.testing.assert_allclose(got, vjp(g)[0], rtol=1e-5, atol=1e-5)
  assert onednn.input_grad_stride1(x.shape, k, ((3, 0), (0, 0)), g) is None  # k - 1 - 3 < 0


def test_vmap_runs_once_per_index():
  rng = np.random.default_rng(3)
  x, k = _rand(rng, 3, 2, 5, 5, 2), _rand(rng, 3, 3, 3, 2, 4)
  pads = ((1, 1), (1, 1))
  got = jax.vmap(lambda x, k: onednn.conv(x, k, (1, 1), pads))(x, k)
  want = jnp.stack([_xla(x[i], k[i], (1, 1), pads) for i in range(3)])
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  got = jax.vmap(lambda x: onednn.conv(x, k[0], (1, 1), pads))(x)  # the kernel not mapped
  np.testing.assert_allclose(got[1], _xla(x[1], k[0], (1, 1), pads), rtol=1e-5, atol=1e-5)


def _lowered(fn, *args) -> str:
  return jax.jit(fn).lower(*args).as_text()


def test_forms_fall_back_to_xla(monkeypatch):
  """bfloat16, or a jaxlib without oneDNN: XLA's convolution, no custom call."""
  rng = np.random.default_rng(4)
  x, k = _rand(rng, 2, 6, 6, 4), _rand(rng, 4, 4, 4, 8)
  conv = lambda x, k: layers.conv_onednn(x, k, (2, 2), (1, 1))
  deconv = layers.conv_transpose_4x4s2_phase_onednn
  assert "__onednn$convolution" in _lowered(conv, x, k)
  assert "__onednn$convolution" in _lowered(deconv, x, k)
  xb, kb = x.astype(jnp.bfloat16), k.astype(jnp.bfloat16)
  assert "__onednn" not in _lowered(conv, xb, kb) and "__onednn" not in _lowered(deconv, xb, kb)
  np.testing.assert_array_equal(conv(xb, kb), layers.conv_xla(xb, kb, (2, 2), (1, 1)))
  monkeypatch.setattr(layers.onednn, "available", lambda: False)
  # Fresh functions: jit's trace cache would hand back the earlier traces.
  conv = lambda x, k: layers.conv_onednn(x, k, (2, 2), (1, 1))
  deconv = lambda x, k: layers.conv_transpose_4x4s2_phase_onednn(x, k)
  assert "__onednn" not in _lowered(conv, x, k) and "__onednn" not in _lowered(deconv, x, k)


@pytest.mark.slow
def test_vqvae_on_onednn_matches_eigen():
  """The whole VQ-VAE (no quantiser): loss and every parameter's gradient are Eigen's."""
  rng = np.random.default_rng(5)
  x = _rand(rng, 4, 28, 28, 1)

  def model(lib):
    return VQVAE(
      hidden=16, res_hidden=8, num_res_layers=2, embed_dim=4, channels=1, conv_library=lib
    )

  params = model("eigen").init(jax.random.key(0), x)

  def loss_and_grads(lib):
    m = model(lib)
    loss = lambda p: jnp.mean((m.apply(p, x) - x) ** 2)
    return jax.jit(jax.value_and_grad(loss), compiler_options=layers.compiler_options(lib))(params)

  hlo = jax.jit(lambda p: model("onednn").apply(p, x)).lower(params).as_text()
  assert hlo.count("__onednn$convolution") >= 4
  (l1, g1), (l2, g2) = loss_and_grads("eigen"), loss_and_grads("onednn")
  np.testing.assert_allclose(l2, l1, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(g2), jax.tree.leaves(g1), strict=True):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_main_runs_its_convolutions_on_onednn_without_a_cache(tmp_path):
  """The default run, as a user without a persistent compilation cache starts it: oneDNN's
  convolutions execute (its verbose log names them), and the console stays clean."""
  env = without_compilation_cache(dict(os.environ, JAX_PLATFORMS="cpu", ONEDNN_VERBOSE="1"))
  args = ["--config=configs/tiny.py", f"--workdir={tmp_path / 'run'}", "--config.num_train_steps=2"]
  proc = subprocess.run(
    [sys.executable, "-m", "arcvq_jax.main", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=env,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "exec,cpu,convolution" in proc.stdout, proc.stdout[-3000:]
  assert "Error writing persistent compilation cache" not in proc.stderr
