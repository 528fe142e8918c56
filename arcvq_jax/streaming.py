"""ArcLoss and nearest-code search streamed over chunks (SPEC.md section 1, "Precision and memory").

`quantization.arc_loss` and `quantization.nearest_code` build the whole K x N (N x K)
similarity matrix: 100 MB at K=512, N=50176, 2 GB at K=16384, N=32768. The functions here
give the same values, indices and gradients while only ever holding one (K, C) block of it
(C tokens at a time), and on CPU they are also faster, because a block that stays in cache
is cheaper to make, reduce and re-read than one matrix that goes through main memory.

ArcLoss, one pass over token chunks (`lax.scan`) carrying per codebook row k:
- the running top-k cosines and their GLOBAL token indices. A block's candidates are merged
  with the running ones by one lax.top_k, running entries first: they have lower token
  indices, so ties resolve exactly as lax.top_k on the full row does (lowest index first);
- an online log-sum-exp (a shift and a rescaled sum) of s*c over every token seen that is
  NOT in the running top-k. What leaves the top-k, or never enters it, is added to it, masked
  by position and never by value (duplicated latents tie); nothing is ever subtracted.
At the end the top-k are P_k, and log_den = logaddexp(rest, log_num).

The backward pass (jax.custom_vjp) recomputes each chunk's cosines instead of storing them:
with G[k, i] = dL/dc[k, i] it forms G^T @ e_hat one chunk at a time: the softmax weight
(s/K) exp(s c - log_den) for entries outside P (found by token index), and the K * top_k
entries of P added afterwards by one scatter-add. The normalisation of z is left to autodiff through
`quantization.l2_normalize`, so zero vectors get the same finite gradient as the naive form.

N need not be a multiple of the chunk: the last, shorter chunk is processed as a block of its
own, so no padded token exists to be masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from arcvq_jax.quantization import ARCCOS_CLIP, DISTANCES, l2_normalize, sg

# Elements of one (K, C) block. 2**21 floats = 8 MB; bench/bench_arcloss.py --sweep measured
# it on a 2-core CPU (2 MB L2 per core, 32 MB L3): see the table in that file.
BLOCK_ELEMENTS = 2**21
MIN_CHUNK = 128
MAX_CHUNK = 8192
# Entries per group of the two-stage top-k in `_absorb_block`.
TOP_K_GROUP = 32
# Codes per block of the nearest-code search; larger codebooks are scanned in chunks.
CODE_CHUNK = 8192


def auto_chunk_size(num_rows: int, block_elements: int = BLOCK_ELEMENTS) -> int:
  """Tokens per chunk for (num_rows, C) blocks of about `block_elements` floats.

  The power of two in [MIN_CHUNK, MAX_CHUNK] nearest below block_elements / num_rows.
  """
  c = max(MIN_CHUNK, min(MAX_CHUNK, block_elements // max(num_rows, 1)))
  return 1 << (c.bit_length() - 1)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k along the last axis, kept as XLA's TopK op.

  Without the barrier, XLA on CPU fuses the slices of the indices into their consumers,
  no longer recognises sort+slice as a top-k and sorts the whole block (60x slower).
  """
  return lax.optimization_barrier(lax.top_k(x, k))


def _split(x: jax.Array, chunk: int) -> tuple[jax.Array | None, jax.Array | None]:
  """(N, ...) -> full chunks (N // C, C, ...) and the tail (N % C, ...); None where empty."""
  n = x.shape[0]
  num = n // chunk
  full = x[: num * chunk].reshape(num, chunk, *x.shape[1:]) if num else None
  tail = x[num * chunk:] if n % chunk else None
  return full, tail


def _margin_logit(c: jax.Array, s: float, m: float) -> jax.Array:
  """s * cos(theta + m), theta = arccos(clip(c)): the same expression as quantization.arc_loss."""
  theta = jnp.arccos(jnp.clip(c, -1.0 + ARCCOS_CLIP, 1.0 - ARCCOS_CLIP))
  return s * jnp.cos(theta + m)


def _any_equal(iota_len: int, idx: jax.Array) -> jax.Array:
  """(R, L) bool: position p of row r is one of idx[r, :] (idx (R, k) int32)."""
  pos = lax.iota(jnp.int32, iota_len)[None, :]
  hit = pos == idx[:, :1]
  for j in range(1, idx.shape[1]):
    hit |= pos == idx[:, j:j + 1]
  return hit


