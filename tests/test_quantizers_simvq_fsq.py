"""SimVQ and FSQ (arcvq_jax/quantizers/simvq.py, fsq.py; docs/math.md, sections 8.4-8.5).

Parity with vector-quantize-pytorch 1.32.0 (the `test` extras) on the same inputs and weights:
the quantized output, the indices, the loss, and the gradients w.r.t. the input and W;
numpy transcriptions of eq. 44-50; the interface's invariants (lookup(tokens(z)) is what
quantize gives, tokens in [0, vocab)); FSQ's index <-> code round trip; the config errors.
"""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from arcvq_jax import config as config_lib
from arcvq_jax.quantizers import fsq as fsq_lib
from arcvq_jax.quantizers import registry
from arcvq_jax.quantizers.base import QuantizerConfigError
from arcvq_jax.quantizers.fsq import FSQ
from arcvq_jax.quantizers.simvq import SimVQ
from arcvq_jax.train import state as state_lib

LIBRARY = "vector-quantize-pytorch==1.32.0"


@pytest.fixture(scope="module")
def lib():
  """The reference library (torch, vector_quantize_pytorch), imported on first use: it takes
  seconds (einx loads torch._dynamo); skips the parity tests where it cannot be imported."""
  try:
    import torch  # noqa: PLC0415
    import vector_quantize_pytorch  # noqa: PLC0415
  except Exception as e:  # ImportError, or a dependency of the library that fails to load
    pytest.skip(
      f"{LIBRARY} is not importable ({type(e).__name__}: {e}); the parity tests need the "
      "test extras: pip install -e '.[test]'"
    )
  return torch, vector_quantize_pytorch


STEP = jnp.zeros((), jnp.int32)


def assert_close(actual, desired, rtol=1e-5):
  """Max |actual - desired| <= rtol * max |desired| (float32 parity of whole arrays)."""
  actual, desired = np.asarray(actual, np.float64), np.asarray(desired, np.float64)
  assert actual.shape == desired.shape, (actual.shape, desired.shape)
  err = np.max(np.abs(actual - desired)) / max(np.max(np.abs(desired)), 1e-30)
  assert err <= rtol, f"relative error {err:.3g} > {rtol}"


def tiny_config(variant: str) -> ml_collections.ConfigDict:
  c = config_lib.vqvae_config()
  c.quantizer.num_codes, c.quantizer.embed_dim = 64, 16
  return config_lib.apply_variant(c, variant)


# --------------------------------------------------------------------------- SimVQ


def simvq_data(n=96, d=8, k=32, seed=0):
  rng = np.random.default_rng(seed)
  z = (0.5 * rng.normal(size=(n, d))).astype(np.float32)
  c = (rng.normal(size=(k, d)) * d**-0.5).astype(np.float32)
  w = rng.uniform(-(d**-0.5), d**-0.5, size=(d, d)).astype(np.float32)  # (in, out)
  g = rng.normal(size=(n, d)).astype(np.float32)  # the decoder's gradient w.r.t. z_ste
  return z, c, w, g


def simvq_jax(quantizer, z, c, w, g):
  """Value, indices, loss, and the gradients (w.r.t. the params and z) of the loss and of the
  decoder's path <z_ste, g> separately."""
  params = dict(codebook=jnp.asarray(c), codebook_transform=jnp.asarray(w))
  quantize = lambda p, x: quantizer.quantize(p, x, STEP)
  out, vjp = jax.vjp(quantize, params, jnp.asarray(z))
  zero = jax.tree.map(jnp.zeros_like, out)
  loss_grads = vjp(zero._replace(loss=jnp.ones_like(out.loss)))
  path_grads = vjp(zero._replace(z_ste=jnp.asarray(g)))
  return out, loss_grads, path_grads


