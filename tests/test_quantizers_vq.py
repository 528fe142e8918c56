"""`vq` and `arcvq` against references on the same inputs and weights.

vq (docs/math.md, eq. 5-7, 13-16) against vector-quantize-pytorch 1.32.0's `VectorQuantize`:
Euclidean search, the straight-through output, each loss term with both placements of beta
(the library has one term, mse(q, x) x commitment_weight, whose gradient reaches the codebook
only with learnable_codebook=True: our codebook and commitment terms are each one library run),
the gradients w.r.t. the input and the codebook, EMA k-means (decay, eps, Laplace smoothing),
dead-code restart where comparable, and the rotation trick (value and gradient).

arcvq (eq. 4-10): the library's cosine-sim VectorQuantize returns the normalised codes while
ArcVQ returns the raw rows (docs/math.md, section 14), so the truth is a float64 numpy
transcription of our formulas (gradients: analytic for eq. 6-7, central differences for
ArcLoss); the library still checks the cosine search and the direction of the output.
"""

from __future__ import annotations

import dataclasses
import functools
import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcvq_jax import blockwise
from arcvq_jax.quantizers import vq as vq_lib
from arcvq_jax.quantizers.arcvq import ArcVQ
from arcvq_jax.quantizers.vq import VQ

LIBRARY_VERSION = "1.32.0"
try:
  import torch
  import vector_quantize_pytorch as vqp
  from vector_quantize_pytorch.vector_quantize_pytorch import rotate_to as lib_rotate_to

  LIBRARY_PROBLEM = (
    None
    if importlib.metadata.version("vector-quantize-pytorch") == LIBRARY_VERSION
    else f"vector-quantize-pytorch {importlib.metadata.version('vector-quantize-pytorch')} "
    f"is installed; the parity figures are for {LIBRARY_VERSION}"
  )
except ImportError as e:  # the test extras install both (pyproject.toml)
  torch = vqp = lib_rotate_to = None
  LIBRARY_PROBLEM = f"the reference is not importable ({e}); pip install -e '.[test]'"
needs_library = pytest.mark.skipif(
  LIBRARY_PROBLEM is not None, reason=f"vector-quantize-pytorch parity: {LIBRARY_PROBLEM}"
)

N, D, K = 64, 8, 16
STEP0 = jnp.zeros((), jnp.int32)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def data(seed: int = 0, n: int = N):
  """Latents, codebook and an output cotangent with an unambiguous Euclidean search (the
  library computes sqrt(||z||^2 + ||e||^2 - 2 z.e), we ||e||^2 - 2 z.e: near-ties could
  round apart)."""
  rng = np.random.default_rng(seed)
  z = rng.normal(size=(n, D)).astype(np.float32)
  e = (rng.normal(size=(K, D)) * 0.8).astype(np.float32)
  g = rng.normal(size=(n, D)).astype(np.float32)
  d2 = np.sort(((z[:, None].astype(np.float64) - e[None]) ** 2).sum(-1), axis=1)
  assert (d2[:, 1] - d2[:, 0]).min() > 1e-4, "pick another seed: a near-tie"
  return z, e, g


@functools.cache
def total_and_grads(quantizer):
  def total(params, z, g, step):
    out = quantizer.quantize(params, z, step)
    return jnp.sum(out.z_ste * g) + out.loss, out

  return jax.jit(jax.value_and_grad(total, argnums=(0, 1), has_aux=True))


def ours(quantizer, codebook, z, g, step=STEP0):
  """Outputs of `quantize`, and the gradients of sum(z_ste * g) + loss w.r.t. z and the
  codebook."""
  params = {"codebook": jnp.asarray(codebook)}
  (_, out), (gp, gz) = total_and_grads(quantizer)(params, jnp.asarray(z), jnp.asarray(g), step)
  return out, np.asarray(gz), np.asarray(gp["codebook"])


def library_vq(codebook, **kwargs):
  lib = vqp.VectorQuantize(dim=D, codebook_size=K, **kwargs).train()
  lib._codebook.embed.data.copy_(torch.from_numpy(codebook)[None])
  lib._codebook.embed_avg.data.copy_(torch.from_numpy(codebook)[None])
  return lib


