"""LPIPS against the reference `lpips` package (PyTorch), with the same weights.

The reference net has a random VGG16 trunk (torchvision's own init, seeded) and the REAL v0.1
linear weights that ship inside the lpips package; the trunk's state dict is saved as a .pth
file and converted by our converter CLI, exactly as a user converts the ImageNet weights.
"""

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
from skimage import data as skdata
from skimage.transform import resize

from arcvq_jax.convert import lpips_weights
from arcvq_jax.losses import lpips as lpips_lib
from model_fixtures import random_lpips_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(reference LPIPS module, our params loaded from the converted file, file paths)."""
  folder = tmp_path_factory.mktemp("lpips")
  torch.manual_seed(0)
  vgg = torchvision.models.vgg16()  # random trunk, torchvision's init
  vgg_path = str(folder / "vgg16_random.pth")
  torch.save(vgg.state_dict(), vgg_path)
  out = str(folder / "lpips_vgg16.npz")
  proc = subprocess.run(
      [sys.executable, "-m", "arcvq_jax.convert.lpips_weights", f"--vgg16={vgg_path}",
       f"--out={out}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]

  ref = lpips.LPIPS(net="vgg", pretrained=True, pnet_rand=True, verbose=False)
  features = {f"{k}": v for k, v in vgg.features.state_dict().items()}
  for i, sl in enumerate((ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4,
                          ref.net.slice5)):
    sl.load_state_dict({k: features[k] for k in sl.state_dict()})
  ref.eval()
  return ref, lpips_lib.load_params(out), dict(vgg=vgg_path, out=out)


def photos(size):
  """Two real photo pairs (astronaut vs coffee, chelsea vs rocket) in [-1, 1], NHWC."""
  def prep(img):
    return resize(img, size, anti_aliasing=True).astype(np.float32) * 2 - 1
  x = np.stack([prep(skdata.astronaut()), prep(skdata.chelsea())])
  y = np.stack([prep(skdata.coffee()), prep(skdata.rocket())])
  return x, y


def reference(ref, x, y, grad=False):
  tx = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=grad)
  ty = torch.tensor(y.transpose(0, 3, 1, 2))
  d = ref(tx, ty).reshape(-1)
  if not grad:
    return d.detach().numpy(), None
  d.sum().backward()
  return d.detach().numpy(), tx.grad.numpy().transpose(0, 2, 3, 1)


@pytest.mark.parametrize("size", [(64, 64), (48, 40)])
def test_matches_the_lpips_package_on_photos_and_noise(converted, size):
  ref, params, _ = converted
  x, y = photos(size)
  rng = np.random.default_rng(0)
  x = np.concatenate([x, rng.uniform(-1, 1, (1, *size, 3)).astype(np.float32)])
  y = np.concatenate([y, np.clip(x[-1:] + rng.normal(0, 0.2, x[-1:].shape), -1, 1).astype(np.float32)])
  want, _ = reference(ref, x, y)
  got = np.asarray(jax.jit(lpips_lib.lpips_distance)(params, x, y))
  assert got.shape == (3,) and got.dtype == np.float32
  assert np.all(want > 1e-3)  # far from 0: the comparison can fail
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  same = np.asarray(jax.jit(lpips_lib.lpips_distance)(params, x, x))
  np.testing.assert_allclose(same, 0.0, atol=1e-6)


def test_features_match_the_reference_trunk(converted):
  ref, params, _ = converted
  x, _ = photos((48, 48))
  scaled = (x - np.asarray(lpips_lib.SHIFT, np.float32)) / np.asarray(lpips_lib.SCALE, np.float32)
  ours = lpips_lib.VGG16Features().apply({"params": params["vgg"]}, jnp.asarray(scaled))
  theirs = ref.net(torch.tensor(scaled.transpose(0, 3, 1, 2)))
  for a, b in zip(ours, theirs):
    b = b.detach().numpy().transpose(0, 2, 3, 1)
    assert a.shape == b.shape
    np.testing.assert_allclose(a, b, atol=2e-5 * float(np.abs(b).max()), rtol=1e-4)


def test_gradient_matches_torch_autograd(converted):
  ref, params, _ = converted
  x, y = photos((40, 40))
  _, want = reference(ref, x, y, grad=True)
  got = jax.jit(jax.grad(lambda a: jnp.sum(lpips_lib.lpips_distance(params, a, y))))(x)
  scale = float(np.abs(want).max())
  assert scale > 0
  np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=1e-3)


def test_bfloat16_compute_is_float32_and_close(converted):
  _, params, _ = converted
  x, y = photos((64, 64))
  f32 = lpips_lib.lpips_distance(params, x, y)
  bf16 = jax.jit(lambda a, b: lpips_lib.lpips_distance(params, a, b, dtype=jnp.bfloat16))(x, y)
  assert bf16.dtype == jnp.float32
  np.testing.assert_allclose(bf16, f32, rtol=0.05)


def test_grey_images_are_repeated_to_rgb():
  params = random_lpips_params(1)
  rng = np.random.default_rng(1)
  x, y = (rng.uniform(-1, 1, (2, 32, 32, 1)).astype(np.float32) for _ in range(2))
  np.testing.assert_allclose(
      lpips_lib.lpips_distance(params, x, y),
      lpips_lib.lpips_distance(params, np.repeat(x, 3, -1), np.repeat(y, 3, -1)), rtol=1e-6)
  with pytest.raises(ValueError, match="1- or 3-channel"):
    lpips_lib.lpips_distance(params, np.zeros((1, 32, 32, 2)), np.zeros((1, 32, 32, 2)))


def test_zero_features_give_finite_gradients():
  params = random_lpips_params(2)
  x = -jnp.ones((1, 16, 16, 3)) * 5  # far outside the data range: many ReLUs all off
  g = jax.grad(lambda a: jnp.sum(lpips_lib.lpips_distance(params, a, jnp.zeros_like(a))))(x)
  assert np.all(np.isfinite(g))


def test_save_load_round_trip_and_errors(converted, tmp_path):
  _, params, paths = converted
  path = str(tmp_path / "copy.npz")
  lpips_lib.save_params(params, path)
  again = lpips_lib.load_params(path)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again)):
    np.testing.assert_array_equal(a, b)
  assert [p.name for p in tmp_path.iterdir()] == ["copy.npz"]  # no temporary left behind

  missing = str(tmp_path / "none.npz")
  with pytest.raises(lpips_lib.LPIPSWeightsError,
                     match=r"no LPIPS weights file .*python -m arcvq_jax\.convert\.lpips_weights"):
    lpips_lib.load_params(missing)
  flat = lpips_lib.to_flat(params)
  flat["vgg/conv3_2/kernel"] = flat["vgg/conv3_2/kernel"][..., :128]
  np.savez(str(tmp_path / "bad.npz"), **flat)
  with pytest.raises(lpips_lib.LPIPSWeightsError, match=r"'vgg/conv3_2/kernel' has shape"):
    lpips_lib.load_params(str(tmp_path / "bad.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip file")
  with pytest.raises(lpips_lib.LPIPSWeightsError, match="not a readable .npz"):
    lpips_lib.load_params(str(tmp_path / "junk.npz"))


def test_converter_refuses_a_state_dict_that_is_not_vgg16(converted):
  _, _, paths = converted
  vgg = lpips_weights.load_torch_state(paths["vgg"])
  lin = lpips_weights.load_torch_state(lpips_weights.default_lin_path())
  del vgg["features.28.weight"]
  with pytest.raises(lpips_lib.LPIPSWeightsError, match=r"no 'features\.28\.weight' \(conv5_3\)"):
    lpips_weights.convert(vgg, lin)
  vgg19 = {k: v.numpy() for k, v in torchvision.models.vgg19().state_dict().items()}
  with pytest.raises(lpips_lib.LPIPSWeightsError):
    lpips_weights.convert(vgg19, lin)
