"""LPIPS against the reference `lpips` package (PyTorch), with the same weights.

The reference net has a random VGG16 trunk (torchvision's own init, seeded, plus random conv
biases) and the REAL v0.1 linear weights that ship inside the lpips package; the trunk's state
dict is saved as a .pth file and converted by our converter CLI, exactly as a user converts
the ImageNet weights.
"""

from __future__ import annotations

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import lpips
import numpy as np
import pytest
import torch
import torchvision
from model_fixtures import random_lpips_params
from skimage import data as skdata
from skimage.transform import resize

from arcvq_jax.convert import lpips_weights
from arcvq_jax.losses import lpips as lpips_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# 64x64 and 48x40: the second halves to 3x2 through odd sizes (6x5 -> 3x2), which the
# max-pools must floor as PyTorch's do.
SIZES = ((64, 64), (48, 40))

# Module-level jitted functions with the params as arguments: tests that use equal shapes
# share one compile, which is most of this file's time on a CPU.
distance = jax.jit(lpips_lib.lpips_distance, static_argnames="dtype")
grad_x = jax.jit(jax.grad(lambda p, x, y: jnp.sum(lpips_lib.lpips_distance(p, x, y)), argnums=1))
features = jax.jit(lambda p, x: lpips_lib.VGG16Features().apply({"params": p}, x))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(reference LPIPS module, our params loaded from the converted file, file paths)."""
  folder = tmp_path_factory.mktemp("lpips")
  torch.manual_seed(0)
  ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False).eval()
  slices = (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5)
  with torch.no_grad():
    for m in torch.nn.ModuleList(slices).modules():
      if isinstance(m, torch.nn.Conv2d):
        # torchvision's init zeroes the biases; random ones let the test see their mapping.
        m.bias.uniform_(-0.1, 0.1)
  # The slices keep torchvision's module indices ('0.weight' .. '28.bias'), so their state
  # dicts are exactly torchvision's `features.*`; a classifier key checks it is ignored.
  trunk = {f"features.{k}": v.clone() for sl in slices for k, v in sl.state_dict().items()}
  trunk["classifier.6.bias"] = torch.zeros(1000)
  vgg_path = str(folder / "vgg16_random.pth")
  torch.save(trunk, vgg_path)
  out = str(folder / "lpips_vgg16.npz")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "arcvq_jax.convert.lpips_weights",
      f"--vgg16={vgg_path}",
      f"--out={out}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return ref, lpips_lib.load_params(out), dict(vgg=vgg_path, out=out)


def photos(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """Two real photo pairs (astronaut vs coffee, chelsea vs rocket): (2, H, W, 3) in [-1, 1]."""

  def prep(img):
    return resize(img, size, anti_aliasing=True).astype(np.float32) * 2 - 1

  x = np.stack([prep(skdata.astronaut()), prep(skdata.chelsea())])
  y = np.stack([prep(skdata.coffee()), prep(skdata.rocket())])
  return x, y


def photos_and_noise(size: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
  """`photos` plus a uniform-noise image against a noisy copy of it: (3, H, W, 3)."""
  x, y = photos(size)
  rng = np.random.default_rng(0)
  noise = rng.uniform(-1, 1, (1, *size, 3)).astype(np.float32)
  noisy = np.clip(noise + rng.normal(0, 0.2, noise.shape), -1, 1).astype(np.float32)
  return np.concatenate([x, noise]), np.concatenate([y, noisy])


def reference(ref, x: np.ndarray, y: np.ndarray, grad: bool = False):
  """The lpips package's distances (B,) and, with grad, d sum / dx (B, H, W, 3)."""
  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=grad)
  ty = torch.tensor(y.transpose(0, 3, 1, 2))
  d = ref(tx, ty).reshape(-1)
  if not grad:
    return d.detach().numpy(), None
  d.sum().backward()
  return d.detach().numpy(), tx.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.slow
@pytest.mark.parametrize("size", SIZES)
def test_matches_the_lpips_package_on_photos_and_noise(converted, size):
  ref, params, _ = converted
  x, y = photos_and_noise(size)
  with torch.no_grad():
    want, _ = reference(ref, x, y)
  got = np.asarray(distance(params, x, y))
  assert got.shape == (3,) and got.dtype == np.float32
  assert np.all(want > 5e-3)  # far from 0: the comparison can fail
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  np.testing.assert_allclose(distance(params, x, x), 0.0, atol=1e-6)


@pytest.mark.slow
def test_features_match_the_reference_trunk(converted):
  ref, params, _ = converted
  x, _ = photos(SIZES[1])
  scaled = (x - np.asarray(lpips_lib.SHIFT, np.float32)) / np.asarray(lpips_lib.SCALE, np.float32)
  ours = features(params["vgg"], scaled)
  with torch.no_grad():
    theirs = ref.net(torch.tensor(scaled.transpose(0, 3, 1, 2)))
  assert len(ours) == len(theirs) == 5
  for a, b in zip(ours, theirs, strict=True):
    b = b.numpy().transpose(0, 2, 3, 1)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=2e-5 * float(np.abs(b).max()), rtol=1e-4)


@pytest.mark.slow
def test_gradient_matches_torch_autograd(converted):
  ref, params, _ = converted
  x, y = photos((32, 32))
  _, want = reference(ref, x, y, grad=True)
  got = grad_x(params, x, y)
  scale = float(np.abs(want).max())
  assert scale > 0
  np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-3)


