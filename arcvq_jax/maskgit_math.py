"""MaskGIT as pure functions (docs/math.md, section 11.3): the cosine masking schedule, the
cross-entropy on masked positions with label dropout for guidance, and iterative parallel
decoding with confidence annealing, as google-research/maskgit's `parallel_decode` does it.

Tokens are (B, N) int32 sequences of a grid in raster order; `mask_id` (the vocabulary size)
marks an unknown token. A `logits_fn(tokens, labels) -> logits` (B, N, V) float32 is the
model (see token_sampling.py); the trainer and the sampler pass closures over the params.
Nothing here knows Flax.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from arcvq_jax import diffusion
from arcvq_jax import token_sampling as ts


def mask_ratio(r: jax.Array) -> jax.Array:
  """MaskGIT's cosine schedule gamma(r) = cos(pi/2 * r): the share of tokens masked at
  r in [0, 1] (1 at r = 0, 0 at r = 1)."""
  return jnp.cos(0.5 * math.pi * r)


def num_masked(r: jax.Array, num_tokens: int) -> jax.Array:
  """Training: how many of N tokens to mask at r (B,) -> (B,) int32, ceil(gamma(r) N) clipped
  to [1, N] (at least one target per example)."""
  m = jnp.ceil(mask_ratio(r) * num_tokens)
  return jnp.clip(m, 1, num_tokens).astype(jnp.int32)


def rank_within_rows(scores: jax.Array) -> jax.Array:
  """(B, N) -> (B, N) int32: each entry's rank in its row, 0 for the smallest (ties by
  position). `rank < m` selects exactly the m smallest."""
  return jnp.argsort(jnp.argsort(scores, axis=-1), axis=-1).astype(jnp.int32)


def random_mask(key: jax.Array, batch: int, num_tokens: int) -> jax.Array:
  """(B, N) bool: per example r ~ U[0, 1), then num_masked(r, N) positions drawn uniformly
  without replacement are True (masked)."""
  k_ratio, k_pos = jax.random.split(key)
  m = num_masked(jax.random.uniform(k_ratio, (batch,)), num_tokens)
  ranks = rank_within_rows(jax.random.uniform(k_pos, (batch, num_tokens)))
  return ranks < m[:, None]


def masked_cross_entropy(
  logits: jax.Array, targets: jax.Array, mask: jax.Array, label_smoothing: float = 0.0
) -> jax.Array:
  """Mean cross-entropy over the masked positions of the whole batch, float32.

  logits (B, N, V), targets (B, N) int32, mask (B, N) bool. Unmasked positions add nothing
  and get exactly zero gradient. label_smoothing eps: the target distribution is
  (1 - eps) one_hot + eps / V (MaskGIT's config uses 0.1).
  """
  logits = logits.astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
  ce = lse - target_logit
  if label_smoothing > 0:
    ce = (1.0 - label_smoothing) * ce + label_smoothing * (lse - jnp.mean(logits, axis=-1))
  total = jnp.sum(jnp.where(mask, ce, 0.0))
  return total / jnp.maximum(jnp.sum(mask), 1).astype(jnp.float32)


def maskgit_loss(
  key: jax.Array,
  logits_fn: ts.LogitsFn,
  tokens: jax.Array,
  labels: jax.Array | None,
  *,
  mask_id: int,
  cond_drop_prob: float = 0.0,
  null_class: int = 0,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The training loss of one batch: mask (random_mask), drop labels (guidance), predict.

  key: drawn into the mask and the label dropout. tokens (B, N) int32 in [0, V); labels (B,)
  or None. Returns (loss, aux) with aux: mask_fraction (the share of tokens masked) and
  accuracy (of the argmax on the masked positions).
  """
  k_mask, k_drop = jax.random.split(key)
  b, n = tokens.shape
  mask = random_mask(k_mask, b, n)
  inputs = jnp.where(mask, jnp.asarray(mask_id, tokens.dtype), tokens)
  if labels is not None:
    labels = diffusion.drop_labels(k_drop, labels, cond_drop_prob, null_class)
  logits = logits_fn(inputs, labels)
  loss = masked_cross_entropy(logits, tokens, mask, label_smoothing)
  hits = jnp.where(mask, jnp.argmax(logits, axis=-1) == tokens, False)
  count = jnp.maximum(jnp.sum(mask), 1)
  aux = dict(mask_fraction=jnp.mean(mask), accuracy=jnp.sum(hits) / count)
  return loss, aux


# --------------------------------------------------------------------------- decoding


def decode_schedule(num_tokens: int, num_steps: int) -> np.ndarray:
  """(S, N + 1) int32: entry [s, n0] is how many tokens stay masked after decoding step s of
  S when n0 were unknown at the start (maskgit's `decode`, computed once in float64):

    m_s = floor(n0 * gamma((s + 1) / S)), clipped to [1, u_s - 1] (reveal at least one,
          keep at least one for the next step), never above u_s; m_{S-1} = 0,

  where u_s is the number unknown before step s (u_0 = n0, u_{s+1} = m_s).
  """
  if num_steps < 1:
    raise ValueError(f"parallel decoding needs at least one step, got {num_steps}")
  table = np.zeros((num_steps, num_tokens + 1), np.int32)
  for n0 in range(num_tokens + 1):
    unknown = n0
    for s in range(num_steps - 1):
      m = math.floor(n0 * math.cos(0.5 * math.pi * (s + 1) / num_steps))
      m = min(unknown, max(1, min(unknown - 1, m)))
      table[s, n0] = unknown = m
  return table


def all_masked(batch: int, num_tokens: int, mask_id: int) -> jax.Array:
  """(B, N) int32 of mask_id: the start of generation from nothing."""
  return jnp.full((batch, num_tokens), mask_id, jnp.int32)


def parallel_decode(
  logits_fn: ts.LogitsFn,
  tokens: jax.Array,
  labels: jax.Array | None,
  keys: jax.Array,
  *,
  mask_id: int,
  num_steps: int = 8,
  temperature: float = 1.0,
  choice_temperature: float = 4.5,
  guidance_scale: float = 1.0,
  null_class: int = 0,
  top_k: int = 0,
  top_p: float = 1.0,
  return_history: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
  """MaskGIT's iterative decoding from tokens (B, N) (mask_id where unknown; `all_masked` to
  generate, known tokens are kept) to (B, N) with every token known, in `num_steps` calls.

  At step s: the logits (guided: u + w (c - u), both from one call on the doubled batch)
  over temperature (then top-k / top-p) give a sample at every unknown position; its
  confidence is its log-probability plus Gumbel noise of scale choice_temperature *
  (1 - (s + 1) / S); the decode_schedule(...)[s, n0] least confident samples are masked again.
  keys (B, 2): per-sample keys (token_sampling.sample_keys); step s of sample b draws from
  fold_in(keys[b], s), so a sample does not depend on the batch it is drawn in.
  return_history: also the tokens after each step (S, B, N), mask_id where still unknown.
  guidance_scale 1 (or labels None) makes one call on the batch. Jit the caller; the step
  count, temperatures and scale are static.
  """
  b, n = tokens.shape
  table = jnp.asarray(decode_schedule(n, num_steps))
  n0 = jnp.sum(tokens == mask_id, axis=-1)
  guided = labels is not None and guidance_scale != 1.0

  def logits_at(cur):
    if guided:
      return ts.guided_logits(logits_fn, cur, labels, guidance_scale, null_class)
    return logits_fn(cur, labels)

  def body(s, carry):
    cur, history = carry
    logits = ts.sampling_logits(logits_at(cur).astype(jnp.float32), temperature, top_k, top_p)
    step_keys = ts.fold_keys(keys, s)
    k_sample, k_choice = jnp.split(jax.vmap(jax.random.split)(step_keys), 2, axis=1)
    sampled = ts.categorical(k_sample[:, 0], logits)
    unknown = cur == mask_id
    sampled = jnp.where(unknown, sampled, cur)
    logp = jnp.take_along_axis(jax.nn.log_softmax(logits), sampled[..., None], axis=-1)[..., 0]
    noise = jax.vmap(lambda k: jax.random.gumbel(k, (n,)))(k_choice[:, 0])
    scale = choice_temperature * (1.0 - (s + 1) / num_steps)
    confidence = jnp.where(unknown, logp + scale * noise, jnp.inf)
    remask = rank_within_rows(confidence) < table[s, n0][:, None]
    cur = jnp.where(remask, mask_id, sampled)
    if history is not None:
      history = history.at[s].set(cur)
    return cur, history

  history = jnp.zeros((num_steps, b, n), jnp.int32) if return_history else None
  out, history = jax.lax.fori_loop(0, num_steps, body, (tokens.astype(jnp.int32), history))
  return (out, history) if return_history else out
