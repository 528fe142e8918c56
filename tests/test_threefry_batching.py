"""threefry_batching.batch_draws: the same values as the function it wraps, bit for bit, with
its independent threefry draws hashed together (few hashes where there were hundreds)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.extend import core as jax_core

from arcvq_jax import sharding, threefry_batching
from arcvq_jax.train import state as state_lib

O0 = {"xla_backend_optimization_level": 0}


def many_draws(key):
  """Draws of every kind an initialiser makes, and some that are not batched."""
  k_a, k_b = jax.random.split(key)
  out = {
    "normal": jax.random.normal(k_a, (3, 5, 7)),
    "uniform": jax.random.uniform(jax.random.fold_in(k_a, 3), (11,), minval=-2.0, maxval=0.5),
    "truncated": jax.random.truncated_normal(k_b, -2.0, 2.0, (4, 4)),
    "bits_odd": jax.random.bits(jax.random.fold_in(k_b, 7), (5,)),  # an odd count
    "bits8": jax.random.bits(k_b, (6,), jnp.uint8),  # not batched: 8-bit words
    "scalar": jax.random.normal(jax.random.fold_in(jax.random.fold_in(key, 1), 2), ()),
    "batched_keys": jax.random.normal(jax.random.split(k_a, 3)[1], (2,)),
    "permutation": jax.random.permutation(k_a, 9),
    "typed": jax.random.normal(jax.random.key(5), (3,)),
  }
  # draws in a chain: each level hashes while the next waits for its key
  k = key
  for i in range(4):
    k = jax.random.fold_in(k, i)
    out[f"chain{i}"] = jax.random.uniform(k, (i + 2, 3))
  return out


def assert_same_draws(got: dict, want: dict) -> None:
  assert sorted(got) == sorted(want)
  for name in want:
    assert got[name].dtype == want[name].dtype and got[name].shape == want[name].shape, name
    if jnp.issubdtype(want[name].dtype, jnp.floating):
      # an ulp of the transform's terms (uniform(-2, 0.5) near 0: many ulps of the result)
      np.testing.assert_allclose(got[name], want[name], rtol=1e-6, atol=1e-6, err_msg=name)
    else:
      np.testing.assert_array_equal(got[name], want[name], err_msg=name)


def threefry_hashes(fn, *args) -> int:
  """Threefry hashes in fn's jaxpr (nested jaxprs included): its draws and key folds, each
  lowered to a hash of its own, and the hashes batch_draws writes out."""

  def count(jaxpr) -> int:
    n = 0
    for eqn in jaxpr.eqns:
      n += eqn.primitive.name in ("random_bits", "random_fold_in", "threefry2x32")
      n += sum(count(getattr(sub, "jaxpr", sub)) for sub in jax_core.jaxprs_in_params(eqn.params))
    return n

  return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_same_values_as_the_function_bit_for_bit():
  """The same random bits, exactly; a float transform of them (erf_inv, scaling) is fused by
  its context and may round an ulp apart, as any change around it could make it."""
  key = jax.random.PRNGKey(42)
  want = jax.jit(many_draws, compiler_options=O0)(key)
  got = jax.jit(threefry_batching.batch_draws(many_draws), compiler_options=O0)(key)
  assert_same_draws(got, want)
  plain, batched = (
    threefry_hashes(f, key) for f in (many_draws, threefry_batching.batch_draws(many_draws))
  )
  assert plain >= 20 and batched <= 8, (plain, batched)


def test_without_partitionable_threefry_nothing_is_batched_and_values_agree():
  key = jax.random.PRNGKey(3)
  with jax.threefry_partitionable(False):
    want = jax.jit(many_draws, compiler_options=O0)(key)
    got = jax.jit(threefry_batching.batch_draws(many_draws), compiler_options=O0)(key)
    assert threefry_hashes(threefry_batching.batch_draws(many_draws), key) == threefry_hashes(
      many_draws, key
    )
  assert_same_draws(got, want)


def test_a_models_fresh_state_is_the_same_with_a_few_hashes():
  """A small VQ-VAE's train state (params, codebook, Adam moments) through fresh_state."""
  from configs import tiny  # noqa: PLC0415 (configs/ is not a package)

  c = tiny.get_config()
  model = state_lib.build_model(c, channels=1)
  init_fn = functools.partial(
    state_lib.init_train_state, model=model, tx=state_lib.make_optimizer(c), image_shape=(28, 28, 1)
  )
  key = jax.random.PRNGKey(c.seed)
  mesh = sharding.make_mesh((-1,), ("data",))
  got, shardings = sharding.fresh_state(init_fn, c.seed, mesh, c.sharding)
  want = jax.jit(init_fn, out_shardings=shardings, compiler_options=O0)(key)  # the same level
  leaves_got, leaves_want = jax.tree.leaves(got), jax.tree.leaves(want)
  assert jax.tree.structure(got) == jax.tree.structure(want) and len(leaves_want) > 20
  for a, b in zip(leaves_got, leaves_want, strict=True):
    np.testing.assert_array_equal(a, b)
  plain = threefry_hashes(init_fn, key)
  batched = threefry_hashes(threefry_batching.batch_draws(init_fn), key)
  assert plain > 30 and batched <= 8, (plain, batched)
