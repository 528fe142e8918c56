"""Metrics against independent truths: scikit-image on real photos, numpy, hand counts."""

from __future__ import annotations

import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage import filters, transform
from skimage import metrics as skmetrics

from arcvq_jax.evaluation import images as image_lib
from arcvq_jax.evaluation import metrics

# float32 JAX vs float64 scikit-image; observed deviations are ~1e-7 (SSIM) and ~2e-6 dB
# (PSNR), so this still catches a 1e-3 slip in any constant.
SSIM_ATOL = 1e-5
PSNR_ATOL = 1e-5


# --------------------------------------------------------------------------- fixtures


def _photo(name: str, size: int) -> np.ndarray:
  """A skimage.data photo, anti-aliased down to size x size, float32 in [0, 1]."""
  image = getattr(skdata, name)()
  shape = (size, size, *image.shape[2:])
  return transform.resize(image, shape, anti_aliasing=True).astype(np.float32)


def _degrade(image: np.ndarray, kind: str, seed: int = 0) -> np.ndarray:
  """A plausible 'reconstruction' of image: float32 in [0, 1], same shape."""
  if kind == "noise":
    rng = np.random.default_rng(seed)
    out = image + rng.normal(0.0, 0.08, image.shape)
  elif kind == "blur":
    out = filters.gaussian(image, sigma=1.2, channel_axis=-1 if image.ndim == 3 else None)
  elif kind == "jpeg":
    as_uint8 = np.round(image * 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(as_uint8).save(buffer, format="JPEG", quality=15)
    out = np.asarray(Image.open(io.BytesIO(buffer.getvalue())), dtype=np.float32) / 255.0
  elif kind == "shift":  # brightness/contrast change: stresses the luminance term
    out = 0.8 * image + 0.15
  else:
    raise ValueError(kind)
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def _sk_ssim(a: np.ndarray, b: np.ndarray, **kwargs) -> float:
  """Reference SSIM in float64 on the exact float32 values our code sees."""
  kwargs = {
    "win_size": 11,
    "data_range": 1.0,
    "channel_axis": -1 if a.ndim == 3 else None,
    **kwargs,
  }
  return skmetrics.structural_similarity(a.astype(np.float64), b.astype(np.float64), **kwargs)


def _sk_ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
  """skimage's full, uncropped SSIM map (H, W, C), float64."""
  _, ssim_map = skmetrics.structural_similarity(
    a.astype(np.float64),
    b.astype(np.float64),
    win_size=11,
    data_range=1.0,
    channel_axis=-1,
    full=True,
  )
  return ssim_map


def _sk_psnr(a: np.ndarray, b: np.ndarray) -> float:
  return skmetrics.peak_signal_noise_ratio(
    a.astype(np.float64), b.astype(np.float64), data_range=1.0
  )


def _ours(fn, a: np.ndarray, b: np.ndarray) -> float:
  """Runs a batched metric on one (H, W, C) or (H, W) image pair, float32."""
  if a.ndim == 2:
    a, b = a[..., None], b[..., None]
  return float(fn(jnp.asarray(a[None], jnp.float32), jnp.asarray(b[None], jnp.float32))[0])


PHOTOS = ["astronaut", "coffee", "chelsea", "rocket"]
DEGRADATIONS = ["noise", "blur", "jpeg", "shift"]


# --------------------------------------------------------------------------- SSIM / PSNR


def _assert_matches_skimage(original, reconstruction):
  np.testing.assert_allclose(
    _ours(metrics.ssim, original, reconstruction),
    _sk_ssim(original, reconstruction),
    rtol=0,
    atol=SSIM_ATOL,
  )
  np.testing.assert_allclose(
    _ours(metrics.psnr, original, reconstruction),
    _sk_psnr(original, reconstruction),
    rtol=0,
    atol=PSNR_ATOL,
  )


@pytest.mark.slow
@pytest.mark.parametrize("name", PHOTOS)
@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_ssim_and_psnr_match_skimage_on_rgb_photos(name, kind):
  original = _photo(name, 64)
  reconstruction = _degrade(original, kind)
  assert original.shape == (64, 64, 3)
  _assert_matches_skimage(original, reconstruction)


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_ssim_and_psnr_match_skimage_on_grayscale_28x28(kind):
  original = _photo("camera", 28)
  reconstruction = _degrade(original, kind)
  assert original.shape == (28, 28)
  _assert_matches_skimage(original, reconstruction)


@pytest.mark.parametrize("kind", DEGRADATIONS)
def test_ssim_keeps_float32_precision_on_near_white_images(kind):
  # Low-contrast bright images: E[x^2] - E[x]^2 in float32 without centring misses
  # skimage by ~3e-5 here, so this guards the centring in metrics.ssim.
  original = 0.9 + 0.1 * _photo("astronaut", 64)
  reconstruction = _degrade(original, kind)
  np.testing.assert_allclose(
    _ours(metrics.ssim, original, reconstruction),
    _sk_ssim(original, reconstruction),
    rtol=0,
    atol=SSIM_ATOL,
  )


@pytest.mark.slow
def test_ssim_on_32x32_and_non_square_images():
  # CIFAR-sized, and H != W so that swapped axes in the window would show.
  for shape in [(32, 32), (40, 24)]:
    original = transform.resize(skdata.chelsea(), (*shape, 3), anti_aliasing=True).astype(
      np.float32
    )
    reconstruction = _degrade(original, "jpeg")
    np.testing.assert_allclose(
      _ours(metrics.ssim, original, reconstruction),
      _sk_ssim(original, reconstruction),
      rtol=0,
      atol=SSIM_ATOL,
    )


def test_batched_and_jitted_metrics_match_per_image_references():
  originals = np.stack([_photo(name, 64) for name in PHOTOS])
  reconstructions = np.stack(
    [
      _degrade(x, kind, seed=i)
      for i, (x, kind) in enumerate(zip(originals, DEGRADATIONS, strict=True))
    ]
  )
  x = jnp.asarray(originals, jnp.float32)
  y = jnp.asarray(reconstructions, jnp.float32)

  ssim_jit = jax.jit(metrics.ssim, static_argnames="win_size")
  got_ssim = np.asarray(ssim_jit(x, y))
  got_psnr = np.asarray(jax.jit(metrics.psnr)(x, y))
  assert got_ssim.shape == (4,) and got_ssim.dtype == np.float32
  assert got_psnr.shape == (4,) and got_psnr.dtype == np.float32

  want_ssim = [_sk_ssim(a, b) for a, b in zip(originals, reconstructions, strict=True)]
  want_psnr = [_sk_psnr(a, b) for a, b in zip(originals, reconstructions, strict=True)]
  np.testing.assert_allclose(got_ssim, want_ssim, rtol=0, atol=SSIM_ATOL)
  np.testing.assert_allclose(got_psnr, want_psnr, rtol=0, atol=PSNR_ATOL)
  # Each image scored on its own: the batch must not mix images.
  assert len(set(np.round(got_ssim, 4))) == 4


def test_psnr_by_hand_in_numpy():
  original = _photo("coffee", 64)
  reconstruction = _degrade(original, "noise")
  mse = np.mean((original.astype(np.float64) - reconstruction.astype(np.float64)) ** 2)
  np.testing.assert_allclose(
    _ours(metrics.psnr, original, reconstruction), 10 * np.log10(1.0 / mse), rtol=0, atol=PSNR_ATOL
  )
  # A known value: every pixel off by 0.1 -> mse 0.01 -> 20 dB; data_range 2 -> +6.02 dB.
  x = jnp.full((2, 8, 8, 3), 0.5, jnp.float32)
  np.testing.assert_allclose(metrics.psnr(x, x + 0.1), [20.0, 20.0], atol=1e-4)
  np.testing.assert_allclose(
    metrics.psnr(x, x + 0.1, data_range=2.0), [20.0 + 20 * np.log10(2.0)] * 2, atol=1e-4
  )


def test_identical_images_give_ssim_one_and_psnr_inf_like_skimage():
  x = _photo("astronaut", 32)
  assert _ours(metrics.ssim, x, x) == pytest.approx(1.0, abs=1e-6)
  assert _ours(metrics.psnr, x, x) == np.inf
  with np.errstate(divide="ignore"):
    assert _sk_psnr(x, x) == np.inf


def test_ssim_tolerance_would_catch_wrong_definitions():
  """Each plausible mistake moves SSIM by far more than the tolerance on real photos."""
  original = _photo("chelsea", 64)
  reconstruction = _degrade(original, "jpeg")
  ours = _ours(metrics.ssim, original, reconstruction)
  wrong_variants = {
    "K2=0.02": _sk_ssim(original, reconstruction, K2=0.02),
    "population covariance": _sk_ssim(original, reconstruction, use_sample_covariance=False),
    "win_size=7": _sk_ssim(original, reconstruction, win_size=7),
    "gaussian window": _sk_ssim(original, reconstruction, gaussian_weights=True, sigma=1.5),
    # A 'same' (reflect-padded) window that keeps the border pixels in the mean.
    "same window, no crop": float(np.mean(_sk_ssim_map(original, reconstruction))),
  }
  for label, wrong in wrong_variants.items():
    assert abs(ours - wrong) > 5 * SSIM_ATOL, (label, abs(ours - wrong))
  # K1 only matters where local means are small (C1 against mu^2): use a dark photo.
  dark, dark_reconstruction = 0.05 * original, 0.05 * reconstruction
  ours_dark = _ours(metrics.ssim, dark, dark_reconstruction)
  assert abs(ours_dark - _sk_ssim(dark, dark_reconstruction)) < SSIM_ATOL
  assert abs(ours_dark - _sk_ssim(dark, dark_reconstruction, K1=0.02)) > 20 * SSIM_ATOL


def test_ssim_rejects_small_images_and_bad_windows():
  small = jnp.zeros((2, 10, 28, 3), jnp.float32)
  with pytest.raises(ValueError, match="smaller than the 11x11 window"):
    metrics.ssim(small, small)
  with pytest.raises(ValueError, match="smaller than the 11x11 window"):
    metrics.ssim(jnp.swapaxes(small, 1, 2), jnp.swapaxes(small, 1, 2))
  ok = jnp.zeros((1, 28, 28, 1), jnp.float32)
  with pytest.raises(ValueError, match="odd"):
    metrics.ssim(ok, ok, win_size=10)
  with pytest.raises(ValueError, match=r"\(B, H, W, C\)"):
    metrics.ssim(ok[0], ok[0])
  # 11x11 images are the smallest allowed: a single window.
  tiny = _photo("camera", 11)
  np.testing.assert_allclose(
    _ours(metrics.ssim, tiny, _degrade(tiny, "noise")),
    _sk_ssim(tiny, _degrade(tiny, "noise")),
    rtol=0,
    atol=SSIM_ATOL,
  )


def test_to_unit_range_maps_and_clips():
  x = jnp.array([-1.3, -1.0, 0.0, 0.5, 1.0, 1.2], jnp.float32)
  np.testing.assert_allclose(metrics.to_unit_range(x), [0.0, 0.0, 0.5, 0.75, 1.0, 1.0])


# --------------------------------------------------------------------------- codebook


def test_usage_and_perplexity_hand_computed():
  k = 16
  uniform = jnp.full((k,), 7, jnp.int32)
  np.testing.assert_allclose(metrics.perplexity(uniform), k, rtol=1e-6)
  np.testing.assert_allclose(metrics.codebook_usage(uniform), 1.0)

  one_hot = jnp.zeros((k,), jnp.int32).at[3].set(100)
  np.testing.assert_allclose(metrics.perplexity(one_hot), 1.0, rtol=1e-6)
  np.testing.assert_allclose(metrics.codebook_usage(one_hot), 1.0 / k)

  # Zeros are ignored by perplexity (0 log 0 = 0) but count as unused codes.
  half = jnp.array([3, 0, 3, 0], jnp.int32)
  np.testing.assert_allclose(metrics.perplexity(half), 2.0, rtol=1e-6)
  np.testing.assert_allclose(metrics.codebook_usage(half), 0.5)

  # Non-uniform, float counts: p = (1, 2, 5, 0) / 8.
  counts = jnp.array([1.0, 2.0, 5.0, 0.0], jnp.float32)
  p = np.array([1, 2, 5]) / 8
  np.testing.assert_allclose(
    jax.jit(metrics.perplexity)(counts), np.exp(-np.sum(p * np.log(p))), rtol=1e-6
  )
  np.testing.assert_allclose(jax.jit(metrics.codebook_usage)(counts), 0.75)
  assert np.isfinite(float(metrics.perplexity(counts)))


def test_code_counts_matches_bincount_with_mask():
  rng = np.random.default_rng(1)
  k = 32
  indices = rng.integers(0, k - 4, size=(5, 4, 4))  # last 4 codes never used
  mask = np.array([1, 1, 0, 1, 0], bool)

  counts = jax.jit(metrics.code_counts, static_argnums=1)(jnp.asarray(indices), k)
  assert counts.shape == (k,) and counts.dtype == jnp.int32
  np.testing.assert_array_equal(counts, np.bincount(indices.ravel(), minlength=k))

  masked = jax.jit(metrics.code_counts, static_argnums=1)(
    jnp.asarray(indices), k, jnp.asarray(mask)
  )
  np.testing.assert_array_equal(masked, np.bincount(indices[mask].ravel(), minlength=k))
  assert int(masked.sum()) == 3 * 16

  flat = metrics.code_counts(jnp.asarray(indices.ravel()), k)
  np.testing.assert_array_equal(flat, np.bincount(indices.ravel(), minlength=k))
  np.testing.assert_allclose(
    metrics.codebook_usage(counts), np.mean(np.bincount(indices.ravel(), minlength=k) > 0)
  )


def test_code_counts_drops_out_of_range_and_checks_mask_shape():
  counts = metrics.code_counts(jnp.array([0, 1, 1, 4, -1]), 4)
  np.testing.assert_array_equal(counts, [1, 2, 0, 0])
  with pytest.raises(ValueError, match="mask"):
    metrics.code_counts(jnp.zeros((3, 2, 2), jnp.int32), 4, jnp.ones((2,), bool))


# --------------------------------------------------------------------------- image grids


def _constant_images(n: int, h: int, w: int, c: int) -> np.ndarray:
  """Image i is filled with (i + 1) / (n + 1): distinct, in (0, 1), never the pad value."""
  values = (np.arange(n, dtype=np.float32) + 1) / (n + 1)
  return np.broadcast_to(values[:, None, None, None], (n, h, w, c)).copy()


def test_image_grid_shape_and_pixel_placement():
  n, h, w, c, ncols, pad = 5, 4, 6, 3, 3, 2
  images = _constant_images(n, h, w, c)
  grid = image_lib.image_grid(images, ncols=ncols, pad=pad, pad_value=1.0)
  assert grid.shape == (2 * (h + pad) + pad, 3 * (w + pad) + pad, c)
  assert grid.dtype == np.float32
  for i in range(n):
    top, left = pad + (i // ncols) * (h + pad), pad + (i % ncols) * (w + pad)
    np.testing.assert_array_equal(grid[top : top + h, left : left + w], images[i])
  # Borders and the empty sixth slot hold the pad value.
  assert np.all(grid[:pad] == 1.0) and np.all(grid[:, :pad] == 1.0)
  top, left = pad + (h + pad), pad + 2 * (w + pad)
  assert np.all(grid[top : top + h, left : left + w] == 1.0)
  assert np.sum(grid != 1.0) == n * h * w * c

  # [-1, 1] inputs with value_range=(-1, 1) give the same grid; overshoot is clipped.
  signed = image_lib.image_grid(images * 2 - 1, ncols=ncols, pad=pad, value_range=(-1.0, 1.0))
  np.testing.assert_allclose(signed, grid, atol=1e-6)
  clipped = image_lib.image_grid(np.full((1, 2, 2, 1), 1.5, np.float32), pad=0)
  np.testing.assert_array_equal(clipped, np.ones((2, 2, 1), np.float32))
  # Fewer images than columns: the grid is only as wide as the images.
  assert image_lib.image_grid(images[:2], ncols=8, pad=1).shape == (h + 2, 2 * w + 3, c)


def test_side_by_side_interleaves_rows():
  n, h, w, c, ncols, pad = 5, 3, 3, 1, 3, 1
  originals = _constant_images(n, h, w, c)
  reconstructions = originals * 0.5  # distinct from every original value
  grid = image_lib.side_by_side(
    originals, reconstructions, n=n, ncols=ncols, pad=pad, pad_value=0.0
  )
  assert grid.shape == (4 * (h + pad) + pad, ncols * (w + pad) + pad, c)

  def cell(row: int, col: int) -> np.ndarray:
    top, left = pad + row * (h + pad), pad + col * (w + pad)
    return grid[top : top + h, left : left + w]

  for i in range(n):
    row, col = divmod(i, ncols)
    np.testing.assert_array_equal(cell(2 * row, col), originals[i])
    np.testing.assert_array_equal(cell(2 * row + 1, col), reconstructions[i])
  np.testing.assert_array_equal(cell(2, 2), 0.0)  # no sixth pair
  np.testing.assert_array_equal(cell(3, 2), 0.0)

  # n caps the pairs shown; defaults give one row of originals over their reconstructions.
  default = image_lib.side_by_side(
    np.zeros((10, h, w, c), np.float32), np.ones((10, h, w, c), np.float32), n=8
  )
  assert default.shape == (2 * (h + 2) + 2, 8 * (w + 2) + 2, c)
  with pytest.raises(ValueError, match="differ in shape"):
    image_lib.side_by_side(originals, reconstructions[:, :2])
