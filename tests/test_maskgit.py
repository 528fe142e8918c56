"""The MaskGIT token prior (arcvq_jax/models/maskgit.py, maskgit_math.py; docs/math.md,
section 11.3): the masking schedule's counts against numpy, the loss on masked positions
only, the decoding schedule by hand, parallel decoding's reveal counts, its confidence order,
guidance, and a tiny prior that overfits four grids."""

from __future__ import annotations

import functools
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from model_fixtures import init_params

from arcvq_jax import maskgit_math as mm
from arcvq_jax import token_sampling as ts
from arcvq_jax.models import maskgit

GRID = (3, 4)
N = GRID[0] * GRID[1]
V = 16
CLASSES = 3


def make_model(**kw) -> maskgit.MaskGITTransformer:
  args = dict(
    vocab_size=V, grid=GRID, num_classes=CLASSES, dim=32, depth=2, num_heads=4, multiple_of=8
  )
  return maskgit.MaskGITTransformer(**{**args, **kw})


@pytest.fixture(scope="module")
def model_and_params():
  model = make_model()
  params = init_params(model, jnp.zeros((1, N), jnp.int32), jnp.zeros((1,), jnp.int32), seed=0)
  return model, params, jax.jit(lambda p, t, y: model.apply({"params": p}, t, y))


# --------------------------------------------------------------------------- the schedule


def test_masked_counts_follow_ceil_cos_against_numpy():
  n = 256
  r = np.random.default_rng(0).uniform(size=4000).astype(np.float32)
  got = np.asarray(mm.num_masked(jnp.asarray(r), n))
  exact = np.cos(np.pi / 2 * r.astype(np.float64)) * n
  want = np.clip(np.ceil(exact), 1, n)
  # float32 cos may round across an integer where the exact value is within an ulp of it
  clear = np.abs(exact - np.round(exact)) > 1e-3
  assert clear.mean() > 0.99
  np.testing.assert_array_equal(got[clear], want[clear])
  assert np.all(np.abs(got - want) <= 1)


def test_masked_counts_bounds():
  n = 100
  r = jnp.asarray([0.0, 1e-7, 0.5, 1.0 - 1e-7, 1.0])
  got = np.asarray(mm.num_masked(r, n))
  assert got[0] == n and got[1] == n  # everything masked at r = 0
  assert got[2] == math.ceil(math.cos(math.pi / 4) * n) == 71
  assert got[3] == 1 and got[4] == 1  # at least one target as r -> 1


def test_random_mask_masks_the_drawn_number_of_positions():
  key = jax.random.PRNGKey(3)
  b, n = 64, 50
  mask = np.asarray(mm.random_mask(key, b, n))
  r = jax.random.uniform(jax.random.split(key)[0], (b,))  # random_mask's first draw
  np.testing.assert_array_equal(mask.sum(1), np.asarray(mm.num_masked(r, n)))
  assert mask.sum(1).min() >= 1 and mask.sum(1).max() <= n
  # the positions are spread over the whole sequence
  assert mask[:, : n // 2].sum() > 0.3 * mask.sum()


# --------------------------------------------------------------------------- the loss


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_masked_cross_entropy_counts_only_masked_positions(smoothing):
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(3, 10, 7)).astype(np.float32) * 2
  targets = rng.integers(0, 7, size=(3, 10))
  mask = rng.uniform(size=(3, 10)) < 0.4
  loss, grad = jax.jit(jax.value_and_grad(mm.masked_cross_entropy), static_argnums=3)(
    jnp.asarray(logits), jnp.asarray(targets), jnp.asarray(mask), smoothing
  )
  lg = logits.astype(np.float64)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  q = np.eye(7)[targets] * (1 - smoothing) + smoothing / 7
  ce = -(q * logp).sum(-1)
  np.testing.assert_allclose(float(loss), ce[mask].mean(), rtol=1e-6)
  grad = np.asarray(grad)
  assert np.all(grad[~mask] == 0.0)  # exactly zero where nothing is masked
  assert np.all(np.abs(grad[mask]).sum(-1) > 0)


