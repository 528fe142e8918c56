"""Reconstruction and codebook metrics (docs/math.md, eq. 36-37, 42-43), pure jax.numpy functions.

Every function here is side-effect free and works under `jax.jit`. Image metrics take a
batch `(B, H, W, C)` of images already in [0, 1] (use `to_unit_range` on model outputs in
[-1, 1]) and return one value per image, so that padded batches can be masked and the
evaluation loop decides how to average.

PSNR and SSIM follow scikit-image's definitions (`peak_signal_noise_ratio`,
`structural_similarity(..., win_size=11, data_range=1.0, channel_axis=-1)`), which is what
the reference evaluation uses; `tests/test_metrics.py` checks the agreement on real photos.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array

# scikit-image's structural_similarity defaults (Wang et al. 2004, eq. 7).
_SSIM_K1 = 0.01
_SSIM_K2 = 0.03


def _as_float(x: Array) -> Array:
  """Promotes to at least float32: bf16 model outputs would lose the PSNR/SSIM digits."""
  x = jnp.asarray(x)
  return x.astype(jnp.result_type(x.dtype, jnp.float32))


def _check_images(x: Array, y: Array, name: str) -> None:
  if x.ndim != 4:
    raise ValueError(f"{name}: expected images of shape (B, H, W, C), got {x.shape}.")
  if x.shape != y.shape:
    raise ValueError(f"{name}: x and y shapes differ: {x.shape} vs {y.shape}.")


def to_unit_range(x: Array) -> Array:
  """Maps images from [-1, 1] to [0, 1].

  Args:
    x: any shape, float in (about) [-1, 1].

  Returns:
    Same shape and dtype, in [0, 1]. Values are clipped because decoder outputs overshoot
    [-1, 1] and the metrics (and image writers) assume the data range is exactly 1.
  """
  return jnp.clip((x + 1.0) * 0.5, 0.0, 1.0)


def psnr(x: Array, y: Array, data_range: float = 1.0) -> Array:
  """Per-image peak signal-to-noise ratio, in dB.

  Matches `skimage.metrics.peak_signal_noise_ratio(x[i], y[i], data_range=data_range)`:
  `10 log10(data_range^2 / mse)` with the mean squared error over H, W and C.

  Identical images (mse == 0) give `+inf`, as in scikit-image (which returns inf after a
  numpy divide-by-zero warning). Under jit there is no warning, so callers that average
  over a set must handle it explicitly, e.g. `jnp.isinf(p).any()` or
  `jnp.minimum(p, 100.0)` if they prefer a cap; we do not cap here so that the number
  agrees with the reference evaluation.

  Args:
    x: (B, H, W, C) float, reference images in [0, data_range].
    y: (B, H, W, C) float, reconstructions, same range.
    data_range: peak-to-peak range of the images (1.0 for [0, 1]).

  Returns:
    (B,) float32 (float64 if the inputs are float64 under jax_enable_x64).
  """
  _check_images(x, y, "psnr")
  x, y = _as_float(x), _as_float(y)
  mse = jnp.mean(jnp.square(x - y), axis=(1, 2, 3))
  # data_range**2 / 0 -> inf, log10(inf) = inf: the same +inf that skimage returns.
  return 10.0 * jnp.log10(jnp.square(data_range) / mse)


def _box_sum_valid(x: Array, win_size: int) -> Array:
  """Sum over every win_size x win_size window fully inside the image ('valid').

  x: (B, H, W, C) -> (B, H - win_size + 1, W - win_size + 1, C), same dtype.

  Two separable reduce_window sums rather than a convolution or cumulative sums: each
  output is a direct float32 sum of win_size terms (cumsums would subtract large running
  totals), and reduce_window never runs in TF32/bf16 the way a GPU/TPU conv does by default.
  """
  x = jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, win_size, 1, 1), (1, 1, 1, 1), "VALID")
  return jax.lax.reduce_window(x, 0.0, jax.lax.add, (1, 1, win_size, 1), (1, 1, 1, 1), "VALID")


def ssim(x: Array, y: Array, data_range: float = 1.0, win_size: int = 11) -> Array:
  """Per-image structural similarity, scikit-image's definition.

  Equals `skimage.metrics.structural_similarity(x[i], y[i], win_size=win_size,
  data_range=data_range, channel_axis=-1)`: uniform win_size x win_size window,
  K1 = 0.01, K2 = 0.03, sample covariance (N / (N - 1) with N = win_size**2), SSIM map
  averaged over the pixels at least (win_size - 1) // 2 from every border, then over
  channels. skimage filters with reflect padding and then crops exactly those border
  pixels, so a 'valid' box filter gives the same map without any padding.

  Args:
    x: (B, H, W, C) float images in [0, data_range]; grayscale is C == 1.
    y: (B, H, W, C) float, same shape.
    data_range: peak-to-peak range; sets C1 = (K1 R)^2 and C2 = (K2 R)^2.
    win_size: odd window side; must be static under jit (it sets shapes).

  Returns:
    (B,) float32 (float64 for float64 inputs under jax_enable_x64).

  Raises:
    ValueError: wrong rank, mismatched shapes, even win_size, or H or W < win_size.
  """
  _check_images(x, y, "ssim")
  win_size = int(win_size)
  if win_size < 2 or win_size % 2 != 1:
    raise ValueError(f"ssim: win_size must be an odd integer >= 3, got {win_size}.")
  _, h, w, _ = x.shape
  if h < win_size or w < win_size:
    raise ValueError(
      f"ssim: images of {h}x{w} are smaller than the {win_size}x{win_size} window; "
      "pass a smaller odd win_size (skimage raises the same error)."
    )
  x, y = _as_float(x), _as_float(y)

  # Variances come from E[x^2] - E[x]^2, which cancels catastrophically in float32 on
  # bright images. They are shift invariant, so compute them on data centred by the
  # per-image, per-channel mean; the luminance term uses the uncentred local means.
  x_mean = jnp.mean(x, axis=(1, 2), keepdims=True)
  y_mean = jnp.mean(y, axis=(1, 2), keepdims=True)
  xc, yc = x - x_mean, y - y_mean

  n = win_size * win_size
  inv_n = 1.0 / n
  cov_norm = n / (n - 1.0)  # use_sample_covariance=True
  mu_xc = _box_sum_valid(xc, win_size) * inv_n
  mu_yc = _box_sum_valid(yc, win_size) * inv_n
  var_x = cov_norm * (_box_sum_valid(xc * xc, win_size) * inv_n - mu_xc * mu_xc)
  var_y = cov_norm * (_box_sum_valid(yc * yc, win_size) * inv_n - mu_yc * mu_yc)
  cov_xy = cov_norm * (_box_sum_valid(xc * yc, win_size) * inv_n - mu_xc * mu_yc)
  mu_x = mu_xc + x_mean
  mu_y = mu_yc + y_mean

  c1 = jnp.square(_SSIM_K1 * data_range)
  c2 = jnp.square(_SSIM_K2 * data_range)
  numerator = (2.0 * mu_x * mu_y + c1) * (2.0 * cov_xy + c2)
  denominator = (jnp.square(mu_x) + jnp.square(mu_y) + c1) * (var_x + var_y + c2)
  ssim_map = numerator / denominator  # (B, H - win + 1, W - win + 1, C)
  # Mean over pixels per channel, then over channels: equal-size crops make it one mean.
  return jnp.mean(ssim_map, axis=(1, 2, 3))


def code_counts(indices: Array, num_codes: int, mask: Array | None = None) -> Array:
  """Histogram of selected codebook rows.

  Args:
    indices: (B, h, w), (B, N) or (N,) integer code indices in [0, num_codes). Indices
      outside that range are dropped (not clipped into the first or last bin).
    num_codes: K, static under jit.
    mask: optional (B,) (the leading axis of `indices`) bool or 0/1; entries with
      mask == 0 are ignored, e.g. the padding images of a last, partial batch.

  Returns:
    (K,) int32 counts; sum over batches of the evaluation set, then feed to
    `codebook_usage` and `perplexity`.
  """
  indices = jnp.asarray(indices).astype(jnp.int32)
  if mask is None:
    weights = jnp.ones(indices.shape, jnp.int32)
  else:
    mask = jnp.asarray(mask)
    if mask.shape != indices.shape[:1]:
      raise ValueError(
        f"code_counts: mask must have shape {indices.shape[:1]} (the leading axis of "
        f"indices {indices.shape}), got {mask.shape}."
      )
    weights = jnp.broadcast_to(
      mask.astype(jnp.int32).reshape(mask.shape + (1,) * (indices.ndim - 1)), indices.shape
    )
  # segment_sum drops out-of-range ids (jnp.bincount would clip them into the edge bins).
  return jax.ops.segment_sum(weights.reshape(-1), indices.reshape(-1), num_segments=num_codes)


def codebook_usage(counts: Array) -> Array:
  """Share of the K codebook rows selected at least once.

  Args:
    counts: (K,) integer or float selection counts over the whole evaluation set.

  Returns:
    () float32 in [0, 1].
  """
  counts = jnp.asarray(counts)
  return jnp.mean((counts > 0).astype(jnp.float32))


def perplexity(counts: Array) -> Array:
  """Perplexity exp(-sum_k p_k log p_k) of the code selection frequencies.

  p = counts / sum(counts), with 0 log 0 = 0 so unused codes contribute nothing. The
  value lies in [1, K]: 1 when a single code is used, K when all are used equally.

  Args:
    counts: (K,) integer or float selection counts.

  Returns:
    () float32 (float64 for float64 counts under x64); NaN if all counts are zero.
  """
  counts = _as_float(counts)
  p = counts / jnp.sum(counts)
  # xlogy(0, 0) == 0 and has no NaN gradient, unlike p * log(p).
  entropy = -jnp.sum(jax.scipy.special.xlogy(p, p))
  return jnp.exp(entropy)
