"""The FID Inception against pytorch-fid's network, with the same random weights.

The reference is built as `pytorch_fid.inception.fid_inception_v3()` builds it (torchvision's
Inception3 with 1008 classes, no aux logits, the FID blocks), without the download: its
parameters and BatchNorm statistics are random, its state dict is saved as a .pth file in the
layout of the public `pt_inception-2015-12-05` file and converted by our converter CLI, exactly
as a user converts the real weights. pytorch-fid's own `InceptionV3` wrapper (resize to 299,
scaling to [-1, 1]) runs it on real photos.
"""

from __future__ import annotations

import os
import subprocess
import sys

import device_env
import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from pytorch_fid import inception as pfid
from skimage import data as skdata

from arcvq_jax.convert import inception_weights
from arcvq_jax.evaluation import inception as inception_lib
from arcvq_jax.models import layers

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

features = jax.jit(inception_lib.inception_apply, static_argnames=("quantize", "conv_impl"))


def features_on(library: str):
  """`features` compiled for a convolution library ('ynn': XLA:CPU's default, 'eigen')."""
  return jax.jit(
    inception_lib.inception_apply,
    static_argnames=("quantize", "conv_impl"),
    compiler_options=layers.compiler_options(library),
  )


def fid_inception_random(seed: int = 0) -> torch.nn.Module:
  """pytorch-fid's fid_inception_v3() with random weights and BatchNorm statistics.

  The statistics are those of a calibration batch (so activations keep a sensible scale
  through the 94 convolutions; otherwise the features would be ~0 or overflow), then
  perturbed at random; BatchNorm scales and shifts are random too.
  """
  torch.manual_seed(seed)
  net = torchvision.models.inception_v3(
    weights=None, aux_logits=False, num_classes=1008, init_weights=False
  )
  net.Mixed_5b = pfid.FIDInceptionA(192, pool_features=32)
  net.Mixed_5c = pfid.FIDInceptionA(256, pool_features=64)
  net.Mixed_5d = pfid.FIDInceptionA(288, pool_features=64)
  net.Mixed_6b = pfid.FIDInceptionC(768, channels_7x7=128)
  net.Mixed_6c = pfid.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6d = pfid.FIDInceptionC(768, channels_7x7=160)
  net.Mixed_6e = pfid.FIDInceptionC(768, channels_7x7=192)
  net.Mixed_7b = pfid.FIDInceptionE_1(1280)
  net.Mixed_7c = pfid.FIDInceptionE_2(2048)
  bns = [m for m in net.modules() if isinstance(m, torch.nn.BatchNorm2d)]
  with torch.no_grad():
    for bn in bns:
      bn.weight.uniform_(0.5, 1.5)
      bn.bias.uniform_(-0.2, 0.2)
      bn.momentum = 1.0  # running stats := the calibration batch's
    net.fc.bias.uniform_(-0.5, 0.5)
    net.train()
    net(torch.rand(4, 3, 299, 299) * 2 - 1)
    net.eval()
    for bn in bns:
      bn.running_mean.add_(0.1 * bn.running_var.sqrt() * torch.randn_like(bn.running_mean))
      bn.running_var.mul_(torch.empty_like(bn.running_var).uniform_(0.7, 1.4))
  return net


