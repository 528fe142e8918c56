"""Distribution metrics on Inception features (docs/math.md, eq. 39-41): Frechet distance (FID,
rFID), Inception Score, precision and recall (Kynkaanniemi et al. 2019, k = 3).

Statistics are accumulated while streaming over a data set (`FeatureStats`): running float64
sums of the pool features and of their outer products, Inception Score sums per split, and a
fixed-size random subset of features for precision/recall; no image and no full feature
matrix is held. Everything here runs on the host in numpy except the blocked k-NN search of
precision/recall, which is jitted.
"""

from __future__ import annotations

import functools
import warnings
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath

from arcvq_jax import npz_files

PR_NEIGHBOURS = 3  # Kynkaanniemi et al.: the k-th nearest neighbour sets each radius
IS_SPLITS = 10  # the original Inception Score code's 10 splits
PR_BLOCK = 1024  # rows per block of the pairwise-distance search


class StatisticsError(ValueError):
  """Statistics that cannot be compared (other dimensions, networks or image sizes)."""


def warn_if_few(num_images: int, dim: int, what: str) -> None:
  """FID's covariance has rank < dim with fewer than dim + 1 images: the number is then
  biased high and not comparable with published values."""
  if num_images <= dim:
    warnings.warn(
      f"{what}: {num_images} images for {dim}-dimensional Inception features; the covariance "
      f"is singular and FID is not comparable with published values (use >= {dim + 1}, "
      "the protocol uses 10k-50k).",
      stacklevel=2,
    )


# -------------------------------------------------------------------------- Frechet distance


def _sqrtm_psd(a: np.ndarray) -> np.ndarray:
  """Symmetric square root of a symmetric positive semi-definite matrix (eigenvalues < 0 from
  rounding are set to 0)."""
  w, v = np.linalg.eigh((a + a.T) / 2)
  return (v * np.sqrt(np.maximum(w, 0.0))) @ v.T


def frechet_distance(
  mu1: np.ndarray, sigma1: np.ndarray, mu2: np.ndarray, sigma2: np.ndarray
) -> float:
  """||mu1 - mu2||^2 + Tr(S1 + S2 - 2 (S1 S2)^(1/2)) between N(mu1, S1) and N(mu2, S2).

  Tr (S1 S2)^(1/2) = sum_i sqrt(lambda_i(A S2 A)) with A = S1^(1/2): A S2 A is symmetric
  positive semi-definite with the eigenvalues of S1 S2, so two symmetric eigendecompositions
  replace scipy's general `sqrtm` (which pytorch-fid uses): no complex parts, no failure on
  singular covariances, and the same value as pytorch-fid's `calculate_frechet_distance`
  where that one converges. float64 throughout.
  """
  mu1, mu2 = np.atleast_1d(np.asarray(mu1, np.float64)), np.atleast_1d(np.asarray(mu2, np.float64))
  s1, s2 = (
    np.atleast_2d(np.asarray(sigma1, np.float64)),
    np.atleast_2d(np.asarray(sigma2, np.float64)),
  )
  if mu1.shape != mu2.shape or s1.shape != s2.shape or s1.shape != mu1.shape * 2:
    raise StatisticsError(
      f"statistics of different dimensions: mu {mu1.shape} vs {mu2.shape}, sigma {s1.shape} "
      f"vs {s2.shape}; compare features of the same network layer."
    )
  root1 = _sqrtm_psd(s1)
  eig = np.linalg.eigvalsh(root1 @ s2 @ root1)
  tr_covmean = np.sum(np.sqrt(np.maximum(eig, 0.0)))
  diff = mu1 - mu2
  return float(diff @ diff + np.trace(s1) + np.trace(s2) - 2.0 * tr_covmean)


# ------------------------------------------------------------------------- Inception Score


def _softmax64(logits: np.ndarray) -> np.ndarray:
  z = np.asarray(logits, np.float64)
  z = z - z.max(axis=1, keepdims=True)
  p = np.exp(z)
  return p / p.sum(axis=1, keepdims=True)


