"""The paper's codebook diagnostics as images (docs/math.md, section 12), drawn with matplotlib:

  norm_vs_usage   each codebook row's L2 norm against how often it was selected (Fig. 2: with
                  vanilla VQ the used rows grow long and the unused ones stay near the origin)
  distances       the K x K matrix of pairwise L2 distances between codebook rows (Fig. 3:
                  dark blocks are rows that collapsed onto each other)
  usage           selection frequency of every row, sorted (a rank-frequency histogram), with
                  usage and perplexity

`write_codebook_diagnostics` saves the three as PNG files and, given a metric writer
(arcvq_jax.metric_writer), logs them as TensorBoard images.

Two different usages are plotted in this project, and each plot says which in its title
(`source`): the training loop draws the rows' training-time EMA selection rates (a row counts
as used above EMA_USED_THRESHOLD, as TensorBoard's train/ema_usage), `python -m
arcvq_jax.evaluate` the selection counts of one split's tokens (used: selected at least once,
as codebook_usage in its JSON). They differ: most rows keep some EMA rate long after the last
batch that picked them.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np

from arcvq_jax.evaluation import metrics

# More rows than this are subsampled (evenly spaced) in the distance matrix image.
MAX_MATRIX_CODES = 1024
# More rows than this are drawn as a filled step outline instead of one bar each.
MAX_BARS = 4096
PLOTS = ("norm_vs_usage", "distances", "usage")
# The training loop's EMA usage rate above which a row counts as used (train/ema_usage).
EMA_USED_THRESHOLD = 1e-3


def _figure(width: float = 6.4, height: float = 4.8):
  # The object-oriented API with the Agg canvas: no pyplot state, no display needed.
  from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: PLC0415
  from matplotlib.figure import Figure  # noqa: PLC0415

  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _as_arrays(codebook: Any, counts: Any) -> tuple[np.ndarray, np.ndarray]:
  codebook = np.asarray(codebook, np.float64)
  counts = np.asarray(counts, np.float64)
  if codebook.ndim != 2 or counts.shape != codebook.shape[:1]:
    raise ValueError(
      f"expected a codebook (K, D) and counts (K,), got {codebook.shape} and {counts.shape}."
    )
  return codebook, counts


def pairwise_distances(codebook: np.ndarray) -> np.ndarray:
  """(K, D) -> (K, K) float64 Euclidean distances between the rows (through the Gram matrix:
  K x K x D differences would not fit for large codebooks; absolute error ~1e-7 x norm)."""
  e = np.asarray(codebook, np.float64)
  sq = np.sum(e * e, axis=1)
  dist = np.sqrt(np.maximum(sq[:, None] - 2.0 * e @ e.T + sq[None, :], 0.0))
  np.fill_diagonal(dist, 0.0)
  return dist


def _source_note(source: str) -> str:
  return f"\n({source})" if source else ""


def norm_vs_usage_figure(
  codebook: Any, counts: Any, title: str = "", *, source: str = "", used_above: float = 0.0
):
  """Fig. 2: scatter of row norm (y) against selection frequency (x, symmetric log scale so
  that unused rows sit at 0). A row is used where its count (or rate) exceeds `used_above`;
  `source` names what the counts are (in the title)."""
  codebook, counts = _as_arrays(codebook, counts)
  norms = np.linalg.norm(codebook, axis=1)
  freq = counts / max(counts.sum(), 1.0)
  used = counts > used_above
  fig = _figure()
  ax = fig.add_subplot()
  ax.scatter(freq[used], norms[used], s=8, alpha=0.7, label=f"used ({used.sum()})")
  ax.scatter(
    freq[~used], norms[~used], s=8, alpha=0.7, color="tab:red", label=f"unused ({(~used).sum()})"
  )
  positive = freq[used]
  ax.set_xscale("symlog", linthresh=float(positive.min()) if positive.size else 1e-6)
  ax.set_xlabel("selection frequency (share of tokens)")
  ax.set_ylabel("codebook row L2 norm")
  ax.set_title(title or "codebook row norm vs. usage" + _source_note(source))
  ax.legend(loc="best")
  ax.grid(alpha=0.3)
  fig.tight_layout()
  return fig


def distance_matrix_figure(codebook: Any, title: str = ""):
  """Fig. 3: the pairwise L2 distance matrix of the codebook rows, in index order (bright =
  far apart); K > MAX_MATRIX_CODES rows are subsampled evenly."""
  codebook = np.asarray(codebook, np.float64)
  k = codebook.shape[0]
  rows = np.linspace(0, k - 1, min(k, MAX_MATRIX_CODES)).round().astype(int)
  dist = pairwise_distances(codebook[rows])
  fig = _figure(6.4, 5.6)
  ax = fig.add_subplot()
  image = ax.imshow(dist, cmap="viridis", interpolation="nearest")
  fig.colorbar(image, ax=ax, label="L2 distance")
  note = "" if len(rows) == k else f" ({len(rows)} of {k} rows)"
  ax.set_title((title or "pairwise distances of codebook rows") + note)
  ax.set_xlabel("code index")
  ax.set_ylabel("code index")
  if len(rows) != k:  # label the axes with the original indices
    ticks = ax.get_xticks()
    ticks = ticks[(ticks >= 0) & (ticks < len(rows))]
    ax.set_xticks(ticks, [str(rows[int(t)]) for t in ticks])
    ax.set_yticks(ticks, [str(rows[int(t)]) for t in ticks])
  fig.tight_layout()
  return fig


def usage_histogram_figure(
  counts: Any, title: str = "", *, source: str = "", used_above: float = 0.0
):
  """Selection frequency of every codebook row, sorted from most to least used; the title
  gives the usage (rows above `used_above`) and perplexity, and `source`."""
  counts = np.asarray(counts, np.float64)
  freq = np.sort(counts)[::-1] / max(counts.sum(), 1.0)
  fig = _figure()
  ax = fig.add_subplot()
  if len(freq) <= MAX_BARS:
    ax.bar(np.arange(len(freq)), freq, width=1.0)
  else:  # one bar per row takes minutes to draw at K = 100k; the step outline is the same
    ax.fill_between(np.arange(len(freq)), freq, step="mid", linewidth=0)
  if np.any(freq > 0):
    ax.set_yscale("log")
  ax.set_xlim(-0.5, len(freq) - 0.5)
  ax.set_xlabel("codebook rows, by decreasing usage")
  ax.set_ylabel("selection frequency (share of tokens)")
  used = int(np.sum(counts > used_above))
  ax.set_title(
    title
    or f"usage {100 * used / len(counts):.1f} % ({used} / {len(counts)}), "
    f"perplexity {float(metrics.perplexity(counts)):.1f}"
    + _source_note(source)
  )
  ax.grid(alpha=0.3, axis="y")
  fig.tight_layout()
  return fig


def training_source(step: int) -> str:
  """The title note of plots drawn from the training loop's EMA usage rates."""
  return f"training-time EMA usage at step {step}: rows with rate > {EMA_USED_THRESHOLD:g}"