@pytest.mark.slow
@pytest.mark.parametrize("gradient", ["ste", "rotation"])
@pytest.mark.parametrize("legacy_beta", [False, True])
def test_simvq_matches_vector_quantize_pytorch(lib, gradient, legacy_beta):
  torch, vqp = lib
  z, c, w, g = simvq_data()
  beta = 0.25
  # The library's loss is (mse(sg(x), q) + a * mse(x, sg(q))) * b: a = beta, b = 1 is eq. 46
  # with legacy_beta False; a = 1/beta, b = beta puts beta on the codebook term (legacy).
  a, b = (1 / beta, beta) if legacy_beta else (beta, 1.0)
  ref = vqp.SimVQ(
    dim=8,
    codebook_size=32,
    rotation_trick=gradient == "rotation",
    input_to_quantize_commit_loss_weight=a,
    commitment_weight=b,
  )
  with torch.no_grad():
    ref.frozen_codebook.copy_(torch.from_numpy(c))
    ref.code_transform.weight.copy_(torch.from_numpy(w.T))  # nn.Linear holds W^T
  x = torch.from_numpy(z)[None].requires_grad_(True)
  t_out, t_idx, t_loss = ref(x)
  weight = ref.code_transform.weight
  t_loss_gx, t_loss_gw = torch.autograd.grad(t_loss, (x, weight), retain_graph=True)
  t_path_gx, t_path_gw = torch.autograd.grad(
    (t_out * torch.from_numpy(g)[None]).sum(), (x, weight), allow_unused=True
  )
  assert t_path_gw is None  # the decoder's path gives W nothing, in both gradient paths

  q = SimVQ(num_codes=32, embed_dim=8, gradient=gradient, beta=beta, legacy_beta=legacy_beta)
  out, (loss_gp, loss_gz), (path_gp, path_gz) = simvq_jax(q, z, c, w, g)
  np.testing.assert_array_equal(out.indices, t_idx[0].numpy())
  assert len(np.unique(out.indices)) > 8  # many codes in play
  assert_close(out.z_ste, t_out[0].detach().numpy())
  assert_close(out.loss, t_loss.detach().numpy())
  assert_close(out.terms["loss_vq"], t_loss.detach().numpy())
  assert_close(loss_gz, t_loss_gx[0].numpy())  # the commitment term
  assert_close(loss_gp["codebook_transform"], t_loss_gw.numpy().T)  # the codebook term
  assert_close(path_gz, t_path_gx[0].numpy())
  np.testing.assert_array_equal(path_gp["codebook_transform"], 0.0)
  # C is frozen: no gradient reaches it at all.
  np.testing.assert_array_equal(loss_gp["codebook"], 0.0)
  np.testing.assert_array_equal(path_gp["codebook"], 0.0)


def test_simvq_against_numpy():
  """Eq. 44-46 in float64: nearest row of C W, loss (w_cb, w_commit) * mse."""
  z, c, w, g = simvq_data(seed=1)
  codes = c.astype(np.float64) @ w.astype(np.float64)
  want_idx = np.argmin(((z[:, None, :] - codes[None]) ** 2).sum(-1), axis=1)
  mse = np.mean((z - codes[want_idx]) ** 2)
  for legacy, weights in ((False, (1.0, 0.3)), (True, (0.3, 1.0))):
    q = SimVQ(num_codes=32, embed_dim=8, beta=0.3, legacy_beta=legacy)
    out, (loss_gp, loss_gz), _ = simvq_jax(q, z, c, w, g)
    np.testing.assert_array_equal(out.indices, want_idx)
    assert_close(out.loss, sum(weights) * mse)
    # d/dz of w_commit * mean((z - sg(q))^2); d/dW of w_cb * mean((sg(z) - C_k W)^2).
    n_el = z.size
    assert_close(loss_gz, weights[1] * 2 * (z - codes[want_idx]) / n_el)
    onehot = np.eye(32)[want_idx]
    want_gw = weights[0] * 2 * (onehot @ c).T @ (codes[want_idx] - z) / n_el
    assert_close(loss_gp["codebook_transform"], want_gw)


