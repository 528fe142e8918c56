"""The blocked ArcLoss and nearest-code search against the naive forms in quantization.py.

quantization.arc_loss / nearest_code are checked against numpy in test_quantization.py; here
they are the truth that the chunked versions must reproduce: the same value, the same
gradient (so the same P_k, ties included) and the same indices.
"""

import functools
import json
import os
import subprocess
import sys

import device_env
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from blockwise_fixtures import exact_units, random_data

from arcvq_jax import blockwise as st
from arcvq_jax import config as config_lib
from arcvq_jax import quantization as vq
from arcvq_jax.models import discriminator
from arcvq_jax.quantizers import vq as vq_quantizer
from arcvq_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def naive_and_blocked(z, e, s, m, k, chunk, code_chunk=None):
  """(value, dL/dz) of both forms, jitted."""
  naive = jax.jit(jax.value_and_grad(lambda a: vq.arc_loss(a, jnp.asarray(e), s, m, k)))
  blocked = jax.jit(
    jax.value_and_grad(
      lambda a: st.arc_loss_blocked(
        a, jnp.asarray(e), s, m, k, chunk_size=chunk, code_chunk_size=code_chunk
      )
    )
  )
  return naive(jnp.asarray(z)), blocked(jnp.asarray(z))


def assert_same(naive, blocked, rtol=1e-5, grad_rtol=1e-4):
  (v0, g0), (v1, g1) = naive, blocked
  # The loss is a difference of log-sum-exps of size ~s: its round-off is ~1e-6 absolute.
  np.testing.assert_allclose(v1, v0, rtol=rtol, atol=2e-6)
  g0, g1 = np.asarray(g0), np.asarray(g1)
  assert np.all(np.isfinite(g1))
  # atol relative to the largest entry: entries that are ~0 in both carry only round-off.
  np.testing.assert_allclose(g1, g0, rtol=grad_rtol, atol=grad_rtol * np.abs(g0).max())


# (N, K, D, chunk, code_chunk, s, m, top_k). Shapes: one block; a token tail (300 = 4 * 64 +
# 44); K > chunk, in code blocks with a tail (600 = 2 * 256 + 88); full chunks that take the
# two-stage top-k (chunk >= 4 * top_k * 32) and a tail that does not.
# Each case compiles its own programs (~10 s): one runs in the fast tier, all in the full one.
CASES = [
  pytest.param(256, 40, 16, 256, None, 10.0, 0.1, 3, marks=pytest.mark.slow),
  pytest.param(256, 40, 16, 256, 16, 5.0, 0.0, 5, marks=pytest.mark.slow),
  (300, 7, 8, 64, None, 10.0, 0.1, 1),
  pytest.param(300, 7, 8, 64, 3, 5.0, 0.1, 5, marks=pytest.mark.slow),
  pytest.param(300, 7, 8, 64, None, 10.0, 0.0, 3, marks=pytest.mark.slow),
  pytest.param(1000, 600, 8, 128, 256, 10.0, 0.1, 3, marks=pytest.mark.slow),
  pytest.param(1000, 600, 8, 128, None, 5.0, 0.0, 1, marks=pytest.mark.slow),
  pytest.param(2500, 50, 16, 1024, None, 10.0, 0.1, 5, marks=pytest.mark.slow),
  pytest.param(2500, 50, 16, 1024, 32, 5.0, 0.1, 3, marks=pytest.mark.slow),
  pytest.param(2500, 50, 16, 1024, 25, 10.0, 0.0, 1, marks=pytest.mark.slow),
]


@pytest.mark.parametrize("n,k_rows,d,chunk,code_chunk,s,m,top_k", CASES)
def test_value_and_gradient_match_naive(n, k_rows, d, chunk, code_chunk, s, m, top_k):
  z, e = random_data(n + k_rows, n, k_rows, d)
  assert_same(*naive_and_blocked(z, e, s, m, top_k, chunk, code_chunk))


@pytest.mark.slow
@pytest.mark.parametrize(
  "n,k_rows",
  [
    (9000, 1100),  # two 4096-token chunks and a tail; two 512-code blocks and a tail
    (6272, 600),  # two chunks of 3136 that divide N (`dividing_chunk_size`), no tail
  ],
)
def test_default_block_sizes_match_naive(n, k_rows):
  z, e = random_data(11, n, k_rows, 8)
  assert_same(*naive_and_blocked(z, e, 10.0, 0.1, 3, None))


