"""Vector-quantisation math of ArcVQ-VAE (docs/math.md, sections 1-8), as pure functions.

Nothing here holds state: the codebook `E` (K, D) and the latents `z` (N, D) come in as
arrays, and every function is safe under `jax.jit`. Under a `Mesh` the arrays are global,
so reductions over N (ArcLoss negatives, EMA counts, usage) are global across devices,
never per replica.

All of it runs in float32, whatever dtype the networks compute in: callers cast `z` first.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

sg = jax.lax.stop_gradient

# Same guard as torch.nn.functional.normalize: x / max(||x||, eps).
NORM_EPS = 1e-12
# ArcLoss clips cosines into the open interval before arccos (docs/math.md, eq. 9).
ARCCOS_CLIP = 1e-7

DISTANCES = ("cosine", "euclidean")
INITS = ("spherical", "normal", "uniform")
BBNR_MODES = ("growing", "fixed", "off")


def l2_normalize(x: jax.Array, axis: int = -1) -> jax.Array:
  """x / max(||x||, 1e-12) along `axis`; zero vectors stay zero, with finite gradients.

  The max is taken on the squared norm: the gradient of ||x|| itself is NaN at x = 0.
  """
  sq = jnp.sum(x * x, axis=axis, keepdims=True)
  return x * jax.lax.rsqrt(jnp.maximum(sq, NORM_EPS * NORM_EPS))


# --------------------------------------------------------------------------- init


def init_codebook(key: jax.Array, num_codes: int, dim: int, kind: str) -> jax.Array:
  """Initial codebook (K, D) float32.

  spherical: U(-1, 1)^D rows projected onto the unit sphere (Eq. 4);
  normal:    N(0, 1) rows (the vanilla VQ-VAE baseline);
  uniform:   U(-1/K, 1/K) rows (taming-transformers' nn.Embedding init).
  """
  if kind == "spherical":
    return l2_normalize(jax.random.uniform(key, (num_codes, dim), jnp.float32, -1.0, 1.0))
  if kind == "normal":
    return jax.random.normal(key, (num_codes, dim), jnp.float32)
  if kind == "uniform":
    bound = 1.0 / num_codes
    return jax.random.uniform(key, (num_codes, dim), jnp.float32, -bound, bound)
  raise ValueError(f"unknown codebook init {kind!r}; expected one of {INITS}")


# --------------------------------------------------------------------------- search


def nearest_code(z: jax.Array, codebook: jax.Array, distance: str) -> jax.Array:
  """Index of the nearest codebook row for every latent.

  z: (N, D) float32; codebook: (K, D) float32 -> (N,) int32.
  cosine (Eq. 9): argmax_k <z/||z||, e_k/||e_k||>; euclidean: argmin_k ||z - e_k||^2.
  Ties go to the lowest index (as torch.argmin / argmax).
  """
  if distance == "cosine":
    sim = l2_normalize(z) @ l2_normalize(codebook).T
    return jnp.argmax(sim, axis=-1).astype(jnp.int32)
  if distance == "euclidean":
    # ||z||^2 is constant per row and does not change the argmin.
    dist = jnp.sum(codebook**2, axis=-1)[None, :] - 2.0 * z @ codebook.T
    return jnp.argmin(dist, axis=-1).astype(jnp.int32)
  raise ValueError(f"unknown distance {distance!r}; expected one of {DISTANCES}")


class Quantized(NamedTuple):
  z_q: jax.Array  # (N, D) the raw codebook rows e_{k*}, differentiable w.r.t. the codebook
  z_ste: jax.Array  # (N, D) z + sg(z_q - z): what the decoder sees (straight-through)
  indices: jax.Array  # (N,) int32


def quantize(z: jax.Array, codebook: jax.Array, distance: str) -> Quantized:
  """Nearest-code quantisation with the straight-through estimator (Eq. 8-9).

  The quantised vector is the RAW row e_{k*} (not its normalised direction), also for
  cosine matching: the norm ball of BBNR is what bounds it.
  z: (N, D) float32, codebook: (K, D) float32.
  """
  return quantize_with_indices(z, codebook, nearest_code(z, codebook, distance))


def quantize_with_indices(z: jax.Array, codebook: jax.Array, indices: jax.Array) -> Quantized:
  """`quantize` with the nearest-code indices (N,) already found (e.g. by a blocked search)."""
  z_q = jnp.take(codebook, indices, axis=0)
  return Quantized(z_q=z_q, z_ste=z + sg(z_q - z), indices=indices)


def vq_loss(
  z: jax.Array,
  z_q: jax.Array,
  beta: float,
  legacy: bool = False,
  codebook_term: bool = True,
) -> jax.Array:
  """VQ loss (Eq. 3), scalar.

  legacy=False: mean((sg(z) - z_q)^2) + beta * mean((z - sg(z_q))^2)  (paper, VQ-VAE runs)
  legacy=True:  beta * mean((sg(z) - z_q)^2) + mean((z - sg(z_q))^2)  (taming's default)
  codebook_term=False drops the term that moves the codebook (EMA codebooks update apart).
  """
  codebook = jnp.mean((sg(z) - z_q) ** 2)
  commit = jnp.mean((z - sg(z_q)) ** 2)
  w_codebook, w_commit = (beta, 1.0) if legacy else (1.0, beta)
  if not codebook_term:
    w_codebook = 0.0
  return w_codebook * codebook + w_commit * commit


# --------------------------------------------------------------------------- BBNR


def bbnr_radius(step: jax.Array, alpha: float, mode: str) -> jax.Array:
  """Radius M(t) of the codebook ball (Eq. 5): exp(alpha t), 1 ('fixed'), inf ('off')."""
  step = jnp.asarray(step, jnp.float32)
  if mode == "growing":
    return jnp.exp(alpha * step)
  if mode == "fixed":
    return jnp.ones_like(step)
  if mode == "off":
    return jnp.full_like(step, jnp.inf)
  raise ValueError(f"unknown BBNR mode {mode!r}; expected one of {BBNR_MODES}")


def bbnr_project(codebook: jax.Array, radius: jax.Array) -> jax.Array:
  """Project every row into the ball of radius M (Eq. 6-7): e * min(1, M / ||e||).

  codebook: (K, D) float32, radius: scalar -> (K, D). A projection, not a loss: callers
  apply it outside the gradient and store the result.
  """
  norm = jnp.linalg.norm(codebook, axis=-1, keepdims=True)
  return codebook * jnp.minimum(1.0, radius / jnp.maximum(norm, NORM_EPS))


# --------------------------------------------------------------------------- ArcLoss


def arc_loss(z: jax.Array, codebook: jax.Array, s: float, m: float, top_k: int) -> jax.Array:
  """ArcCosine additive-margin loss (Eq. 10-12), scalar; gradients reach `z` only.

  z: (N, D) float32 latents of the GLOBAL batch; codebook: (K, D) float32.
  For each row k, its `top_k` most similar latents P_k get the logit s*cos(theta + m),
  all other latents s*cos(theta); the loss is the mean over k of
  -log(sum_{P_k} exp(l) / sum_{all N} exp(l)), computed with log-sum-exp.
  """
  cos = l2_normalize(sg(codebook)) @ l2_normalize(z).T  # (K, N)
  top_cos, top_idx = jax.lax.top_k(cos, top_k)  # (K, top_k)
  theta = jnp.arccos(jnp.clip(top_cos, -1.0 + ARCCOS_CLIP, 1.0 - ARCCOS_CLIP))
  pos_logits = s * jnp.cos(theta + m)  # (K, top_k)
  rows = jnp.arange(cos.shape[0])[:, None]
  # The margin logits replace the plain ones at P_k, in the denominator too.
  logits = (s * cos).at[rows, top_idx].set(pos_logits)
  log_den = jax.nn.logsumexp(logits, axis=-1)
  log_num = jax.nn.logsumexp(pos_logits, axis=-1)
  return jnp.mean(log_den - log_num)


def arc_weight(step: jax.Array, gamma0: float, decay: float) -> jax.Array:
  """ArcLoss weight gamma(t) = gamma0 * exp(-lambda t) (Eq. 13)."""
  return gamma0 * jnp.exp(-decay * jnp.asarray(step, jnp.float32))


# --------------------------------------------------------------------------- codebook statistics


def code_histogram(
  indices: jax.Array, num_codes: int, weights: jax.Array | None = None
) -> jax.Array:
  """How often each code was picked: indices (N,) int -> (K,) float32 counts."""
  ones = jnp.ones(indices.shape, jnp.float32) if weights is None else weights.astype(jnp.float32)
  return jnp.zeros((num_codes,), jnp.float32).at[indices].add(ones)


class EMAState(NamedTuple):
  cluster_size: jax.Array  # (K,) EMA of the counts
  embed_sum: jax.Array  # (K, D) EMA of the sum of latents assigned to each code


def ema_codebook_update(
  ema: EMAState, z: jax.Array, indices: jax.Array, decay: float, eps: float
) -> tuple[EMAState, jax.Array]:
  """One EMA k-means step (van den Oord et al. 2017, App. A.1; Sonnet's VectorQuantizerEMA).

  z: (N, D) float32 (no gradient), indices: (N,) int32.
  Returns the new EMA state and the new codebook (K, D) = embed_sum / Laplace-smoothed counts.
  """
  num_codes = ema.cluster_size.shape[0]
  z = sg(z)
  counts = code_histogram(indices, num_codes)
  sums = jnp.zeros_like(ema.embed_sum).at[indices].add(z)
  cluster_size = decay * ema.cluster_size + (1.0 - decay) * counts
  embed_sum = decay * ema.embed_sum + (1.0 - decay) * sums
  # Laplace smoothing keeps unused codes from dividing by zero.
  total = jnp.sum(cluster_size)
  smoothed = (cluster_size + eps) / (total + num_codes * eps) * total
  return EMAState(cluster_size, embed_sum), embed_sum / smoothed[:, None]


def restart_dead_codes(
  key: jax.Array,
  codebook: jax.Array,
  usage: jax.Array,
  z: jax.Array,
  threshold: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Re-seed rarely used codes with random latents of the batch (Jukebox / CVQ-style restart).

  codebook: (K, D); usage: (K,) EMA of per-step counts; z: (N, D) global batch latents.
  A code whose usage is below `threshold` is replaced by a latent drawn uniformly from z,
  and its usage is reset to the mean usage, so it gets time to be chosen before it can
  be restarted again. Returns (codebook, usage, dead mask (K,) bool).
  """
  num_codes = codebook.shape[0]
  dead = usage < threshold
  pick = jax.random.randint(key, (num_codes,), 0, z.shape[0])
  fresh = jnp.take(sg(z), pick, axis=0)
  codebook = jnp.where(dead[:, None], fresh, codebook)
  usage = jnp.where(dead, jnp.mean(usage), usage)
  return codebook, usage, dead