def test_maskgit_loss_feeds_mask_ids_and_drops_labels():
  tokens = jax.random.randint(jax.random.PRNGKey(0), (8, N), 0, V)
  labels = jnp.arange(8, dtype=jnp.int32) % CLASSES
  key = jax.random.PRNGKey(5)

  @functools.partial(jax.jit, static_argnums=0)
  def run(drop_prob):
    seen = {}

    def logits_fn(t, y):
      seen["tokens"], seen["labels"] = t, y
      return jnp.zeros((*t.shape, V))

    loss, aux = mm.maskgit_loss(
      key, logits_fn, tokens, labels, mask_id=V, cond_drop_prob=drop_prob, null_class=CLASSES
    )
    return loss, aux, seen["tokens"], seen["labels"]

  loss, aux, fed, fed_labels = run(1.0)
  mask = np.asarray(mm.random_mask(jax.random.split(key)[0], 8, N))
  fed = np.asarray(fed)
  np.testing.assert_array_equal(fed == V, mask)
  np.testing.assert_array_equal(fed[~mask], np.asarray(tokens)[~mask])
  np.testing.assert_array_equal(fed_labels, CLASSES)  # all dropped at probability 1
  np.testing.assert_allclose(float(loss), math.log(V), rtol=1e-6)  # uniform logits
  np.testing.assert_allclose(float(aux["mask_fraction"]), mask.mean(), rtol=1e-6)
  np.testing.assert_array_equal(run(0.0)[3], labels)


# --------------------------------------------------------------------------- decoding


def test_decode_schedule_by_hand():
  # N = 16, S = 4: floor(16 cos(pi/8)) = 14, floor(16 cos(pi/4)) = 11, floor(16 cos(3pi/8)) = 6.
  np.testing.assert_array_equal(mm.decode_schedule(16, 4)[:, 16], [14, 11, 6, 0])
  # More steps than tokens: at least one revealed per step, one kept masked until the last.
  np.testing.assert_array_equal(mm.decode_schedule(3, 8)[:, 3], [2, 1, 1, 1, 1, 1, 1, 0])
  # A partly known start (n0 = 8 of 16 unknown): floor(8 cos(.)) = 7, 5, 3, then 0.
  np.testing.assert_array_equal(mm.decode_schedule(16, 4)[:, 8], [7, 5, 3, 0])
  assert np.all(mm.decode_schedule(16, 4)[:, 0] == 0)
  np.testing.assert_array_equal(mm.decode_schedule(16, 1)[:, 16], [0])


@pytest.mark.parametrize("steps", [4, 8])
def test_parallel_decode_reveals_per_the_schedule(model_and_params, steps):
  model, params, _ = model_and_params
  b = 3
  start = np.full((b, N), V, np.int32)
  start[1, :5] = [1, 2, 3, 4, 5]  # sample 1 starts with five known tokens
  labels = jnp.asarray([0, 1, CLASSES], jnp.int32)
  keys = ts.sample_keys(jax.random.PRNGKey(0), jnp.arange(b))
  out, history = jax.jit(
    lambda p: mm.parallel_decode(
      lambda t, y: model.apply({"params": p}, t, y),
      jnp.asarray(start),
      labels,
      keys,
      mask_id=V,
      num_steps=steps,
      guidance_scale=2.0,
      null_class=CLASSES,
      return_history=True,
    )
  )(params)
  out, history = np.asarray(out), np.asarray(history)
  assert out.min() >= 0 and out.max() < V  # every token known
  np.testing.assert_array_equal(history[-1], out)
  np.testing.assert_array_equal(out[1, :5], [1, 2, 3, 4, 5])  # known tokens kept
  table = mm.decode_schedule(N, steps)
  masked = (history == V).sum(-1)  # (S, B)
  np.testing.assert_array_equal(masked[:, 0], table[:, N])
  np.testing.assert_array_equal(masked[:, 1], table[:, N - 5])
  # a token once revealed keeps its value
  for s in range(steps - 1):
    known = history[s] != V
    np.testing.assert_array_equal(history[s + 1][known], history[s][known])


def test_the_least_confident_samples_are_masked_again():
  """Step 0 without Gumbel noise (choice_temperature 0): of the N samples, the m_0 whose
  log-probabilities are lowest (numpy, float64) are masked again, the rest revealed."""
  n, steps, b = 16, 4, 3
  table = jnp.asarray(np.random.default_rng(2).normal(size=(n, V)) * 3, jnp.float32)
  logits_fn = lambda tokens, labels: jnp.broadcast_to(table, (*tokens.shape, V))
  keys = ts.sample_keys(jax.random.PRNGKey(1), jnp.arange(b))
  _, history = mm.parallel_decode(
    logits_fn,
    mm.all_masked(b, n, V),
    None,
    keys,
    mask_id=V,
    num_steps=steps,
    choice_temperature=0.0,
    return_history=True,
  )
  # Step 0's draws, from the keys as parallel_decode derives them.
  k_sample = jax.vmap(lambda k: jax.random.split(jax.random.fold_in(k, 0))[0])(keys)
  sampled = np.asarray(ts.categorical(k_sample, jnp.broadcast_to(table, (b, n, V))))
  lg = np.asarray(table, np.float64)
  logp = lg - np.log(np.exp(lg).sum(-1, keepdims=True))
  conf = np.take_along_axis(np.broadcast_to(logp, (b, n, V)), sampled[..., None], -1)[..., 0]
  m0 = mm.decode_schedule(n, steps)[0, n]
  want = np.zeros((b, n), bool)
  np.put_along_axis(want, np.argsort(conf, axis=-1)[:, :m0], True, axis=-1)
  np.testing.assert_array_equal(np.asarray(history[0]) == V, want)
  np.testing.assert_array_equal(np.asarray(history[0])[~want], sampled[~want])


