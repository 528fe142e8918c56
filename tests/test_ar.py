"""The autoregressive token prior (arcvq_jax/models/ar.py, transformer.py, ar_math.py,
token_sampling.py; docs/math.md, section 11.4): the KV cache against the full forward,
causality by gradients, 2D RoPE against a numpy transcription and its shift invariance,
top-k / top-p against numpy, guidance, the cached sampler against the no-cache one, and a
tiny prior that overfits four grids."""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_fixtures import init_params

from arcvq_jax import ar_math
from arcvq_jax import token_sampling as ts
from arcvq_jax.models import ar
from arcvq_jax.models import transformer as tf

GRID = (3, 4)
N = GRID[0] * GRID[1]
V = 16
CLASSES = 3


def make_model(positions: str = "rope2d", **kw) -> ar.ARTransformer:
  args = dict(
    vocab_size=V,
    grid=GRID,
    num_classes=CLASSES,
    dim=32,
    depth=2,
    num_heads=4,
    multiple_of=8,
    positions=positions,
  )
  return ar.ARTransformer(**{**args, **kw})


def random_params(model: ar.ARTransformer, seed: int = 0):
  """init's params with the zero-initialised head (and everything else) perturbed, so that
  the logits depend on every input."""
  tokens = jnp.zeros((1, N), jnp.int32)
  params = init_params(model, tokens, jnp.zeros((1,), jnp.int32), seed=seed)
  return perturb(params, jax.random.PRNGKey(seed + 100))


@jax.jit
def perturb(params, key):
  leaves, treedef = jax.tree.flatten(params)
  keys = jax.random.split(key, len(leaves))
  noisy = [x + 0.2 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys, strict=True)]
  return jax.tree.unflatten(treedef, noisy)


@pytest.fixture(scope="module")
def model_and_params():
  """The rope2d model, its random params and its jitted forward, shared by the module."""
  model = make_model()
  params = random_params(model)
  return model, params, jax.jit(lambda p, t, y: model.apply({"params": p}, t, y))


def batch(seed: int = 0, b: int = 3) -> tuple[jax.Array, jax.Array]:
  tokens = jax.random.randint(jax.random.PRNGKey(seed), (b, N), 0, V)
  labels = jnp.arange(b, dtype=jnp.int32) % (CLASSES + 1)  # the null class included
  return tokens, labels


# --------------------------------------------------------------------------- the KV cache


@pytest.mark.parametrize(
  "positions",
  [
    "rope2d",
    pytest.param("rope1d", marks=pytest.mark.slow),
    pytest.param("learned", marks=pytest.mark.slow),
  ],
)
def test_kv_cache_decoding_gives_the_full_forward_logits(positions, model_and_params):
  if positions == "rope2d":
    model, params, forward = model_and_params
  else:
    model = make_model(positions)
    params = random_params(model)
    forward = jax.jit(lambda p, t, y: model.apply({"params": p}, t, y))
  tokens, labels = batch()
  full = forward(params, tokens, labels)

  @jax.jit
  def incremental(p, t, y):
    cache = ar.init_cache(model, t.shape[0])
    first, cache = model.apply({"params": p}, y, cache, method="prefill")

    def step(cache, token):
      logits, cache = model.apply({"params": p}, token, cache, method="decode_step")
      return cache, logits

    cache, rest = jax.lax.scan(step, cache, t[:, : N - 1].T)
    return jnp.concatenate([first[:, None], rest.transpose(1, 0, 2)], axis=1), cache.index

  inc, index = incremental(params, tokens, labels)
  assert int(index) == N
  assert float(jnp.abs(full).max()) > 0.5  # the logits are not trivially zero
  np.testing.assert_allclose(np.asarray(inc), np.asarray(full), rtol=0, atol=1e-5)