def run_library(lib, z, g):
  x = torch.tensor(z[None], requires_grad=True)
  out, idx, loss, breakdown = lib(x, return_loss_breakdown=True)
  (out * torch.tensor(g[None])).sum().add(loss).backward()
  embed = lib._codebook.embed
  return dict(
    out=out[0].detach().numpy(),
    indices=idx[0].numpy(),
    loss=loss.item(),
    commit=breakdown.commitment.item(),
    grad_z=x.grad[0].numpy(),
    grad_e=None if embed.grad is None else embed.grad[0].numpy(),
  )


# --------------------------------------------------------------------------- vq


@needs_library
@pytest.mark.parametrize("legacy", [False, True])
def test_vq_loss_trained_codebook_matches_library(legacy):
  """Our L_vq = w_cb * codebook term + w_commit * commitment term (eq. 7) against two library
  runs: learnable_codebook=False, commitment_weight=w_commit (the commitment term; the input's
  gradient), and learnable_codebook=True, commitment_weight=w_cb (the codebook's gradient)."""
  z, e, g = data()
  beta = 0.25
  w_cb, w_commit = (beta, 1.0) if legacy else (1.0, beta)
  out, gz, ge = ours(VQ(num_codes=K, embed_dim=D, beta=beta, legacy_beta=legacy), e, z, g)
  common = dict(ema_update=False, rotation_trick=False, threshold_ema_dead_code=0)
  commit = run_library(
    library_vq(e, learnable_codebook=False, commitment_weight=w_commit, **common), z, g
  )
  cb = run_library(library_vq(e, learnable_codebook=True, commitment_weight=w_cb, **common), z, g)
  np.testing.assert_array_equal(np.asarray(out.indices), commit["indices"])
  np.testing.assert_array_equal(np.asarray(out.indices), cb["indices"])
  assert rel_err(out.z_ste, commit["out"]) < 1e-6
  assert rel_err(out.loss, commit["loss"] + cb["loss"]) < 1e-6
  assert rel_err(out.terms["loss_vq"], out.loss) == 0
  assert rel_err(gz, commit["grad_z"]) < 1e-6
  assert rel_err(ge, cb["grad_e"]) < 1e-6