def test_guidance_scale_one_gives_the_conditional_logits(model_and_params):
  _, params, forward = model_and_params
  tokens = jax.random.randint(jax.random.PRNGKey(2), (3, N), 0, V + 1)  # some [MASK]
  labels = jnp.asarray([0, 1, 2], jnp.int32)
  fn = lambda t, y: forward(params, t, y)
  cond, uncond = fn(tokens, labels), fn(tokens, None)
  np.testing.assert_allclose(ts.guided_logits(fn, tokens, labels, 1.0, CLASSES), cond, atol=1e-5)
  np.testing.assert_allclose(ts.guided_logits(fn, tokens, labels, 0.0, CLASSES), uncond, atol=1e-5)
  assert float(jnp.abs(cond - uncond).max()) > 1e-3


@pytest.mark.slow
def test_a_sample_does_not_depend_on_its_batch(model_and_params):
  model, params, _ = model_and_params
  labels = jnp.asarray([0, 1, 2], jnp.int32)
  keys = ts.sample_keys(jax.random.PRNGKey(4), jnp.arange(3))
  draw = jax.jit(lambda y, k: maskgit.sample_tokens(model, params, y, k, num_steps=4))
  all3 = np.asarray(draw(labels, keys))
  assert all3.shape == (3, *GRID)
  np.testing.assert_array_equal(np.asarray(draw(labels[1:2], keys[1:2])), all3[1:2])


def test_the_model_sees_the_whole_grid(model_and_params):
  """Bidirectional: the logits at the first position change with the last token."""
  _, params, forward = model_and_params
  tokens = jnp.full((2, N), V, jnp.int32).at[1, -1].set(3)
  logits = forward(params, tokens, None)
  a, b = logits[:1], logits[1:]
  assert float(jnp.abs(a[0, 0] - b[0, 0]).max()) > 0


def test_vocabularies_above_two_to_the_sixteen_are_refused():
  with pytest.raises(ValueError, match="factorized heads"):
    make_model(vocab_size=2**16 + 1).init(jax.random.PRNGKey(0), jnp.zeros((1, N), jnp.int32))


# --------------------------------------------------------------------------- overfitting


@pytest.mark.slow
def test_a_tiny_prior_overfits_four_grids():
  """500 Adam steps on four 4x4 grids, one per class; decoding in 8 steps gives them back."""
  grid, vocab = (4, 4), 16
  grids = jax.random.randint(jax.random.PRNGKey(0), (4, *grid), 0, vocab)
  labels = jnp.arange(4, dtype=jnp.int32)
  model = maskgit.MaskGITTransformer(
    vocab_size=vocab, grid=grid, num_classes=4, dim=64, depth=2, num_heads=4, multiple_of=16
  )
  params = init_params(model, grids.reshape(4, -1), labels, seed=0)
  tx = optax.adam(3e-3)
  STEPS = 500

  @jax.jit
  def train(params):
    def step(carry, key):
      params, opt = carry
      loss, grads = jax.value_and_grad(
        lambda p: maskgit.train_loss(model, p, key, grids, labels, cond_drop_prob=0.1)[0]
      )(params)
      updates, opt = tx.update(grads, opt, params)
      return (optax.apply_updates(params, updates), opt), loss

    keys = jax.random.split(jax.random.PRNGKey(1), STEPS)
    (params, _), losses = jax.lax.scan(step, (params, tx.init(params)), keys)
    return params, losses

  start = time.perf_counter()
  params, losses = train(params)
  # (steps whose labels were dropped cannot know which grid: their loss stays ~log 4)
  assert float(jnp.mean(losses[-50:])) < 0.5, losses[-10:]
  keys = ts.sample_keys(jax.random.PRNGKey(2), jnp.arange(4))
  for scale in (1.0, 2.0):
    samples = jax.jit(
      lambda p, s=scale: maskgit.sample_tokens(
        model, p, labels, keys, num_steps=8, temperature=0.5, guidance_scale=s
      )
    )(params)
    np.testing.assert_array_equal(samples, grids)
  assert time.perf_counter() - start < 60