def test_zero_features_give_finite_gradients():
  # Far outside the data range many ReLU vectors are all zero, where d||f|| is infinite.
  x = np.full((2, 32, 32, 3), -5.0, np.float32)
  g = grad_x(random_lpips_params(2), x, np.zeros_like(x))
  assert np.all(np.isfinite(g))


@pytest.mark.slow
def test_bfloat16_compute_is_float32_and_close(converted):
  _, params, _ = converted
  x, y = photos_and_noise(SIZES[1])
  f32 = distance(params, x, y)
  bf16 = distance(params, x, y, dtype=jnp.bfloat16)
  assert bf16.dtype == jnp.float32
  assert not np.array_equal(bf16, f32)  # the convs did run in bfloat16
  np.testing.assert_allclose(bf16, f32, rtol=0.05)


@pytest.mark.slow
def test_grey_images_are_repeated_to_rgb():
  params = random_lpips_params(1)
  rng = np.random.default_rng(1)
  x, y = (rng.uniform(-1, 1, (3, *SIZES[1], 1)).astype(np.float32) for _ in range(2))
  np.testing.assert_allclose(
    distance(params, x, y), distance(params, np.repeat(x, 3, -1), np.repeat(y, 3, -1)), rtol=1e-6
  )
  with pytest.raises(ValueError, match="1- or 3-channel"):
    lpips_lib.lpips_distance(params, np.zeros((1, 32, 32, 2)), np.zeros((1, 32, 32, 2)))
  with pytest.raises(ValueError, match="one shape"):
    lpips_lib.lpips_distance(params, np.zeros((1, 32, 32, 3)), np.zeros((1, 32, 16, 3)))


@pytest.mark.slow
def test_save_load_round_trip_and_errors(converted, tmp_path):
  _, params, _ = converted
  path = str(tmp_path / "sub" / "copy.npz")
  lpips_lib.save_params(params, path)
  again = lpips_lib.load_params(path)
  assert jax.tree.structure(again) == jax.tree.structure(params)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  assert os.listdir(tmp_path / "sub") == ["copy.npz"]  # no temporary file left behind

  with pytest.raises(
    lpips_lib.LPIPSWeightsError,
    match=r"no LPIPS weights file .*vgg16-397923af\.pth.*"
    r"python -m arcvq_jax\.convert\.lpips_weights --vgg16=",
  ):
    lpips_lib.load_params(str(tmp_path / "none.npz"))
  flat = lpips_lib.to_flat(params)
  flat["vgg/conv3_2/kernel"] = flat["vgg/conv3_2/kernel"][..., :128]
  np.savez(str(tmp_path / "bad.npz"), **flat)
  with pytest.raises(
    lpips_lib.LPIPSWeightsError,
    match=r"'vgg/conv3_2/kernel' has shape \(3, 3, 256, 128\), expected "
    r"\(3, 3, 256, 256\)",
  ):
    lpips_lib.load_params(str(tmp_path / "bad.npz"))
  flat = lpips_lib.to_flat(params)
  del flat["lin/lin4"]
  np.savez(str(tmp_path / "short.npz"), **flat)
  with pytest.raises(lpips_lib.LPIPSWeightsError, match=r"no array 'lin/lin4'"):
    lpips_lib.load_params(str(tmp_path / "short.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip file")
  with pytest.raises(lpips_lib.LPIPSWeightsError, match=r"not a readable \.npz"):
    lpips_lib.load_params(str(tmp_path / "junk.npz"))


@pytest.mark.slow
def test_converter_refuses_what_is_not_vgg16_and_lpips_vgg(converted):
  _, _, paths = converted
  vgg = lpips_weights.load_torch_state(paths["vgg"])
  lin = lpips_weights.load_torch_state(lpips_weights.default_lin_path())
  lpips_weights.convert(vgg, lin)  # the files themselves convert

  missing = {k: v for k, v in vgg.items() if k != "features.28.weight"}
  with pytest.raises(lpips_lib.LPIPSWeightsError, match=r"no 'features\.28\.weight' \(conv5_3\)"):
    lpips_weights.convert(missing, lin)
  grey = {**vgg, "features.0.weight": vgg["features.0.weight"][:, :1]}
  with pytest.raises(
    lpips_lib.LPIPSWeightsError,
    match=r"features\.0\.weight \(conv1_1\) has shape \(64, 1, 3, 3\), "
    r"expected \(64, 3, 3, 3\)",
  ):
    lpips_weights.convert(grey, lin)
  for cfg, batch_norm, first_missing in (("E", False, 17), ("D", True, 2)):  # VGG19, VGG16-BN
    trunk = torchvision.models.vgg.make_layers(torchvision.models.vgg.cfgs[cfg], batch_norm)
    other = {f"features.{k}": v.numpy() for k, v in trunk.state_dict().items()}
    with pytest.raises(
      lpips_lib.LPIPSWeightsError,
      match=rf"no 'features\.{first_missing}\.weight'.*torchvision's VGG16",
    ):
      lpips_weights.convert(other, lin)
  alex = lpips_weights.load_torch_state(
    os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "alex.pth")
  )
  with pytest.raises(
    lpips_lib.LPIPSWeightsError, match=r"lin1\.model\.1\.weight has shape \(1, 192, 1, 1\)"
  ):
    lpips_weights.convert(vgg, alex)
