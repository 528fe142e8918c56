"""Codebook diagnostics: the plotted data, the PNG files and the TensorBoard images."""

from __future__ import annotations

import os

import numpy as np
import pytest
from PIL import Image
from run_helpers import read_image_tags
from scipy.spatial.distance import cdist

from arcvq_jax import metric_writer
from arcvq_jax.evaluation import diagnostics


def collapsed_codebook(k: int = 64, d: int = 8, seed: int = 0):
  """A vanilla-VQ-like codebook: a few long, used rows; the rest short and unused."""
  rng = np.random.default_rng(seed)
  codebook = rng.normal(size=(k, d)) * 0.01
  counts = np.zeros(k, np.int64)
  codebook[:5] = rng.normal(size=(5, d)) * 3
  counts[:5] = [500, 300, 100, 50, 1]
  return codebook, counts


def test_pairwise_distances_equal_scipy():
  rng = np.random.default_rng(1)
  e = rng.normal(size=(50, 16)) * 2 + 1
  np.testing.assert_allclose(diagnostics.pairwise_distances(e), cdist(e, e), atol=1e-6)


def test_plots_show_the_data():
  codebook, counts = collapsed_codebook()
  figs = diagnostics.codebook_figures(codebook, counts)
  used, unused = figs["norm_vs_usage"].axes[0].collections
  norms = np.linalg.norm(codebook, axis=1)
  freq = counts / counts.sum()
  np.testing.assert_allclose(used.get_offsets(), np.stack([freq[:5], norms[:5]], 1))
  np.testing.assert_allclose(unused.get_offsets(), np.stack([freq[5:], norms[5:]], 1))
  matrix = figs["distances"].axes[0].images[0].get_array()
  np.testing.assert_allclose(matrix, cdist(codebook, codebook), atol=1e-6)
  bars = [p.get_height() for p in figs["usage"].axes[0].patches]
  np.testing.assert_allclose(bars, np.sort(freq)[::-1])
  assert "usage 7.8 % (5 / 64), perplexity" in figs["usage"].axes[0].get_title()


def test_large_codebooks_are_subsampled_in_the_matrix():
  rng = np.random.default_rng(2)
  fig = diagnostics.distance_matrix_figure(rng.normal(size=(3000, 4)))
  assert fig.axes[0].images[0].get_array().shape == (1024, 1024)
  assert "(1024 of 3000 rows)" in fig.axes[0].get_title()


def test_large_codebooks_draw_the_usage_as_one_outline():
  rng = np.random.default_rng(3)
  counts = rng.poisson(0.7, size=diagnostics.MAX_BARS + 1000)
  ax = diagnostics.usage_histogram_figure(counts).axes[0]
  assert not ax.patches  # no bar per row
  (outline,) = ax.collections
  top = outline.get_paths()[0].vertices[:, 1]
  freq = np.sort(counts)[::-1] / counts.sum()
  np.testing.assert_allclose(np.unique(top[top > 0]), np.unique(freq[freq > 0]))


def test_writes_pngs_and_tensorboard_images(tmp_path):
  codebook, counts = collapsed_codebook()
  writer = metric_writer.create_writer(str(tmp_path / "tb"))
  paths = diagnostics.write_codebook_diagnostics(
    str(tmp_path / "out"), codebook, counts, prefix="test_step_7_", writer=writer, step=7
  )
  writer.flush()
  assert sorted(paths) == sorted(diagnostics.PLOTS)
  for name, path in paths.items():
    assert os.path.basename(path) == f"test_step_7_codebook_{name}.png"
    with Image.open(path) as img:
      assert img.format == "PNG" and img.size[0] >= 400 and img.size[1] >= 300
      assert np.asarray(img.convert("L")).std() > 10  # not a blank canvas
  assert read_image_tags(str(tmp_path / "tb")) == {f"codebook/{n}": {7} for n in diagnostics.PLOTS}


def test_titles_say_which_usage_they_show():
  codebook, counts = collapsed_codebook()
  rates = counts / counts.sum() + 5e-4  # EMA rates: every row keeps a little
  figs = diagnostics.codebook_figures(
    codebook,
    rates,
    source=diagnostics.training_source(300),
    used_above=diagnostics.EMA_USED_THRESHOLD,
  )
  title = figs["usage"].axes[0].get_title()
  assert title.startswith("usage 7.8 % (5 / 64), perplexity")
  assert "(training-time EMA usage at step 300: rows with rate > 0.001)" in title
  assert "training-time EMA" in figs["norm_vs_usage"].axes[0].get_title()
  split = diagnostics.usage_histogram_figure(counts, source=diagnostics.split_source("test", 6))
  assert "(test split, step 6: rows selected at least once)" in split.axes[0].get_title()


def test_unused_codebook_and_bad_shapes():
  codebook = np.zeros((16, 4))
  paths = diagnostics.codebook_figures(codebook, np.zeros(16))  # nothing used: no crash
  assert len(paths) == 3
  with pytest.raises(ValueError, match=r"codebook \(K, D\) and counts \(K,\)"):
    diagnostics.codebook_figures(codebook, np.zeros(15))
