"""The autoregressive prior as pure functions (docs/math.md, section 11.4): the next-token
loss with label dropout for guidance, and raster-order sampling with temperature, top-k,
top-p and classifier-free guidance, once with a KV cache (one position per call) and once
without (the whole sequence per position: the reference and the benchmark's baseline).

The model comes in as closures (models/ar.py makes them from the params):
  logits_fn(tokens (B, N), labels (B,) | None) -> logits (B, N, V), logits[:, p] of token p
  init_cache_fn(batch) -> cache
  prefill_fn(labels (B,) | None, cache) -> (logits of token 0 (B, V), cache)
  decode_fn(tokens (B,), cache) -> (logits of the next token (B, V), cache)
Guidance runs the conditional and the unconditional sequences in one doubled batch
[labels; null] through the whole loop (cache included); the guided logits pick one token,
which both halves then read. Nothing here knows Flax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

from arcvq_jax import diffusion
from arcvq_jax import token_sampling as ts

PrefillFn = Callable[[jax.Array | None, Any], tuple[jax.Array, Any]]
DecodeFn = Callable[[jax.Array, Any], tuple[jax.Array, Any]]


def ar_loss(
  key: jax.Array,
  logits_fn: ts.LogitsFn,
  tokens: jax.Array,
  labels: jax.Array | None,
  *,
  cond_drop_prob: float = 0.0,
  null_class: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Mean negative log-likelihood in nats per token, float32, of tokens (B, N) given the
  (dropped: guidance) labels. key: the label dropout. Returns (loss, aux) with aux: accuracy
  (of the argmax prediction of each token)."""
  if labels is not None:
    labels = diffusion.drop_labels(key, labels, cond_drop_prob, null_class)
  logits = logits_fn(tokens, labels).astype(jnp.float32)
  lse = jax.nn.logsumexp(logits, axis=-1)
  target = jnp.take_along_axis(logits, tokens[..., None], axis=-1)[..., 0]
  accuracy = jnp.mean(jnp.argmax(logits, axis=-1) == tokens)
  return jnp.mean(lse - target), dict(accuracy=accuracy)


def _guided(labels: jax.Array | None, guidance_scale: float) -> bool:
  return labels is not None and guidance_scale != 1.0


def _pick(
  logits: jax.Array,
  keys: jax.Array,
  p: jax.Array | int,
  guided: bool,
  guidance_scale: float,
  temperature: float,
  top_k: int,
  top_p: float,
) -> jax.Array:
  """Token p of each sample from its logits ((2B, V) when guided, else (B, V)) -> (B,)."""
  if guided:
    cond, uncond = jnp.split(logits, 2)
    logits = ts.guide(cond, uncond, guidance_scale)
  logits = ts.sampling_logits(logits.astype(jnp.float32), temperature, top_k, top_p)
  return ts.categorical(ts.fold_keys(keys, p), logits)


def sample_cached(
  prefill_fn: PrefillFn,
  decode_fn: DecodeFn,
  init_cache_fn: Callable[[int], Any],
  labels: jax.Array | None,
  keys: jax.Array,
  num_tokens: int,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  guidance_scale: float = 1.0,
  null_class: int = 0,
) -> jax.Array:
  """Raster-order sampling with the KV cache: (B,) labels, (B, 2) keys -> (B, N) int32.

  One prefill (the class token) and N - 1 decode steps, a `fori_loop`. Token p of sample b
  draws with fold_in(keys[b], p) from the guided logits u + w (c - u) over temperature, then
  top-k, then top-p. guidance_scale 1 (or labels None) runs the batch once. Jit the caller;
  temperature, top_k, top_p and the scale are static.
  """
  b = keys.shape[0]
  guided = _guided(labels, guidance_scale)
  run_labels = ts.double_labels(labels, null_class) if guided else labels
  pick = lambda logits, p: _pick(logits, keys, p, guided, guidance_scale, temperature, top_k, top_p)
  logits, cache = prefill_fn(run_labels, init_cache_fn(2 * b if guided else b))

  def body(p, carry):
    tokens, logits, cache = carry
    token = pick(logits, p)
    logits, cache = decode_fn(jnp.concatenate([token, token]) if guided else token, cache)
    return tokens.at[:, p].set(token), logits, cache

  tokens = jnp.zeros((b, num_tokens), jnp.int32)
  tokens, logits, _ = jax.lax.fori_loop(0, num_tokens - 1, body, (tokens, logits, cache))
  return tokens.at[:, num_tokens - 1].set(pick(logits, num_tokens - 1))


def sample_uncached(
  logits_fn: ts.LogitsFn,
  labels: jax.Array | None,
  keys: jax.Array,
  num_tokens: int,
  *,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  guidance_scale: float = 1.0,
  null_class: int = 0,
) -> jax.Array:
  """`sample_cached` without a cache: the whole (B, N) sequence through the network at each
  of the N positions (the tokens after p are placeholders the causal model never reads).
  The same draws, so the same samples up to rounding; N times the attention and MLP work."""
  b = keys.shape[0]
  guided = _guided(labels, guidance_scale)
  run_labels = ts.double_labels(labels, null_class) if guided else labels

  def body(p, tokens):
    inputs = jnp.concatenate([tokens, tokens]) if guided else tokens
    logits = jax.lax.dynamic_index_in_dim(logits_fn(inputs, run_labels), p, axis=1, keepdims=False)
    token = _pick(logits, keys, p, guided, guidance_scale, temperature, top_k, top_p)
    return tokens.at[:, p].set(token)

  return jax.lax.fori_loop(0, num_tokens, body, jnp.zeros((b, num_tokens), jnp.int32))
