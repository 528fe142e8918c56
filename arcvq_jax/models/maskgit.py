"""A bidirectional transformer over the token grid: MaskGIT's masked-token model (Chang et al.
2022), with the pre-norm blocks of models/transformer.py (docs/math.md, section 11.3).

  sequence  [c, x_0, ..., x_{N-1}]     c = cls_embedding(label) (label = num_classes: null),
                                       x_p = tok_embeddings(t_p), t_p = vocab_size: [MASK]
  + pos_embedding (1 + N, D) -> blocks_0 .. blocks_{depth-1} (every token sees every token)
  -> norm -> output (D, vocab_size, with bias) at the N grid positions

The logits never cover [MASK]. Sampling (iterative parallel decoding), the masking schedule
and the loss are in arcvq_jax/maskgit_math.py.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from arcvq_jax import maskgit_math
from arcvq_jax.models import transformer as tf


class MaskGITTransformer(nn.Module):
  """tokens (B, N) int32 in [0, vocab_size] (vocab_size = [MASK]), N = h * w in raster order;
  labels (B,) int32 in [0, num_classes] (num_classes: the null class; None: all null) ->
  logits (B, N, vocab_size) float32.

  dtype: the compute dtype (params are float32). dropout: on the embeddings, the attention
  and feed-forward outputs (needs a 'dropout' rng when train=True).
  """

  vocab_size: int
  grid: tuple[int, int]
  num_classes: int = 0
  dim: int = 768
  depth: int = 24
  num_heads: int = 16
  mlp_ratio: float = 4.0
  multiple_of: int = 256
  dropout: float = 0.0
  norm_eps: float = 1e-5
  dtype: Any = jnp.float32

  @property
  def num_tokens(self) -> int:
    return self.grid[0] * self.grid[1]

  @property
  def mask_id(self) -> int:
    return self.vocab_size

  @property
  def null_class(self) -> int:
    return self.num_classes

  @nn.compact
  def __call__(
    self, tokens: jax.Array, labels: jax.Array | None = None, train: bool = False
  ) -> jax.Array:
    tf.check_vocab(self.vocab_size)
    b, n = tokens.shape
    if n != self.num_tokens:
      raise ValueError(f"{n} tokens per sequence; a {self.grid} grid has {self.num_tokens}")
    embed = lambda k, name: nn.Embed(k, self.dim, embedding_init=tf.default_init, name=name)
    if labels is None:
      labels = jnp.full((b,), self.num_classes, jnp.int32)
    c = embed(self.num_classes + 1, "cls_embedding")(labels)[:, None]
    x = embed(self.vocab_size + 1, "tok_embeddings")(tokens)
    pos = self.param("pos_embedding", tf.default_init, (1 + n, self.dim), jnp.float32)
    h = jnp.concatenate([c, x], axis=1) + pos[None]
    h = nn.Dropout(self.dropout)(h, deterministic=not train)
    hidden = tf.swiglu_hidden(self.dim, self.mlp_ratio, self.multiple_of)
    for i in range(self.depth):
      block = tf.Block(
        self.num_heads, hidden, False, self.dropout, self.norm_eps, self.dtype, name=f"blocks_{i}"
      )
      h, _ = block(h, train=train)
    h = tf.RMSNorm(self.norm_eps, jnp.float32, name="norm")(h[:, 1:])
    # The head runs in float32: float32 logits for the loss and the confidences.
    head = nn.Dense(self.vocab_size, kernel_init=tf.default_init, dtype=jnp.float32, name="output")
    return head(h)


def train_loss(
  model: MaskGITTransformer,
  params: Any,
  key: jax.Array,
  tokens: jax.Array,
  labels: jax.Array | None,
  *,
  cond_drop_prob: float = 0.0,
  label_smoothing: float = 0.0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The loss of one batch (maskgit_math.maskgit_loss): tokens (B, h, w) int32 grids,
  labels (B,) or None. key: the mask, the label dropout and the model's dropout."""
  k_loss, k_dropout = jax.random.split(key)
  b = tokens.shape[0]
  labels = labels if model.num_classes else None

  def logits_fn(t, y):
    return model.apply({"params": params}, t, y, train=True, rngs={"dropout": k_dropout})

  return maskgit_math.maskgit_loss(
    k_loss,
    logits_fn,
    tokens.reshape(b, -1),
    labels,
    mask_id=model.mask_id,
    cond_drop_prob=cond_drop_prob,
    null_class=model.null_class,
    label_smoothing=label_smoothing,
  )


def sample_tokens(
  model: MaskGITTransformer,
  params: Any,
  labels: jax.Array | None,
  keys: jax.Array,
  *,
  num_steps: int = 8,
  temperature: float = 1.0,
  choice_temperature: float = 4.5,
  guidance_scale: float = 1.0,
  top_k: int = 0,
  top_p: float = 1.0,
) -> jax.Array:
  """Samples (B, h, w) int32 by parallel decoding from an all-masked grid, for labels (B,)
  (ignored by an unconditional model) and per-sample keys (B, 2). Jit the caller."""
  b = keys.shape[0]
  tokens = maskgit_math.parallel_decode(
    lambda t, y: model.apply({"params": params}, t, y),
    maskgit_math.all_masked(b, model.num_tokens, model.mask_id),
    labels if model.num_classes else None,
    keys,
    mask_id=model.mask_id,
    num_steps=num_steps,
    temperature=temperature,
    choice_temperature=choice_temperature,
    guidance_scale=guidance_scale,
    null_class=model.null_class,
    top_k=top_k,
    top_p=top_p,
  )
  return tokens.reshape(b, *model.grid)