def photos(size: int) -> np.ndarray:
  """Four real photos, centre-cropped squares resized to size x size: (4, size, size, 3) uint8."""
  from skimage.transform import resize  # noqa: PLC0415

  out = []
  for img in (skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()):
    h, w, _ = img.shape
    s = min(h, w)
    crop = img[(h - s) // 2 : (h - s) // 2 + s, (w - s) // 2 : (w - s) // 2 + s]
    out.append(np.round(resize(crop, (size, size), anti_aliasing=True) * 255).astype(np.uint8))
  return np.stack(out)


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(pytorch-fid's InceptionV3 wrapper around the random net, the net, our params)."""
  folder = tmp_path_factory.mktemp("inception")
  net = fid_inception_random()
  pt_path = str(folder / "pt_inception_random.pth")
  torch.save(net.state_dict(), pt_path)
  out = str(folder / "inception.npz")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "arcvq_jax.convert.inception_weights",
      f"--pt={pt_path}",
      f"--out={out}",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  original = pfid.fid_inception_v3
  pfid.fid_inception_v3 = lambda: net  # the wrapper builds its blocks from this net
  try:
    wrapper = pfid.InceptionV3([pfid.InceptionV3.BLOCK_INDEX_BY_DIM[2048]]).eval()
  finally:
    pfid.fid_inception_v3 = original
  return wrapper, net, inception_lib.load_params(out)


@pytest.mark.slow
# XLA's convolution, under XLA's default library and on Eigen (the CPU default); im2col + GEMM
@pytest.mark.parametrize(
  "conv_impl, library", [("xla", "ynn"), ("xla", "eigen"), ("gemm", "ynn"), ("onednn", "eigen")]
)
def test_features_and_logits_match_pytorch_fid_on_photos(converted, conv_impl, library, request):
  if conv_impl == "onednn":
    request.getfixturevalue("no_persistent_cache")  # else the form falls back to XLA's
  wrapper, net, params = converted
  images = photos(256)  # resized up to 299 on both sides
  with torch.no_grad():
    # pytorch-fid's input: ToTensor of the 8-bit images, (B, 3, H, W) in [0, 1].
    pool_ref = wrapper(torch.tensor(images.transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32))
    pool_ref = pool_ref[0].reshape(len(images), -1)
    logits_ref = (pool_ref @ net.fc.weight.T).numpy()  # unbiased, for the Inception Score
    biased_ref = net.fc(pool_ref).numpy()
  pool_ref = pool_ref.numpy()
  pool, logits = (np.asarray(a) for a in features_on(library)(params, images, conv_impl=conv_impl))
  assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
  assert pool.dtype == np.float32
  # Random weights with a useful scale: features far from 0 and different per photo.
  assert np.abs(pool_ref).mean() > 0.05 and np.std(pool_ref, axis=0).mean() > 0.01
  for ours, ref in ((pool, pool_ref), (logits, logits_ref)):
    scale = np.abs(ref).max()
    assert np.abs(ours - ref).max() <= 1e-4 * scale
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-5 * scale)
  biased = logits + np.asarray(params["fc"]["bias"])
  np.testing.assert_allclose(biased, biased_ref, rtol=1e-4, atol=1e-4 * np.abs(biased_ref).max())


@pytest.mark.parametrize(
  "shape", [(28, 28, 1), (299, 299, 3), (400, 300, 3), (512, 512, 3), (7, 1000, 3)]
)
def test_preprocess_is_pytorch_fids_resize_and_scaling(shape):
  rng = np.random.default_rng(shape[0])
  u = rng.integers(0, 256, (2, *shape), dtype=np.uint8)
  ours = np.asarray(inception_lib.preprocess(u))
  t = torch.tensor(u.transpose(0, 3, 1, 2) / 255.0, dtype=torch.float32)
  if shape[-1] == 1:
    t = t.repeat(1, 3, 1, 1)  # PIL's convert('RGB'), as pytorch-fid reads grey files
  ref = 2 * F.interpolate(t, size=(299, 299), mode="bilinear", align_corners=False) - 1
  # The same interpolation up to float32 rounding of positions and sums (values in [-1, 1]).
  np.testing.assert_allclose(ours, ref.numpy().transpose(0, 2, 3, 1), atol=1e-5)
  # Floats in [-1, 1] are quantised to the same 8-bit levels.
  x = u.astype(np.float32) / 127.5 - 1.0
  np.testing.assert_allclose(inception_lib.preprocess(x + 1e-3), ours, atol=1e-6)
  exact = np.asarray(inception_lib.preprocess(x + 1e-3, quantize=False))
  assert 0 < np.abs(exact - ours).max() < 1e-2


@pytest.mark.slow
def test_sharded_extractor_matches_the_plain_function(converted):
  _, _, params = converted
  images = photos(64)
  extractor = inception_lib.InceptionFeatures(params, batch_size=3)
  assert (extractor.conv_impl, extractor.conv_library) == ("onednn", "eigen")  # the defaults
  want_pool, want_logits = (
    np.asarray(a) for a in features_on("eigen")(params, images, conv_impl="onednn")
  )
  pool, logits = extractor(images)  # 4 images: a full batch of 3, then 1 + 2 padding rows
  assert pool.shape == (4, 2048) and logits.shape == (4, 1008)
  np.testing.assert_allclose(pool, want_pool, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_save_load_round_trip_and_errors(converted, tmp_path):
  _, _, params = converted
  path = str(tmp_path / "sub" / "copy.npz")
  inception_lib.save_params(params, path)
  again = inception_lib.load_params(path)
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)
  assert os.listdir(tmp_path / "sub") == ["copy.npz"]
  assert inception_lib.fingerprint(again) == inception_lib.fingerprint(params)
  assert inception_lib.fingerprint(inception_lib.random_params(1)) != inception_lib.fingerprint(
    params
  )

  with pytest.raises(
    inception_lib.InceptionWeightsError,
    match=r"no FID Inception weights file .*pt_inception-2015-12-05-6726825d"
    r"\.pth.*python -m arcvq_jax\.convert\.inception_weights --pt=",
  ):
    inception_lib.load_params(str(tmp_path / "none.npz"))
  flat = inception_lib.to_flat(params)
  flat["Mixed_6c/branch7x7_2/kernel"] = flat["Mixed_6c/branch7x7_2/kernel"][..., :10]
  np.savez(str(tmp_path / "bad.npz"), **flat)
  with pytest.raises(
    inception_lib.InceptionWeightsError,
    match=r"'Mixed_6c/branch7x7_2/kernel' has shape \(1, 7, 160, 10\), "
    r"expected \(1, 7, 160, 160\)",
  ):
    inception_lib.load_params(str(tmp_path / "bad.npz"))
  (tmp_path / "junk.npz").write_bytes(b"not a zip file")
  with pytest.raises(inception_lib.InceptionWeightsError, match=r"not a readable \.npz"):
    inception_lib.load_params(str(tmp_path / "junk.npz"))


@pytest.mark.slow
def test_converter_refuses_other_inceptions(converted):
  _, net, _ = converted
  state = {k: v.numpy() for k, v in net.state_dict().items()}
  inception_weights.convert(state)  # the reference itself converts
  # torchvision's ImageNet Inception-v3: 1000 classes (its blocks have the same shapes).
  tv = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
  with pytest.raises(
    inception_lib.InceptionWeightsError,
    match=r"fc\.weight has shape \(1000, 2048\), expected \(1008, 2048\)",
  ):
    inception_weights.convert({k: v.numpy() for k, v in tv.state_dict().items()})
  missing = {k: v for k, v in state.items() if k != "Mixed_7c.branch_pool.bn.running_var"}
  with pytest.raises(
    inception_lib.InceptionWeightsError, match=r"no 'Mixed_7c\.branch_pool\.bn\.running_var'"
  ):
    inception_weights.convert(missing)


MULTIDEVICE_SCRIPT = """
import jax, numpy as np
from arcvq_jax.evaluation import inception as inc
from arcvq_jax.models import layers
assert jax.device_count() == 4
params = inc.random_params(0)
x = np.random.default_rng(0).integers(0, 256, (6, 32, 32, 3), dtype=np.uint8)
mask = np.array([1, 1, 0, 1, 1, 1], bool)
extractor = inc.InceptionFeatures(params, batch_size=4)
pool, logits = extractor(x, mask)      # 2 batches of 4 over 4 devices, padding and a mask
want_pool, want_logits = jax.jit(
    inc.inception_apply, static_argnames="conv_impl",
    compiler_options=layers.compiler_options(extractor.conv_library),
)(params, x[mask], conv_impl=extractor.conv_impl)
np.testing.assert_allclose(pool, want_pool, rtol=1e-5, atol=1e-6)
np.testing.assert_allclose(logits, want_logits, rtol=1e-5, atol=1e-5)
print("ok", pool.shape)
"""


@pytest.mark.slow
def test_extractor_split_over_four_devices():
  env = device_env.simulated_devices(4)
  proc = subprocess.run(
    [sys.executable, "-c", MULTIDEVICE_SCRIPT],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "ok (5, 2048)" in proc.stdout