@pytest.mark.parametrize("gradient", ["ste", "rotation"])
def test_simvq_tokens_lookup_and_codebook(gradient):
  z, c, w, _ = simvq_data()
  q = SimVQ(num_codes=32, embed_dim=8, gradient=gradient)
  params = dict(codebook=jnp.asarray(c), codebook_transform=jnp.asarray(w))
  out = jax.jit(q.quantize)(params, jnp.asarray(z), STEP)
  tokens = jax.jit(q.tokens)(params, jnp.asarray(z))
  np.testing.assert_array_equal(tokens, out.indices)
  assert tokens.dtype == jnp.int32 and int(tokens.min()) >= 0 and int(tokens.max()) < 32
  looked_up = jax.jit(q.lookup)(params, tokens)
  codebook = q.codebook(params)
  assert codebook.shape == (32, 8) and q.has_codebook
  np.testing.assert_array_equal(looked_up, np.asarray(codebook)[np.asarray(tokens)])
  if gradient == "ste":  # z_ste is z_q bit for bit
    np.testing.assert_array_equal(out.z_ste, looked_up)
  else:  # up to the rounding of the rotation
    np.testing.assert_allclose(out.z_ste, looked_up, rtol=0, atol=2e-6)
  assert (q.vocab_size, q.dim) == (32, 8)


@pytest.mark.slow
def test_simvq_params_init_and_frozen_codebook():
  config = tiny_config("simvq")
  q = registry.from_config(config)
  assert isinstance(q, SimVQ) and q.frozen_params() == ("codebook",)
  inits = q.param_inits()
  assert set(inits) == {"codebook", "codebook_transform"}
  big = SimVQ(num_codes=4096, embed_dim=16).param_inits()
  c = np.asarray(big["codebook"](jax.random.PRNGKey(0)))
  w = np.asarray(big["codebook_transform"](jax.random.PRNGKey(1)))
  assert c.shape == (4096, 16) and w.shape == (16, 16)
  assert abs(c.std() - 16**-0.5) < 0.01 and abs(c.mean()) < 0.01  # N(0, 1/D)
  assert np.abs(w).max() <= 0.25 and np.abs(w).max() > 0.2  # U(-1/sqrt(D), 1/sqrt(D))
  # The optimizer leaves C alone and updates W.
  params = {k: init(jax.random.PRNGKey(2)) for k, init in inits.items()}
  grads = jax.tree.map(jnp.ones_like, params)
  tx = state_lib.make_optimizer(config)
  updates, _ = tx.update(grads, tx.init(params), params)
  np.testing.assert_array_equal(updates["codebook"], 0.0)
  assert np.abs(np.asarray(updates["codebook_transform"])).min() > 0


# --------------------------------------------------------------------------- FSQ

LEVEL_SETS = [(8, 5, 5, 5), (7, 6, 4, 3)]


def np_bound(z, levels):
  """Eq. 47 in float64."""
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * (1 + 1e-3) / 2
  offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
  return np.tanh(z + np.arctanh(offset / half_l)) * half_l - offset, half_l, offset


def fsq_data(levels, n=200, seed=0):
  rng = np.random.default_rng(seed)
  z = (1.5 * rng.normal(size=(n, len(levels)))).astype(np.float32)
  g = rng.normal(size=(n, len(levels))).astype(np.float32)
  return z, g


@pytest.mark.slow
@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_fsq_matches_vector_quantize_pytorch(lib, levels):
  torch, vqp = lib
  z, g = fsq_data(levels)
  ref = vqp.FSQ(levels=list(levels))
  x = torch.from_numpy(z)[None].requires_grad_(True)
  t_out, t_idx = ref(x)
  (t_gx,) = torch.autograd.grad((t_out * torch.from_numpy(g)[None]).sum(), (x,))

  q = FSQ(levels=levels)
  out = q.quantize({}, jnp.asarray(z), STEP)
  gz = jax.grad(lambda x: jnp.sum(q.quantize({}, x, STEP).z_ste * g))(jnp.asarray(z))
  np.testing.assert_array_equal(out.indices, t_idx[0].numpy())
  assert len(np.unique(out.indices)) > 50
  # Same codes: both are a rounded integer divided by floor(L/2).
  np.testing.assert_array_equal(out.z_ste, t_out[0].detach().numpy())
  assert_close(gz, t_gx[0].numpy())
  assert float(out.loss) == 0.0 and out.terms == {}
  # Every index's code, as the library's indices_to_codes.
  every = np.arange(math.prod(levels))
  want = ref.indices_to_codes(torch.from_numpy(every)).numpy()
  np.testing.assert_array_equal(q.lookup({}, jnp.asarray(every)), want)


