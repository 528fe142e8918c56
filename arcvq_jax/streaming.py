"""ArcLoss and nearest-code search streamed over blocks (SPEC.md section 1, "Precision and memory").

`quantization.arc_loss` and `quantization.nearest_code` build the whole K x N (N x K)
similarity matrix: 100 MB at K=512, N=50176, 2 GB at K=16384, N=32768. The functions here
give the same values, indices and gradients while only ever holding one block of it (a few
hundred codes x a few thousand tokens, 8 MB), and on CPU they are also faster: a block that
stays in cache is cheaper to make, reduce and re-read than a matrix in main memory.

ArcLoss. The rows k of the loss are independent, so the codebook goes through in row blocks,
and each row block makes one pass over the tokens in chunks, carrying per row:
- the running top-k cosines and their GLOBAL token indices. A chunk's candidates are merged
  with the running ones by one top-k, running entries first: they have lower token indices,
  so ties resolve exactly as lax.top_k on the full row does (lowest index first);
- an online log-sum-exp (a shift and a rescaled sum) of s*c over every token seen that is
  NOT in the running top-k. What leaves the top-k, or never enters it, is added to it, masked
  by position and never by value (duplicated latents tie); nothing is ever subtracted.
At the end the top-k are P_k, and log_den = logaddexp(rest, log_num).

The backward pass (jax.custom_vjp) recomputes each block's cosines instead of storing them:
with G[k, i] = dL/dc[k, i] it adds G^T @ e_hat block by block, G being the softmax weight
(s/K) exp(s c - log_den) outside P (found by token index); the K * top_k entries of P are
added afterwards by one scatter-add. The normalisation of z is left to autodiff through
`quantization.l2_normalize`, so zero vectors get the same finite gradient as the naive form.

N and K need not be multiples of the chunk sizes: the last, shorter chunk is processed as a
block of its own, so no padded token or code exists to be masked.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

from arcvq_jax.quantization import ARCCOS_CLIP, DISTANCES, l2_normalize, sg

# Default block sizes, measured with bench/bench_arcloss.py --sweep on a 2-core CPU (AMD
# EPYC, 2 MB L2 per core, 32 MB L3; the timings are in that file's docstring).
# ArcLoss: blocks of ARC_CODE_CHUNK codes x BLOCK_ELEMENTS / ARC_CODE_CHUNK tokens (8 MB).
# A larger codebook goes through in row blocks, each with its own pass over the tokens (the
# rows of the loss are independent): taller blocks need shorter rows to stay in cache, and
# XLA's reductions and top-k cost far more per entry on short rows.
BLOCK_ELEMENTS = 2**21
ARC_CODE_CHUNK = 512
# Nearest code: blocks of NEAREST_BLOCK_ELEMENTS / min(K, CODE_CHUNK) tokens x codes.
NEAREST_BLOCK_ELEMENTS = 2**20
CODE_CHUNK = 8192
MIN_CHUNK = 256
MAX_CHUNK = 8192
# Entries per group of the two-stage top-k in `_absorb_block`.
TOP_K_GROUP = 32
# Rows up to this long get the top-k of `_top_k` by rounds of max instead of XLA's TopK.
SHORT_ROW = 256


def auto_chunk_size(num_rows: int, block_elements: int = BLOCK_ELEMENTS) -> int:
  """Tokens per chunk for (num_rows, C) blocks of about `block_elements` floats.

  The power of two in [MIN_CHUNK, MAX_CHUNK] nearest below block_elements / num_rows.
  """
  c = max(MIN_CHUNK, min(MAX_CHUNK, block_elements // max(num_rows, 1)))
  return 1 << (c.bit_length() - 1)


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k(x, k) along the last axis of x (R, L): values (R, k), indices (R, k) int32.

  Sorted, ties to the lowest index. Short rows take k rounds of (max, first index of it):
  XLA's TopK costs ~130 ns per row plus ~2.5 ns per entry of a short row on CPU, which
  dominates for large codebooks. Long rows go to XLA's TopK, behind an optimization barrier:
  without it XLA fuses the slices of the indices into their consumers, no longer sees
  sort+slice as a top-k, and sorts the whole block (60x slower).
  """
  width = x.shape[1]
  if width > SHORT_ROW:
    return lax.optimization_barrier(lax.top_k(x, k))
  pos = lax.iota(jnp.int32, width)[None, :]
  taken = jnp.zeros(x.shape, bool)
  values, indices = [], []
  for _ in range(k):
    # Taken entries are masked by position, so -inf entries can still be picked, once each.
    live = jnp.where(taken, -jnp.inf, x)
    v = jnp.max(live, axis=1)
    hit = ((live == v[:, None]) | jnp.isnan(live)) & ~taken
    i = _first(hit)
    taken |= pos == i[:, None]
    values.append(v)
    indices.append(i)
  return jnp.stack(values, axis=1), jnp.stack(indices, axis=1)