@pytest.mark.slow
@pytest.mark.parametrize(
  "n,chunk,top_k", [(300, 32, 3), (301, 7, 5), (1500, 512, 3), (2000, 1024, 5)]
)
def test_ties_between_duplicated_latents_resolve_like_top_k(n, chunk, top_k):
  # A few distinct directions repeated many times: every P_k boundary is a tie, and only
  # lowest-index-first picks the tokens the naive form picks (the gradient tells which).
  rng = np.random.default_rng(n)
  z = exact_units(1, 12)[rng.integers(0, 12, n)]
  e = exact_units(2, 20)
  naive, blocked = naive_and_blocked(z, e, 10.0, 0.1, top_k, chunk)
  assert_same(naive, blocked)
  # The data does make ties at the boundary (else this test would prove nothing).
  cos = np.asarray(vq.l2_normalize(jnp.asarray(e)) @ vq.l2_normalize(jnp.asarray(z)).T)
  kth = np.sort(cos, axis=1)[:, -top_k]
  assert np.all((cos == kth[:, None]).sum(1) > 1)


@pytest.mark.slow
def test_ties_across_groups_of_one_block():
  # One block of 256 tokens (the two-stage top-k: groups of 32). Token 165 (group 5) is the
  # best; tokens 70 (group 2) and 170 (group 5) tie for second: top_k picks 70, the lower
  # index, although group 5 ranks first among the groups.
  e = np.eye(1, 4, dtype=np.float32)  # (1, 0, 0, 0)
  z = np.tile(-e, (256, 1))  # cosine -1
  z[165] = e  # cosine 1
  z[[70, 170]] = 0.5  # cosine 0.5, exactly
  naive, blocked = naive_and_blocked(z, e, 10.0, 0.1, 2, 256)
  assert_same(naive, blocked)
  assert np.abs(np.asarray(naive[1])[70]).sum() > 0


