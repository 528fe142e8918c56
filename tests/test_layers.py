"""Tests for arcvq_jax.models.layers against an independent PyTorch-formula reference."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcvq_jax.models import layers

IMPLS = sorted(layers.CONV_TRANSPOSE_4X4S2_IMPLS)
B, H, W, CIN, COUT = 2, 5, 6, 3, 4


def numpy_conv_transpose(x, w_torch, b_torch, stride=2, padding=1):
  """PyTorch ConvTranspose2d by its definition, NCHW, plain loops.

  x: (B, Cin, H, W); w_torch: (Cin, Cout, k, k); out[o] = sum_{o = s*i - p + k} x[i] w[k].
  """
  n, _, h, w = x.shape
  _, cout, kh, kw = w_torch.shape
  ho, wo = (h - 1) * stride - 2 * padding + kh, (w - 1) * stride - 2 * padding + kw
  out = np.zeros((n, cout, ho, wo), np.float64)
  for i in range(h):
    for j in range(w):
      for ki in range(kh):
        for kj in range(kw):
          oi, oj = stride * i - padding + ki, stride * j - padding + kj
          if 0 <= oi < ho and 0 <= oj < wo:
            out[:, :, oi, oj] += x[:, :, i, j] @ w_torch[:, :, ki, kj]
  return out + b_torch[None, :, None, None]


def jnp_conv_transpose(x, kernel):
  """The same formula in jnp, NHWC, scatter-add per kernel tap (differentiable reference).

  x: (B, H, W, Cin); kernel: (4, 4, Cin, Cout) = torch_w.permute(2, 3, 0, 1).
  """
  n, h, w, _ = x.shape
  cout = kernel.shape[-1]
  # Output index o = 2i - 1 + k; shift by +1 so every o is in range, crop afterwards.
  out = jnp.zeros((n, 2 * h + 2, 2 * w + 2, cout), x.dtype)
  for ki in range(4):
    for kj in range(4):
      tap = jnp.einsum("bhwi,io->bhwo", x, kernel[ki, kj])
      out = out.at[:, ki : ki + 2 * h : 2, kj : kj + 2 * w : 2].add(tap)
  return out[:, 1 : 2 * h + 1, 1 : 2 * w + 1]


def _random_inputs(seed=0, cout=COUT):
  """x (B, Cin, H, W), torch weight (Cin, Cout, 4, 4), torch bias (Cout,), float32."""
  rng = np.random.default_rng(seed)
  x_nchw = rng.standard_normal((B, CIN, H, W)).astype(np.float32)
  w_torch = rng.standard_normal((CIN, cout, 4, 4)).astype(np.float32)
  b_torch = rng.standard_normal((cout,)).astype(np.float32)
  return x_nchw, w_torch, b_torch


def _params_from_torch(w_torch, b_torch):
  # The documented mapping: kernel = torch_w.permute(2, 3, 0, 1), no spatial flip.
  return {
    "params": {"kernel": jnp.asarray(w_torch.transpose(2, 3, 0, 1)), "bias": jnp.asarray(b_torch)}
  }


@pytest.mark.slow
@pytest.mark.parametrize("impl", [*IMPLS, "auto"])
@pytest.mark.parametrize("cout", [1, COUT, 8])
def test_conv_transpose_matches_pytorch_formula(impl, cout):
  # cout=1 and 8 also exercise both branches of impl='auto'.
  x_nchw, w_torch, b_torch = _random_inputs(cout=cout)
  expected = numpy_conv_transpose(
    x_nchw.astype(np.float64), w_torch.astype(np.float64), b_torch.astype(np.float64)
  ).transpose(0, 2, 3, 1)
  module = layers.ConvTranspose4x4S2(cout, impl=impl)
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  variables = module.init(jax.random.key(0), x)
  assert variables["params"]["kernel"].shape == (4, 4, CIN, cout)
  y = module.apply(_params_from_torch(w_torch, b_torch), x)
  assert y.shape == (B, 2 * H, 2 * W, cout)
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)


def test_jnp_reference_matches_numpy_reference():
  x_nchw, w_torch, _ = _random_inputs(1)
  expected = numpy_conv_transpose(
    x_nchw.astype(np.float64), w_torch.astype(np.float64), np.zeros(COUT)
  ).transpose(0, 2, 3, 1)
  y = jnp_conv_transpose(
    jnp.asarray(x_nchw.transpose(0, 2, 3, 1)), jnp.asarray(w_torch.transpose(2, 3, 0, 1))
  )
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_conv_transpose_gradients_agree():
  x_nchw, w_torch, _ = _random_inputs(2)
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  kernel = jnp.asarray(w_torch.transpose(2, 3, 0, 1))
  cotangent = jax.random.normal(jax.random.key(3), (B, 2 * H, 2 * W, COUT))

  def loss(fn):
    # Random linear functional plus a nonlinearity so the gradient depends on the output.
    return lambda x, k: jnp.sum(cotangent * fn(x, k)) + 0.1 * jnp.sum(jnp.tanh(fn(x, k)) ** 2)

  ref_val, (ref_dx, ref_dk) = jax.value_and_grad(loss(jnp_conv_transpose), (0, 1))(x, kernel)
  for impl in IMPLS:
    fn = layers.CONV_TRANSPOSE_4X4S2_IMPLS[impl]
    val, (dx, dk) = jax.jit(jax.value_and_grad(loss(fn), (0, 1)))(x, kernel)
    np.testing.assert_allclose(val, ref_val, rtol=1e-5, err_msg=impl)
    np.testing.assert_allclose(dx, ref_dx, atol=1e-5, rtol=1e-5, err_msg=impl)
    np.testing.assert_allclose(dk, ref_dk, atol=1e-5, rtol=1e-5, err_msg=impl)


def test_flax_conv_transpose_is_the_flipped_kernel():
  """The documented flax.linen.ConvTranspose equivalence (for reference and the benchmark)."""
  x_nchw, w_torch, b_torch = _random_inputs(5)
  x = jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  params = _params_from_torch(w_torch, b_torch)
  flax_ct = nn.ConvTranspose(COUT, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)))
  flipped = {
    "params": {
      "kernel": jnp.flip(params["params"]["kernel"], (0, 1)),
      "bias": params["params"]["bias"],
    }
  }
  np.testing.assert_allclose(
    flax_ct.apply(flipped, x),
    layers.ConvTranspose4x4S2(COUT, impl="xla").apply(params, x),
    atol=1e-5,
    rtol=1e-5,
  )


def test_auto_impl_choice():
  for backend in ("gpu", "tpu"):
    assert layers.choose_conv_transpose_impl(1, backend=backend) == "matmul"
    assert layers.choose_conv_transpose_impl(64, backend=backend) == "phase"
  assert layers.choose_conv_transpose_impl(1, backend="cpu", library="ynn") == "hybrid"
  assert layers.choose_conv_transpose_impl(64, backend="cpu") == "hybrid"


@pytest.mark.slow
def test_conv_transpose_bias_free_and_bad_impl():
  x = jnp.ones((1, 3, 3, 2))
  variables = layers.ConvTranspose4x4S2(5, use_bias=False).init(jax.random.key(0), x)
  assert set(variables["params"]) == {"kernel"}
  with pytest.raises(ValueError, match="impl"):
    layers.ConvTranspose4x4S2(5, impl="nope").init(jax.random.key(0), x)


@pytest.mark.slow
def test_conv_matches_numpy():
  """Conv == torch Conv2d: cross-correlation with symmetric padding, stride."""
  rng = np.random.default_rng(4)
  x = rng.standard_normal((2, 7, 8, 3)).astype(np.float32)
  module = layers.Conv(5, kernel_size=3, strides=2, padding=1)
  variables = module.init(jax.random.key(0), jnp.asarray(x))
  k = np.asarray(variables["params"]["kernel"], np.float64)
  b = np.asarray(variables["params"]["bias"], np.float64)
  xp = np.pad(x.astype(np.float64), ((0, 0), (1, 1), (1, 1), (0, 0)))
  ho, wo = (7 + 2 - 3) // 2 + 1, (8 + 2 - 3) // 2 + 1
  expected = np.zeros((2, ho, wo, 5))
  for i in range(ho):
    for j in range(wo):
      expected[:, i, j] = (
        np.einsum("bhwi,hwio->bo", xp[:, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3], k) + b
      )
  y = module.apply(variables, jnp.asarray(x))
  np.testing.assert_allclose(np.asarray(y), expected, atol=1e-5, rtol=1e-5)


def _check_uniform_bound(values, bound):
  values = np.asarray(values)
  assert np.abs(values).max() <= bound
  assert np.abs(values).max() > 0.98 * bound
  # U(-b, b) has variance b^2 / 3.
  np.testing.assert_allclose(values.var(), bound**2 / 3, rtol=0.05)


@pytest.mark.slow
def test_conv_init_matches_pytorch_bounds():
  cin, cout, k = 64, 128, 3
  variables = layers.Conv(cout, kernel_size=k, padding=1).init(
    jax.random.key(0), jnp.zeros((1, 8, 8, cin))
  )
  bound = 1 / math.sqrt(cin * k * k)  # torch Conv2d: fan_in = Cin * k * k
  _check_uniform_bound(variables["params"]["kernel"], bound)
  bias = np.asarray(variables["params"]["bias"])
  assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.8 * bound


@pytest.mark.slow
def test_conv_transpose_init_matches_pytorch_bounds():
  cin, cout = 128, 64
  variables = layers.ConvTranspose4x4S2(cout).init(jax.random.key(0), jnp.zeros((1, 4, 4, cin)))
  bound = 1 / math.sqrt(cout * 16)  # torch ConvTranspose2d: fan_in = weight.size(1)*k*k = Cout*16
  _check_uniform_bound(variables["params"]["kernel"], bound)
  bias = np.asarray(variables["params"]["bias"])
  assert np.abs(bias).max() <= bound and np.abs(bias).max() > 0.8 * bound
  assert layers.torch_fan_in((4, 4, cin, cout), transpose=True) == 16 * cout
  assert layers.torch_fan_in((3, 3, cin, cout)) == 9 * cin


@pytest.mark.slow
@pytest.mark.parametrize(
  "k,stride,pad,cin", [(3, 1, 1, 5), (4, 2, 1, 3), (1, 1, 0, 4), (3, 2, 0, 2)]
)
def test_conv_gemm_matches_xla_values_and_gradients(k, stride, pad, cin):
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.normal(size=(2, 9, 8, cin)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(k, k, cin, 6)).astype(np.float32))
  f = lambda impl: lambda x, w: jnp.sum(jnp.sin(impl(x, w, (stride, stride), (pad, pad))))
  np.testing.assert_allclose(
    layers.conv_gemm(x, w, (stride, stride), (pad, pad)),
    layers.conv_xla(x, w, (stride, stride), (pad, pad)),
    rtol=1e-5,
    atol=1e-5,
  )
  gx, gw = jax.grad(f(layers.conv_gemm), argnums=(0, 1))(x, w)
  hx, hw = jax.grad(f(layers.conv_xla), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx, hx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, hw, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_conv_module_impls_share_params_and_output():
  x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 8, 8, 4)).astype(np.float32))
  params = layers.Conv(8, 3, padding=1, impl="xla").init(jax.random.PRNGKey(0), x)
  impls = ("xla", "gemm", "hybrid", "phase_grad", "auto")
  outs = [layers.Conv(8, 3, padding=1, impl=i).apply(params, x) for i in impls]
  for o in outs[1:]:
    np.testing.assert_allclose(o, outs[0], rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="Conv impl 'fast'"):
    layers.Conv(8, 3, impl="fast").apply(params, x)


def test_auto_conv_takes_gemm_for_narrow_patches_on_cpu_only():
  ynn = dict(backend="cpu", library="ynn")
  assert layers.choose_conv_impl((3, 3, 64, 64), **ynn) == "gemm"  # 576 wide
  assert layers.choose_conv_impl((3, 3, 128, 128), **ynn) == "hybrid"
  assert layers.choose_conv_impl((1, 1, 256, 64), **ynn) == "gemm"  # a plain GEMM
  for backend in ("gpu", "tpu"):
    assert layers.choose_conv_impl((3, 3, 3, 64), backend=backend) == "xla"
    assert layers.choose_conv_impl((3, 3, 128, 128), backend=backend) == "xla"


# (k, stride, pad, Cin, Cout): 'same' stride-1 convs with Cout < Cin take the kernel gradient
# from the cotangent's taps, the others from the input's; valid, strided, 1x1, 5x5.
HYBRID_CASES = [
  (3, 1, 1, 6, 4),
  (3, 1, 1, 4, 6),
  (4, 2, 1, 3, 5),
  (3, 2, 0, 2, 3),
  (1, 1, 0, 5, 3),
  (5, 1, 2, 7, 2),
  (3, 1, 0, 4, 2),
]


@pytest.mark.slow
@pytest.mark.parametrize("k,stride,pad,cin,cout", HYBRID_CASES)
def test_conv_hybrid_matches_xla_values_and_gradients(k, stride, pad, cin, cout):
  rng = np.random.default_rng(11)
  x = jnp.asarray(rng.normal(size=(2, 9, 8, cin)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32))
  st, pd = (stride, stride), (pad, pad)
  np.testing.assert_allclose(
    jax.jit(layers.conv_hybrid, static_argnums=(2, 3))(x, w, st, pd),
    layers.conv_xla(x, w, st, pd),
    rtol=1e-5,
    atol=1e-5,
  )
  f = lambda conv: lambda x, w: jnp.sum(jnp.sin(conv(x, w, st, pd)))
  gx, gw = jax.jit(jax.grad(f(layers.conv_hybrid), argnums=(0, 1)))(x, w)
  hx, hw = jax.grad(f(layers.conv_xla), argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gx, hx, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, hw, rtol=1e-4, atol=1e-4)
  # The kernel gradient alone, for an arbitrary cotangent.
  y, vjp = jax.vjp(lambda w: layers.conv_xla(x, w, st, pd), w)
  g = jnp.asarray(rng.normal(size=y.shape).astype(np.float32))
  np.testing.assert_allclose(
    layers.conv_kernel_grad(x, g, w.shape, st, pd), vjp(g)[0], rtol=1e-4, atol=1e-4
  )


# (form, kernel, stride, padding, input (H, W), Cin, Cout): the custom-VJP forms against torch.
# phase_grad: its phase-form input gradient on even inputs, XLA's where the input is odd or
# the shape is not 4x4 / 2 / 1; hybrid: its GEMM kernel gradient (both contraction orders).
CUSTOM_VJP_CASES = (
  [
    ("phase_grad", 4, 2, 1, (8, 10), 3, 5),
    ("phase_grad", 4, 2, 1, (9, 8), 3, 5),
    ("phase_grad", 3, 1, 1, (6, 6), 3, 5),
    ("phase_grad", 4, 2, 0, (10, 10), 3, 5),
  ]
  + [("hybrid", k, s, p, (9, 8), cin, cout) for k, s, p, cin, cout in HYBRID_CASES[:3]]
  + [
    # onednn: the flipped-kernel input gradient (stride 1), the phase form (4x4 / 2 / 1, even),
    # XLA's (odd input, other strides); Eigen's kernel gradient, or the GEMMs where the conv is
    # a stride-1 'same' one to at most half the channels (8 -> 3).
    ("onednn", 3, 1, 1, (6, 7), 3, 5),
    ("onednn", 3, 1, 1, (6, 6), 8, 3),
    ("onednn", 3, 1, 0, (6, 6), 3, 5),
    ("onednn", 4, 2, 1, (8, 10), 3, 5),
    ("onednn", 4, 2, 1, (9, 8), 3, 5),
    ("onednn", 3, 2, 0, (9, 8), 2, 3),
    ("onednn", 1, 1, 0, (5, 5), 4, 6),
  ]
)


@pytest.mark.parametrize("form,k,stride,pad,hw,cin,cout", CUSTOM_VJP_CASES)
def test_custom_vjp_conv_forms_match_torch_values_and_gradients(
  form, k, stride, pad, hw, cin, cout, request
):
  torch = pytest.importorskip("torch")
  if form == "onednn":
    request.getfixturevalue("no_persistent_cache")  # else the form falls back to XLA's
    assert layers.onednn.available() == layers.onednn.supported()
  rng = np.random.default_rng(14)
  x = rng.normal(size=(2, *hw, cin)).astype(np.float32)
  w = rng.normal(size=(k, k, cin, cout)).astype(np.float32)
  xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
  wt = torch.tensor(w.transpose(3, 2, 0, 1), requires_grad=True)  # (Cout, Cin, k, k)
  yt = torch.nn.functional.conv2d(xt, wt, stride=stride, padding=pad)
  torch.sin(yt).sum().backward()
  conv = lambda x, w: layers.CONV_FORMS[form](x, w, (stride, stride), (pad, pad))
  loss = lambda x, w: jnp.sum(jnp.sin(conv(x, w)))
  y = conv(jnp.asarray(x), jnp.asarray(w))
  gx, gw = jax.jit(jax.grad(loss, argnums=(0, 1)))(jnp.asarray(x), jnp.asarray(w))
  np.testing.assert_allclose(y, yt.detach().numpy().transpose(0, 2, 3, 1), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(gw, wt.grad.numpy().transpose(2, 3, 1, 0), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("cout", [1, COUT, 8])
def test_conv_transpose_hybrid_gradients_match_torch(cout):
  torch = pytest.importorskip("torch")
  x_nchw, w_torch, b_torch = _random_inputs(13, cout=cout)
  xt = torch.tensor(x_nchw, requires_grad=True)
  wt = torch.tensor(w_torch, requires_grad=True)
  bt = torch.tensor(b_torch, requires_grad=True)
  yt = torch.nn.functional.conv_transpose2d(xt, wt, bt, stride=2, padding=1)
  torch.sin(yt).sum().backward()
  module = layers.ConvTranspose4x4S2(cout, impl="hybrid")
  params = _params_from_torch(w_torch, b_torch)
  loss = lambda p, x: jnp.sum(jnp.sin(module.apply(p, x)))
  gp, gx = jax.jit(jax.grad(loss, argnums=(0, 1)))(
    params, jnp.asarray(x_nchw.transpose(0, 2, 3, 1))
  )
  np.testing.assert_allclose(gx, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(
    gp["params"]["kernel"], wt.grad.numpy().transpose(2, 3, 0, 1), rtol=1e-4, atol=1e-4
  )
  np.testing.assert_allclose(gp["params"]["bias"], bt.grad.numpy(), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(
  "flags,library",
  [
    ("", "ynn"),
    ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution", "eigen"),
    ("--xla_cpu_experimental_ynn_fusion_type=+individual_convolution", "ynn"),
    ("--xla_cpu_experimental_ynn_fusion_type=dot,eltwise", "eigen"),
    ("--xla_cpu_experimental_ynn_fusion_type=dot,individual_convolution", "ynn"),
  ],
)
def test_cpu_conv_library_reads_xla_flags(monkeypatch, flags, library):
  monkeypatch.setenv("XLA_FLAGS", flags)
  assert layers.cpu_conv_library() == library
  assert layers.choose_conv_impl((3, 3, 128, 128), backend="cpu") == (
    "xla" if library == "eigen" else "hybrid"
  )


def test_auto_forms_for_eigen_convolutions():
  eigen = dict(backend="cpu", library="eigen")
  assert layers.choose_conv_impl((3, 3, 128, 128), **eigen) == "xla"
  assert layers.choose_conv_impl((3, 3, 64, 64), **eigen) == "xla"
  same = dict(strides=(1, 1), padding=(1, 1))  # the residual 3x3 (128 -> 32): GEMM kernel grad
  assert layers.choose_conv_impl((3, 3, 128, 32), **eigen, **same) == "hybrid"
  assert layers.choose_conv_impl((3, 3, 128, 64), **eigen, **same) == "hybrid"
  assert layers.choose_conv_impl((3, 3, 128, 96), **eigen, **same) == "xla"  # not half as wide
  assert layers.choose_conv_impl((3, 3, 128, 32), **eigen) == "xla"  # padding 0: not 'same'
  assert layers.choose_conv_impl((3, 3, 128, 32), **eigen, strides=(2, 2), padding=(1, 1)) == "xla"
  assert layers.choose_conv_impl((1, 1, 128, 64), **eigen) == "gemm"
  down = dict(strides=(2, 2), padding=(1, 1))
  assert layers.choose_conv_impl((4, 4, 64, 128), **eigen, **down) == "phase_grad"
  ynn = dict(backend="cpu", library="ynn")
  assert layers.choose_conv_impl((4, 4, 64, 128), **ynn, **down) == "hybrid"  # Eigen only
  assert layers.choose_conv_impl((3, 3, 64, 128), **eigen, **down) == "xla"
  assert layers.choose_conv_transpose_impl(64, **eigen) == "phase"
  assert layers.choose_conv_transpose_impl(1, **eigen) == "matmul"
  assert layers.choose_conv_impl((4, 4, 1, 64), **eigen, **down) == "gemm"  # 16 <= 64 wide
  assert layers.choose_conv_impl((3, 3, 128, 128), backend="gpu", library="eigen") == "xla"
  with pytest.raises(ValueError, match="conv library 'nope'"):
    layers.choose_conv_impl((3, 3, 8, 8), backend="cpu", library="nope")


@pytest.mark.parametrize("runs_onednn", [True, False])
def test_auto_forms_for_onednn_convolutions(monkeypatch, runs_onednn):
  """'onednn' takes oneDNN for every convolution but the GEMM ones (1x1, an image's first
  layer), the phase form on oneDNN for transposed ones; Eigen's forms where this jaxlib cannot
  run oneDNN's convolution; XLA's off the CPU."""
  monkeypatch.setattr(layers.onednn, "available", lambda: runs_onednn)
  onednn = dict(backend="cpu", library="onednn")
  same, down = dict(strides=(1, 1), padding=(1, 1)), dict(strides=(2, 2), padding=(1, 1))
  assert layers.choose_conv_impl((3, 3, 128, 32), **onednn, **same) == (
    "onednn" if runs_onednn else "hybrid"
  )
  assert layers.choose_conv_impl((4, 4, 64, 128), **onednn, **down) == (
    "onednn" if runs_onednn else "phase_grad"
  )
  assert layers.choose_conv_impl((3, 3, 64, 128), **onednn, **same) == (
    "onednn" if runs_onednn else "xla"
  )
  assert layers.choose_conv_impl((1, 1, 128, 64), **onednn) == "gemm"
  assert layers.choose_conv_impl((4, 4, 1, 64), **onednn, **down) == "gemm"
  assert layers.choose_conv_transpose_impl(64, **onednn) == (
    "phase_onednn" if runs_onednn else "phase"
  )
  assert layers.choose_conv_transpose_impl(1, **onednn) == "matmul"
  assert layers.choose_conv_impl((3, 3, 64, 64), backend="gpu", library="onednn") == "xla"
  assert layers.choose_conv_transpose_impl(64, backend="gpu", library="onednn") == "phase"
  assert layers.compiler_options("onednn") == layers.compiler_options("eigen")


@pytest.mark.slow
def test_modules_pick_their_forms_for_their_library():
  """A module built for Eigen takes Eigen's forms (and its compile options), whatever the
  process default; its output is the same."""
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 8, 8, 16)), jnp.float32)
  params = layers.Conv(32, 3, padding=1).init(jax.random.PRNGKey(0), x)
  ynn = layers.Conv(32, 3, padding=1, library="ynn").apply(params, x)
  eigen = jax.jit(
    lambda p, x: layers.Conv(32, 3, padding=1, library="eigen").apply(p, x),
    compiler_options=layers.compiler_options("eigen"),
  )(params, x)
  np.testing.assert_allclose(eigen, ynn, rtol=1e-5, atol=1e-5)
  assert layers.compiler_options("ynn") is None and layers.compiler_options(None) is None
