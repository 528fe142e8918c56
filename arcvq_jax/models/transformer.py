"""Transformer parts shared by the token priors (models/maskgit.py, models/ar.py): RMSNorm,
the SwiGLU MLP, multi-head attention with an optional KV cache, rotary position embeddings
over a sequence (1D) or over the token grid (2D), and one pre-norm block (docs/math.md,
sections 11.3-11.4).

The names follow LlamaGen's GPT (`attention_norm`, `attention/wqkv`, `attention/wo`,
`ffn_norm`, `feed_forward/w1, w2, w3`), so a sharding rule or a checkpoint map can name them.

Precision: parameters are float32; `dtype` is the compute dtype of the matmuls (bfloat16 in
use). Norms, the rotary rotation and the softmax run in float32.

The KV cache is pure data: `KVCache` holds one (B, S, H, Dh) key and value array per layer
and the write index; the attention call takes a layer's (keys, values) and the index and
returns them updated. Nothing is kept in a Flax collection.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any
MAX_VOCAB = 2**16

# LlamaGen's and MaskGIT's std 0.02 normal init for linear layers and embeddings.
default_init = nn.initializers.normal(0.02)


def check_vocab(vocab_size: int) -> None:
  """One output head serves up to 2^16 tokens; larger vocabularies are refused (why: the
  logits of a batch grow with the vocabulary, docs/math.md, section 11.5)."""
  if not 1 < vocab_size <= MAX_VOCAB:
    raise ValueError(
      f"a token prior over {vocab_size} codes: one output head supports 2 to {MAX_VOCAB} "
      f"(2^16). Use a tokenizer with at most 2^16 codes (lfq with <= 16 bits, fsq levels whose "
      "product is <= 65536); factorized heads (Open-MAGVIT2's) are not implemented."
    )


def swiglu_hidden(dim: int, mlp_ratio: float = 4.0, multiple_of: int = 256) -> int:
  """LlamaGen's SwiGLU width: 2/3 of mlp_ratio * dim, rounded up to a multiple of
  `multiple_of` (the three matrices then cost what a GELU MLP of mlp_ratio * dim does)."""
  hidden = int(2 * int(mlp_ratio * dim) / 3)
  return -(-hidden // multiple_of) * multiple_of


# --------------------------------------------------------------------------- rotary positions


def rope_frequencies(dim: int, base: float = 10000.0) -> np.ndarray:
  """(dim / 2,) float64: base^(-2i / dim), i = 0 .. dim/2 - 1, the angle per unit position."""
  return base ** (-np.arange(0, dim, 2, dtype=np.float64)[: dim // 2] / dim)


def rope_angles_1d(positions: np.ndarray, head_dim: int, base: float = 10000.0) -> np.ndarray:
  """positions (T,) -> angles (T, head_dim / 2): position * frequency, one per channel pair."""
  return np.asarray(positions, np.float64)[:, None] * rope_frequencies(head_dim, base)


def rope_angles_2d(
  rows: np.ndarray, cols: np.ndarray, head_dim: int, base: float = 10000.0
) -> np.ndarray:
  """LlamaGen's 2D RoPE: rows, cols (T,) -> angles (T, head_dim / 2). The first head_dim / 4
  channel pairs turn with the row, the last head_dim / 4 with the column, each with the 1D
  frequencies of a head_dim / 2 wide half. head_dim must be a multiple of 4."""
  if head_dim % 4:
    raise ValueError(f"2D rotary positions need a head dim divisible by 4, got {head_dim}")
  freqs = rope_frequencies(head_dim // 2, base)
  rows = np.asarray(rows, np.float64)[:, None] * freqs
  cols = np.asarray(cols, np.float64)[:, None] * freqs
  return np.concatenate([rows, cols], axis=-1)


def grid_rope_table(
  kind: str, grid: tuple[int, int], head_dim: int, prefix: int = 1, base: float = 10000.0
) -> tuple[np.ndarray, np.ndarray]:
  """(cos, sin), each (prefix + h*w, head_dim / 2) float32, for a sequence of `prefix` class
  tokens followed by the h x w grid in raster order.

  kind 'rope1d': sequence position s turns by s (the prefix by 0, 1, ...). kind 'rope2d':
  grid position p = (p // w, p % w) turns by its row and column; the prefix tokens are not
  turned at all (cos 1, sin 0). LlamaGen's table gives them cos = sin = 0, which zeroes their
  queries and keys; the identity keeps the class token visible to the attention.
  """
  h, w = grid
  n = prefix + h * w
  if kind == "rope1d":
    angles = rope_angles_1d(np.arange(n), head_dim, base)
  elif kind == "rope2d":
    p = np.arange(h * w)
    angles = np.concatenate(
      [np.zeros((prefix, head_dim // 2)), rope_angles_2d(p // w, p % w, head_dim, base)]
    )
  else:
    raise ValueError(f"rotary kind {kind!r} is not one of ('rope1d', 'rope2d')")
  return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Turns each channel pair (x[2i], x[2i+1]) of x (B, T, H, Dh) by the angle whose cos and
  sin are cos[t, i], sin[t, i] ((T, Dh / 2)), in float32; returns x's dtype. The pairs are
  adjacent channels, as LlamaGen (and Meta's Llama) pair them."""
  xf = x.astype(jnp.float32).reshape(*x.shape[:-1], -1, 2)
  a, b = xf[..., 0], xf[..., 1]
  c, s = cos[None, :, None, :], sin[None, :, None, :]
  out = jnp.stack([a * c - b * s, b * c + a * s], axis=-1)
  return out.reshape(x.shape).astype(x.dtype)


# --------------------------------------------------------------------------- attention


class KVCache(NamedTuple):
  """Keys and values of the positions decoded so far.

  keys, values: one (B, S, H, Dh) array per layer, S the fixed maximum length; index: ()
  int32, the next position to write (positions [0, index) hold data).
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  index: jax.Array


def init_cache(
  batch: int, max_len: int, num_layers: int, num_heads: int, head_dim: int, dtype: Dtype
) -> KVCache:
  """An empty cache: zeros, index 0."""
  shape = (batch, max_len, num_heads, head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(num_layers))
  return KVCache(keys=zeros, values=zeros, index=jnp.zeros((), jnp.int32))


def attention_mask(
  query_pos: jax.Array, key_len: int, causal: bool, valid_len: jax.Array | int | None = None
) -> jax.Array:
  """(T, S) bool: may the query at position query_pos[t] read key position s? Causal: s <=
  query_pos[t]. Otherwise every s < valid_len (all S when valid_len is None)."""
  s = jnp.arange(key_len)
  if causal:
    return s[None, :] <= query_pos[:, None]
  limit = key_len if valid_len is None else valid_len
  return jnp.broadcast_to(s[None, :] < limit, (query_pos.shape[0], key_len))


def dot_product_attention(
  q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None = None
) -> jax.Array:
  """softmax(q k^T / sqrt(Dh)) v per head. q (B, T, H, Dh), k, v (B, S, H, Dh), mask (T, S)
  bool or None -> (B, T, H, Dh). Scores and softmax in float32; masked scores are -inf
  (every query must see at least one key)."""
  scale = q.shape[-1] ** -0.5
  scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
  if mask is not None:
    scores = jnp.where(mask[None, None], scores, -jnp.inf)
  weights = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
  return jnp.einsum("bhts,bshd->bthd", weights, v)


class RMSNorm(nn.Module):
  """x / sqrt(mean(x^2) + eps) * scale, over the last axis, in float32; returns `dtype`."""

  eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    scale = self.param("scale", nn.initializers.ones, (x.shape[-1],), jnp.float32)
    xf = x.astype(jnp.float32)
    y = xf * jax.lax.rsqrt(jnp.mean(xf * xf, axis=-1, keepdims=True) + self.eps)
    return (y * scale).astype(self.dtype)


class FeedForward(nn.Module):
  """SwiGLU: w2(silu(w1 x) * w3 x), no biases. x (..., D) -> (..., D)."""

  hidden: int
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False) -> jax.Array:
    dense = lambda n, name: nn.Dense(
      n, use_bias=False, dtype=self.dtype, kernel_init=default_init, name=name
    )
    h = nn.silu(dense(self.hidden, "w1")(x)) * dense(self.hidden, "w3")(x)
    y = dense(x.shape[-1], "w2")(h)
    return nn.Dropout(self.dropout)(y, deterministic=not train)


class Attention(nn.Module):
  """Multi-head self-attention, one fused q/k/v projection `wqkv` and the output `wo`.

  x (B, T, D): the tokens at positions index .. index + T - 1 of the sequence. rope: (cos,
  sin) (T, Dh / 2) for those positions, or None (learned positions live outside). causal: a
  query sees the keys at or before its position; otherwise all keys written so far.
  layer_cache: this layer's (keys, values) (B, S, H, Dh), or None (then index is 0 and the
  keys are x's own). Returns (y (B, T, D), the updated (keys, values) or None).
  """

  num_heads: int
  causal: bool
  dropout: float = 0.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None = None,
    layer_cache: tuple[jax.Array, jax.Array] | None = None,
    index: jax.Array | int = 0,
    train: bool = False,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    b, t, d = x.shape
    if d % self.num_heads:
      raise ValueError(f"width {d} is not divisible by {self.num_heads} heads")
    head_dim = d // self.num_heads
    qkv = nn.Dense(3 * d, use_bias=False, dtype=self.dtype, kernel_init=default_init, name="wqkv")
    q, k, v = jnp.split(qkv(x).reshape(b, t, 3 * self.num_heads, head_dim), 3, axis=2)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    query_pos = index + jnp.arange(t)
    if layer_cache is None:
      keys, values, new_cache = k, v, None
    else:
      cache_k, cache_v = layer_cache
      start = (0, index, 0, 0)
      keys = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), start)
      values = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), start)
      new_cache = (keys, values)
    mask = attention_mask(query_pos, keys.shape[1], self.causal, index + t)
    if layer_cache is None and not self.causal:
      mask = None  # every key is x's own
    y = dot_product_attention(q, keys.astype(q.dtype), values.astype(q.dtype), mask)
    y = nn.Dense(d, use_bias=False, dtype=self.dtype, kernel_init=default_init, name="wo")(
      y.reshape(b, t, d)
    )
    return nn.Dropout(self.dropout)(y, deterministic=not train), new_cache


class Block(nn.Module):
  """Pre-norm block: h = x + attention(norm(x)); out = h + feed_forward(norm(h)).
  Arguments as `Attention`; returns (out (B, T, D), the updated layer cache or None)."""

  num_heads: int
  mlp_hidden: int
  causal: bool
  dropout: float = 0.0
  norm_eps: float = 1e-5
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(
    self,
    x: jax.Array,
    rope: tuple[jax.Array, jax.Array] | None = None,
    layer_cache: tuple[jax.Array, jax.Array] | None = None,
    index: jax.Array | int = 0,
    train: bool = False,
  ) -> tuple[jax.Array, tuple[jax.Array, jax.Array] | None]:
    attn = Attention(self.num_heads, self.causal, self.dropout, self.dtype, name="attention")
    a, new_cache = attn(
      RMSNorm(self.norm_eps, self.dtype, name="attention_norm")(x), rope, layer_cache, index, train
    )
    h = x + a
    ffn = FeedForward(self.mlp_hidden, self.dropout, self.dtype, name="feed_forward")
    out = h + ffn(RMSNorm(self.norm_eps, self.dtype, name="ffn_norm")(h), train)
    return out, new_cache


def stack_caches(caches: Sequence[tuple[jax.Array, jax.Array]], index: jax.Array) -> KVCache:
  """Per-layer (keys, values) pairs and the new write index -> KVCache."""
  return KVCache(keys=tuple(c[0] for c in caches), values=tuple(c[1] for c in caches), index=index)