@pytest.mark.parametrize("levels", LEVEL_SETS)
def test_fsq_against_numpy(levels):
  """Eq. 47-49 in float64, away from the rounding boundaries where float32 may round the
  other way; the gradient is the bound's derivative / floor(L/2) (rounding passes it)."""
  z, g = fsq_data(levels, seed=1)
  b, half_l, offset = np_bound(z.astype(np.float64), levels)
  clear = np.all(np.abs(b - np.floor(b) - 0.5) > 1e-4, axis=1)
  assert clear.mean() > 0.95
  hw = np.asarray(levels) // 2
  want_codes = (np.round(b) / hw).astype(np.float32)  # float32's correctly rounded quotient
  basis = np.cumprod((1, *levels[:-1]))
  want_idx = ((np.round(b) + hw) * basis).sum(-1)
  q = FSQ(levels=levels)
  out = q.quantize({}, jnp.asarray(z), STEP)
  np.testing.assert_array_equal(np.asarray(out.indices)[clear], want_idx[clear])
  np.testing.assert_array_equal(np.asarray(out.z_ste)[clear], want_codes[clear])
  gz = jax.grad(lambda x: jnp.sum(q.quantize({}, x, STEP).z_ste * g))(jnp.asarray(z))
  shift = np.arctanh(offset / half_l)
  assert_close(gz, g * (1 - np.tanh(z + shift) ** 2) * half_l / hw)
  # z = 0 is the middle level of every channel (code 0; for even L, level L/2).
  np.testing.assert_array_equal(q.quantize({}, jnp.zeros((1, len(levels))), STEP).z_ste, 0.0)


@pytest.mark.parametrize("levels", [(3, 4, 5), (8, 5, 5, 5), (7, 6, 4, 3)])
def test_fsq_round_trip_every_index(levels):
  """indices -> codes -> indices for every index, and tokens of a latent that the bound maps
  onto each code (eq. 47 inverted) give that index: every code is reachable."""
  q = FSQ(levels=levels)
  vocab = math.prod(levels)
  assert (q.vocab_size, q.dim, q.has_codebook) == (vocab, len(levels), False)
  every = jnp.arange(vocab, dtype=jnp.int32)
  codes = q.lookup({}, every)
  assert codes.shape == (vocab, len(levels)) and codes.dtype == jnp.float32
  assert float(jnp.min(codes)) == -1.0 and float(jnp.max(codes)) <= 1.0
  np.testing.assert_array_equal(fsq_lib.codes_to_indices(codes, levels), every)
  assert len(np.unique(np.asarray(codes), axis=0)) == vocab
  _, half_l, offset = np_bound(np.zeros(len(levels)), levels)
  hw = np.asarray(levels) // 2
  z = np.arctanh((np.asarray(codes, np.float64) * hw + offset) / half_l) - np.arctanh(
    offset / half_l
  )
  assert np.isfinite(z).all()
  tokens = jax.jit(q.tokens)({}, jnp.asarray(z, jnp.float32))
  np.testing.assert_array_equal(tokens, every)


