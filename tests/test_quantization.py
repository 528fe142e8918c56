"""The quantisation math against straightforward numpy versions of docs/math.md, sections 1-8."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcvq_jax import quantization as vq

jax.config.update("jax_enable_x64", False)


def np_normalize(x):
  n = np.linalg.norm(x, axis=-1, keepdims=True)
  return x / np.maximum(n, 1e-12)


def np_arc_loss(z, e, s, m, k):
  """Eq. 10-12 literally, in float64: exp, sums, divide (fine at these sizes)."""
  c = np_normalize(e) @ np_normalize(z).T  # (K, N)
  total = 0.0
  for row in c:
    top = np.argsort(-row, kind="stable")[:k]
    logits = s * row.copy()
    theta = np.arccos(np.clip(row[top], -1 + 1e-7, 1 - 1e-7))
    logits[top] = s * np.cos(theta + m)
    total += -np.log(np.exp(logits[top]).sum() / np.exp(logits).sum())
  return total / len(c)


def numeric_grad(f, x, eps=1e-5):
  g = np.zeros_like(x)
  for idx in np.ndindex(x.shape):
    d = np.zeros_like(x)
    d[idx] = eps
    g[idx] = (f(x + d) - f(x - d)) / (2 * eps)
  return g


@pytest.fixture
def data():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(40, 8)).astype(np.float32)
  e = rng.normal(size=(6, 8)).astype(np.float32) * rng.uniform(0.2, 3, size=(6, 1)).astype(
    np.float32
  )
  return z, e


def test_nearest_code_cosine_and_euclidean(data):
  z, e = data
  want_cos = np.argmax(np_normalize(z) @ np_normalize(e).T, axis=1)
  want_euc = np.argmin(((z[:, None, :] - e[None]) ** 2).sum(-1), axis=1)
  assert (want_cos != want_euc).any(), "test data must tell the two distances apart"
  np.testing.assert_array_equal(vq.nearest_code(jnp.asarray(z), jnp.asarray(e), "cosine"), want_cos)
  np.testing.assert_array_equal(
    vq.nearest_code(jnp.asarray(z), jnp.asarray(e), "euclidean"), want_euc
  )


def test_cosine_match_ignores_norms_and_ties_go_to_lowest_index():
  e = np.array([[1.0, 0.0], [5.0, 0.0], [0.0, 1.0]], np.float32)  # rows 0 and 1 same direction
  z = np.array([[2.0, 0.1], [0.0, 0.0]], np.float32)  # second: zero vector
  idx = vq.nearest_code(jnp.asarray(z), jnp.asarray(e), "cosine")
  np.testing.assert_array_equal(idx, [0, 0])


@pytest.mark.slow
def test_quantize_returns_raw_rows_and_straight_through(data):
  z, e = data
  q = vq.quantize(jnp.asarray(z), jnp.asarray(e), "cosine")
  np.testing.assert_allclose(q.z_q, e[np.asarray(q.indices)], rtol=0, atol=0)
  np.testing.assert_allclose(q.z_ste, q.z_q, atol=1e-6)
  # d(sum(w * z_ste))/dz = w: the decoder's gradient passes straight to the encoder.
  w = np.random.default_rng(1).normal(size=z.shape).astype(np.float32)
  g = jax.grad(lambda zz: jnp.sum(vq.quantize(zz, jnp.asarray(e), "cosine").z_ste * w))(
    jnp.asarray(z)
  )
  np.testing.assert_allclose(g, w, rtol=1e-6)
  g_e = jax.grad(lambda ee: jnp.sum(vq.quantize(jnp.asarray(z), ee, "cosine").z_ste))(
    jnp.asarray(e)
  )
  assert np.all(np.asarray(g_e) == 0)


@pytest.mark.parametrize("legacy", [False, True])
def test_vq_loss_values_and_gradients(data, legacy):
  z, e = data
  idx = np.argmax(np_normalize(z) @ np_normalize(e).T, axis=1)
  zq = e[idx]
  beta = 0.25
  mse = np.mean((z - zq) ** 2)
  want = (beta * mse + mse) if legacy else (mse + beta * mse)
  loss = lambda zz, ee: vq.vq_loss(zz, ee[idx], beta, legacy=legacy)
  np.testing.assert_allclose(loss(jnp.asarray(z), jnp.asarray(e)), want, rtol=1e-5)
  gz, ge = jax.grad(loss, argnums=(0, 1))(jnp.asarray(z), jnp.asarray(e))
  n = z.size
  w_commit, w_code = (1.0, beta) if legacy else (beta, 1.0)
  np.testing.assert_allclose(gz, w_commit * 2 * (z - zq) / n, rtol=1e-5, atol=1e-8)
  want_ge = np.zeros_like(e)
  np.add.at(want_ge, idx, w_code * 2 * (zq - z) / n)
  np.testing.assert_allclose(ge, want_ge, rtol=1e-5, atol=1e-8)
  # Without the codebook term (EMA codebooks) no gradient reaches the codebook.
  ge0 = jax.grad(lambda ee: vq.vq_loss(jnp.asarray(z), ee[idx], beta, legacy, codebook_term=False))(
    jnp.asarray(e)
  )
  assert np.all(np.asarray(ge0) == 0)


def test_bbnr_radius_and_projection():
  assert np.isclose(vq.bbnr_radius(1000, 3e-4, "growing"), np.exp(0.3), rtol=1e-6)
  assert float(vq.bbnr_radius(1000, 3e-4, "fixed")) == 1.0
  assert np.isinf(vq.bbnr_radius(1000, 3e-4, "off"))
  e = np.array([[3.0, 4.0], [0.3, 0.4], [0.0, 0.0], [-6.0, 8.0]], np.float32)
  out = np.asarray(vq.bbnr_project(jnp.asarray(e), jnp.float32(2.0)))
  want = np.array([[1.2, 1.6], [0.3, 0.4], [0.0, 0.0], [-1.2, 1.6]], np.float32)
  np.testing.assert_allclose(out, want, rtol=1e-6)
  assert np.all(np.isfinite(out))
  np.testing.assert_array_equal(vq.bbnr_project(jnp.asarray(e), jnp.float32(np.inf)), e)


@pytest.mark.slow
@pytest.mark.parametrize("s,m,k", [(10.0, 0.1, 3), (5.0, 0.3, 1), (10.0, 0.0, 5)])
def test_arc_loss_value_matches_numpy(data, s, m, k):
  z, e = data
  got = vq.arc_loss(jnp.asarray(z), jnp.asarray(e), s, m, k)
  np.testing.assert_allclose(
    got, np_arc_loss(z.astype(np.float64), e.astype(np.float64), s, m, k), rtol=2e-5
  )


@pytest.mark.slow
def test_arc_loss_gradient_reaches_latents_only(data):
  z, e = data
  z64, e64 = z.astype(np.float64), e.astype(np.float64)
  gz, ge = jax.grad(lambda a, b: vq.arc_loss(a, b, 10.0, 0.1, 3), argnums=(0, 1))(
    jnp.asarray(z), jnp.asarray(e)
  )
  assert np.all(np.asarray(ge) == 0), "stop-gradient on the codebook"
  want = numeric_grad(lambda zz: np_arc_loss(zz, e64, 10.0, 0.1, 3), z64)
  np.testing.assert_allclose(gz, want, rtol=2e-3, atol=2e-5)


@pytest.mark.slow
def test_arc_loss_is_log_sum_exp_stable():
  # s * cos up to 1000: a naive exp would overflow float32.
  rng = np.random.default_rng(3)
  z = rng.normal(size=(30, 4)).astype(np.float32)
  e = rng.normal(size=(5, 4)).astype(np.float32)
  loss = vq.arc_loss(jnp.asarray(z), jnp.asarray(e), 1000.0, 0.1, 3)
  assert np.isfinite(loss)
  g = jax.grad(lambda a: vq.arc_loss(a, jnp.asarray(e), 1000.0, 0.1, 3))(jnp.asarray(z))
  assert np.all(np.isfinite(g))


@pytest.mark.slow
def test_arc_loss_ties_and_zero_vectors():
  # Duplicated latents tie in the top-k; any choice among ties gives the same value.
  rng = np.random.default_rng(4)
  base = rng.normal(size=(6, 5)).astype(np.float32)
  z = np.concatenate([base, base, np.zeros((2, 5), np.float32)])
  e = np.concatenate([rng.normal(size=(4, 5)), np.zeros((1, 5))]).astype(np.float32)
  loss = vq.arc_loss(jnp.asarray(z), jnp.asarray(e), 10.0, 0.1, 3)
  np.testing.assert_allclose(
    loss, np_arc_loss(z.astype(np.float64), e.astype(np.float64), 10, 0.1, 3), rtol=2e-5
  )
  g = jax.grad(lambda a: vq.arc_loss(a, jnp.asarray(e), 10.0, 0.1, 3))(jnp.asarray(z))
  assert np.all(np.isfinite(g)) and np.isfinite(loss)


def test_arc_weight_schedule():
  t = np.array([0, 10, 1000, 20000])
  np.testing.assert_allclose(vq.arc_weight(jnp.asarray(t), 1.0, 5e-4), np.exp(-5e-4 * t), rtol=1e-6)
  np.testing.assert_allclose(vq.arc_weight(0, 2.0, 1e-4), 2.0)


def test_spherical_init_unit_rows_and_uniform_bounds():
  e = np.asarray(vq.init_codebook(jax.random.PRNGKey(0), 512, 64, "spherical"))
  np.testing.assert_allclose(np.linalg.norm(e, axis=1), 1.0, rtol=1e-5)
  # Uniform directions: the mean direction is near zero.
  assert np.linalg.norm(e.mean(0)) < 0.1
  u = np.asarray(vq.init_codebook(jax.random.PRNGKey(0), 512, 8, "uniform"))
  assert np.abs(u).max() <= 1 / 512 and np.abs(u).max() > 0.9 / 512
  with pytest.raises(ValueError, match="unknown codebook init"):
    vq.init_codebook(jax.random.PRNGKey(0), 4, 4, "xavier")


def test_ema_update_by_hand():
  z = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]], np.float32)
  idx = np.array([0, 0, 1])
  ema = vq.EMAState(cluster_size=jnp.ones(3), embed_sum=jnp.asarray(np.eye(3, 2, dtype=np.float32)))
  new, cb = vq.ema_codebook_update(ema, jnp.asarray(z), jnp.asarray(idx), decay=0.9, eps=1e-5)
  cs = 0.9 * np.ones(3) + 0.1 * np.array([2, 1, 0])
  es = 0.9 * np.eye(3, 2) + 0.1 * np.array([[4.0, 0], [0, 2], [0, 0]])
  n = cs.sum()
  smoothed = (cs + 1e-5) / (n + 3e-5) * n
  np.testing.assert_allclose(new.cluster_size, cs, rtol=1e-6)
  np.testing.assert_allclose(new.embed_sum, es, rtol=1e-6)
  np.testing.assert_allclose(cb, es / smoothed[:, None], rtol=1e-5)


def test_restart_dead_codes_replaces_only_dead_rows():
  codebook = jnp.arange(8.0).reshape(4, 2)
  usage = jnp.array([5.0, 0.0, 2.0, 0.1])
  z = jnp.asarray(np.random.default_rng(0).normal(size=(10, 2)).astype(np.float32))
  cb, new_usage, dead = vq.restart_dead_codes(jax.random.PRNGKey(1), codebook, usage, z, 1.0)
  np.testing.assert_array_equal(dead, [False, True, False, True])
  np.testing.assert_array_equal(cb[0], codebook[0])
  np.testing.assert_array_equal(cb[2], codebook[2])
  for row in (1, 3):  # restarted rows are latents of the batch
    assert np.any(np.all(np.isclose(np.asarray(z), np.asarray(cb[row])), axis=1))
  np.testing.assert_allclose(new_usage, [5.0, 1.775, 2.0, 1.775])


def test_code_histogram_weights():
  idx = jnp.array([0, 2, 2, 3])
  np.testing.assert_array_equal(vq.code_histogram(idx, 5), [1, 0, 2, 1, 0])
  np.testing.assert_array_equal(vq.code_histogram(idx, 5, jnp.array([1, 0, 1, 1])), [1, 0, 1, 1, 0])
