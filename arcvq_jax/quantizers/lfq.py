"""`lfq`: lookup-free quantization (Yu et al. 2023, MAGVIT-v2; docs/math.md, 8.6, eq. 51-55).

No codebook to learn: each of the D = `bits` latent dimensions is quantized to its sign,
times a fixed scale s (the implicit codebook {-s, +s}^bits, 2^bits codes), and the token is
the binary number of the signs (the first dimension is the most significant bit). The encoder
gets the straight-through gradient; an entropy penalty (low entropy per token, high entropy
of the batch-mean distribution over the 2^bits codes) keeps the codes in use, plus a
commitment term. The terms are those of vector-quantize-pytorch's `LFQ` (1.32.0,
`lookup_free_quantization.py`), with which tests/test_quantizers_lfq.py checks parity.

The entropy terms take a softmax over all 2^bits codes for every token of the global batch
(an N x 2^bits matrix). It is computed in chunks of tokens of at most `ENTROPY_BLOCK` entries
(rematerialised in the backward pass), so memory stays bounded; the work grows as N x 2^bits,
which is what limits `bits` (`MAX_BITS`).
"""

from __future__ import annotations

import dataclasses
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from arcvq_jax.quantizers.base import Params, Quantized, Quantizer, config_error

sg = jax.lax.stop_gradient

# 2^20 codes: the entropy terms cost N x 2^bits x bits per step (about 10^12 flops for a
# 32k-token batch) and the usage EMA and evaluation counts hold 2^bits entries.
MAX_BITS = 20
# Entries of one chunk of the N x 2^bits probability matrix (16 MB in float32).
ENTROPY_BLOCK = 2**22
# vector-quantize-pytorch's `log(t, eps=1e-5)`: probabilities are clamped before the log.
ENTROPY_LOG_EPS = 1e-5


def entropy(prob: jax.Array) -> jax.Array:
  """-sum p log(max(p, 1e-5)) over the last axis (the library's clamped entropy, eq. 54)."""
  return -jnp.sum(prob * jnp.log(jnp.maximum(prob, ENTROPY_LOG_EPS)), axis=-1)


def bit_weights(bits: int) -> jax.Array:
  """(bits,) int32: 2^(bits-1), ..., 2, 1 (the first dimension is the most significant)."""
  return jnp.left_shift(1, jnp.arange(bits - 1, -1, -1, dtype=jnp.int32))


def codes_of_tokens(indices: jax.Array, bits: int, scale: float) -> jax.Array:
  """Tokens (...) int -> their codes (..., bits) float32 in {-scale, +scale} (eq. 51)."""
  on = (jnp.asarray(indices, jnp.int32)[..., None] & bit_weights(bits)) != 0
  return jnp.where(on, scale, -scale).astype(jnp.float32)


