"""Image grids for logging reconstructions (numpy, host side).

Both functions return one float32 image (H', W', C) in [0, 1]. clu's
`metric_writers.MetricWriter.write_images` wants a batch (N, H, W, C), so log a grid as

    grid = side_by_side(x, x_rec, value_range=(-1, 1))
    writer.write_images(step, {"reconstructions": grid[None]})

Inputs may be jax or numpy arrays; they are copied to host memory.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np


def _to_unit_float(images: np.ndarray, value_range: Sequence[float], name: str) -> np.ndarray:
  """(N, H, W, C) in value_range -> float32 in [0, 1], clipped (decoders overshoot)."""
  images = np.asarray(images, dtype=np.float32)
  if images.ndim != 4:
    raise ValueError(f"{name}: expected images of shape (N, H, W, C), got {images.shape}.")
  lo, hi = float(value_range[0]), float(value_range[1])
  if not hi > lo:
    raise ValueError(f"{name}: value_range must be (low, high) with high > low, got {value_range}.")
  return np.clip((images - lo) / (hi - lo), 0.0, 1.0)


def _tile(images: np.ndarray, ncols: int, pad: int, pad_value: float) -> np.ndarray:
  """Lays out (N, H, W, C) in [0, 1] row-major with `pad` pixels around every image."""
  n, h, w, c = images.shape
  nrows = max(1, math.ceil(n / ncols))
  grid = np.full((nrows * (h + pad) + pad, ncols * (w + pad) + pad, c), pad_value, dtype=np.float32)
  for i in range(n):
    top = pad + (i // ncols) * (h + pad)
    left = pad + (i % ncols) * (w + pad)
    grid[top : top + h, left : left + w] = images[i]
  return grid


def image_grid(
  images: np.ndarray,
  ncols: int = 8,
  pad: int = 2,
  pad_value: float = 1.0,
  value_range: Sequence[float] = (0.0, 1.0),
) -> np.ndarray:
  """Tiles a batch of images into one image, row-major (image i at row i // ncols).

  Args:
    images: (N, H, W, C) float; grayscale is C == 1. Values are expected in
      `value_range`: the default (0, 1) for data/metric images, pass (-1, 1) for raw
      model inputs and outputs. Values outside are clipped.
    ncols: images per row; the last row is filled with `pad_value` where images run out.
      With N < ncols the grid is only N images wide.
    pad: border in pixels around and between images.
    pad_value: border/empty-slot colour in the *output* range [0, 1] (1.0 = white).

  Returns:
    (nrows * (H + pad) + pad, ncols' * (W + pad) + pad, C) float32 in [0, 1] with
    nrows = ceil(N / ncols') and ncols' = min(ncols, N). Use `grid[None]` for
    `writer.write_images`.
  """
  if ncols < 1 or pad < 0:
    raise ValueError(f"image_grid: need ncols >= 1 and pad >= 0, got ncols={ncols}, pad={pad}.")
  images = _to_unit_float(images, value_range, "image_grid")
  if images.shape[0] == 0:
    raise ValueError("image_grid: no images to tile.")
  return _tile(images, min(ncols, images.shape[0]), pad, pad_value)


def side_by_side(
  originals: np.ndarray,
  reconstructions: np.ndarray,
  n: int = 8,
  ncols: int = 8,
  pad: int = 2,
  pad_value: float = 1.0,
  value_range: Sequence[float] = (0.0, 1.0),
) -> np.ndarray:
  """Grid comparing the first n originals with their reconstructions.

  Rows alternate: a row of up to `ncols` originals, then directly below it a row with
  the reconstructions of the same images in the same columns, then the next originals.
  With the defaults (n = ncols = 8) that is one row of originals over one row of
  reconstructions.

  Args:
    originals: (N, H, W, C) float in `value_range`.
    reconstructions: (N, H, W, C) float in `value_range` (clipped, decoders overshoot).
    n: how many pairs to show (min(n, N) are shown).
    ncols, pad, pad_value, value_range: as in `image_grid`.

  Returns:
    (2 * ceil(n' / ncols') * (H + pad) + pad, ncols' * (W + pad) + pad, C) float32 in
    [0, 1], n' = min(n, N), ncols' = min(ncols, n').
  """
  originals = _to_unit_float(originals, value_range, "side_by_side")
  reconstructions = _to_unit_float(reconstructions, value_range, "side_by_side")
  if originals.shape != reconstructions.shape:
    raise ValueError(
      f"side_by_side: originals {originals.shape} and reconstructions "
      f"{reconstructions.shape} differ in shape."
    )
  if ncols < 1 or pad < 0 or n < 1:
    raise ValueError(f"side_by_side: need n, ncols >= 1 and pad >= 0, got {n}, {ncols}, {pad}.")
  n = min(n, originals.shape[0])
  if n == 0:
    raise ValueError("side_by_side: no images to tile.")
  ncols = min(ncols, n)
  nrows = math.ceil(n / ncols)
  _, h, w, c = originals.shape
  # Slots of a (2 * nrows, ncols) layout; slots past the last pair keep pad_value.
  slots = np.full((2 * nrows * ncols, h, w, c), pad_value, dtype=np.float32)
  for i in range(n):
    row, col = divmod(i, ncols)
    slots[(2 * row) * ncols + col] = originals[i]
    slots[(2 * row + 1) * ncols + col] = reconstructions[i]
  return _tile(slots, ncols, pad, pad_value)