# --------------------------------------------------------------------------- ArcLoss


def arc_loss_streamed(
    z: jax.Array,
    codebook: jax.Array,
    s: float,
    m: float,
    top_k: int,
    chunk_size: int | None = None,
) -> jax.Array:
  """ArcLoss (Eq. 10-12), scalar, equal in value and gradient to `quantization.arc_loss`.

  z: (N, D) float32 latents of the global batch; codebook: (K, D) float32, under
  stop-gradient (its gradient is zero). s > 0, m, top_k <= N and chunk_size are Python
  numbers (static under jit). chunk_size: tokens per block; None picks (K, C) blocks of about
  BLOCK_ELEMENTS floats (`auto_chunk_size`). Memory is O(K * chunk_size + N * D), never O(K * N).
  """
  n, k_rows = z.shape[0], codebook.shape[0]
  if not 1 <= top_k <= n:
    raise ValueError(f"arc_loss_streamed: top_k={top_k} must be in [1, N={n}]")
  if not s > 0:
    raise ValueError(f"arc_loss_streamed: s={s} must be positive")
  chunk = auto_chunk_size(k_rows) if chunk_size is None else int(chunk_size)
  if chunk < 1:
    raise ValueError(f"arc_loss_streamed: chunk_size={chunk_size} must be positive")
  e_hat = l2_normalize(sg(codebook))
  return _arc_core(l2_normalize(z), e_hat, float(s), float(m), int(top_k), min(chunk, n))