def _first(hit: jax.Array) -> jax.Array:
  """(R, L) bool -> (R,) int32: the first True position of each row (L if none).

  A max over floats: XLA on CPU reduces int32 rows several times slower than float32 ones
  (exact: positions are integers below 2**24).
  """
  width = hit.shape[1]
  neg_pos = -lax.iota(jnp.float32, width)[None, :]
  return (-jnp.max(jnp.where(hit, neg_pos, -float(width)), axis=1)).astype(jnp.int32)


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
    code_chunk_size: int | None = None,
) -> jax.Array:
  """ArcLoss (Eq. 10-12), scalar, equal in value and gradient to `quantization.arc_loss`.

  z: (N, D) latents of the global batch; codebook: (K, D), under stop-gradient (its
  gradient is zero); the loss is computed in float32 whatever their dtype. s > 0, m,
  top_k <= N and the chunk sizes are Python numbers (static under jit). Blocks are
  (code_chunk_size, chunk_size): codes x tokens.
  code_chunk_size None: min(K, ARC_CODE_CHUNK); chunk_size None: blocks of about
  BLOCK_ELEMENTS floats (`auto_chunk_size`). Memory is O(block + N * D + K), never O(K * N).
  """
  n, k_rows = z.shape[0], codebook.shape[0]
  if not 1 <= top_k <= n:
    raise ValueError(f"arc_loss_streamed: top_k={top_k} must be in [1, N={n}]")
  if not s > 0:
    raise ValueError(f"arc_loss_streamed: s={s} must be positive")
  rows = min(k_rows, ARC_CODE_CHUNK if code_chunk_size is None else int(code_chunk_size))
  chunk = auto_chunk_size(rows) if chunk_size is None else int(chunk_size)
  if chunk < 1 or rows < 1:
    raise ValueError(f"arc_loss_streamed: chunk sizes must be positive, got {chunk_size}, "
                     f"{code_chunk_size}")
  # float32 whatever the networks compute in (SPEC.md "Precision and memory").
  z = z.astype(jnp.float32)
  e_hat = l2_normalize(sg(codebook).astype(jnp.float32))
  return _arc_core(l2_normalize(z), e_hat, float(s), float(m), int(top_k), min(chunk, n), rows)


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
  missed = jnp.where(_any_equal(all_v.shape[1], pos), 0.0,
                     jnp.exp(s * all_v - new_shift[:, None]))
  rest = (rest * jnp.exp(shift - new_shift) + outside * jnp.exp(block_shift - new_shift)
          + jnp.sum(missed, axis=1))
  return new_v, new_i, new_shift, rest


def _for_token_blocks(n: int, chunk: int, body, init):
  """Run body(start, width, state) -> state over [0, n) in blocks: a loop over the full
  blocks (start traced, width = chunk), then the shorter tail block if any (start static)."""
  state = init
  num = n // chunk
  if num == 1:
    state = body(0, chunk, state)
  elif num > 1:
    state = lax.fori_loop(0, num, lambda i, st: body(i * chunk, chunk, st), state)
  if n % chunk:
    state = body(num * chunk, n % chunk, state)
  return state


