"""Frechet distance, Inception Score and precision/recall against closed forms, pytorch-fid's
`calculate_frechet_distance` and brute-force numpy; the streamed statistics against numpy."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from pytorch_fid.fid_score import calculate_frechet_distance

from arcvq_jax.evaluation import fid


def random_cov(rng, d: int, rank: int | None = None) -> np.ndarray:
  a = rng.normal(size=(d, rank or d))
  return a @ a.T / (rank or d) + (0 if rank else 0.1 * np.eye(d))


def test_frechet_distance_of_a_set_with_itself_is_zero():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(3000, 64)) @ rng.normal(size=(64, 64)) + 3.0
  mu, sigma = feats.mean(0), np.cov(feats, rowvar=False)
  assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)


def test_shifted_and_diagonal_gaussians_match_the_closed_form():
  rng = np.random.default_rng(1)
  d = 32
  sigma = random_cov(rng, d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d)
  # Same covariance: only the means differ.
  np.testing.assert_allclose(
    fid.frechet_distance(mu1, sigma, mu2, sigma), np.sum((mu1 - mu2) ** 2), rtol=1e-9
  )
  # Diagonal covariances: sum (s1 - s2)^2 over the standard deviations.
  v1, v2 = rng.uniform(0.1, 4, d), rng.uniform(0.1, 4, d)
  want = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(v1) - np.sqrt(v2)) ** 2)
  np.testing.assert_allclose(
    fid.frechet_distance(mu1, np.diag(v1), mu2, np.diag(v2)), want, rtol=1e-9
  )


@pytest.mark.parametrize("d", [16, 256])
def test_agrees_with_pytorch_fid(d):
  rng = np.random.default_rng(d)
  mu1, mu2 = rng.normal(size=d), rng.normal(size=d) * 0.1
  s1, s2 = random_cov(rng, d), random_cov(rng, d)
  want = calculate_frechet_distance(mu1, s1, mu2, s2)
  np.testing.assert_allclose(fid.frechet_distance(mu1, s1, mu2, s2), want, rtol=1e-7)


def test_singular_covariances_give_a_finite_value_and_a_warning():
  rng = np.random.default_rng(2)
  d, n = 64, 20  # fewer samples than dimensions: rank-19 covariances
  a, b = rng.normal(size=(n, d)), rng.normal(size=(n, d)) + 0.5
  value = fid.frechet_distance(
    a.mean(0), np.cov(a, rowvar=False), b.mean(0), np.cov(b, rowvar=False)
  )
  assert np.isfinite(value) and value > 0
  with pytest.warns(UserWarning, match=r"20 images for 64-dimensional .* not comparable"):
    fid.warn_if_few(n, d, "FID")
  with warnings.catch_warnings():
    warnings.simplefilter("error")
    fid.warn_if_few(65, 64, "FID")


def test_different_dimensions_are_refused():
  with pytest.raises(fid.StatisticsError, match="different dimensions"):
    fid.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def test_streamed_mean_and_covariance_equal_numpy():
  rng = np.random.default_rng(3)
  # A large common offset: naive sums of squares would lose the covariance to cancellation.
  feats = (rng.normal(size=(1000, 48)) * 0.01 + 1e3).astype(np.float32)
  stats = fid.FeatureStats(dim=48, keep=10)
  for start, stop in ((0, 1), (1, 300), (300, 301), (301, 1000)):
    stats.update(feats[start:stop])
  mu, sigma = stats.mean_cov()
  f64 = feats.astype(np.float64)
  np.testing.assert_allclose(mu, f64.mean(0), rtol=1e-12)
  np.testing.assert_allclose(sigma, np.cov(f64, rowvar=False), rtol=1e-9, atol=1e-12)
  assert stats.count == 1000


def test_reservoir_keeps_a_uniform_subset():
  n, keep = 200, 20
  feats = np.arange(n, dtype=np.float32)[:, None] * np.ones((1, 4), np.float32)
  hits = np.zeros(n)
  for seed in range(300):
    stats = fid.FeatureStats(dim=4, keep=keep, seed=seed)
    for start in range(0, n, 37):
      stats.update(feats[start : start + 37])
    kept = stats.features[:, 0].astype(int)
    assert len(kept) == keep and len(set(kept)) == keep  # distinct input rows
    hits[kept] += 1
  # Each row is kept with probability keep / n = 0.1: 30 of 300 runs, sd ~5.2.
  assert abs(hits.mean() - 30) < 1e-9
  assert hits.min() > 30 - 5 * 5.2 and hits.max() < 30 + 5 * 5.2
  assert np.abs(hits[:keep].mean() - hits[keep:].mean()) < 5  # first rows not favoured


def naive_inception_score(logits: np.ndarray, splits: int) -> tuple[float, float]:
  """The original code (improved-gan inception_score.py) on softmax predictions."""
  preds = np.exp(logits - logits.max(1, keepdims=True))
  preds /= preds.sum(1, keepdims=True)
  n, scores = len(preds), []
  for i in range(splits):
    part = preds[(i * n // splits) : ((i + 1) * n // splits), :]
    kl = part * (np.log(part) - np.log(np.expand_dims(np.mean(part, 0), 0)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  return float(np.mean(scores)), float(np.std(scores))


def test_inception_score_streamed_equals_the_original_code():
  rng = np.random.default_rng(4)
  logits = rng.normal(size=(997, 1008)) * 3  # 997: splits of unequal size
  want = naive_inception_score(logits, 10)
  stats = fid.FeatureStats(dim=2, keep=0, total=len(logits))
  for start in range(0, len(logits), 128):
    stats.update(np.zeros((len(logits[start : start + 128]), 2)), logits[start : start + 128])
  np.testing.assert_allclose(stats.inception_score(), want, rtol=1e-10)
  np.testing.assert_allclose(fid.inception_score(logits), want, rtol=1e-10)


def test_inception_score_known_values():
  # Confident and spread evenly over 100 classes in every split: IS = 100; uniform: IS = 1.
  one_hot = np.full((1000, 1008), -1e4)
  one_hot[np.arange(1000), np.arange(1000) % 100] = 0.0
  np.testing.assert_allclose(fid.inception_score(one_hot), (100.0, 0.0), atol=1e-9)
  np.testing.assert_allclose(fid.inception_score(np.zeros((50, 1008))), (1.0, 0.0), atol=1e-12)
  with pytest.raises(fid.StatisticsError, match="at least 10 images"):
    fid.inception_score(np.zeros((5, 1008)))


def test_precision_recall_on_a_toy_set_with_known_answers():
  # Real: 100 points on a line, spacing 1. Fake: copies of the first 50, plus 50 points far
  # away. k = 3: every radius is 3 (the 3rd neighbour along the line), so precision is
  # 50 / 100 (the copies) and recall 53 / 100 (real 0..49 and 50..52, within 3 of copy 49;
  # 52 lies exactly on the boundary, which counts as inside).
  line = np.stack([np.arange(100.0), np.zeros(100)], 1).astype(np.float32)
  far = np.stack([np.arange(50.0), np.full(50, 1000.0)], 1).astype(np.float32)
  fake = np.concatenate([line[:50], far])
  assert fid.precision_recall(line, fake) == (0.5, 0.53)
  assert fid.precision_recall(line, line) == (1.0, 1.0)


def brute_force_precision_recall(real, fake, k):
  def radii(x):
    d = np.sum((x[:, None] - x[None]) ** 2, -1)
    return np.sort(d, axis=1)[:, k]

  d = np.sum((fake[:, None] - real[None]) ** 2, -1)  # (fake, real)
  precision = np.mean(np.any(d <= radii(real)[None], axis=1))
  recall = np.mean(np.any(radii(fake)[None] >= d.T, axis=1))
  return precision, recall


def test_precision_recall_in_blocks_equals_brute_force(monkeypatch):
  monkeypatch.setattr(fid, "PR_BLOCK", 64)  # several blocks and a padded last one
  rng = np.random.default_rng(5)
  real = rng.normal(size=(300, 8)).astype(np.float32)
  fake = (rng.normal(size=(230, 8)) * 1.3 + 0.4).astype(np.float32)
  got = fid.precision_recall(real, fake)
  want = brute_force_precision_recall(real.astype(np.float64), fake.astype(np.float64), 3)
  np.testing.assert_allclose(got, want, atol=1.5 / 230)  # at most a boundary point apart
  assert 0.1 < got[0] < 0.99 and 0.1 < got[1] < 0.99  # neither trivial
  with pytest.raises(fid.StatisticsError, match="one D"):
    fid.precision_recall(real, fake[:, :4])


def test_save_and_load_statistics(tmp_path):
  rng = np.random.default_rng(6)
  stats = fid.FeatureStats(dim=16, keep=50)
  stats.update(rng.normal(size=(120, 16)))
  stats.info = dict(image_shape=(28, 28, 1), source="toy", network="abc")
  path = str(tmp_path / "stats.npz")
  stats.save(path)
  again = fid.FeatureStats.load(path)
  for a, b in zip(stats.mean_cov(), again.mean_cov(), strict=True):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(again.features, stats.features)
  assert again.count == 120
  assert again.info == dict(image_shape=[28, 28, 1], source="toy", network="abc")
  assert fid.fid_from_stats(stats, again) == pytest.approx(0.0, abs=1e-9)
  with pytest.raises(fid.StatisticsError, match="cannot be extended"):
    again.update(np.zeros((1, 16)))
  # pytorch-fid's statistics files hold mu and sigma only.
  np.savez(str(tmp_path / "pfid.npz"), mu=np.zeros(16), sigma=np.eye(16))
  pfid = fid.FeatureStats.load(str(tmp_path / "pfid.npz"))
  assert pfid.features.shape == (0, 16) and pfid.count == 0
  np.savez(str(tmp_path / "other.npz"), images=np.zeros((2, 4, 4, 3)))
  with pytest.raises(fid.StatisticsError, match="no 'mu' and 'sigma'"):
    fid.FeatureStats.load(str(tmp_path / "other.npz"))
