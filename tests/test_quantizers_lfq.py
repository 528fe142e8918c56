"""`lfq` (docs/math.md, eq. 51-55): parity with vector-quantize-pytorch 1.32.0's `LFQ` on the
same inputs (quantized output, tokens, each loss term, the gradient w.r.t. the input), the
entropy terms against a float64 numpy transcription, the chunked entropy against the whole
matrix, the quantizer's invariants and its config errors."""

from __future__ import annotations

import importlib.metadata

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcvq_jax import config as config_lib
from arcvq_jax.quantizers import lfq as lfq_lib
from arcvq_jax.quantizers import registry
from arcvq_jax.quantizers.base import QuantizerConfigError

LIBRARY_VERSION = "1.32.0"
try:
  import torch
  import vector_quantize_pytorch as vqp

  LIBRARY_PROBLEM = (
    None
    if importlib.metadata.version("vector-quantize-pytorch") == LIBRARY_VERSION
    else f"vector-quantize-pytorch {importlib.metadata.version('vector-quantize-pytorch')} "
    f"is installed; the parity figures are for {LIBRARY_VERSION}"
  )
except ImportError as e:  # the test extras install both (pyproject.toml)
  torch = vqp = None
  LIBRARY_PROBLEM = f"the reference is not importable ({e}); pip install -e '.[test]'"
needs_library = pytest.mark.skipif(
  LIBRARY_PROBLEM is not None, reason=f"vector-quantize-pytorch parity: {LIBRARY_PROBLEM}"
)


def rel_err(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-30))


def latents(n: int, bits: int, scale: float, seed: int = 0) -> np.ndarray:
  """Latents away from 0 (the sign is then unambiguous in every precision)."""
  z = np.random.default_rng(seed).normal(size=(n, bits)) * scale
  return np.where(np.abs(z) < 1e-3 * scale, 1e-3 * scale, z).astype(np.float32)


def np_entropy_terms(z, bits, scale, temperature):
  """Eq. 53-54 in float64: softmax of -||z - c||^2 / T over all codes, clamped entropies."""
  tokens = np.arange(2**bits)
  codes = np.where((tokens[:, None] >> np.arange(bits - 1, -1, -1)) & 1, scale, -scale)
  logits = -((z[:, None, :].astype(np.float64) - codes[None]) ** 2).sum(-1) / temperature
  logits -= logits.max(-1, keepdims=True)
  p = np.exp(logits)
  p /= p.sum(-1, keepdims=True)
  ent = lambda q: -(q * np.log(np.maximum(q, 1e-5))).sum(-1)
  return ent(p).mean(), ent(p.mean(0))


def ours(quantizer, z, g):
  """Value of every output, and d/dz of sum(z_ste * g) + loss."""

  def total(z):
    out = quantizer.quantize({}, z, jnp.zeros((), jnp.int32))
    return jnp.sum(out.z_ste * g) + out.loss, out

  (_, out), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(jnp.asarray(z))
  return out, np.asarray(grad)


def library(z, g, bits, scale, entropy_weight, gamma, temperature, beta):
  lfq = vqp.LFQ(
    dim=bits,
    entropy_loss_weight=entropy_weight,
    commitment_loss_weight=beta,
    diversity_gamma=gamma,
    codebook_scale=scale,
  ).train()
  x = torch.tensor(z[None], requires_grad=True)  # (1, N, bits): batch, sequence, dim
  (out, indices, aux), breakdown = lfq(
    x, inv_temperature=1.0 / temperature, return_loss_breakdown=True
  )
  (out * torch.tensor(g[None])).sum().add(aux).backward()
  return dict(
    z_q=out[0].detach().numpy(),
    indices=indices[0].numpy(),
    loss=aux.item(),
    per_sample=breakdown.per_sample_entropy.item(),
    codebook=breakdown.batch_entropy.item(),
    commit=breakdown.commitment.item(),
    grad=x.grad[0].numpy(),
  )


CASES = [  # bits, latent scale, codebook_scale, entropy_weight, gamma, temperature, beta
  (6, 0.02, 1.0, 0.1, 1.0, 0.01, 0.25),  # library defaults; spread probabilities
  (9, 1.0, 1.0, 0.1, 1.0, 0.01, 0.25),  # the variant; near one-hot, the clamp at 1e-5 active
  # other scale, weights and temperature
  pytest.param(5, 0.3, 0.5, 0.3, 0.7, 0.5, 1.0, marks=pytest.mark.slow),
]


