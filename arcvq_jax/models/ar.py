"""A decoder-only transformer over the token grid in raster order: the autoregressive prior as
LlamaGen's GPT builds it (docs/math.md, section 11.4).

  sequence  [c, t_0, t_1, ..., t_{N-2}]     c = cls_embedding(label), label = num_classes: null
  logits    [p(t_0 | c), p(t_1 | c, t_0), ..., p(t_{N-1} | c, t_<N-1)]

tok_embeddings (V, D) -> blocks_0 .. blocks_{depth-1} (pre-norm, RMSNorm, causal attention,
SwiGLU) -> norm -> output (D, V, no bias, zero init; untied from the embedding). Positions:
'rope2d' (LlamaGen's: half of each head's channel pairs turn with the row, half with the
column), 'rope1d' (the sequence index) or 'learned' (pos_embedding (N, D) added to the input).

Three entry points: `__call__` (teacher forcing, training and the no-cache reference),
`prefill` (the class token into an empty cache) and `decode_step` (one token into the cache,
the next token's logits). `init_cache` makes the cache. Sampling loops: arcvq_jax/ar_math.py.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arcvq_jax import ar_math
from arcvq_jax.models import transformer as tf

POSITIONS = ("rope2d", "rope1d", "learned")


class ARTransformer(nn.Module):
  """tokens (B, N) int32 in [0, vocab_size), N = h * w in raster order; labels (B,) int32 in
  [0, num_classes] (num_classes is the null class of guidance; None: all null) -> logits
  (B, N, vocab_size) float32, logits[:, p] those of token p given the label and tokens < p.

  dtype: the compute dtype (params are float32). dropout: LlamaGen's token, residual and
  feed-forward dropout rate (needs a 'dropout' rng when train=True).
  """

  vocab_size: int
  grid: tuple[int, int]
  num_classes: int = 0
  dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  multiple_of: int = 256
  positions: str = "rope2d"
  rope_base: float = 10000.0
  dropout: float = 0.0
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def head_dim(self) -> int:
    return self.dim // self.num_heads

  def setup(self):
    tf.check_vocab(self.vocab_size)
    if self.positions not in POSITIONS:
      raise ValueError(f"positions {self.positions!r} is not one of {POSITIONS}")
    if self.dim % self.num_heads:
      raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
    embed = lambda n, name: nn.Embed(n, self.dim, embedding_init=tf.default_init, name=name)
    self.tok_embeddings = embed(self.vocab_size, "tok_embeddings")
    self.cls_embedding = embed(self.num_classes + 1, "cls_embedding")
    if self.positions == "learned":
      self.pos_embedding = self.param(
        "pos_embedding", tf.default_init, (self.num_tokens, self.dim), jnp.float32
      )
    hidden = tf.swiglu_hidden(self.dim, self.mlp_ratio, self.multiple_of)
    self.blocks = [
      tf.Block(
        self.num_heads, hidden, True, self.dropout, self.norm_eps, self.dtype, name=f"blocks_{i}"
      )
      for i in range(self.depth)
    ]
    self.norm = tf.RMSNorm(self.norm_eps, jnp.float32)
    # The head runs in float32 (float32 logits); LlamaGen zeroes it at init.
    self.output = nn.Dense(
      self.vocab_size, use_bias=False, kernel_init=nn.initializers.zeros, dtype=jnp.float32
    )
    self.drop = nn.Dropout(self.dropout)

  def _labels(self, labels: jax.Array | None, batch: int) -> jax.Array:
    if labels is None:
      return jnp.full((batch,), self.num_classes, jnp.int32)
    return labels

  def _run(
    self, h: jax.Array, start: jax.Array | int, cache: tf.KVCache | None, train: bool
  ) -> tuple[jax.Array, tf.KVCache | None]:
    """h (B, T, D) float32 at sequence positions start .. start + T - 1 -> logits (B, T, V)."""
    t = h.shape[1]
    rope = None
    if self.positions == "learned":
      h = h + jax.lax.dynamic_slice_in_dim(self.pos_embedding, start, t)[None]
    else:
      # Sequence positions 0 .. N-1: the class token, then grid positions 0 .. N-2.
      table = tf.grid_rope_table(self.positions, self.grid, self.head_dim, 1, self.rope_base)
      rope = tuple(jax.lax.dynamic_slice_in_dim(jnp.asarray(a), start, t) for a in table)
    h = self.drop(h, deterministic=not train)
    new = []
    for i, block in enumerate(self.blocks):
      layer_cache = None if cache is None else (cache.keys[i], cache.values[i])
      h, c = block(h, rope, layer_cache, start, train)
      new.append(c)
    logits = self.output(self.norm(h).astype(jnp.float32))
    new_cache = None if cache is None else tf.stack_caches(new, cache.index + t)
    return logits, new_cache

  def embed(self, tokens: jax.Array) -> jax.Array:
    """tokens (B, N) -> token embeddings (B, N, D) float32."""
    return self.tok_embeddings(tokens)

  def from_embeddings(
    self, x: jax.Array, labels: jax.Array | None = None, train: bool = False
  ) -> jax.Array:
    """The network after the token embedding: x (B, N, D) of t_0 .. t_{N-1} -> logits
    (B, N, V). The last token's embedding is not used (nothing comes after it)."""
    c = self.cls_embedding(self._labels(labels, x.shape[0]))[:, None]
    seq = jnp.concatenate([c, x[:, :-1]], axis=1)
    return self._run(seq, 0, None, train)[0]

  def __call__(
    self, tokens: jax.Array, labels: jax.Array | None = None, train: bool = False
  ) -> jax.Array:
    return self.from_embeddings(self.embed(tokens), labels, train)

  def prefill(self, labels: jax.Array | None, cache: tf.KVCache) -> tuple[jax.Array, tf.KVCache]:
    """The class token at position 0 of an empty cache: labels (B,) -> (logits of t_0 (B, V),
    the cache with index 1)."""
    c = self.cls_embedding(self._labels(labels, cache.keys[0].shape[0]))[:, None]
    logits, cache = self._run(c, 0, cache, False)
    return logits[:, 0], cache

  def decode_step(self, tokens: jax.Array, cache: tf.KVCache) -> tuple[jax.Array, tf.KVCache]:
    """Token t_p (B,) at sequence position cache.index = p + 1 -> (logits of t_{p+1} (B, V),
    the cache with index p + 2)."""
    logits, cache = self._run(self.embed(tokens[:, None]), cache.index, cache, False)
    return logits[:, 0], cache

  def extend(self, tokens: jax.Array, cache: tf.KVCache) -> tuple[jax.Array, tf.KVCache]:
    """Several tokens (B, T) at once after the cache's positions -> (logits (B, T, V), cache):
    `decode_step` for T tokens (used to check the cache against the full forward)."""
    return self._run(self.embed(tokens), cache.index, cache, False)