def _for_code_blocks(rows: int, fn, codes: jax.Array):
  """fn(code rows) -> pytree of (r, ...) arrays, over blocks of `rows` codes of codes (K, D):
  lax.map over the full blocks, then the tail; concatenated back to (K, ...)."""
  full, tail = _split(codes, rows)
  outs = []
  if full is not None and full.shape[0] == 1:
    outs.append(fn(full[0]))
  elif full is not None:
    outs.append(jax.tree.map(lambda r: r.reshape(-1, *r.shape[2:]), lax.map(fn, full)))
  if tail is not None:
    outs.append(fn(tail))
  return outs[0] if len(outs) == 1 else jax.tree.map(lambda *r: jnp.concatenate(r), *outs)


def _arc_forward(z_hat, e_hat, s, m, top_k, chunk, rows):
  """P_k as values (K, k) and token indices (K, k); log_den, log_num (K,).

  Rows of the codebook are independent: each block of `rows` codes makes one pass over
  the tokens.
  """
  n = z_hat.shape[0]

  def row_block(e_rows):
    r = e_rows.shape[0]
    init = (
        jnp.full((r, top_k), -jnp.inf, jnp.float32),
        jnp.full((r, top_k), n, jnp.int32),
        jnp.full((r,), -jnp.inf, jnp.float32),
        jnp.zeros((r,), jnp.float32),
    )

    def body(start, width, carry):
      zc = lax.dynamic_slice_in_dim(z_hat, start, width)
      return _absorb_block(carry, e_rows @ zc.T, start, s, top_k)

    top_v, top_i, shift, rest = _for_token_blocks(n, chunk, body, init)
    log_num = jax.nn.logsumexp(_margin_logit(top_v, s, m), axis=1)
    # rest is 0 when N == top_k: its log is -inf and logaddexp ignores it.
    log_den = jnp.logaddexp(shift + jnp.log(rest), log_num)
    return top_v, top_i, log_den, log_num

  return _for_code_blocks(rows, row_block, e_hat)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6))
def _arc_core(z_hat, e_hat, s, m, top_k, chunk, rows):
  _, _, log_den, log_num = _arc_forward(z_hat, e_hat, s, m, top_k, chunk, rows)
  return jnp.mean(log_den - log_num)


def _arc_core_fwd(z_hat, e_hat, s, m, top_k, chunk, rows):
  top_v, top_i, log_den, log_num = _arc_forward(z_hat, e_hat, s, m, top_k, chunk, rows)
  return jnp.mean(log_den - log_num), (z_hat, e_hat, top_v, top_i, log_den, log_num)