@needs_library
@pytest.mark.parametrize("legacy", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_vq_ema_codebook_matches_library_over_steps(legacy):
  """EMA k-means (eq. 13-14): three steps, codebook and statistics after each; the loss is
  the commitment term only (w_cb = 0)."""
  _, e, _ = data()
  beta, decay, eps = 0.25, 0.9, 1e-5
  quantizer = VQ(
    num_codes=K, embed_dim=D, beta=beta, legacy_beta=legacy, codebook_update="ema",
    ema_decay=decay, ema_eps=eps,
  )  # fmt: skip
  lib = library_vq(
    e, decay=decay, eps=eps, commitment_weight=1.0 if legacy else beta, rotation_trick=False
  )
  params = {"codebook": jnp.asarray(e)}
  stats = quantizer.init_stats(params)
  usage = jnp.zeros((K,), jnp.float32)
  after = jax.jit(quantizer.after_step)
  for step in range(3):
    z, _, g = data(seed=10 + step)
    out, gz, _ = ours(quantizer, params["codebook"], z, g)
    ref = run_library(lib, z, g)
    np.testing.assert_array_equal(np.asarray(out.indices), ref["indices"])
    assert rel_err(out.loss, ref["loss"]) < 1e-6
    assert rel_err(gz, ref["grad_z"]) < 1e-6
    params, stats, usage, _ = after(params, stats, usage, z, out.indices, jax.random.key(step))
    assert rel_err(stats.cluster_size, lib._codebook.cluster_size[0].numpy()) < 1e-6
    assert rel_err(stats.embed_sum, lib._codebook.embed_avg[0].numpy()) < 1e-6
    assert rel_err(params["codebook"], lib._codebook.embed[0].numpy()) < 1e-6


@needs_library
def test_vq_dead_code_restart_matches_library_where_comparable():
  """Restart (eq. 15-16) against the library's threshold_ema_dead_code with its cluster_size
  set to our usage EMA and its decay to our usage_decay: the same rows are dead, their usage
  is reset to the same value, the other rows are untouched and the new rows are latents of
  the batch. Which latents each draws is random in both (not compared)."""
  z, e, g = data()
  rho, tau = 0.9, 1.0
  u0 = np.random.default_rng(5).uniform(0.0, 2.0, size=K).astype(np.float32)
  quantizer = VQ(num_codes=K, embed_dim=D, restart_threshold=tau)
  out, _, _ = ours(quantizer, e, z, g)
  counts = np.bincount(np.asarray(out.indices), minlength=K)
  usage = rho * u0 + (1 - rho) * counts.astype(np.float32)  # the train step's usage EMA (eq. 15)
  params, _, new_usage, metrics = jax.jit(quantizer.after_step)(
    {"codebook": jnp.asarray(e)}, None, jnp.asarray(usage), z, out.indices, jax.random.key(0)
  )
  lib = library_vq(
    e, learnable_codebook=True, ema_update=False, rotation_trick=False, decay=rho,
    threshold_ema_dead_code=tau,
  )  # fmt: skip
  lib._codebook.cluster_size.data.copy_(torch.from_numpy(u0)[None])
  lib._codebook.reset_cluster_size = float(np.mean(usage))  # ours: the mean usage (eq. 16)
  run_library(lib, z, g)
  dead = usage < tau
  assert 0 < dead.sum() < K and int(metrics["codes_restarted"]) == dead.sum()
  lib_embed = lib._codebook.embed[0].detach().numpy()
  assert rel_err(new_usage, lib._codebook.cluster_size[0].numpy()) < 1e-6
  for rows in (np.asarray(params["codebook"]), lib_embed):
    np.testing.assert_array_equal(rows[~dead], e[~dead])
    assert all((np.abs(z - row).max(-1) == 0).any() for row in rows[dead])


@needs_library
def test_rotation_trick_matches_library():
  """rotate_to (eq. 6b): value and the gradient w.r.t. the latent; no gradient to the code."""
  z, e, g = data()
  z_q = e[np.random.default_rng(2).integers(0, K, N)]
  rotate = jax.jit(lambda a, b, c: (lambda v: (v[0], v[1](c)))(jax.vjp(vq_lib.rotate_to, a, b)))
  mine, (gz, gq) = rotate(jnp.asarray(z), jnp.asarray(z_q), jnp.asarray(g))
  x, q = torch.tensor(z, requires_grad=True), torch.tensor(z_q, requires_grad=True)
  theirs = lib_rotate_to(x, q)
  (theirs * torch.tensor(g)).sum().backward()
  assert rel_err(mine, theirs.detach().numpy()) < 1e-6
  assert rel_err(gz, x.grad.numpy()) < 1e-5
  assert q.grad is None or not q.grad.any()
  assert not np.asarray(gq).any()
  # The whole quantizer with gradient='rotation' against VectorQuantize(rotation_trick=True).
  out, gz, _ = ours(VQ(num_codes=K, embed_dim=D, gradient="rotation"), e, z, g)
  ref = run_library(
    library_vq(e, learnable_codebook=False, ema_update=False, rotation_trick=True,
               commitment_weight=0.25),
    z, g,
  )  # fmt: skip
  np.testing.assert_array_equal(np.asarray(out.indices), ref["indices"])
  assert rel_err(out.z_ste, ref["out"]) < 1e-6
  assert rel_err(gz, ref["grad_z"]) < 1e-5


# --------------------------------------------------------------------------- arcvq


def np_normalize(x):
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def np_arc_loss(z, e, s, m, k):
  """Eq. 8-10 in float64, the codebook a constant."""
  c = np_normalize(e) @ np_normalize(z).T  # (K, N)
  top = np.argsort(-c, axis=1, kind="stable")[:, :k]
  rows = np.arange(len(c))[:, None]
  logits = s * c
  theta = np.arccos(np.clip(c[rows, top], -1 + 1e-7, 1 - 1e-7))
  logits[rows, top] = s * np.cos(theta + m)
  lse = lambda a: a.max(-1) + np.log(np.exp(a - a.max(-1, keepdims=True)).sum(-1))
  return float(np.mean(lse(logits) - lse(logits[rows, top])))


@pytest.mark.parametrize("impl", ["naive", "blocked"])
def test_arcvq_against_numpy_transcription(impl):
  """BBNR (eq. 3-4), cosine search (eq. 5), raw-row STE (eq. 6), L_vq (eq. 7), ArcLoss
  (eq. 8-10) and its weight (eq. 11-12), with their gradients, in float64 numpy. 'blocked':
  the search taken from the blocked ArcLoss's forward pass."""
  rng = np.random.default_rng(7)
  n, step = 24, 1000
  z = rng.normal(size=(n, D)).astype(np.float32)
  e = np_normalize(rng.normal(size=(K, D))) * rng.uniform(0.5, 2.5, size=(K, 1))
  e = e.astype(np.float32)
  g = rng.normal(size=(n, D)).astype(np.float32)
  quantizer = ArcVQ(num_codes=K, embed_dim=D, beta=0.25, search_impl=impl, arc_impl=impl)
  assert quantizer.search_in_arc_loss(n, None) == (impl == "blocked")
  s, m, k, beta = quantizer.arc_s, quantizer.arc_m, quantizer.arc_top_k, quantizer.beta
  params, before = quantizer.before_step({"codebook": jnp.asarray(e)}, jnp.asarray(step))
  out, gz, ge = ours(quantizer, params["codebook"], z, g, step=jnp.asarray(step))

  z64, e64, g64 = (a.astype(np.float64) for a in (z, e, g))
  radius = np.exp(quantizer.bbnr_alpha * step)  # eq. 3-4
  ep = e64 * np.minimum(1.0, radius / np.linalg.norm(e64, axis=-1, keepdims=True))
  assert 0 < (np.linalg.norm(e64, axis=-1) > radius).sum() < K  # some rows projected
  assert rel_err(before["bbnr_radius"], radius) < 1e-6
  assert rel_err(params["codebook"], ep) < 1e-6
  cos = np_normalize(z64) @ np_normalize(ep).T  # eq. 5
  best = np.sort(cos, axis=1)
  assert (best[:, -1] - best[:, -2]).min() > 1e-5  # an unambiguous search
  idx = cos.argmax(1)
  z_q = ep[idx]  # eq. 6: the raw rows
  mse = np.mean((z64 - z_q) ** 2)
  loss_vq = (1.0 + beta) * mse  # eq. 7: both terms have the value mse
  loss_arc = np_arc_loss(z64, ep, s, m, k)
  weight = quantizer.arc_gamma0 * np.exp(-quantizer.arc_decay * step)  # eq. 11
  np.testing.assert_array_equal(np.asarray(out.indices), idx)
  assert rel_err(out.z_ste, z_q) < 1e-6
  assert rel_err(out.terms["loss_vq"], loss_vq) < 1e-5
  assert rel_err(out.terms["loss_arc"], loss_arc) < 1e-5
  assert rel_err(out.terms["arc_weight"], weight) < 1e-6
  assert rel_err(out.loss, loss_vq + weight * loss_arc) < 1e-5  # eq. 12

  # Gradients: the STE passes g; eq. 7 analytic; ArcLoss by central differences (its
  # codebook is under stop-gradient, eq. 8, so the codebook's gradient is eq. 7's alone).
  h = 1e-6
  arc_grad = np.zeros_like(z64)
  for i, j in np.ndindex(z64.shape):
    dz = np.zeros_like(z64)
    dz[i, j] = h
    arc_grad[i, j] = (np_arc_loss(z64 + dz, ep, s, m, k) - np_arc_loss(z64 - dz, ep, s, m, k)) / (
      2 * h
    )
  want_gz = g64 + beta * 2 * (z64 - z_q) / z64.size + weight * arc_grad
  want_ge = np.zeros_like(ep)
  np.add.at(want_ge, idx, 2 * (z_q - z64) / z64.size)
  assert rel_err(gz, want_gz) < 1e-5
  assert rel_err(ge, want_ge) < 1e-5


def test_search_comes_from_the_arc_loss_only_where_both_are_blocked_on_one_device():
  fused = ArcVQ(num_codes=K, embed_dim=D, search_impl="blocked", arc_impl="blocked")
  assert fused.search_in_arc_loss(N, None)
  assert fused.search_in_arc_loss(N, jax.make_mesh((1,), ("data",)))
  assert not dataclasses.replace(fused, distance="euclidean").search_in_arc_loss(N, None)
  assert not dataclasses.replace(fused, search_impl="naive").search_in_arc_loss(N, None)
  assert not dataclasses.replace(fused, arc_impl="naive").search_in_arc_loss(N, None)
  # 'auto': blocked from K x N > blockwise.BLOCK_ELEMENTS (the VQ-VAE at batch 128: 512 x 6272).
  auto = ArcVQ(num_codes=512, embed_dim=64)
  assert auto.search_in_arc_loss(6272, None) and not auto.search_in_arc_loss(64, None)
  # Large codebooks keep the separate search (measured faster there; blockwise.py).
  big = dataclasses.replace(auto, num_codes=blockwise.SEARCH_IN_ARC_MAX_CODES + 1)
  assert not big.search_in_arc_loss(6272, None)


class _FakeMesh:
  size = 8


def test_search_stays_apart_on_several_devices():
  # On a mesh the ArcLoss splits the codebook's rows and the search the tokens.
  fused = ArcVQ(num_codes=K, embed_dim=D, search_impl="blocked", arc_impl="blocked")
  assert not fused.search_in_arc_loss(N, _FakeMesh())


@needs_library
def test_arcvq_search_and_direction_match_cosine_sim_library():
  """The library's cosine-sim VectorQuantize picks the same codes but returns n(e_k), where
  ArcVQ returns e_k (docs/math.md, section 14)."""
  z, e, g = data()
  out, _, _ = ours(ArcVQ(num_codes=K, embed_dim=D, bbnr="off", arc=False), e, z, g)
  lib = vqp.VectorQuantize(dim=D, codebook_size=K, use_cosine_sim=True).eval()
  lib._codebook.embed.data.copy_(torch.from_numpy(np_normalize(e))[None])
  with torch.no_grad():
    lib_out, lib_idx, _ = lib(torch.tensor(z[None]))
  np.testing.assert_array_equal(np.asarray(out.indices), lib_idx[0].numpy())
  assert rel_err(np_normalize(np.asarray(out.z_ste)), lib_out[0].numpy()) < 1e-6
  assert not np.allclose(np.asarray(out.z_ste), lib_out[0].numpy())


# --------------------------------------------------------------------------- invariants


@pytest.mark.parametrize(
  "quantizer",
  [
    VQ(num_codes=K, embed_dim=D),
    pytest.param(VQ(num_codes=K, embed_dim=D, gradient="rotation"), marks=pytest.mark.slow),
    ArcVQ(num_codes=K, embed_dim=D),
  ],
  ids=["vq", "vq_rotation", "arcvq"],
)
def test_lookup_of_tokens_is_what_the_decoder_saw(quantizer):
  z, e, _ = data()
  params = {"codebook": jnp.asarray(e)}
  out = jax.jit(quantizer.quantize)(params, jnp.asarray(z), STEP0)
  tokens = quantizer.tokens(params, jnp.asarray(z))
  np.testing.assert_array_equal(tokens, out.indices)
  assert tokens.dtype == jnp.int32 and int(tokens.min()) >= 0 and int(tokens.max()) < K
  # In value: z + sg(z_q - z) rounds within an ulp of |z| + |z_q| (eq. 6).
  np.testing.assert_allclose(quantizer.lookup(params, tokens), out.z_ste, rtol=0, atol=1e-6)


def test_restart_survives_the_next_ema_update():
  """With an EMA codebook, a restarted row must stay where it was re-seeded when the next
  step assigns it nothing (the library resets cluster_size and embed_avg of the row)."""
  z, e, _ = data()
  quantizer = VQ(num_codes=K, embed_dim=D, codebook_update="ema", restart_threshold=1.0)
  params = {"codebook": jnp.asarray(e)}
  stats = quantizer.init_stats(params)
  usage = jnp.full((K,), 2.0).at[0].set(0.0)  # row 0 is dead
  busy = jnp.ones((N,), jnp.int32)  # every latent to row 1: row 0 gets nothing
  after = jax.jit(quantizer.after_step)
  params, stats, usage, m = after(params, stats, usage, z, busy, jax.random.key(0))
  assert int(m["codes_restarted"]) == 1
  seeded = np.asarray(params["codebook"][0])
  params, stats, usage, _ = after(params, stats, usage, z, busy, jax.random.key(1))
  np.testing.assert_allclose(params["codebook"][0], seeded, rtol=1e-3, atol=1e-3)