@pytest.mark.slow
def test_extend_writes_several_positions_at_once(model_and_params):
  """Prefill, then 5 tokens in one call, then the other 6 in one: the same logits."""
  model, params, forward = model_and_params
  tokens, labels = batch(1)
  full = forward(params, tokens, labels)

  @jax.jit
  def chunked(p, t, y):
    first, cache = model.apply({"params": p}, y, ar.init_cache(model, t.shape[0]), method="prefill")
    mid, cache = model.apply({"params": p}, t[:, :5], cache, method="extend")
    rest, cache = model.apply({"params": p}, t[:, 5 : N - 1], cache, method="extend")
    return jnp.concatenate([first[:, None], mid, rest], axis=1)

  np.testing.assert_allclose(np.asarray(chunked(params, tokens, labels)), full, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- causality


def test_logits_at_a_position_have_no_gradient_from_that_token_or_later(model_and_params):
  model, params, _ = model_and_params
  tokens, labels = batch(2, b=2)
  emb = model.apply({"params": params}, tokens, method="embed")
  logits_fn = lambda x: model.apply({"params": params}, x, labels, method="from_embeddings")
  # jac[p, b, q, d]: d(sum of example 0's logits at position p) / d(embedding of token q of b).
  jac = jax.jit(jax.jacrev(lambda x: logits_fn(x)[0].sum(-1)))(emb)
  assert float(jnp.abs(jac[:, 1]).sum()) == 0.0  # never from the other example
  depends = np.asarray(jnp.abs(jac[:, 0]).sum(-1)) > 0  # [p, q]
  later = np.triu(np.ones((N, N), bool))  # q >= p
  assert not depends[later].any(), np.argwhere(depends & later)[:5]
  assert depends[~later].all()  # every earlier token reaches the logits


# --------------------------------------------------------------------------- rotary positions


def numpy_rope_2d(x: np.ndarray, rows: np.ndarray, cols: np.ndarray, base: float) -> np.ndarray:
  """x (T, Dh) turned pair by pair as complex numbers: pair i < Dh/4 by row * f_i, pair
  Dh/4 + i by col * f_i, f_i = base^(-2i / (Dh/2)), LlamaGen's precompute_freqs_cis_2d."""
  dh = x.shape[1]
  quarter = dh // 4
  f = base ** (-(2.0 * np.arange(quarter)) / (dh // 2))
  theta = np.concatenate([rows[:, None] * f, cols[:, None] * f], axis=1)  # (T, Dh/2)
  z = (x[:, 0::2] + 1j * x[:, 1::2]) * np.exp(1j * theta)
  out = np.empty_like(x)
  out[:, 0::2], out[:, 1::2] = z.real, z.imag
  return out


def test_rope_2d_against_a_numpy_transcription():
  grid, dh, base = (3, 5), 16, 100.0
  cos, sin = tf.grid_rope_table("rope2d", grid, dh, prefix=1, base=base)
  x = np.random.default_rng(0).normal(size=(1 + 15, dh)).astype(np.float32)
  got = np.asarray(tf.apply_rope(jnp.asarray(x)[None, :, None], cos, sin))[0, :, 0]
  p = np.arange(15)
  want = numpy_rope_2d(x[1:].astype(np.float64), p // 5, p % 5, base)
  np.testing.assert_allclose(got[1:], want, rtol=0, atol=1e-5)
  np.testing.assert_array_equal(got[0], x[0])  # the class token is not turned


def test_rope_2d_scores_depend_only_on_the_offset():
  """<R(y1, x1) q, R(y2, x2) k> is the same for every pair of positions with one (dy, dx)."""
  dh, grid = 16, (8, 8)
  rng = np.random.default_rng(1)
  q, k = (jnp.asarray(rng.normal(size=(1, 1, 1, dh)), jnp.float32) for _ in range(2))
  cos, sin = tf.grid_rope_table("rope2d", grid, dh, prefix=0)

  def score(a, b):
    ia, ib = a[0] * grid[1] + a[1], b[0] * grid[1] + b[1]
    qa = tf.apply_rope(q, cos[ia : ia + 1], sin[ia : ia + 1])
    kb = tf.apply_rope(k, cos[ib : ib + 1], sin[ib : ib + 1])
    return float(jnp.sum(qa * kb))

  for dy, dx in [(0, 1), (2, -3), (-1, 0), (3, 3)]:
    starts = [(y, x) for y in range(8) for x in range(8) if 0 <= y + dy < 8 and 0 <= x + dx < 8]
    scores = [score(s, (s[0] + dy, s[1] + dx)) for s in starts[::3]]
    np.testing.assert_allclose(scores, scores[0], rtol=0, atol=1e-5)
  # ... and the offset matters, along rows and along columns
  assert abs(score((0, 0), (0, 1)) - score((0, 0), (1, 0))) > 1e-3
  assert abs(score((0, 0), (0, 1)) - score((0, 0), (0, 2))) > 1e-3


# --------------------------------------------------------------------------- sampling


def numpy_top_k_top_p(logits: np.ndarray, k: int, p: float) -> np.ndarray:
  """HF's / LlamaGen's top_k_top_p_filtering transcribed: top-k, then sort descending,
  remove where the cumulative probability exceeds p, shifted right one, the first kept."""
  out = logits.astype(np.float64).copy()
  if k > 0:
    kth = np.sort(out, axis=-1)[:, -k][:, None]
    out[out < kth] = -np.inf
  if p < 1.0:
    order = np.argsort(-out, axis=-1)
    s = np.take_along_axis(out, order, axis=-1)
    e = np.exp(s - s[:, :1])
    cum = np.cumsum(e / e.sum(-1, keepdims=True), axis=-1)
    remove = cum > p
    remove[:, 1:] = remove[:, :-1].copy()
    remove[:, 0] = False
    for row in range(out.shape[0]):
      out[row, order[row][remove[row]]] = -np.inf
  return out


@pytest.mark.parametrize("k, p", [(5, 1.0), (0, 0.7), (7, 0.5), (0, 0.05), (1, 0.9), (0, 1.0)])
def test_top_k_top_p_against_numpy(k, p):
  logits = np.random.default_rng(k + int(100 * p)).normal(size=(6, 40)).astype(np.float32) * 2
  got = np.asarray(ts.filter_top_p(ts.filter_top_k(jnp.asarray(logits), k), p))
  want = numpy_top_k_top_p(logits, k, p)
  np.testing.assert_array_equal(np.isinf(got), np.isinf(want))
  np.testing.assert_array_equal(got[np.isfinite(got)], logits[np.isfinite(want)])


def test_guidance_scale_one_gives_the_conditional_logits(model_and_params):
  _, params, forward = model_and_params
  tokens, labels = batch(4)
  fn = lambda t, y: forward(params, t, y)
  cond, uncond = fn(tokens, labels), fn(tokens, jnp.full_like(labels, CLASSES))
  g1 = ts.guided_logits(fn, tokens, labels, 1.0, CLASSES)
  g0 = ts.guided_logits(fn, tokens, labels, 0.0, CLASSES)
  g3 = ts.guided_logits(fn, tokens, labels, 3.0, CLASSES)
  # Equal up to rounding: the doubled batch adds in another order, and u + (c - u) rounds.
  np.testing.assert_allclose(g1, cond, rtol=0, atol=1e-5)
  np.testing.assert_allclose(g0, uncond, rtol=0, atol=1e-5)
  np.testing.assert_allclose(g3, uncond + 3 * (cond - uncond), rtol=0, atol=5e-5)
  assert float(jnp.abs(cond - uncond).max()) > 1e-2


@pytest.mark.slow
@pytest.mark.parametrize("scale, k, p", [(1.0, 0, 1.0), (2.5, 6, 0.9)])
def test_cached_sampler_draws_what_the_no_cache_reference_draws(scale, k, p, model_and_params):
  model, params, _ = model_and_params
  labels = jnp.asarray([0, 1, 2, 3], jnp.int32)
  keys = ts.sample_keys(jax.random.PRNGKey(7), jnp.arange(4))
  kw = dict(guidance_scale=scale, top_k=k, top_p=p, temperature=0.9)
  draw = jax.jit(
    lambda p_, y, ks, c: ar.sample_tokens(model, p_, y, ks, use_cache=c, **kw), static_argnums=3
  )
  cached = np.asarray(draw(params, labels, keys, True))
  reference = np.asarray(draw(params, labels, keys, False))
  assert cached.shape == (4, *GRID) and cached.min() >= 0 and cached.max() < V
  np.testing.assert_array_equal(cached, reference)
  # A sample does not depend on the batch it is drawn in.
  np.testing.assert_array_equal(np.asarray(draw(params, labels[2:3], keys[2:3], True)), cached[2:3])
  assert len(np.unique(cached.reshape(4, -1), axis=0)) > 1


def test_top_k_one_is_greedy(model_and_params):
  """top_k = 1 makes the cached sampler pick the argmax of the full forward at each position."""
  model, params, forward = model_and_params
  labels = jnp.asarray([0, 2], jnp.int32)
  keys = ts.sample_keys(jax.random.PRNGKey(0), jnp.arange(2))
  tokens = jax.jit(lambda p: ar.sample_tokens(model, p, labels, keys, top_k=1))(params)
  tokens = tokens.reshape(2, N)
  np.testing.assert_array_equal(tokens, jnp.argmax(forward(params, tokens, labels), -1))


def test_ar_loss_is_the_mean_token_cross_entropy():
  logits = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 7))
  tokens = jax.random.randint(jax.random.PRNGKey(1), (2, 5), 0, 7)
  loss, _ = jax.jit(
    lambda lg: ar_math.ar_loss(jax.random.PRNGKey(2), lambda t, y: lg, tokens, None)
  )(logits)
  lg = np.asarray(logits, np.float64)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  want = -np.take_along_axis(logp, np.asarray(tokens)[..., None], -1).mean()
  np.testing.assert_allclose(float(loss), want, rtol=1e-6)


def test_bf16_compute_keeps_float32_params_and_logits(model_and_params):
  _, params, forward = model_and_params
  model = make_model(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, N), jnp.int32))
  assert {x.dtype for x in jax.tree.leaves(shapes)} == {jnp.dtype(jnp.float32)}
  tokens, labels = batch(7)
  low = jax.jit(lambda p: model.apply({"params": p}, tokens, labels))(params)
  high = forward(params, tokens, labels)
  assert low.dtype == jnp.float32
  np.testing.assert_allclose(low, high, rtol=0, atol=0.1 * float(jnp.abs(high).max()))