def inception_score(logits: np.ndarray, splits: int = IS_SPLITS) -> tuple[float, float]:
  """(mean, std) over `splits` contiguous splits of exp(E_x KL(p(y|x) || p(y))), p the
  softmax of the (unbiased) 1008 logits, as the original code (improved-gan) computes it.

  logits: (N, 1008). The streamed `FeatureStats.inception_score` gives the same numbers.
  """
  stats = _ISSums(len(logits), splits)
  stats.update(logits)
  return stats.score()


class _ISSums:
  """Per split: count, sum_i p_i (classes) and sum_i sum_c p_ic log p_ic, enough for
  KL mean = mean_i sum_c p log p - sum_c pbar log pbar. The N images are expected in
  advance, since they are split in arrival order."""

  def __init__(self, total: int, splits: int):
    if total < splits:
      raise StatisticsError(
        f"the Inception Score needs at least {splits} images (one per split), got {total}."
      )
    self.total, self.splits, self.seen = total, splits, 0
    self.count = np.zeros(splits, np.int64)
    self.p_sum: np.ndarray | None = None
    self.plogp = np.zeros(splits, np.float64)

  def update(self, logits: np.ndarray) -> None:
    p = _softmax64(logits)
    if self.p_sum is None:
      self.p_sum = np.zeros((self.splits, p.shape[1]), np.float64)
    # Split s = images [s N // splits, (s + 1) N // splits), the original code's slices.
    i = np.arange(self.seen, self.seen + len(p))
    split = -(-(i + 1) * self.splits // self.total) - 1
    if len(p) and split[-1] >= self.splits:
      raise StatisticsError(
        f"more than the {self.total} images announced for the Inception Score arrived."
      )
    self.seen += len(p)
    ent = np.sum(p * np.log(np.maximum(p, 1e-300)), axis=1)
    np.add.at(self.count, split, 1)
    np.add.at(self.p_sum, split, p)
    np.add.at(self.plogp, split, ent)

  def score(self) -> tuple[float, float]:
    if self.seen != self.total:
      raise StatisticsError(f"the Inception Score expected {self.total} images, got {self.seen}.")
    pbar = self.p_sum / self.count[:, None]
    kl = self.plogp / self.count - np.sum(pbar * np.log(np.maximum(pbar, 1e-300)), axis=1)
    scores = np.exp(kl)
    return float(np.mean(scores)), float(np.std(scores))


# ------------------------------------------------------------------------ precision/recall


def _pairwise_sq(a: jax.Array, b: jax.Array) -> jax.Array:
  """(n, D), (m, D) -> (n, m) squared Euclidean distances (float32, >= 0)."""
  d = (
    jnp.sum(a * a, 1)[:, None]
    - 2.0 * jnp.dot(a, b.T, precision=jax.lax.Precision.HIGHEST)
    + jnp.sum(b * b, 1)[None, :]
  )
  return jnp.maximum(d, 0.0)


@functools.partial(jax.jit, static_argnames="k")
def _kth_block(block: jax.Array, points: jax.Array, k: int) -> jax.Array:
  """Squared distance of each block row to its k-th nearest point (the row itself, at
  distance 0, is the 0-th), as the reference code's np.partition(d, k)[:, k]."""
  return -jax.lax.top_k(-_pairwise_sq(block, points), k + 1)[0][:, k]


@jax.jit
def _covered_block(block: jax.Array, points: jax.Array, radii: jax.Array) -> jax.Array:
  """Whether each block row lies within the radius of at least one point."""
  return jnp.any(_pairwise_sq(block, points) <= radii[None, :], axis=1)


def _blocks(x: np.ndarray, fn, *args) -> np.ndarray:
  """fn over fixed-size row blocks of x (the last one padded: one compile per shape)."""
  out = []
  for start in range(0, len(x), PR_BLOCK):
    block = x[start : start + PR_BLOCK]
    n = len(block)
    if n < PR_BLOCK and len(x) > PR_BLOCK:
      block = np.concatenate([block, np.zeros((PR_BLOCK - n, x.shape[1]), x.dtype)])
    out.append(np.asarray(fn(block, *args))[:n])
  return np.concatenate(out)


def knn_radii(features: np.ndarray, k: int = PR_NEIGHBOURS) -> np.ndarray:
  """(N,) squared distance of every point to its k-th nearest other point."""
  if k < 1:
    raise ValueError(f"k must be >= 1, got {k}.")
  if len(features) <= k:
    raise StatisticsError(
      f"precision/recall with k = {k} needs more than {k} points per set, got {len(features)}."
    )
  x = np.asarray(features, np.float32)
  return _blocks(x, functools.partial(_kth_block, k=k), jnp.asarray(x))


def precision_recall(
  real: np.ndarray, fake: np.ndarray, k: int = PR_NEIGHBOURS
) -> tuple[float, float]:
  """Improved precision and recall (Kynkaanniemi et al. 2019).

  Each set's manifold is the union of balls around its points with radius the distance to
  the point's k-th nearest neighbour in its own set. Precision: the share of fake points
  inside the real manifold; recall: the share of real points inside the fake manifold
  (a point on a ball's boundary counts as inside, as in the reference code).

  real: (N, D), fake: (M, D) features, e.g. Inception pool features.
  """
  real, fake = np.asarray(real, np.float32), np.asarray(fake, np.float32)
  if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
    raise StatisticsError(
      f"precision/recall needs (N, D) features of one D, got {real.shape} and {fake.shape}."
    )
  r_real, r_fake = knn_radii(real, k), knn_radii(fake, k)
  precision = _blocks(fake, _covered_block, jnp.asarray(real), jnp.asarray(r_real)).mean()
  recall = _blocks(real, _covered_block, jnp.asarray(fake), jnp.asarray(r_fake)).mean()
  return float(precision), float(recall)


# --------------------------------------------------------------------- streamed statistics


class FeatureStats:
  """Statistics of one image set, accumulated batch by batch.

  - mean and covariance of the pool features (float64 sums of f - c and (f - c)(f - c)^T
    with c the first batch's mean, so the covariance does not cancel catastrophically);
  - `keep` features drawn uniformly at random from the whole stream (reservoir sampling with
    `seed`), for precision/recall;
  - with `total` (the number of images, needed to place the splits), the Inception Score
    sums of the logits.

  `save` / `load` write and read an .npz that `python -m arcvq_jax.evaluate_samples` uses as
  cached reference statistics; pytorch-fid's statistics files (mu, sigma) load too (FID only).
  """

  def __init__(
    self,
    dim: int = 2048,
    keep: int = 10000,
    total: int | None = None,
    splits: int = IS_SPLITS,
    seed: int = 0,
  ):
    self.dim, self.keep = dim, keep
    self.count = 0
    self._shift: np.ndarray | None = None
    self._sum = np.zeros(dim, np.float64)
    self._outer = np.zeros((dim, dim), np.float64)
    self._rng = np.random.default_rng(seed)
    self._kept = np.zeros((keep, dim), np.float32)
    self._num_kept = 0
    self._is = _ISSums(total, splits) if total is not None else None
    self.info: dict[str, Any] = {}  # what the images were, e.g. image_shape, source, network
    self._mu: np.ndarray | None = None  # set by `load` / `from_mean_cov`
    self._sigma: np.ndarray | None = None

  def update(self, pool: np.ndarray, logits: np.ndarray | None = None) -> None:
    """pool: (n, dim) features of n more images; logits: (n, 1008) with `total`."""
    pool = np.asarray(pool)
    if pool.ndim != 2 or pool.shape[1] != self.dim:
      raise StatisticsError(f"expected (n, {self.dim}) features, got {pool.shape}.")
    if self._mu is not None:
      raise StatisticsError("these statistics were loaded from a file and cannot be extended.")
    if not len(pool):
      return
    f = pool.astype(np.float64)
    if self._shift is None:
      self._shift = f.mean(axis=0)
    c = f - self._shift
    self._sum += c.sum(axis=0)
    self._outer += c.T @ c
    self._reservoir(pool.astype(np.float32))
    self.count += len(pool)
    if self._is is not None:
      if logits is None:
        raise ValueError("these statistics collect the Inception Score: pass the logits too.")
      self._is.update(logits)

  def _reservoir(self, f: np.ndarray) -> None:
    """Algorithm R: item t (0-based) replaces a random kept one with probability keep/(t+1)."""
    t = self.count + np.arange(len(f))
    fill = t < self.keep
    self._kept[t[fill]] = f[fill]
    self._num_kept = min(self.keep, self._num_kept + int(fill.sum()))
    rest = np.flatnonzero(~fill)
    if rest.size:
      slots = (self._rng.random(rest.size) * (t[rest] + 1)).astype(np.int64)
      take = slots < self.keep
      # In stream order, so a later item overwrites an earlier one in the same slot.
      for i, s in zip(rest[take], slots[take], strict=True):
        self._kept[s] = f[i]

  def mean_cov(self) -> tuple[np.ndarray, np.ndarray]:
    """(mu (dim,), sigma (dim, dim)) float64; sigma with the n - 1 normalisation of np.cov."""
    if self._mu is not None:
      return self._mu, self._sigma
    if self.count < 2:
      raise StatisticsError(f"need at least 2 images for a covariance, got {self.count}.")
    n = self.count
    m = self._sum / n
    cov = (self._outer - n * np.outer(m, m)) / (n - 1)
    return m + self._shift, cov

  @property
  def features(self) -> np.ndarray:
    """The kept (min(count, keep), dim) float32 features, in no particular order."""
    return self._kept[: self._num_kept]

  def inception_score(self) -> tuple[float, float]:
    if self._is is None:
      raise StatisticsError("these statistics did not collect the Inception Score (pass total).")
    return self._is.score()

  def save(self, path: str) -> None:
    """Writes mu, sigma (pytorch-fid's keys), num_images, features and info as .npz (local or
    gs://), atomically."""
    mu, sigma = self.mean_cov()
    arrays = dict(mu=mu, sigma=sigma, num_images=np.int64(self.count), features=self.features)
    arrays.update({f"info_{k}": np.asarray(v) for k, v in self.info.items()})
    npz_files.save_npz(path, arrays)

  @classmethod
  def load(cls, path: str) -> FeatureStats:
    """Statistics written by `save`, or a pytorch-fid statistics file (mu, sigma only)."""
    if not epath.Path(path).expanduser().exists():
      raise FileNotFoundError(f"no statistics file at {path}.")
    data = npz_files.read_npz(path)
    if "mu" not in data or "sigma" not in data:
      raise StatisticsError(
        f"{path} has no 'mu' and 'sigma': not a statistics file (it holds {sorted(data)})."
      )
    return cls.from_mean_cov(
      data["mu"],
      data["sigma"],
      count=int(data["num_images"]) if "num_images" in data else 0,
      features=data.get("features"),
      info={k[len("info_") :]: v.tolist() for k, v in data.items() if k.startswith("info_")},
    )

  @classmethod
  def from_mean_cov(
    cls,
    mu: np.ndarray,
    sigma: np.ndarray,
    *,
    count: int = 0,
    features: np.ndarray | None = None,
    info: dict[str, Any] | None = None,
  ) -> FeatureStats:
    """Statistics given as their mean (dim,) and covariance (dim, dim) (a file's), with
    optional features (n, dim) for precision/recall; `count` images (0: unknown)."""
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    stats = cls(dim=mu.shape[0], keep=0)
    stats._mu, stats._sigma = mu, sigma
    stats.count = count
    if features is not None:
      stats._kept = np.asarray(features, np.float32)
      stats._num_kept = len(stats._kept)
    stats.info = dict(info or {})
    return stats


def fid_from_stats(a: FeatureStats, b: FeatureStats) -> float:
  """The Frechet distance between two accumulated feature sets."""
  return frechet_distance(*a.mean_cov(), *b.mean_cov())