def init_cache(model: ARTransformer, batch: int, dtype: Any = None) -> tf.KVCache:
  """An empty KV cache for `batch` sequences of the model's N positions (the class token and
  t_0 .. t_{N-2}); dtype defaults to the model's compute dtype."""
  return tf.init_cache(
    batch,
    model.num_tokens,
    model.depth,
    model.num_heads,
    model.head_dim,
    model.dtype if dtype is None else dtype,
  )


def train_loss(
  model: ARTransformer,
  params: Any,
  key: jax.Array,
  tokens: jax.Array,
  labels: jax.Array | None,
  *,
  cond_drop_prob: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of one batch (ar_math.ar_loss): tokens (B, h, w) int32 grids, labels (B,) or
  None. key: the label dropout and the model's dropout."""
  k_loss, k_dropout = jax.random.split(key)
  b = tokens.shape[0]
  labels = labels if model.num_classes else None

  def logits_fn(t, y):
    return model.apply({"params": params}, t, y, train=True, rngs={"dropout": k_dropout})

  return ar_math.ar_loss(
    k_loss,
    logits_fn,
    tokens.reshape(b, -1),
    labels,
    cond_drop_prob=cond_drop_prob,
    null_class=model.num_classes,
  )


def sample_tokens(
  model: ARTransformer,
  params: Any,
  labels: jax.Array | None,
  keys: jax.Array,
  *,
  use_cache: bool = True,
  temperature: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
  guidance_scale: float = 1.0,
) -> jax.Array:
  """Samples (B, h, w) int32 for labels (B,) (ignored by an unconditional model) and
  per-sample keys (B, 2) (token_sampling.sample_keys). use_cache False: the no-cache
  reference (ar_math.sample_uncached). Jit the caller."""
  variables = {"params": params}
  labels = labels if model.num_classes else None
  kwargs = dict(
    temperature=temperature,
    top_k=top_k,
    top_p=top_p,
    guidance_scale=guidance_scale,
    null_class=model.num_classes,
  )
  if use_cache:
    tokens = ar_math.sample_cached(
      lambda y, c: model.apply(variables, y, c, method="prefill"),
      lambda t, c: model.apply(variables, t, c, method="decode_step"),
      lambda b: init_cache(model, b),
      labels,
      keys,
      model.num_tokens,
      **kwargs,
    )
  else:
    tokens = ar_math.sample_uncached(
      lambda t, y: model.apply(variables, t, y), labels, keys, model.num_tokens, **kwargs
    )
  return tokens.reshape(keys.shape[0], *model.grid)