def test_vocabularies_above_two_to_the_sixteen_are_refused():
  model = make_model(vocab_size=2**18)
  with pytest.raises(ValueError, match="factorized heads"):
    model.init(jax.random.PRNGKey(0), jnp.zeros((1, N), jnp.int32))


# --------------------------------------------------------------------------- overfitting


@pytest.mark.slow
def test_a_tiny_prior_overfits_four_grids():
  """300 Adam steps on four 4x4 grids, one per class; greedy samples give them back."""
  grid, vocab = (4, 4), 16
  grids = jax.random.randint(jax.random.PRNGKey(0), (4, *grid), 0, vocab)
  labels = jnp.arange(4, dtype=jnp.int32)
  model = ar.ARTransformer(
    vocab_size=vocab, grid=grid, num_classes=4, dim=64, depth=2, num_heads=4, multiple_of=16
  )
  params = init_params(model, grids.reshape(4, -1), labels, seed=0)
  tx = optax.adam(3e-3)

  @jax.jit
  def train(params):
    def step(carry, key):
      params, opt = carry
      loss, grads = jax.value_and_grad(
        lambda p: ar.train_loss(model, p, key, grids, labels, cond_drop_prob=0.1)[0]
      )(params)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt), loss

    keys = jax.random.split(jax.random.PRNGKey(1), 300)
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), keys)
    return params, losses

  start = time.perf_counter()
  params, losses = train(params)
  assert float(losses[-1]) < 0.01, losses[-10:]
  keys = ts.sample_keys(jax.random.PRNGKey(2), jnp.arange(4))
  samples = jax.jit(lambda p: ar.sample_tokens(model, p, labels, keys, top_k=1))(params)
  np.testing.assert_array_equal(samples, grids)
  # Guided sampling at temperature 0.5 (p(correct) > 0.99 per token at 1) gives them too.
  samples = jax.jit(
    lambda p: ar.sample_tokens(model, p, labels, keys, temperature=0.5, guidance_scale=2.0)
  )(params)
  np.testing.assert_array_equal(samples, grids)
  assert time.perf_counter() - start < 60