@pytest.mark.parametrize(
  "width", [pytest.param(8, marks=pytest.mark.slow), pytest.param(99, marks=pytest.mark.slow), 300]
)
def test_block_top_k_is_lax_top_k(width):
  # Both ways `_top_k` takes (rounds of max for short rows, XLA's TopK for long ones), on rows
  # with many ties and with -inf entries (the running top-k starts at -inf).
  rng = np.random.default_rng(width)
  x = rng.integers(-3, 3, (64, width)).astype(np.float32)
  x[::3, : width // 2] = -np.inf
  x[1, :] = -np.inf
  for k in (1, 3, 5):
    want_v, want_i = jax.lax.top_k(jnp.asarray(x), k)
    got_v, got_i = jax.jit(st._top_k, static_argnums=1)(jnp.asarray(x), k)
    np.testing.assert_array_equal(got_v, want_v)
    np.testing.assert_array_equal(got_i, want_i)


@pytest.mark.slow
def test_zero_vectors_in_latents_and_codebook():
  z, e = random_data(3, 700, 30, 8)
  z[::7] = 0.0  # zero latents: cosine 0, gradient through the eps guard
  e[[0, 11, 29]] = 0.0  # zero codes: every cosine 0, P_k = the first top_k tokens
  zero = np.zeros(len(z), bool)
  zero[::7] = True
  for chunk in (64, 700):
    (v0, g0), (v1, g1) = naive_and_blocked(z, e, 10.0, 0.1, 3, chunk)
    # The guard makes the gradient at a zero latent finite but ~1/eps: compare the two kinds
    # of rows apart, each to its own scale.
    assert_same((v0, g0[zero]), (v1, g1[zero]))
    assert_same((v0, g0[~zero]), (v1, g1[~zero]))


@pytest.mark.slow
def test_large_scale_is_stable():
  # s = 1000: exp without the running shifts would overflow (or underflow to log 0).
  z, e = random_data(4, 400, 6, 4)
  naive, blocked = naive_and_blocked(z, e, 1000.0, 0.1, 3, 64)
  assert np.isfinite(blocked[0])
  assert_same(naive, blocked, rtol=1e-5, grad_rtol=1e-3)


@pytest.mark.slow
def test_top_k_equal_to_n():
  # Every token is in P: the loss is 0 (the naive form's is round-off around it).
  z, e = random_data(5, 5, 3, 4)
  (v0, g0), (v1, g1) = naive_and_blocked(z, e, 10.0, 0.1, 5, 2)
  np.testing.assert_allclose([v1, v0], 0.0, atol=1e-6)
  np.testing.assert_allclose(g1, g0, atol=1e-6)


@pytest.mark.slow
def test_codebook_gets_zero_gradient_under_jit():
  z, e = random_data(6, 300, 12, 8)
  z, e = jnp.asarray(z), jnp.asarray(e)
  loss = functools.partial(st.arc_loss_blocked, s=10.0, m=0.1, top_k=3, chunk_size=64)
  # Weighted, as in the training loss: the incoming cotangent is not 1.
  g_z, g_e = jax.jit(jax.grad(lambda a, b: 0.37 * loss(a, b), argnums=(0, 1)))(z, e)
  assert np.all(np.asarray(g_e) == 0)
  want = jax.jit(jax.grad(lambda a: 0.37 * vq.arc_loss(a, e, 10.0, 0.1, 3)))(z)
  np.testing.assert_allclose(g_z, want, rtol=1e-4, atol=1e-4 * float(jnp.abs(want).max()))
  np.testing.assert_allclose(jax.jit(loss)(z, e), vq.arc_loss(z, e, 10.0, 0.1, 3), rtol=1e-5)


@pytest.mark.slow
def test_bfloat16_inputs_are_computed_in_float32():
  z, e = random_data(10, 300, 12, 8)
  z16, e16 = jnp.asarray(z, jnp.bfloat16), jnp.asarray(e, jnp.bfloat16)
  loss = functools.partial(st.arc_loss_blocked, s=10.0, m=0.1, top_k=3, chunk_size=64)
  value, grad = jax.jit(jax.value_and_grad(loss))(z16, e16)
  want = vq.arc_loss(z16.astype(jnp.float32), e16.astype(jnp.float32), 10.0, 0.1, 3)
  assert value.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
  np.testing.assert_allclose(value, want, rtol=1e-5)
  idx = jax.jit(st.nearest_code_blocked, static_argnums=(2, 3))(z16, e16, "cosine", 64)
  np.testing.assert_array_equal(
    idx, vq.nearest_code(z16.astype(jnp.float32), e16.astype(jnp.float32), "cosine")
  )


def test_never_builds_the_k_by_n_matrix():
  # XLA's own account of the temporaries of forward + backward: the naive form needs several
  # (K, N) buffers, the blocked one a few (K, chunk) blocks and O(N * D).
  n, k_rows, d, chunk = 16384, 256, 8, 512
  z = jax.ShapeDtypeStruct((n, d), jnp.float32)
  e = jax.ShapeDtypeStruct((k_rows, d), jnp.float32)

  def temp_bytes(loss):
    return jax.jit(jax.grad(loss)).lower(z, e).compile().memory_analysis().temp_size_in_bytes

  matrix = 4 * k_rows * n
  naive = temp_bytes(lambda a, b: vq.arc_loss(a, b, 10.0, 0.1, 3))
  blocked = temp_bytes(lambda a, b: st.arc_loss_blocked(a, b, 10.0, 0.1, 3, chunk_size=chunk))
  assert naive >= matrix  # the check can tell
  assert blocked < matrix / 4, (blocked, matrix)


def test_rejects_bad_arguments():
  z, e = jnp.ones((4, 3)), jnp.ones((2, 3))
  with pytest.raises(ValueError, match="top_k"):
    st.arc_loss_blocked(z, e, 10.0, 0.1, 5)
  with pytest.raises(ValueError, match="s="):
    st.arc_loss_blocked(z, e, -1.0, 0.1, 3)
  with pytest.raises(ValueError, match="distance"):
    st.nearest_code_blocked(z, e, "manhattan")


def test_auto_chunk_size():
  assert st.auto_chunk_size(512) == 4096  # the default ArcLoss block: 512 codes x 4096 tokens
  assert st.auto_chunk_size(1000) == 2048  # the power of two below 2**21 / 1000
  assert st.auto_chunk_size(1) == st.MAX_CHUNK
  assert st.auto_chunk_size(10**7) == st.MIN_CHUNK
  assert st.auto_chunk_size(8192, st.NEAREST_BLOCK_ELEMENTS) == 256 == st.MIN_CHUNK


def test_dividing_chunk_size():
  assert st.dividing_chunk_size(6272, 4096) == 3136  # 128 images of 7 x 7 tokens: 2 x 3136
  assert st.dividing_chunk_size(50176, 4096) == 3584  # 1024 images: 14 x 3584
  assert st.dividing_chunk_size(8192, 4096) == 4096  # divides already
  assert st.dividing_chunk_size(9000, 4096) == 4096  # no multiple of 32 divides 9000: as it was
  assert st.dividing_chunk_size(4097, 4096) == 4096  # none in [2048, 4096]
  assert st.dividing_chunk_size(300, 256, multiple=1) == 150
  for n in range(1, 3000, 37):
    c = st.dividing_chunk_size(n, 1024)
    assert c == 1024 or (n % c == 0 and c % 32 == 0 and 512 <= c <= 1024)


# --------------------------------------------------------------------------- nearest code


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
@pytest.mark.parametrize("chunk,code_chunk", [(None, 8192), (16, 8), (64, 37), (7, 5)])
def test_nearest_code_matches_naive(distance, chunk, code_chunk):
  z, e = random_data(7, 203, 37, 8)
  want = vq.nearest_code(jnp.asarray(z), jnp.asarray(e), distance)
  got = jax.jit(
    functools.partial(
      st.nearest_code_blocked, distance=distance, chunk_size=chunk, code_chunk_size=code_chunk
    )
  )(jnp.asarray(z), jnp.asarray(e))
  assert got.dtype == jnp.int32 and got.shape == (203,)
  np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("distance", ["cosine", "euclidean"])
def test_nearest_code_ties_go_to_the_lowest_index(distance):
  # Codes 19 and 3 are equal, 27 and 3 point the same way; every latent is one of them (or a
  # zero vector, which ties with every code under cosine), so each answer is a tie.
  e = exact_units(8, 30)
  e[19] = e[3]
  e[27] = 4.0 * e[3]
  e[28] = e[4]
  z = np.concatenate([e[[19, 27, 28, 3, 4]], np.zeros((2, 8), np.float32)])
  z = np.tile(z, (5, 1))
  want = vq.nearest_code(jnp.asarray(z), jnp.asarray(e), distance)
  expect_first = {"cosine": [3, 3, 4, 3, 4, 0, 0], "euclidean": [3, 27, 4, 3, 4, None, None]}
  for row, first in zip(np.asarray(want)[:7], expect_first[distance], strict=True):
    if first is not None:
      assert row == first
  for chunk, code_chunk in [(None, 8192), (4, 8), (35, 4)]:
    got = jax.jit(
      functools.partial(
        st.nearest_code_blocked, distance=distance, chunk_size=chunk, code_chunk_size=code_chunk
      )
    )(jnp.asarray(z), jnp.asarray(e))
    np.testing.assert_array_equal(got, want)


@pytest.mark.slow
def test_nearest_code_nan_like_argmax():
  z, e = random_data(9, 20, 11, 4)
  z[5, 2] = np.nan
  e[6, 1] = np.nan  # every latent scores NaN against code 6
  for distance in ("cosine", "euclidean"):
    want = vq.nearest_code(jnp.asarray(z), jnp.asarray(e), distance)
    got = jax.jit(st.nearest_code_blocked, static_argnums=(2, 3, 4))(
      jnp.asarray(z), jnp.asarray(e), distance, 8, 4
    )
    np.testing.assert_array_equal(got, want)


# --------------------------------------------------------------------------- ArcLoss + search


# (N, K, chunk, code_chunk): one block; token tail and code blocks with a tail; the default
# blocks (two 3136-token chunks at N 6272); and codes in blocks of 7 (a later block of codes
# must win only when strictly better).
@pytest.mark.parametrize(
  "n,k_rows,chunk,code_chunk",
  [
    (256, 40, 256, None),
    (300, 600, 64, 256),
    pytest.param(6272, 512, None, None, marks=pytest.mark.slow),
    (203, 37, 16, 7),
  ],
)
def test_arc_loss_and_nearest_match_both_naive_forms(n, k_rows, chunk, code_chunk):
  z, e = random_data(n + 3 * k_rows, n, k_rows, 8)
  both = jax.jit(
    jax.value_and_grad(
      lambda a: st.arc_loss_and_nearest_blocked(
        a, jnp.asarray(e), 10.0, 0.1, 3, chunk_size=chunk, code_chunk_size=code_chunk
      ),
      has_aux=True,
    )
  )
  (value, idx), grad = both(jnp.asarray(z))
  assert idx.dtype == jnp.int32 and idx.shape == (n,)
  np.testing.assert_array_equal(idx, vq.nearest_code(jnp.asarray(z), jnp.asarray(e), "cosine"))
  naive = jax.jit(jax.value_and_grad(lambda a: vq.arc_loss(a, jnp.asarray(e), 10.0, 0.1, 3)))
  assert_same(naive(jnp.asarray(z)), (value, grad))


def test_arc_loss_and_nearest_ties_and_nan_like_argmax():
  # The ties of test_nearest_code_ties_go_to_the_lowest_index, split over blocks of 4 codes
  # (3 and its copies 19, 27 fall in different blocks), then a NaN code in a later block: it
  # wins every token, as in jnp.argmax.
  e = exact_units(8, 30)
  e[19] = e[3]
  e[27] = 4.0 * e[3]
  e[28] = e[4]
  z = np.tile(np.concatenate([e[[19, 27, 28, 3, 4]], np.zeros((2, 8), np.float32)]), (5, 1))
  find = jax.jit(lambda a, b: st.arc_loss_and_nearest_blocked(a, b, 10.0, 0.1, 3, 8, 4)[1])
  got = find(jnp.asarray(z), jnp.asarray(e))
  np.testing.assert_array_equal(got[:7], [3, 3, 4, 3, 4, 0, 0])
  np.testing.assert_array_equal(got, vq.nearest_code(jnp.asarray(z), jnp.asarray(e), "cosine"))
  e[21, 1] = np.nan
  got = find(jnp.asarray(z), jnp.asarray(e))
  np.testing.assert_array_equal(got, np.full(len(z), 21))
  np.testing.assert_array_equal(got, vq.nearest_code(jnp.asarray(z), jnp.asarray(e), "cosine"))


# --------------------------------------------------------------------------- on a mesh


@pytest.fixture(scope="module")
def multidevice():
  """tests/blockwise_multidevice_script.py on 8 simulated CPU devices: {case: errors}."""
  env = device_env.simulated_devices(8, unoptimised=True)
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "blockwise_multidevice_script.py")],
    env=env,
    capture_output=True,
    text=True,
    timeout=1200,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [row for row in proc.stdout.splitlines() if row.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT") :])


@pytest.mark.slow
def test_sharded_arc_loss_equals_single_device(multidevice):
  # Meshes (8,) data, (4, 2) data x model, (2, 4) data x fsdp (batch over both); the codebook
  # whole or split along K over each axis; K = 100 leaves padded row shares; 'ties' makes
  # every P_k boundary a tie, so a token order other than the global one would show.
  cases = {k: v for k, v in multidevice.items() if k.startswith("arc/")}
  assert len(cases) == 31
  assert any("cb=model" in k for k in cases) and any("cb=fsdp" in k for k in cases)
  for key, err in cases.items():
    assert err["finite"], key
    assert err["value"] < 1e-6, (key, err)
    assert err["grad"] < 1e-5, (key, err)


@pytest.mark.slow
def test_sharded_search_equals_single_device(multidevice):
  # Cosine and Euclidean; ties between equal and parallel codes and NaN scores included.
  cases = {k: v for k, v in multidevice.items() if k.startswith("search/")}
  assert len(cases) == 108
  assert {k for k, v in cases.items() if not v["equal"]} == set()


@pytest.mark.slow
def test_codebook_sharded_train_step_equals_one_device(multidevice):
  # A VQ-VAE step on 8 devices, blocked ArcLoss and search with the codebook stored and
  # searched split along K, against the naive step on one device.
  cases = {k: v for k, v in multidevice.items() if k.startswith("train/")}
  assert set(cases) == {"train/4x2:data,model/cb=model", "train/2x4:data,fsdp/cb=data"}
  for key, run in cases.items():
    assert run["sharded_search"], key
    assert run["spec"].startswith("P('model'" if "cb=model" in key else "P('data'"), run
    assert run["loss_arc"] > 0
    for name, err in run["losses"].items():
      assert err < 2e-5, (key, name, err)
    assert run["codebook"] < 1e-4, (key, run["codebook"])


def test_sharded_forms_check_their_mesh():
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  z, e = jnp.ones((4, 3)), jnp.ones((2, 3))
  with pytest.raises(ValueError, match="mesh axis 'model'"):
    st.arc_loss_sharded(z, e, 10.0, 0.1, 3, mesh=mesh, codebook_axis="model")
  with pytest.raises(ValueError, match="top_k"):
    st.arc_loss_sharded(z, e, 10.0, 0.1, 5, mesh=mesh)
  with pytest.raises(ValueError, match="mesh axis 'fsdp'"):
    st.nearest_code_sharded(z, e, "cosine", mesh=mesh, batch_axes=("data", "fsdp"))


@pytest.mark.slow
def test_sharded_forms_on_one_device_match():
  # A one-device mesh: the same code path as on many (gather, row shares, psum), trivially.
  mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:1]), ("data",))
  z, e = random_data(12, 300, 37, 8)
  z, e = jnp.asarray(z), jnp.asarray(e)
  want = jax.value_and_grad(lambda a: vq.arc_loss(a, e, 10.0, 0.1, 3))(z)
  got = jax.jit(
    jax.value_and_grad(
      lambda a: st.arc_loss_sharded(
        a, e, 10.0, 0.1, 3, mesh=mesh, codebook_axis="data", chunk_size=64
      )
    )
  )(z)
  assert_same(want, got)
  idx = jax.jit(
    lambda a, b: st.nearest_code_sharded(a, b, "cosine", mesh=mesh, codebook_axis="data")
  )(z, e)
  np.testing.assert_array_equal(idx, vq.nearest_code(z, e, "cosine"))