def split_source(split: str, step: int) -> str:
  """The title note of plots drawn from the code counts of one split (evaluation)."""
  return f"{split} split, step {step}: rows selected at least once"


def to_png(fig) -> bytes:
  buf = io.BytesIO()
  fig.savefig(buf, format="png")
  return buf.getvalue()


def to_rgb(fig) -> np.ndarray:
  """(H, W, 3) uint8 pixels of a figure, for TensorBoard."""
  fig.canvas.draw()
  return np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()


def codebook_figures(
  codebook: Any, counts: Any, *, source: str = "", used_above: float = 0.0
) -> dict[str, Any]:
  """{'norm_vs_usage', 'distances', 'usage'} -> matplotlib figures (see the usage plots for
  `source` and `used_above`)."""
  codebook, counts = _as_arrays(codebook, counts)
  usage = dict(source=source, used_above=used_above)
  return dict(
    norm_vs_usage=norm_vs_usage_figure(codebook, counts, **usage),
    distances=distance_matrix_figure(codebook),
    usage=usage_histogram_figure(counts, **usage),
  )


def write_codebook_diagnostics(
  directory: str,
  codebook: Any,
  counts: Any,
  *,
  prefix: str = "",
  writer: Any = None,
  step: int = 0,
  tag: str = "codebook",
  source: str = "",
  used_above: float = 0.0,
) -> dict[str, str]:
  """Saves `{directory}/{prefix}codebook_{name}.png` for the three plots; with a metric
  writer (arcvq_jax.metric_writer), also logs them as images '{tag}/{name}' at `step`.

  codebook: (K, D) rows as the model stores them; counts: (K,) selection counts over the
  evaluation set (`metrics.code_counts`), or the training-time EMA usage rates. `source`
  says which, in the titles: e.g. "test split, step 300: rows selected at least once", or
  training_source(step) with used_above=EMA_USED_THRESHOLD. Returns {name: path}.
  """
  os.makedirs(directory, exist_ok=True)
  paths = {}
  figures = codebook_figures(codebook, counts, source=source, used_above=used_above)
  for name, fig in figures.items():
    path = os.path.join(directory, f"{prefix}codebook_{name}.png")
    with open(path, "wb") as f:
      f.write(to_png(fig))
    paths[name] = path
  if writer is not None:
    writer.write_images(step, {f"{tag}/{name}": to_rgb(fig)[None] for name, fig in figures.items()})
  return paths