def entropy_terms(
  z: jax.Array, codes: jax.Array, temperature: float, block: int = ENTROPY_BLOCK
) -> tuple[jax.Array, jax.Array]:
  """(mean per-token entropy, entropy of the batch-mean distribution) (eq. 53-54).

  z: (N, D) float32 latents of the global batch; codes: (V, D) all the codes. Each token's
  distribution is softmax over the codes of -||z_i - c||^2 / temperature, computed as
  2 <z_i, c> / temperature (||z_i||^2 and ||c||^2 = D s^2 are the same for every code).
  Tokens go in chunks of at most `block` / V rows; each chunk is recomputed in the backward
  pass, so no N x V matrix is ever held.
  """
  n, v = z.shape[0], codes.shape[0]
  scale = 2.0 / temperature

  def chunk_sums(zc: jax.Array, weight: jax.Array) -> tuple[jax.Array, jax.Array]:
    prob = jax.nn.softmax((zc @ codes.T) * scale, axis=-1)  # (chunk, V)
    return jnp.sum(weight * entropy(prob)), jnp.sum(weight[:, None] * prob, axis=0)

  rows = max(1, min(n, block // v))
  if rows >= n:
    ent_sum, prob_sum = chunk_sums(z, jnp.ones((n,), jnp.float32))
  else:
    chunks = -(-n // rows)
    pad = chunks * rows - n
    zp = jnp.pad(z, ((0, pad), (0, 0))).reshape(chunks, rows, z.shape[1])
    wp = jnp.pad(jnp.ones((n,), jnp.float32), (0, pad)).reshape(chunks, rows)
    body = jax.checkpoint(chunk_sums)

    def step(carry, xs):
      ent, prob = body(*xs)
      return (carry[0] + ent, carry[1] + prob), None

    init = (jnp.zeros((), jnp.float32), jnp.zeros((v,), jnp.float32))
    (ent_sum, prob_sum), _ = jax.lax.scan(step, init, (zp, wp))
  return ent_sum / n, entropy(prob_sum / n)


@dataclasses.dataclass(frozen=True)
class LFQ(Quantizer):
  """Sign quantization of `bits` dimensions: 2^bits tokens, no params, no statistics."""

  bits: int
  codebook_scale: float = 1.0
  entropy_weight: float = 0.1
  diversity_gamma: float = 1.0
  entropy_temperature: float = 0.01
  commitment_weight: float = 0.25
  entropy_block: int = ENTROPY_BLOCK  # not a config key: the tests use small chunks

  name = "lfq"
  has_codebook = False  # the implicit codes are the corners of a cube; nothing to plot

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> LFQ:
    """bits = quantizer.embed_dim (quantizer.num_codes is not used: the vocabulary is
    2^embed_dim); the commitment weight is quantizer.beta (eq. 55)."""
    q = config.quantizer
    d = {f.name: f.default for f in dataclasses.fields(cls)}
    if config.get("arc") is not None and config.arc.get("enabled", False):
      raise config_error(
        "arc.enabled",
        "the 'lfq' quantizer has no ArcLoss",
        "Set --config.arc.enabled=False (the 'lfq' variant does).",
      )
    refused = (
      ("bbnr", "off", "it has no codebook to project"),
      ("codebook_update", "loss", "it has no codebook to update"),
      ("restart_threshold", 0.0, "it has no codebook rows to restart"),
      ("gradient", "ste", "it takes the straight-through gradient only"),
      ("legacy_beta", False, "it has no codebook term; beta weighs the commitment term"),
    )
    for key, default, why in refused:
      if q.get(key, default) != default:
        raise config_error(
          f"quantizer.{key}",
          f"is {q[key]!r}, but the 'lfq' quantizer takes only {default!r}: {why}",
          f"Set --config.quantizer.{key}={default} (the 'lfq' variant does).",
        )
    bits = q.get("embed_dim")
    if not isinstance(bits, int) or not 1 <= bits <= MAX_BITS:
      raise config_error(
        "quantizer.embed_dim",
        f"is the number of bits of 'lfq' (2^embed_dim codes) and must be an integer in "
        f"1..{MAX_BITS}, got {bits!r} (the entropy terms take a softmax over all 2^bits "
        "codes for every token)",
        "Use e.g. 9 for 512 codes, 10 for 1024, 18 for MAGVIT-v2's 262144.",
      )
    out = dict(bits=bits)
    checks = (  # key, field, test, requirement, fix
      ("codebook_scale", "codebook_scale", lambda v: v > 0, "> 0", "The library uses 1.0."),
      ("entropy_weight", "entropy_weight", lambda v: v >= 0, ">= 0", "The library uses 0.1."),
      ("diversity_gamma", "diversity_gamma", lambda v: v >= 0, ">= 0", "The library uses 1.0."),
      (
        "entropy_temperature",
        "entropy_temperature",
        lambda v: v > 0,
        "> 0",
        "The library uses 0.01 (its inv_temperature 100).",
      ),
      (
        "beta",
        "commitment_weight",
        lambda v: v >= 0,
        ">= 0",
        "The default is 0.25 (eq. 7's); 0 is the library's LFQ default.",
      ),
    )
    for key, field, ok, requirement, fix in checks:
      value = q.get(key, d[field])
      if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise config_error(f"quantizer.{key}", f"must be a number, got {value!r}", fix)
      if not (math.isfinite(value) and ok(value)):
        raise config_error(
          f"quantizer.{key}", f"must be finite and {requirement}, got {value}", fix
        )
      out[field] = float(value)
    return cls(**out)

  @classmethod
  def vocabulary_keys(cls, vocab_size: int) -> dict[str, Any]:
    """The bits whose 2^bits is closest to `vocab_size` on a log scale (log2 K for a power of
    two); num_codes is kept equal to the vocabulary, as the 'lfq' variant does."""
    bits = min(max(1, round(math.log2(vocab_size))), MAX_BITS)
    return {"embed_dim": bits, "num_codes": 2**bits}

  @property
  def vocab_size(self) -> int:
    return 2**self.bits

  @property
  def dim(self) -> int:
    return self.bits

  def all_codes(self) -> jax.Array:
    """(2^bits, bits) float32: the code of every token, in token order."""
    return codes_of_tokens(jnp.arange(self.vocab_size), self.bits, self.codebook_scale)

  def quantize(
    self, params: Params, z: jax.Array, step: jax.Array, *, mesh: Any = None
  ) -> Quantized:
    del params, step, mesh  # the global batch's statistics: jit partitions the sums
    z = z.astype(jnp.float32)
    s = self.codebook_scale
    q = jnp.where(z > 0, s, -s).astype(jnp.float32)  # eq. 51 (0 -> -s, as the library)
    # q in value exactly (z - sg(z) is 0), so that lookup(tokens(z)) is bitwise the same;
    # the gradient w.r.t. z is the identity (eq. 52).
    z_ste = q + (z - sg(z))
    per_sample, codebook_entropy = entropy_terms(
      z, self.all_codes(), self.entropy_temperature, self.entropy_block
    )
    loss_entropy = per_sample - self.diversity_gamma * codebook_entropy
    loss_commit = jnp.mean((z - sg(q)) ** 2)
    loss = self.entropy_weight * loss_entropy + self.commitment_weight * loss_commit
    return Quantized(
      z_ste=z_ste,
      indices=self.tokens({}, z),
      loss=loss,
      terms=dict(
        loss_lfq=loss,
        loss_entropy=loss_entropy,
        loss_commit=loss_commit,
        entropy_per_sample=per_sample,
        entropy_codebook=codebook_entropy,
      ),
    )

  def tokens(self, params: Params, z: jax.Array, *, mesh: Any = None) -> jax.Array:
    del params, mesh
    return jnp.sum(jnp.where(z > 0, bit_weights(self.bits), 0), axis=-1).astype(jnp.int32)

  def lookup(self, params: Params, indices: jax.Array) -> jax.Array:
    del params
    return codes_of_tokens(indices, self.bits, self.codebook_scale)