# --------------------------------------------------------------------------- choice and config


def test_auto_keeps_the_naive_form_for_small_problems():
  assert not vq_quantizer.use_blocked("auto", 64, 784)  # the tiny configs: one small matrix
  assert vq_quantizer.use_blocked("auto", 100_000, 64)
  assert vq_quantizer.use_blocked("auto", 1024, 32768)
  assert vq_quantizer.use_blocked("blocked", 8, 8)
  assert not vq_quantizer.use_blocked("naive", 10**5, 10**5)


@pytest.mark.parametrize(
  "axis,shape,axes,devices,match",
  [
    ("model", (-1,), ("data",), 8, "'model' is not one of the mesh axes"),
    ("data", (-1,), ("data",), 3, "do not split evenly over the 3 devices"),
    ("fsdp", (2, -1), ("data", "fsdp"), 8, None),  # 512 codes over 4
    ("data", (-1,), ("data",), 8, None),
  ],
)
def test_codebook_axis_is_validated(axis, shape, axes, devices, match):
  c = config_lib.vqvae_config()
  c.batch_size, c.eval_batch_size = 24, 24
  c.quantizer.codebook_axis = axis
  c.sharding.mesh_shape, c.sharding.mesh_axes = shape, axes
  if match is None:
    config_lib.validate(c, num_devices=devices)
  else:
    with pytest.raises(ValueError, match=r"config\.quantizer\.codebook_axis: .*" + match):
      config_lib.validate(c, num_devices=devices)