@pytest.mark.slow
@pytest.mark.parametrize("levels", [(8, 5, 5, 5), (7, 6, 4, 3), (1000, 999, 3)])
def test_fsq_lookup_of_tokens_is_quantize_exactly(levels):
  z, _ = fsq_data(levels, n=1024, seed=2)
  # Saturated latents (tanh = +-1 in float32) reach the outer levels, and no further.
  z[-2:] = [[50.0] * len(levels), [-50.0] * len(levels)]
  q = FSQ(levels=levels)
  for fn in (lambda f: f, jax.jit):
    out = fn(q.quantize)({}, jnp.asarray(z), STEP)
    tokens = fn(q.tokens)({}, jnp.asarray(z))
    np.testing.assert_array_equal(tokens, out.indices)
    assert tokens.dtype == jnp.int32
    assert int(tokens.min()) >= 0 and int(tokens.max()) < q.vocab_size
    assert (int(tokens[-2]), int(tokens[-1])) == (q.vocab_size - 1, 0)
    np.testing.assert_array_equal(fn(q.lookup)({}, tokens), out.z_ste)  # bit for bit


# --------------------------------------------------------------------------- config


@pytest.mark.parametrize(
  "variant, cls, vocab, dim",
  [
    ("simvq", SimVQ, 64, 16),
    ("simvq_rotation", SimVQ, 64, 16),
    ("fsq", FSQ, 1000, 4),
    ("fsq_64k", FSQ, 64000, 6),
  ],
)
def test_variants(variant, cls, vocab, dim):
  c = tiny_config(variant)
  q = registry.from_config(c)
  assert isinstance(q, cls) and (q.vocab_size, q.dim) == (vocab, dim)
  assert c.quantizer.embed_dim == dim and not c.arc.enabled
  config_lib.validate(c, num_devices=1)
  assert config_lib.vqvae_config().quantizer.levels == (8, 5, 5, 5)


@pytest.mark.parametrize(
  "levels, says",
  [
    ((8, 2, 5), "level of 2"),
    ((8, 1), "must be >= 3"),
    ((8, 0), "must be >= 3"),
    ((), "non-empty sequence of integers"),
    ((8.0, 5), "non-empty sequence of integers"),
    ((True, 5), "non-empty sequence of integers"),
    ("8555", "sequence of integers"),
    (8, "sequence of integers"),
    ((1001, 3), "a level above 1000"),
    ((512, 512, 128), "more than 16777216"),
    ((256, 256, 256, 256), "more than 16777216"),  # 2^32 would not fit int32 either
  ],
)
def test_fsq_bad_levels(levels, says):
  n = len(levels) if isinstance(levels, tuple) else 1
  c = ml_collections.ConfigDict(
    dict(quantizer=dict(name="fsq", levels=levels, embed_dim=n, bbnr="off"))
  )
  with pytest.raises(QuantizerConfigError, match=r"config\.quantizer\.levels") as e:
    registry.from_config(c)
  msg = str(e.value)
  assert says in msg and ("Use" in msg or "Set" in msg), msg


def test_fsq_embed_dim_must_match_levels():
  c = tiny_config("fsq")
  c.quantizer.levels = (8, 8, 8, 5, 5, 5)
  with pytest.raises(QuantizerConfigError, match=r"config.quantizer.embed_dim: is 4.*has 6") as e:
    registry.from_config(c)
  assert "--config.quantizer.embed_dim=6" in str(e.value)


@pytest.mark.parametrize("variant", ["fsq", "simvq"])
def test_arc_and_bbnr_refused(variant):
  c = tiny_config(variant)
  c.arc.enabled = True
  with pytest.raises(QuantizerConfigError, match=r"config\.arc\.enabled"):
    registry.from_config(c)
  c = tiny_config(variant)
  c.quantizer.bbnr = "growing"
  with pytest.raises(QuantizerConfigError, match=r"config\.quantizer\.bbnr"):
    registry.from_config(c)


@pytest.mark.parametrize(
  "key, value",
  [
    ("codebook_update", "ema"),
    ("restart_threshold", 1.0),
    ("gradient", "gumbel"),
    ("distance", "manhattan"),
    ("num_codes", 0),
  ],
)
def test_simvq_bad_settings(key, value):
  c = tiny_config("simvq")
  c.quantizer[key] = value
  with pytest.raises(QuantizerConfigError, match=f"config.quantizer.{key}"):
    registry.from_config(c)
