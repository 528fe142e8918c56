"""Drawing tokens from a prior's logits, shared by the MaskGIT and AR samplers
(arcvq_jax/maskgit_math.py, arcvq_jax/ar_math.py; docs/math.md, sections 11.3-11.5):
classifier-free guidance on logits, temperature, top-k and top-p (nucleus) filtering, and
per-sample keys. Pure jax.numpy; nothing here knows Flax.

A `logits_fn(tokens, labels) -> logits` is any function of tokens (B, N) int32 and labels
(B,) int32 (or None) returning float32 logits (B, N, V).
"""

from __future__ import annotations

from collections.abc import Callable

import jax
import jax.numpy as jnp

LogitsFn = Callable[[jax.Array, jax.Array | None], jax.Array]


def guide(cond: jax.Array, uncond: jax.Array, scale: float | jax.Array) -> jax.Array:
  """Classifier-free guidance on logits: uncond + scale * (cond - uncond). Scale 1 is the
  conditional logits, 0 the unconditional ones."""
  return uncond + scale * (cond - uncond)


def double_labels(labels: jax.Array, null_class: int) -> jax.Array:
  """labels (B,) -> (2B,): [labels; null ... null], the batch of one guided call (the
  conditional half first, as LlamaGen orders it)."""
  return jnp.concatenate([labels, jnp.full_like(labels, null_class)])


def guided_logits(
  logits_fn: LogitsFn,
  tokens: jax.Array,
  labels: jax.Array | None,
  scale: float | jax.Array,
  null_class: int,
) -> jax.Array:
  """Guided logits from one call on the doubled batch [tokens; tokens] with labels
  [labels; null]. labels None (an unconditional model): logits_fn(tokens, None)."""
  if labels is None:
    return logits_fn(tokens, None)
  both = logits_fn(jnp.concatenate([tokens, tokens]), double_labels(labels, null_class))
  cond, uncond = jnp.split(both, 2)
  return guide(cond, uncond, scale)


def filter_top_k(logits: jax.Array, k: int) -> jax.Array:
  """Logits (..., V) with everything below the k-th largest set to -inf (ties with it kept,
  as LlamaGen's filter keeps them). k <= 0 or k >= V: unchanged."""
  if k <= 0 or k >= logits.shape[-1]:
    return logits
  kth = jax.lax.top_k(logits, k)[0][..., -1:]
  return jnp.where(logits < kth, -jnp.inf, logits)


def filter_top_p(logits: jax.Array, p: float) -> jax.Array:
  """Nucleus filtering of logits (..., V): a token is kept when the tokens ranked above it
  hold at most p of the probability (HF's and LlamaGen's rule: the most probable tokens up to
  the first whose cumulative probability passes p; the most probable one always), the rest
  -inf. p >= 1: unchanged. Ties with the least probable kept logit are kept too."""
  if p >= 1.0:
    return logits
  sorted_logits = jnp.sort(logits, axis=-1)[..., ::-1]
  probs = jax.nn.softmax(sorted_logits, axis=-1)
  before = jnp.cumsum(probs, axis=-1) - probs  # probability mass of the tokens ranked above
  keep = before <= p
  keep = keep.at[..., 0].set(True)
  cutoff = jnp.min(jnp.where(keep, sorted_logits, jnp.inf), axis=-1, keepdims=True)
  return jnp.where(logits < cutoff, -jnp.inf, logits)


def sampling_logits(
  logits: jax.Array, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> jax.Array:
  """LlamaGen's order: logits / temperature, then top-k, then top-p. (..., V) -> (..., V)."""
  if not temperature > 0:
    raise ValueError(f"sampling temperature must be > 0, got {temperature}")
  return filter_top_p(filter_top_k(logits / temperature, top_k), top_p)


def sample_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
  """(B, 2) keys fold_in(key, i): sample i draws the same whatever batch it is drawn in."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def fold_keys(keys: jax.Array, step: jax.Array | int) -> jax.Array:
  """(B, 2) per-sample keys -> fold_in(keys[b], step): the keys of one decoding step."""
  return jax.vmap(lambda k: jax.random.fold_in(k, step))(keys)


def categorical(keys: jax.Array, logits: jax.Array) -> jax.Array:
  """One draw per sample: keys (B, 2), logits (B, ..., V) -> (B, ...) int32."""
  return jax.vmap(jax.random.categorical)(keys, logits).astype(jnp.int32)