def test_streamed_arc_loss_is_allowed_on_several_devices():
  c = config_lib.vqvae_config()
  c.arc.impl = "blocked"
  config_lib.validate(c, num_devices=8)


@pytest.mark.slow
def test_large_codebook_config_trains_a_few_steps():
  # configs/large_codebook.py: K = 100,000 with the full VQGAN step (GAN on from step 0),
  # on random images of the config's data shape (Fashion-MNIST, 28x28x1).
  from arcvq_jax import sharding  # noqa: PLC0415
  from arcvq_jax.train import gan_steps  # noqa: PLC0415
  from arcvq_jax.train.state import make_disc_optimizer, make_optimizer  # noqa: PLC0415
  from configs import large_codebook  # noqa: PLC0415 (configs/ is not a package)

  c = large_codebook.get_config()
  config_lib.validate(c, num_devices=1)
  config_lib.validate_against_data(c, (28, 28, 1))
  assert c.quantizer.num_codes == 100_000
  tokens = c.batch_size * 7 * 7
  assert vq_quantizer.use_blocked("auto", c.quantizer.num_codes, tokens)
  mesh = sharding.make_mesh((-1,), ("data",), devices=jax.devices()[:1])
  model = state_lib.build_model(c, channels=1)
  state, _, steps_fn = gan_steps.create_state_and_steps(
    c,
    model,
    discriminator.from_config(c),
    make_optimizer(c),
    make_disc_optimizer(c),
    mesh,
    (28, 28, 1),
    None,
  )
  assert state.gen.params["codebook"].shape == (100_000, 8)
  rng = np.random.default_rng(0)
  losses = []
  for t in range(2):
    x = rng.uniform(-1, 1, size=(c.batch_size, 28, 28, 1)).astype(np.float32)
    state, metrics = steps_fn(
      state, sharding.global_batch({"image": x}, sharding.batch_sharding(mesh)), t
    )
    losses.append({k: float(v) for k, v in metrics.items()})
  for m in losses:
    for key in ("loss", "loss_vq", "loss_arc", "d_loss"):
      assert np.isfinite(m[key]), (key, m)
    assert m["loss_arc"] > 0
  assert int(jax.device_get(state.gen.step)) == 2
