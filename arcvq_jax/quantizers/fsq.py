"""`fsq`: Finite Scalar Quantization (Mentzer et al. 2023, "Finite Scalar Quantization: VQ-VAE
Made Simple"; docs/math.md, section 8.5, eq. 47-50).

Each of the d = len(levels) latent channels is bounded by a shifted tanh and rounded to one of
L_j levels; the token is the mixed-radix number of the d level indices, so the vocabulary is
prod(levels) (e.g. (8, 5, 5, 5): 1000, (8, 8, 8, 5, 5, 5): 64000). No codebook, no
parameters, no loss: the rounding passes the gradient straight through, the tanh bound's
own derivative stays in it.

`config.quantizer.levels` sets the levels; `config.quantizer.embed_dim` must equal
len(levels), the encoder's output channels (the fsq variants set both). `num_codes` is not
used: the vocabulary is the product of the levels.

The bound is vector-quantize-pytorch's (1 + eps, atanh), not the paper's appendix code
(1 - eps, tan): atanh puts z = 0 exactly on the middle level. Both reach the same L_j levels,
so the set of codes (the implicit codebook, eq. 50) is the same, but not every latent gets the
same code: the two bounds differ by up to (L_j - 1) eps, and a latent that close to a rounding
boundary lands on the neighbouring level (for N(0, 1) latents about 4 values in a thousand on
a channel of 8 levels, 2 on one of 5; 10-11 tokens in a thousand with (8, 5, 5, 5); measured
in docs/math.md, section 8.5). Levels are integers from 3 to 1000 (2 needs the library's
other, symmetry-preserving bound; above 1000 the bound's eps reaches past the outer levels),
and their product at most 2^24.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from arcvq_jax.quantizers.base import Params, Quantized, Quantizer, config_error

sg = jax.lax.stop_gradient

BOUND_EPS = 1e-3  # vector-quantize-pytorch's and the paper's eps in the bound
# The largest vocabulary: the train state holds a (V,) float32 usage EMA and evaluation a (V,)
# histogram, and float32 counts are exact up to 2^24; it also keeps the tokens in int32.
MAX_VOCAB = 2**24
# The largest level: from L = 1002 on, the bound's eps (half_l = (L-1)(1+eps)/2) reaches
# beyond the outer levels, and round(b) a level outside 0..L-1 (as in the library).
MAX_LEVEL = 1000
LEVELS_EXAMPLE = "(8, 5, 5, 5) (1000 codes) or (8, 8, 8, 5, 5, 5) (64000 codes)"


# Levels per channel that `levels_for` chooses from: the FSQ paper recommends L >= 5 (its
# Table 1 uses 5 to 8), and 8 is the largest level its configurations use.
CHOSEN_LEVELS = (5, 6, 7, 8)


def levels_for(vocab_size: int, max_channels: int = 8) -> tuple[int, ...]:
  """The levels (descending, each in CHOSEN_LEVELS) whose product is closest to `vocab_size`
  on a log scale; among equally close ones, more channels (FSQ trades levels for channels),
  then the larger levels first. E.g. 1000 -> (8, 5, 5, 5), 512 -> (8, 8, 8),
  4096 -> (8, 8, 8, 8), 32768 -> (8, 8, 8, 8, 8)."""
  if vocab_size < 2:
    raise ValueError(f"an FSQ vocabulary needs at least 2 codes, got {vocab_size}")
  candidates = (
    combo
    for channels in range(1, max_channels + 1)
    for combo in itertools.combinations_with_replacement(CHOSEN_LEVELS[::-1], channels)
  )

  def rank(levels: tuple[int, ...]) -> tuple[float, int, tuple[int, ...]]:
    return (abs(math.log(math.prod(levels) / vocab_size)), -len(levels), tuple(-v for v in levels))

  return min(candidates, key=rank)


def check_levels(levels: Any) -> tuple[int, ...]:
  """config.quantizer.levels as a tuple of ints; raises QuantizerConfigError naming the key."""
  key = "quantizer.levels"
  if isinstance(levels, (str, bytes)) or not hasattr(levels, "__iter__"):
    raise config_error(
      key,
      f"must be a sequence of integers, got {levels!r}",
      "Set e.g. --config.quantizer.levels='(8, 5, 5, 5)'.",
    )
  levels = tuple(levels)
  if not levels or not all(
    isinstance(v, (int, np.integer)) and not isinstance(v, bool) for v in levels
  ):
    raise config_error(
      key,
      f"must be a non-empty sequence of integers, got {levels!r}",
      f"Use e.g. {LEVELS_EXAMPLE}.",
    )
  levels = tuple(int(v) for v in levels)
  if any(v < 2 for v in levels):
    raise config_error(
      key, f"every level must be >= 3, got {levels}", f"Use e.g. {LEVELS_EXAMPLE}."
    )
  if 2 in levels:
    raise config_error(
      key,
      f"{levels} has a level of 2, which the tanh bound puts off-centre (it needs the "
      "symmetry-preserving bound, not implemented)",
      "Use 3 or more levels per channel (e.g. 3 instead of 2); for binary codes, the lfq "
      "quantizer.",
    )
  if max(levels) > MAX_LEVEL:
    raise config_error(
      key,
      f"{levels} has a level above {MAX_LEVEL}, where the bound (eq. 47, eps = {BOUND_EPS}) "
      "reaches past the outer levels",
      f"Use levels of at most {MAX_LEVEL} (more channels instead), e.g. {LEVELS_EXAMPLE}.",
    )
  vocab = math.prod(levels)
  if vocab > MAX_VOCAB:
    raise config_error(
      key,
      f"{levels} make {vocab} codes, more than {MAX_VOCAB} (2^24: the (V,) usage and "
      "histograms count in float32 and the tokens are int32)",
      f"Use fewer or smaller levels, e.g. {LEVELS_EXAMPLE}.",
    )
  return levels


def basis(levels: tuple[int, ...]) -> np.ndarray:
  """The mixed-radix place values (d,) int32: prod(levels[:j]) (eq. 49)."""
  return np.cumprod((1, *levels[:-1])).astype(np.int32)


def bound(z: jax.Array, levels: tuple[int, ...]) -> jax.Array:
  """z (..., d) float32 -> b (..., d) float32 (eq. 47): tanh(z + shift) * half_l - offset,
  in (-half_l - offset, half_l - offset), so that round(b) takes the L_j integers from
  -floor(L_j/2) on; b(0) = 0."""
  lv = np.asarray(levels, np.float64)
  half_l = (lv - 1) * (1 + BOUND_EPS) / 2
  offset = np.where(np.asarray(levels) % 2 == 0, 0.5, 0.0)
  shift = np.arctanh(offset / half_l)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  return jnp.tanh(z + f32(shift)) * f32(half_l) - f32(offset)


def half_width(levels: tuple[int, ...]) -> np.ndarray:
  """floor(L_j / 2) (d,) int32: the scale from rounded levels to codes in [-1, 1]."""
  return np.asarray(levels, np.int32) // 2


def codes_to_indices(codes: jax.Array, levels: tuple[int, ...]) -> jax.Array:
  """Codes (..., d) float32 (values of eq. 48) -> tokens (...) int32 (eq. 49)."""
  hw = half_width(levels)
  digits = jnp.round(codes * hw.astype(np.float32) + hw.astype(np.float32)).astype(jnp.int32)
  return jnp.sum(digits * basis(levels), axis=-1, dtype=jnp.int32)


def indices_to_codes(indices: jax.Array, levels: tuple[int, ...]) -> jax.Array:
  """Tokens (...) int -> codes (..., d) float32 (eq. 50), the values `FSQ.quantize` gives."""
  hw = half_width(levels)
  digits = (indices.astype(jnp.int32)[..., None] // basis(levels)) % np.asarray(levels, np.int32)
  return (digits - hw).astype(jnp.float32) / hw.astype(np.float32)


@dataclasses.dataclass(frozen=True)
class FSQ(Quantizer):
  """Finite scalar quantization with `levels` (eq. 47-50)."""

  levels: tuple[int, ...] = (8, 5, 5, 5)

  name = "fsq"
  has_codebook = False

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> FSQ:
    q = config.quantizer
    if config.get("arc") is not None and config.arc.get("enabled", False):
      raise config_error(
        "arc.enabled",
        "the 'fsq' quantizer has no ArcLoss",
        "Set --config.arc.enabled=False (the fsq variants do).",
      )
    if q.get("bbnr", "off") != "off":
      raise config_error(
        "quantizer.bbnr",
        f"is {q.bbnr!r}, but the 'fsq' quantizer has no codebook to bound",
        "Set --config.quantizer.bbnr=off (the fsq variants do).",
      )
    levels = check_levels(q.get("levels", cls.levels))
    if q.get("embed_dim") != len(levels):
      raise config_error(
        "quantizer.embed_dim",
        f"is {q.get('embed_dim')!r}, but FSQ quantizes one latent channel per level and "
        f"quantizer.levels={levels} has {len(levels)}",
        f"Set --config.quantizer.embed_dim={len(levels)} (the fsq variants set both).",
      )
    return cls(levels=levels)

  @classmethod
  def vocabulary_keys(cls, vocab_size: int) -> dict[str, Any]:
    """Levels whose product is closest to `vocab_size` (`levels_for`), one channel each."""
    levels = levels_for(vocab_size)
    return {"levels": levels, "embed_dim": len(levels)}

  @property
  def vocab_size(self) -> int:
    return math.prod(self.levels)

  @property
  def dim(self) -> int:
    return len(self.levels)

  def quantize(
    self, params: Params, z: jax.Array, step: jax.Array, *, mesh: Any = None
  ) -> Quantized:
    """z: (N, d) float32 -> codes in [-1, 1] (eq. 48; exactly `lookup` of the indices),
    indices (N,) int32 (eq. 49), no loss."""
    del params, step, mesh
    b = bound(z.astype(jnp.float32), self.levels)
    r = jnp.round(b)  # half to even, as torch.round
    hw = half_width(self.levels)
    # b + (r - b) is r exactly (|r - b| <= 1/2, so r - b is exact), with b's gradient.
    z_ste = (b + sg(r - b)) / hw.astype(np.float32)
    digits = (sg(r) + hw.astype(np.float32)).astype(jnp.int32)
    indices = jnp.sum(digits * basis(self.levels), axis=-1, dtype=jnp.int32)
    return Quantized(z_ste=z_ste, indices=indices, loss=jnp.zeros((), jnp.float32), terms={})

  def tokens(self, params: Params, z: jax.Array, *, mesh: Any = None) -> jax.Array:
    return self.quantize(params, z, jnp.zeros((), jnp.int32), mesh=mesh).indices

  def lookup(self, params: Params, indices: jax.Array) -> jax.Array:
    del params
    return indices_to_codes(indices, self.levels)