@needs_library
@pytest.mark.parametrize("bits,zscale,scale,weight,gamma,temperature,beta", CASES)
def test_parity_with_vector_quantize_pytorch(bits, zscale, scale, weight, gamma, temperature, beta):
  n = 96
  z = latents(n, bits, zscale, seed=bits)
  g = np.random.default_rng(1).normal(size=(n, bits)).astype(np.float32)
  quantizer = lfq_lib.LFQ(
    bits=bits,
    codebook_scale=scale,
    entropy_weight=weight,
    diversity_gamma=gamma,
    entropy_temperature=temperature,
    commitment_weight=beta,
  )
  out, grad = ours(quantizer, z, g)
  ref = library(z, g, bits, scale, weight, gamma, temperature, beta)
  np.testing.assert_array_equal(np.asarray(out.indices), ref["indices"])
  assert rel_err(out.z_ste, ref["z_q"]) < 1e-6
  for term, key in (
    ("entropy_per_sample", "per_sample"),
    ("entropy_codebook", "codebook"),
    ("loss_commit", "commit"),
  ):
    assert abs(float(out.terms[term]) - ref[key]) <= 2e-6 * max(abs(ref[key]), 1.0), term
  assert abs(float(out.loss) - ref["loss"]) <= 2e-6 * max(abs(ref["loss"]), 1.0)
  assert rel_err(grad, ref["grad"]) < 1e-5


def test_entropy_terms_match_numpy_and_chunks_match_whole():
  bits, n = 7, 203  # 203 tokens: the chunked form pads its last chunk
  z = latents(n, bits, 0.05, seed=3)
  per_sample, codebook = np_entropy_terms(z, bits, 1.0, 0.01)
  whole = lfq_lib.LFQ(bits=bits)
  chunked = lfq_lib.LFQ(bits=bits, entropy_block=16 * 2**bits)  # 13 chunks of 16 tokens
  g = np.zeros((n, bits), np.float32)
  out_w, grad_w = ours(whole, z, g)
  out_c, grad_c = ours(chunked, z, g)
  for out in (out_w, out_c):
    assert abs(float(out.terms["entropy_per_sample"]) - per_sample) < 1e-5 * per_sample
    assert abs(float(out.terms["entropy_codebook"]) - codebook) < 1e-5 * codebook
  assert rel_err(grad_c, grad_w) < 1e-5


def test_tokens_lookup_and_straight_through():
  quantizer = lfq_lib.LFQ(bits=4, codebook_scale=0.5)
  tokens_of, lookup = jax.jit(quantizer.tokens), jax.jit(quantizer.lookup)
  z = jnp.asarray([[0.3, -0.1, 0.0, 2.0], [-1.0, -1.0, -1.0, -1.0], [1.0, 1.0, 1.0, 1e-9]])
  tokens = tokens_of({}, z)
  # The first dimension is the most significant bit; 0 counts as negative (as the library).
  np.testing.assert_array_equal(tokens, [0b1001, 0b0000, 0b1111])
  assert tokens.dtype == jnp.int32
  out = jax.jit(quantizer.quantize)({}, z, jnp.zeros((), jnp.int32))
  np.testing.assert_array_equal(out.indices, tokens)
  # lookup(tokens(z)) is what the decoder saw in training, bit for bit.
  np.testing.assert_array_equal(lookup({}, tokens), out.z_ste)
  np.testing.assert_array_equal(np.abs(out.z_ste), 0.5)
  every = jnp.arange(16)
  np.testing.assert_array_equal(tokens_of({}, lookup({}, every)), every)
  grad = jax.jit(jax.grad(lambda z: jnp.sum(quantizer.quantize({}, z, 0).z_ste * 3)))(z)
  np.testing.assert_array_equal(grad, 3.0)  # straight through (eq. 52)
  tok = jax.jit(lfq_lib.LFQ(bits=12).tokens)({}, latents(64, 12, 1.0))
  assert int(tok.min()) >= 0 and int(tok.max()) < 2**12


def test_from_config_variant_and_errors():
  c = config_lib.apply_variant(config_lib.vqvae_config(), "lfq")
  q = registry.from_config(c)
  assert isinstance(q, lfq_lib.LFQ)
  assert (q.vocab_size, q.dim, q.commitment_weight, q.entropy_weight) == (512, 9, 0.25, 0.1)
  assert (q.diversity_gamma, q.entropy_temperature, q.codebook_scale) == (1.0, 0.01, 1.0)
  assert q.param_inits() == {} and q.codebook({}) is None and not q.has_codebook
  config_lib.validate(c, 1)
  bad = [
    ("quantizer.embed_dim", 0, "quantizer.embed_dim"),
    ("quantizer.embed_dim", lfq_lib.MAX_BITS + 1, "quantizer.embed_dim"),
    ("quantizer.entropy_temperature", 0.0, "quantizer.entropy_temperature"),
    ("quantizer.entropy_weight", -1.0, "quantizer.entropy_weight"),
    ("quantizer.codebook_scale", float("nan"), "quantizer.codebook_scale"),
    ("quantizer.bbnr", "growing", "quantizer.bbnr"),
    ("quantizer.legacy_beta", True, "quantizer.legacy_beta"),
    ("quantizer.codebook_update", "ema", "quantizer.codebook_update"),
    ("quantizer.restart_threshold", 1.0, "quantizer.restart_threshold"),
    ("quantizer.gradient", "rotation", "quantizer.gradient"),
    ("arc.enabled", True, "arc.enabled"),
  ]
  for key, value, named in bad:
    c = config_lib.apply_variant(config_lib.vqvae_config(), "lfq")
    section, name = key.split(".")
    c[section][name] = value
    with pytest.raises(QuantizerConfigError, match=rf"config\.{named}: .*(Set|Use|uses)"):
      registry.from_config(c)