def _absorb_block(carry, c, start, s, top_k):
  """Fold one block of cosines c (K, C), tokens start .. start+C-1, into the running state.

  carry: top_v (K, k) and top_i (K, k) int32, the running top-k (sorted, ties to the lowest
  index); shift (K,) and rest (K,): rest = sum over all other tokens seen of exp(s c - shift).
  """
  top_v, top_i, shift, rest = carry
  k_rows, width = c.shape
  g = TOP_K_GROUP
  if width % g == 0 and width >= 4 * top_k * g:
    # Two-stage top-k, 2-4x faster than one TopK over the block: the k groups of g consecutive
    # tokens with the largest maxima hold the block's top-k (an entry of the top-k has at most
    # k-1 entries before it, larger or equal at a lower index, and so at most k-1 groups can
    # beat its group). Their entries are the candidates; the other groups only add their
    # exp-sums, which the same pass over the block computes with the maxima.
    blocks = c.reshape(k_rows, width // g, g)
    group_max = jnp.max(blocks, axis=2)
    block_shift = s * jnp.max(group_max, axis=1)
    group_sum = jnp.sum(jnp.exp(s * blocks - block_shift[:, None, None]), axis=2)
    _, picked = _top_k(group_max, top_k)
    picked = jnp.sort(picked, axis=1)  # increasing token order, for the tie order below
    outside = jnp.sum(jnp.where(_any_equal(width // g, picked), 0.0, group_sum), axis=1)
    cand_v = jnp.take_along_axis(blocks, picked[:, :, None], axis=1).reshape(k_rows, top_k * g)
    cand_i = (picked[:, :, None] * g + lax.iota(jnp.int32, g)).reshape(k_rows, top_k * g)
  else:
    block_shift = s * jnp.max(c, axis=1)
    outside = jnp.zeros((k_rows,), jnp.float32)
    cand_v = c
    cand_i = jnp.broadcast_to(lax.iota(jnp.int32, width), c.shape)
  # Running entries first: lower token indices, so stable top_k keeps lax.top_k's tie order.
  all_v = jnp.concatenate([top_v, cand_v], axis=1)
  all_i = jnp.concatenate([top_i, cand_i + start], axis=1)
  new_v, pos = _top_k(all_v, top_k)
  new_i = jnp.take_along_axis(all_i, pos, axis=1)
  # Candidates that miss the new top-k, and entries it evicts, join the rest.
  new_shift = jnp.maximum(shift, block_shift)  # finite: every block holds a token
  missed = jnp.where(_any_equal(all_v.shape[1], pos), 0.0, jnp.exp(s * all_v - new_shift[:, None]))
  rest = (rest * jnp.exp(shift - new_shift) + outside * jnp.exp(block_shift - new_shift)
          + jnp.sum(missed, axis=1))
  return new_v, new_i, new_shift, rest


def _arc_forward(z_hat, e_hat, s, m, top_k, chunk):
  """One pass over the tokens: P_k as values (K, k) and indices (K, k); log_den, log_num (K,)."""
  n = z_hat.shape[0]
  k_rows = e_hat.shape[0]
  full, tail = _split(z_hat, chunk)
  carry = (
      jnp.full((k_rows, top_k), -jnp.inf, jnp.float32),
      jnp.full((k_rows, top_k), n, jnp.int32),
      jnp.full((k_rows,), -jnp.inf, jnp.float32),
      jnp.zeros((k_rows,), jnp.float32),
  )
  if full is not None:
    def step(carry, xs):
      zc, start = xs
      return _absorb_block(carry, e_hat @ zc.T, start, s, top_k), None

    starts = jnp.arange(full.shape[0], dtype=jnp.int32) * chunk
    carry, _ = lax.scan(step, carry, (full, starts))
  if tail is not None:
    carry = _absorb_block(carry, e_hat @ tail.T, n - tail.shape[0], s, top_k)
  top_v, top_i, shift, rest = carry
  pos = _margin_logit(top_v, s, m)  # (K, top_k)
  log_num = jax.nn.logsumexp(pos, axis=1)
  # rest is 0 when N == top_k: its log is -inf and logaddexp ignores it.
  log_den = jnp.logaddexp(shift + jnp.log(rest), log_num)
  return top_v, top_i, log_den, log_num


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5))
def _arc_core(z_hat, e_hat, s, m, top_k, chunk):
  _, _, log_den, log_num = _arc_forward(z_hat, e_hat, s, m, top_k, chunk)
  return jnp.mean(log_den - log_num)


def _arc_core_fwd(z_hat, e_hat, s, m, top_k, chunk):
  top_v, top_i, log_den, log_num = _arc_forward(z_hat, e_hat, s, m, top_k, chunk)
  return jnp.mean(log_den - log_num), (z_hat, e_hat, top_v, top_i, log_den, log_num)


def _arc_core_bwd(s, m, top_k, chunk, res, ct):
  z_hat, e_hat, top_v, top_i, log_den, log_num = res
  k_rows = e_hat.shape[0]
  scale = ct / k_rows  # d mean_k / d L_k, times the incoming cotangent

  top_i_t = top_i.T  # (k, K)

  def block_grad(zc, start):
    # Recomputed as (C, K): g @ e_hat is then a plain matmul, 2.5x faster on CPU than
    # g.T @ e_hat with g (K, C).
    c = zc @ e_hat.T
    # Outside P: dL/dc = (1/K) * s * softmax_i(l). P entries are masked (by token index)
    # and added below: their plain weight exp(s c - log_den) can overflow once the margin
    # makes s c much larger than the logits in log_den (large s * m).
    tokens = start + lax.iota(jnp.int32, zc.shape[0])[:, None]
    in_p = tokens == top_i_t[:1]
    for j in range(1, top_i_t.shape[0]):
      in_p |= tokens == top_i_t[j:j + 1]
    g = jnp.where(in_p, 0.0, (scale * s) * jnp.exp(s * c - log_den[None, :]))
    return g @ e_hat  # (C, D)

  n = z_hat.shape[0]
  full, tail = _split(z_hat, chunk)
  parts = []
  if full is not None:
    starts = jnp.arange(full.shape[0], dtype=jnp.int32) * chunk
    parts.append(lax.map(lambda xs: block_grad(*xs), (full, starts)).reshape(-1, z_hat.shape[1]))
  if tail is not None:
    parts.append(block_grad(tail, n - tail.shape[0]))
  dz = jnp.concatenate(parts) if len(parts) > 1 else parts[0]
  # P entries: dL/dl = (1/K) (exp(l - log_den) - exp(l - log_num)), then through the margin
  # (autodiff of the same expression, so the clip's edges behave as in the naive form).
  pos, margin_vjp = jax.vjp(lambda v: _margin_logit(v, s, m), top_v)
  g_pos = scale * (jnp.exp(pos - log_den[:, None]) - jnp.exp(pos - log_num[:, None]))
  (g_pos,) = margin_vjp(g_pos)
  rows = jnp.broadcast_to(jnp.arange(k_rows)[:, None], top_i.shape).reshape(-1)
  dz = dz.at[top_i.reshape(-1)].add(g_pos.reshape(-1, 1) * e_hat[rows])
  return dz, jnp.zeros_like(e_hat)


_arc_core.defvjp(_arc_core_fwd, _arc_core_bwd)


# --------------------------------------------------------------------------- search


def nearest_code_streamed(
    z: jax.Array,
    codebook: jax.Array,
    distance: str,
    chunk_size: int | None = None,
    code_chunk_size: int = CODE_CHUNK,
) -> jax.Array:
  """Index of the nearest codebook row, equal to `quantization.nearest_code`.

  z: (N, D) float32; codebook: (K, D) float32 -> (N,) int32. cosine: argmax_k of
  <z/||z||, e_k/||e_k||>; euclidean: argmin_k ||e_k||^2 - 2 <z, e_k>. Ties go to the lowest
  index, NaN scores win (as jnp.argmax / argmin). Tokens go in chunks of `chunk_size` (None:
  blocks of about BLOCK_ELEMENTS) and, when K > code_chunk_size, codes in chunks of
  code_chunk_size with a running best: no block is larger than (chunk_size, code_chunk_size).
  """
  if distance not in DISTANCES:
    raise ValueError(f"unknown distance {distance!r}; expected one of {DISTANCES}")
  n = z.shape[0]
  k_rows = codebook.shape[0]
  kc = min(k_rows, int(code_chunk_size))
  chunk = min(n, auto_chunk_size(kc) if chunk_size is None else int(chunk_size))
  if distance == "cosine":
    z = l2_normalize(z)
    codes = l2_normalize(codebook)
    offset = jnp.zeros((k_rows,), jnp.float32)
  else:
    codes = codebook
    offset = jnp.sum(codebook**2, axis=-1)
  code_full, code_tail = _split(codes, kc)
  offset_full, offset_tail = _split(offset, kc)

  def block_best(zc, ec, oc, start):
    """Best (score, index) of one block (C, kc'); the score is maximised."""
    if distance == "cosine":
      score = zc @ ec.T
    else:
      # The naive form's expression, negated (exactly) so that both distances maximise.
      score = -(oc[None, :] - 2.0 * zc @ ec.T)
    best = jnp.max(score, axis=1)
    # The first position holding the max: jnp.argmax's answer, but a variadic reduce is ~10x
    # slower on CPU. A NaN makes the max NaN, and then the first NaN wins, as in jnp.argmax.
    hit = (score == best[:, None]) | jnp.isnan(score)
    local = lax.iota(jnp.int32, ec.shape[0])[None, :]
    return best, jnp.min(jnp.where(hit, local, ec.shape[0]), axis=1) + start

  def merge(best, idx, b, i):
    # Strictly better only: the earlier (lower-index) code keeps a tie; a NaN stays.
    better = (b > best) | (jnp.isnan(b) & ~jnp.isnan(best))
    return jnp.where(better, b, best), jnp.where(better, i, idx)

  def token_chunk(zc):
    best = jnp.full((zc.shape[0],), -jnp.inf, jnp.float32)
    idx = jnp.zeros((zc.shape[0],), jnp.int32)
    if code_full is not None and code_full.shape[0] == 1:
      best, idx = block_best(zc, code_full[0], offset_full[0], 0)
    elif code_full is not None:
      def step(carry, xs):
        return merge(*carry, *block_best(zc, *xs)), None

      starts = jnp.arange(code_full.shape[0], dtype=jnp.int32) * kc
      (best, idx), _ = lax.scan(step, (best, idx), (code_full, offset_full, starts))
    if code_tail is not None:
      best, idx = merge(best, idx, *block_best(zc, code_tail, offset_tail, k_rows - code_tail.shape[0]))
    return idx

  full, tail = _split(z, chunk)
  parts = []
  if full is not None:
    parts.append(lax.map(token_chunk, full).reshape(-1))
  if tail is not None:
    parts.append(token_chunk(tail))
  return (jnp.concatenate(parts) if len(parts) > 1 else parts[0]).astype(jnp.int32)