def _arc_core_bwd(s, m, top_k, chunk, rows, res, ct):
  z_hat, e_hat, top_v, top_i, log_den, log_num = res
  n, d = z_hat.shape
  k_rows = e_hat.shape[0]
  scale = ct / k_rows  # d mean_k / d L_k, times the incoming cotangent

  def block_grad(zc, start, e_rows, den_rows, p_rows):
    """One (C, rows) block: dL/dc = (1/K) s softmax_i(l) outside P, times the codes: (C, D)."""
    # Recomputed as (C, rows): g @ e_rows is then a plain matmul, 2.5x faster on CPU than
    # g.T @ e_rows with g (rows, C).
    c = zc @ e_rows.T
    # P entries are masked by token index and added below: their plain weight
    # exp(s c - log_den) can overflow once the margin makes s c much larger than the logits
    # in log_den (large s * m).
    tokens = start + lax.iota(jnp.int32, zc.shape[0])[:, None]
    in_p = tokens == p_rows[:1]
    for j in range(1, top_k):
      in_p |= tokens == p_rows[j:j + 1]
    g = jnp.where(in_p, 0.0, (scale * s) * jnp.exp(s * c - den_rows[None, :]))
    return g @ e_rows

  def rows_grad(e_rows, den_rows, p_rows, dz):
    """Add one block of codes' contribution to dz (N, D), token block by token block.

    The code loop is the outer one: its slices enter the token loop as loop operands, so
    they are materialised once. (Sliced inside the token loop, XLA fuses the dynamic slices
    into the elementwise loop above and redoes their indexing per element: 4x slower.)
    """
    def body(start, width, dz):
      zc = lax.dynamic_slice_in_dim(z_hat, start, width)
      acc = lax.dynamic_slice_in_dim(dz, start, width)
      acc = acc + block_grad(zc, start, e_rows, den_rows, p_rows)
      return lax.dynamic_update_slice_in_dim(dz, acc, start, 0)

    return _for_token_blocks(n, chunk, body, dz)

  e_full, e_tail = _split(e_hat, rows)
  den_full, den_tail = _split(log_den, rows)
  # P's token indices as (k, rows) per block: rows of the mask are then contiguous.
  p_full, p_tail = _split(top_i, rows)
  dz = jnp.zeros((n, d), jnp.float32)
  if e_full is not None:
    p_full = jnp.swapaxes(p_full, 1, 2)
    if e_full.shape[0] == 1:
      dz = rows_grad(e_full[0], den_full[0], p_full[0], dz)
    else:
      dz = lax.fori_loop(0, e_full.shape[0],
                         lambda j, dz: rows_grad(e_full[j], den_full[j], p_full[j], dz), dz)
  if e_tail is not None:
    dz = rows_grad(e_tail, den_tail, p_tail.T, dz)
  # P entries: dL/dl = (1/K) (exp(l - log_den) - exp(l - log_num)), then through the margin
  # (autodiff of the same expression, so the clip's edges behave as in the naive form).
  pos, margin_vjp = jax.vjp(lambda v: _margin_logit(v, s, m), top_v)
  g_pos = scale * (jnp.exp(pos - log_den[:, None]) - jnp.exp(pos - log_num[:, None]))
  (g_pos,) = margin_vjp(g_pos)
  code_of = jnp.broadcast_to(jnp.arange(k_rows)[:, None], top_i.shape).reshape(-1)
  dz = dz.at[top_i.reshape(-1)].add(g_pos.reshape(-1, 1) * e_hat[code_of])
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

  z: (N, D); codebook: (K, D) (compared in float32) -> (N,) int32. cosine: argmax_k of
  <z/||z||, e_k/||e_k||>; euclidean: argmin_k ||e_k||^2 - 2 <z, e_k>. Ties go to the lowest
  index, NaN scores win (as jnp.argmax / argmin). Tokens go in chunks of `chunk_size` (None:
  blocks of about NEAREST_BLOCK_ELEMENTS) and, when K > code_chunk_size, codes in chunks of
  code_chunk_size with a running best: no block is larger than (chunk_size, code_chunk_size).
  """
  if distance not in DISTANCES:
    raise ValueError(f"unknown distance {distance!r}; expected one of {DISTANCES}")
  z, codebook = z.astype(jnp.float32), codebook.astype(jnp.float32)
  n = z.shape[0]
  k_rows = codebook.shape[0]
  kc = min(k_rows, int(code_chunk_size))
  if chunk_size is None:
    chunk_size = auto_chunk_size(kc, NEAREST_BLOCK_ELEMENTS)
  chunk = min(n, int(chunk_size))
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
    # The first position holding the max: jnp.argmax's answer (a variadic reduce is ~10x
    # slower on CPU). A NaN makes the max NaN, and then the first NaN wins, as in jnp.argmax.
    return best, _first((score == best[:, None]) | jnp.isnan(score)) + start

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
      tail_start = k_rows - code_tail.shape[0]
      best, idx = merge(best, idx, *block_best(zc, code_tail, offset_tail, tail_start))
    return idx

  full, tail = _split(z, chunk)
  parts = []
  if full is not None:
    parts.append(lax.map(token_chunk, full).reshape(-1))
  if tail is not None:
    parts.append(token_chunk(tail))
  return (jnp.concatenate(parts) if len(parts) > 1 else parts[0]).astype(jnp.int32)
