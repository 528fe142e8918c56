"""ArcLoss and nearest-code search computed in blocks (docs/math.md, section 9).

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

Search. Tokens in chunks, codes in chunks with a running (best score, index): a later block
wins only when strictly better, so ties go to the lowest index as in jnp.argmax.
`arc_loss_and_nearest_blocked` takes the cosine search from the ArcLoss's own blocks instead
(each block's per-token maxima, merged the same way from block of codes to block of codes),
so the K x N cosines are computed once.

On a device mesh (`arc_loss_sharded`, `nearest_code_sharded`), inside jax.shard_map with
explicit collectives. ArcLoss: the normalised tokens of the global batch are gathered
(N x D) and the codebook ROWS are split over the devices (a codebook split along K keeps its
shards), each device going through its rows in blocks over all N tokens; a psum makes the
mean. Search:
each device searches its tokens against its slice of the codebook, and a global arg-max
(pmax of the scores, pmin of the indices that hold it) combines the slices.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P

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
# The search comes out of the ArcLoss's pass (`arc_loss_and_nearest_blocked`, chosen by
# quantizers.arcvq) for codebooks up to this size. Forward + backward + search, apart -> in one
# pass, ms (bench/bench_arcloss.py --nearest): K 512, D 64, N 6272: 7.4 -> 6.3; N 50176:
# 57.2 -> 46.5; K 1024, D 64, N 6272: 14.4 -> 11.7; K 2048, D 64: 29.0 -> 22.0; K 2048, D 16,
# N 32768: 78.2 -> 70.7; K 1024, D 256 (the VQGAN's), N 8192: 47.2 -> 37.3. Larger codebooks
# gain nothing or lose (K 4096, D 16: -30 .. +6 ms; K 16384, D 16: 526 -> 544-590): the
# per-token maxima go down the columns of each block of codes, which costs more than the
# separate search's rows once its dot is cheap (small D).
SEARCH_IN_ARC_MAX_CODES = 2048
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


def dividing_chunk_size(n: int, chunk: int, multiple: int = TOP_K_GROUP) -> int:
  """The largest multiple of `multiple` in [chunk / 2, chunk] that divides n (no tail block),
  else `chunk`. A tail block costs the ArcLoss more than its share on CPU: at K 512, D 64,
  N 6272 (one 4096 block and a 2176 tail) 6.4 ms against 5.1 ms in two blocks of 3136, and
  N 7808 11.3 against 7.6 ms (forward + backward; equal at N 50176)."""
  for c in range(chunk - chunk % multiple, chunk // 2 - 1, -multiple):
    if c > 0 and n % c == 0:
      return c
  return chunk


def _top_k(x: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
  """lax.top_k(x, k) along the last axis of x (R, L): values (R, k), indices (R, k) int32.

  Sorted, ties to the lowest index. Short rows take k rounds of (max, first index of it):
  XLA's TopK costs ~130 ns per row plus ~2.5 ns per entry of a short row on CPU, which
  dominates for large codebooks. Long rows go to XLA's TopK, behind an optimization barrier:
  without it XLA fuses the slices of the indices into their consumers, no longer sees
  sort+slice as a top-k, and sorts the whole block (60x slower). x rides through the barrier
  too: a barrier on the bare (values, indices) pair is simplified into one on the TopK
  instruction itself, which XLA's TopK decomposer then fails on in an SPMD program (a CHECK
  failure, "optimization_barrier ... cannot be downcasted to GetTupleElement", jax 0.10).
  """
  width = x.shape[1]
  if width > SHORT_ROW:
    values, indices, _ = lax.optimization_barrier((*lax.top_k(x, k), x))
    return values, indices
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


def _first(hit: jax.Array, axis: int = 1) -> jax.Array:
  """(R, L) bool -> (R,) int32: the first True position of each row (L if none); axis=0:
  of each column, (L,) (R if none).

  A max over floats: XLA on CPU reduces int32 rows several times slower than float32 ones
  (exact: positions are integers below 2**24).
  """
  width = hit.shape[axis]
  neg_pos = -lax.iota(jnp.float32, width)
  neg_pos = neg_pos[None, :] if axis == 1 else neg_pos[:, None]
  return (-jnp.max(jnp.where(hit, neg_pos, -float(width)), axis=axis)).astype(jnp.int32)


def _split(x: jax.Array, chunk: int) -> tuple[jax.Array | None, jax.Array | None]:
  """(N, ...) -> full chunks (N // C, C, ...) and the tail (N % C, ...); None where empty."""
  n = x.shape[0]
  num = n // chunk
  full = x[: num * chunk].reshape(num, chunk, *x.shape[1:]) if num else None
  tail = x[num * chunk :] if n % chunk else None
  return full, tail


def _margin_logit(c: jax.Array, s: float, m: float) -> jax.Array:
  """s * cos(theta + m), theta = arccos(clip(c)): the same expression as quantization.arc_loss."""
  theta = jnp.arccos(jnp.clip(c, -1.0 + ARCCOS_CLIP, 1.0 - ARCCOS_CLIP))
  return s * jnp.cos(theta + m)


def _vary_like(tree, *refs):
  """`tree` marked as varying over every mesh axis that one of `refs` varies over.

  Inside jax.shard_map a loop's carry must keep its type: a carry that starts as a constant
  (the same on every device) but is updated from per-device data needs the mark up front.
  Outside shard_map nothing varies and this is the identity.
  """
  return _vary_over(tree, frozenset().union(*(_varying_axes(r) for r in refs)))


def _vary_over(tree, axes):
  """`tree` marked as varying over the mesh axes `axes` (pcast; its transpose is a psum)."""

  def mark(x):
    missing = tuple(sorted(frozenset(axes) - _varying_axes(x)))
    return lax.pcast(x, missing, to="varying") if missing else x

  return jax.tree.map(mark, tree)


def _varying_axes(x) -> frozenset:
  """The mesh axes x varies over inside jax.shard_map (its type's 'V:' set)."""
  aval = jax.typeof(x)
  mat = getattr(aval, "manual_axis_type", None)  # jax 0.10; older releases: aval.vma
  return mat.varying if mat is not None else getattr(aval, "vma", frozenset())


def _any_equal(iota_len: int, idx: jax.Array) -> jax.Array:
  """(R, L) bool: position p of row r is one of idx[r, :] (idx (R, k) int32)."""
  pos = lax.iota(jnp.int32, iota_len)[None, :]
  hit = pos == idx[:, :1]
  for j in range(1, idx.shape[1]):
    hit |= pos == idx[:, j : j + 1]
  return hit


# --------------------------------------------------------------------------- ArcLoss


def arc_loss_blocked(
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
  BLOCK_ELEMENTS floats (`auto_chunk_size`), as many as divide N evenly where one does
  (`dividing_chunk_size`). Memory is O(block + N * D + K), never O(K * N).
  """
  return _arc_loss_blocked(
    "arc_loss_blocked", z, codebook, s, m, top_k, chunk_size, code_chunk_size, False
  )[0]


def arc_loss_and_nearest_blocked(
  z: jax.Array,
  codebook: jax.Array,
  s: float,
  m: float,
  top_k: int,
  chunk_size: int | None = None,
  code_chunk_size: int | None = None,
) -> tuple[jax.Array, jax.Array]:
  """(`arc_loss_blocked`, `nearest_code_blocked(z, codebook, 'cosine')`) in one pass.

  The search's cosines are the ArcLoss's own: each block of them also gives, per token, its
  best code in the block (the first index of the maximum, NaN first, as jnp.argmax), merged
  over the blocks of codes in increasing order. The separate search computes the same K x N
  cosines again: at K 512, D 64, ArcLoss forward + backward and search took 7.4 ms apart and
  6.3 in one pass at N 6272, 57.2 and 46.5 at N 50176 (bench/bench_arcloss.py --nearest).
  Indices: (N,) int32, without gradient.
  """
  return _arc_loss_blocked(
    "arc_loss_and_nearest_blocked", z, codebook, s, m, top_k, chunk_size, code_chunk_size, True
  )


def _arc_loss_blocked(fn, z, codebook, s, m, top_k, chunk_size, code_chunk_size, with_nearest):
  """`arc_loss_blocked`'s work: (the loss, the nearest codes or None); fn names the caller
  in errors."""
  n, k_rows = z.shape[0], codebook.shape[0]
  if not 1 <= top_k <= n:
    raise ValueError(f"{fn}: top_k={top_k} must be in [1, N={n}]")
  if not s > 0:
    raise ValueError(f"{fn}: s={s} must be positive")
  rows = min(k_rows, ARC_CODE_CHUNK if code_chunk_size is None else int(code_chunk_size))
  chunk = dividing_chunk_size(n, auto_chunk_size(rows)) if chunk_size is None else int(chunk_size)
  if chunk < 1 or rows < 1:
    raise ValueError(f"{fn}: chunk sizes must be positive, got {chunk_size}, {code_chunk_size}")
  # float32 whatever the networks compute in (docs/math.md, section 1).
  z = z.astype(jnp.float32)
  e_hat = l2_normalize(sg(codebook).astype(jnp.float32))
  losses, nearest = _arc_rows(
    l2_normalize(z), e_hat, float(s), float(m), int(top_k), min(chunk, n), rows, with_nearest
  )
  return jnp.mean(losses), nearest


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
  rest = (
    rest * jnp.exp(shift - new_shift)
    + outside * jnp.exp(block_shift - new_shift)
    + jnp.sum(missed, axis=1)
  )
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


def _for_code_blocks(rows: int, fn, codes: jax.Array, carry=None):
  """fn(code rows, index of the first, carry) -> (pytree of (r, ...) arrays, carry), over
  blocks of `rows` codes of codes (K, D) in order: a scan over the full blocks, then the
  tail. Returns the outputs concatenated back to (K, ...) and the last carry."""
  full, tail = _split(codes, rows)
  outs = []
  if full is not None and full.shape[0] == 1:
    out, carry = fn(full[0], 0, carry)
    outs.append(out)
  elif full is not None:
    starts = jnp.arange(full.shape[0], dtype=jnp.int32) * rows
    carry, out = lax.scan(lambda c, xs: fn(*xs, c)[::-1], carry, (full, starts))
    outs.append(jax.tree.map(lambda r: r.reshape(-1, *r.shape[2:]), out))
  if tail is not None:
    out, carry = fn(tail, codes.shape[0] - tail.shape[0], carry)
    outs.append(out)
  outs = outs[0] if len(outs) == 1 else jax.tree.map(lambda *r: jnp.concatenate(r), *outs)
  return outs, carry


def _best_of_columns(c: jax.Array) -> tuple[jax.Array, jax.Array]:
  """c (R, C) -> per column, the maximum (C,) and the first row holding it (C,) int32; a NaN
  makes the maximum NaN and the first NaN wins (jnp.argmax(c, axis=0))."""
  best = jnp.max(c, axis=0)
  # Down the columns: a transpose of the block would cost more than the max.
  return best, _first((c == best[None, :]) | jnp.isnan(c), axis=0)


def _arc_forward(z_hat, e_hat, s, m, top_k, chunk, rows, with_nearest=False):
  """P_k as values (K, k) and token indices (K, k); log_den, log_num (K,); and with_nearest,
  each token's nearest code (N,) int32 (the arg-max of its cosines), else None.

  Rows of the codebook are independent: each block of `rows` codes makes one pass over
  the tokens. The nearest codes are a running (best cosine, index) per token, (N,) each,
  carried from block of codes to block of codes.
  """
  n = z_hat.shape[0]

  def row_block(e_rows, first_row, nearest):
    r = e_rows.shape[0]
    init = (
      jnp.full((r, top_k), -jnp.inf, jnp.float32),
      jnp.full((r, top_k), n, jnp.int32),
      jnp.full((r,), -jnp.inf, jnp.float32),
      jnp.zeros((r,), jnp.float32),
    )
    init = _vary_like(init, e_rows, z_hat)

    def body(start, width, state):
      carry, nearest = state
      zc = lax.dynamic_slice_in_dim(z_hat, start, width)
      c = e_rows @ zc.T
      if nearest is not None:
        # A later block of codes takes a token only when strictly better (_merge_best).
        col_best, col_idx = _best_of_columns(c)
        best, idx = (lax.dynamic_slice_in_dim(a, start, width) for a in nearest)
        merged = _merge_best(best, idx, col_best, col_idx + first_row)
        nearest = tuple(
          lax.dynamic_update_slice_in_dim(a, b, start, 0)
          for a, b in zip(nearest, merged, strict=True)
        )
      return _absorb_block(carry, c, start, s, top_k), nearest

    (top_v, top_i, shift, rest), nearest = _for_token_blocks(n, chunk, body, (init, nearest))
    log_num = jax.nn.logsumexp(_margin_logit(top_v, s, m), axis=1)
    # rest is 0 when N == top_k: its log is -inf and logaddexp ignores it.
    log_den = jnp.logaddexp(shift + jnp.log(rest), log_num)
    return (top_v, top_i, log_den, log_num), nearest

  nearest = None
  if with_nearest:
    nearest = (jnp.full((n,), -jnp.inf, jnp.float32), jnp.zeros((n,), jnp.int32))
  out, nearest = _for_code_blocks(rows, row_block, e_hat, _vary_like(nearest, z_hat, e_hat))
  return (*out, None if nearest is None else nearest[1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4, 5, 6, 7))
def _arc_rows(z_hat, e_hat, s, m, top_k, chunk, rows, with_nearest=False):
  """The per-row losses L_k = log_den_k - log_num_k, (K,), whose mean is ArcLoss, and with
  with_nearest each token's nearest code (N,) int32 (no gradient), else None."""
  _, _, log_den, log_num, nearest = _arc_forward(
    z_hat, e_hat, s, m, top_k, chunk, rows, with_nearest
  )
  return log_den - log_num, nearest


def _arc_rows_fwd(z_hat, e_hat, s, m, top_k, chunk, rows, with_nearest=False):
  top_v, top_i, log_den, log_num, nearest = _arc_forward(
    z_hat, e_hat, s, m, top_k, chunk, rows, with_nearest
  )
  return (log_den - log_num, nearest), (z_hat, e_hat, top_v, top_i, log_den, log_num)


def _arc_rows_bwd(s, m, top_k, chunk, rows, with_nearest, res, ct):
  del with_nearest
  ct = ct[0]  # the indices' cotangent is float0
  z_hat, e_hat, top_v, top_i, log_den, log_num = res
  n, d = z_hat.shape
  k_rows = e_hat.shape[0]
  scale = ct  # (K,) dLoss / dL_k: 1/K under the mean, 0 for padding rows of a sharded loss

  def block_grad(zc, start, e_rows, den_rows, scale_rows, p_rows):
    """One (C, rows) block: dL_k/dc = s softmax_i(l) outside P, times dLoss/dL_k and the
    codes: (C, D)."""
    # Recomputed as (C, rows): g @ e_rows is then a plain matmul, 2.5x faster on CPU than
    # g.T @ e_rows with g (rows, C).
    c = zc @ e_rows.T
    # P entries are masked by token index and added below: their plain weight
    # exp(s c - log_den) can overflow once the margin makes s c much larger than the logits
    # in log_den (large s * m).
    tokens = start + lax.iota(jnp.int32, zc.shape[0])[:, None]
    in_p = tokens == p_rows[:1]
    for j in range(1, top_k):
      in_p |= tokens == p_rows[j : j + 1]
    g = jnp.where(in_p, 0.0, (s * scale_rows)[None, :] * jnp.exp(s * c - den_rows[None, :]))
    return g @ e_rows

  def rows_grad(e_rows, den_rows, scale_rows, p_rows, dz):
    """Add one block of codes' contribution to dz (N, D), token block by token block.

    The code loop is the outer one: its slices enter the token loop as loop operands, so
    they are materialised once. (Sliced inside the token loop, XLA fuses the dynamic slices
    into the elementwise loop above and redoes their indexing per element: 4x slower.)
    """

    def body(start, width, dz):
      zc = lax.dynamic_slice_in_dim(z_hat, start, width)
      acc = lax.dynamic_slice_in_dim(dz, start, width)
      acc = acc + block_grad(zc, start, e_rows, den_rows, scale_rows, p_rows)
      return lax.dynamic_update_slice_in_dim(dz, acc, start, 0)

    return _for_token_blocks(n, chunk, body, dz)

  e_full, e_tail = _split(e_hat, rows)
  den_full, den_tail = _split(log_den, rows)
  scale_full, scale_tail = _split(scale, rows)
  # P's token indices as (k, rows) per block: rows of the mask are then contiguous.
  p_full, p_tail = _split(top_i, rows)
  dz = _vary_like(jnp.zeros((n, d), jnp.float32), z_hat, e_hat, ct)
  if e_full is not None:
    p_full = jnp.swapaxes(p_full, 1, 2)
    if e_full.shape[0] == 1:
      dz = rows_grad(e_full[0], den_full[0], scale_full[0], p_full[0], dz)
    else:
      # Each code block's slices ride in the loop carry, taken one iteration ahead: a carry is
      # a buffer of its own. Sliced where they are used, XLA fuses the slices into the
      # elementwise loop of block_grad whenever the token loop has a single block (N <= chunk),
      # redoing their indexing per element: 2x slower at N = 4096, K = 100,000.
      blocks = (e_full, den_full, scale_full, p_full)
      last = e_full.shape[0] - 1

      def code_block(j, carry):
        dz, current = carry
        upcoming = tuple(
          lax.dynamic_index_in_dim(a, jnp.minimum(j + 1, last), keepdims=False) for a in blocks
        )
        return rows_grad(*current, dz), upcoming

      dz, _ = lax.fori_loop(0, last + 1, code_block, (dz, tuple(a[0] for a in blocks)))
  if e_tail is not None:
    dz = rows_grad(e_tail, den_tail, scale_tail, p_tail.T, dz)
  # P entries: dL_k/dl = exp(l - log_den) - exp(l - log_num), then through the margin
  # (autodiff of the same expression, so the clip's edges behave as in the naive form).
  pos, margin_vjp = jax.vjp(lambda v: _margin_logit(v, s, m), top_v)
  g_pos = scale[:, None] * (jnp.exp(pos - log_den[:, None]) - jnp.exp(pos - log_num[:, None]))
  (g_pos,) = margin_vjp(g_pos)
  code_of = jnp.broadcast_to(jnp.arange(k_rows)[:, None], top_i.shape).reshape(-1)
  dz = dz.at[top_i.reshape(-1)].add(g_pos.reshape(-1, 1) * e_hat[code_of])
  return dz, _vary_like(jnp.zeros_like(e_hat), e_hat)


_arc_rows.defvjp(_arc_rows_fwd, _arc_rows_bwd)


# --------------------------------------------------------------------------- search


def nearest_code_blocked(
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
  return _nearest_best(z, codebook, distance, chunk_size, code_chunk_size)[1]


def _nearest_best(z, codebook, distance, chunk_size=None, code_chunk_size=CODE_CHUNK):
  """(best score (N,) float32, its index (N,) int32) of `nearest_code_blocked`; the score is
  maximised: the cosine, or -(||e||^2 - 2 <z, e>) for Euclidean distance."""
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
    # Euclidean: the naive form's expression, negated (exactly) so that both distances maximise.
    score = zc @ ec.T if distance == "cosine" else -(oc[None, :] - 2.0 * zc @ ec.T)
    best = jnp.max(score, axis=1)
    # The first position holding the max: jnp.argmax's answer (a variadic reduce is ~10x
    # slower on CPU). A NaN makes the max NaN, and then the first NaN wins, as in jnp.argmax.
    return best, _first((score == best[:, None]) | jnp.isnan(score)) + start

  def token_chunk(zc):
    best = jnp.full((zc.shape[0],), -jnp.inf, jnp.float32)
    idx = jnp.zeros((zc.shape[0],), jnp.int32)
    best, idx = _vary_like((best, idx), zc, codes)
    if code_full is not None and code_full.shape[0] == 1:
      best, idx = block_best(zc, code_full[0], offset_full[0], 0)
    elif code_full is not None:

      def step(carry, xs):
        return _merge_best(*carry, *block_best(zc, *xs)), None

      starts = jnp.arange(code_full.shape[0], dtype=jnp.int32) * kc
      (best, idx), _ = lax.scan(step, (best, idx), (code_full, offset_full, starts))
    if code_tail is not None:
      tail_start = k_rows - code_tail.shape[0]
      best, idx = _merge_best(best, idx, *block_best(zc, code_tail, offset_tail, tail_start))
    return best, idx

  full, tail = _split(z, chunk)
  parts = []
  if full is not None:
    parts.append(jax.tree.map(lambda a: a.reshape(-1), lax.map(token_chunk, full)))
  if tail is not None:
    parts.append(token_chunk(tail))
  best, idx = parts[0] if len(parts) == 1 else jax.tree.map(lambda *a: jnp.concatenate(a), *parts)
  return best, idx.astype(jnp.int32)


def _merge_best(best, idx, b, i):
  """The running best (score, index) and a later block's (b, i), all of higher index: strictly
  better only, so the earlier (lower-index) code keeps a tie; a NaN stays."""
  better = (b > best) | (jnp.isnan(b) & ~jnp.isnan(best))
  return jnp.where(better, b, best), jnp.where(better, i, idx)


# --------------------------------------------------------------------------- on a mesh
#
# Both functions below run inside jax.shard_map, so every collective is explicit and XLA's
# SPMD partitioner never sees the block loops (on a batch partitioned by jit alone, XLA's TopK
# decomposer crashed on the blocked ArcLoss in jax 0.10).
#
# The batch (N tokens) is split over `batch_axes`; the codebook is split along K over
# `codebook_axis` (a mesh axis, possibly one of the batch axes) or replicated (None).


def _axes(axes) -> tuple[str, ...]:
  """None, one axis name or a sequence of them -> a tuple of axis names."""
  if axes is None:
    return ()
  return (axes,) if isinstance(axes, str) else tuple(axes)


def _check_mesh_axes(fn: str, mesh, n: int, k_rows: int, batch_axes, codebook_axis) -> None:
  names = tuple(mesh.axis_names)
  for a in (*batch_axes, *_axes(codebook_axis)):
    if a not in names:
      raise ValueError(f"{fn}: mesh axis {a!r} is not one of the mesh's axes {names}")
  data = math.prod(mesh.shape[a] for a in batch_axes)
  if n % data:
    raise ValueError(
      f"{fn}: the {n} tokens do not split evenly over the {data} devices of "
      f"the batch axes {batch_axes}"
    )
  if codebook_axis is not None and k_rows % mesh.shape[codebook_axis]:
    raise ValueError(
      f"{fn}: the {k_rows} codes do not split evenly over the "
      f"{mesh.shape[codebook_axis]} devices of mesh axis {codebook_axis!r}"
    )


def arc_loss_sharded(
  z: jax.Array,
  codebook: jax.Array,
  s: float,
  m: float,
  top_k: int,
  *,
  mesh,
  batch_axes="data",
  codebook_axis: str | None = None,
  chunk_size: int | None = None,
  code_chunk_size: int | None = None,
) -> jax.Array:
  """`arc_loss_blocked` of the global batch on a device mesh: the same value and gradient.

  z: (N, D) split over `batch_axes` (N divisible by their size); codebook: (K, D) split along
  K over `codebook_axis` (K divisible by its size) or replicated (None); mesh: a Mesh (or the
  AbstractMesh of jax.set_mesh). Every row L_k needs all N tokens (its top-k and its
  log-sum-exp), so the normalised tokens are gathered (N x D, small) and the ROWS are split:
  each device takes its codebook shard and, of that, its share by its index along the other
  mesh axes (zero rows pad the last share; they weigh 0). The mean over k is a psum; the
  gradient w.r.t. z comes back by the transpose of the gather (a reduce-scatter). Per device:
  about K / devices rows x N tokens of work, O(block + N * D + K) memory, never K x N.
  """
  batch_axes = _axes(batch_axes)
  n, k_rows = z.shape[0], codebook.shape[0]
  _check_mesh_axes("arc_loss_sharded", mesh, n, k_rows, batch_axes, codebook_axis)
  if not 1 <= top_k <= n:
    raise ValueError(f"arc_loss_sharded: top_k={top_k} must be in [1, N={n}]")
  if not s > 0:
    raise ValueError(f"arc_loss_sharded: s={s} must be positive")
  all_axes = tuple(mesh.axis_names)
  work_axes = tuple(a for a in all_axes if a != codebook_axis)
  share = math.prod(mesh.shape[a] for a in work_axes)
  local_rows = k_rows // (mesh.shape[codebook_axis] if codebook_axis else 1)
  per = -(-local_rows // share)  # rows per device; the last share is padded
  rows = min(per, ARC_CODE_CHUNK if code_chunk_size is None else int(code_chunk_size))
  chunk = min(n, auto_chunk_size(rows) if chunk_size is None else int(chunk_size))
  s, m, top_k = float(s), float(m), int(top_k)

  def local(z_l, e_l):
    z_hat = l2_normalize(z_l.astype(jnp.float32))
    if batch_axes:
      z_hat = lax.all_gather(z_hat, batch_axes, axis=0, tiled=True)  # (N, D), global order
    e_hat = l2_normalize(sg(e_l).astype(jnp.float32))
    first = jnp.zeros((), jnp.int32)
    if share > 1:
      e_hat = jnp.pad(e_hat, ((0, per * share - local_rows), (0, 0)))
      first = lax.axis_index(work_axes) * per
      e_hat = lax.dynamic_slice_in_dim(e_hat, first, per)
    valid = first + lax.iota(jnp.int32, per) < local_rows
    # Each device's rows differ, so everything from here on varies over every axis; marking
    # the tokens so makes their gradient a psum over the axes they were the same on.
    z_hat, e_hat = _vary_over((z_hat, e_hat), all_axes)
    losses, _ = _arc_rows(z_hat, e_hat, s, m, top_k, chunk, rows)
    return lax.psum(jnp.sum(jnp.where(valid, losses, 0.0)), all_axes) / k_rows

  return jax.shard_map(local, mesh=mesh, in_specs=(P(batch_axes), P(codebook_axis)), out_specs=P())(
    z, codebook
  )


def nearest_code_sharded(
  z: jax.Array,
  codebook: jax.Array,
  distance: str,
  *,
  mesh,
  batch_axes="data",
  codebook_axis: str | None = None,
  chunk_size: int | None = None,
  code_chunk_size: int = CODE_CHUNK,
) -> jax.Array:
  """`nearest_code_blocked` on a device mesh: the same indices, (N,) int32 split like z.

  z: (N, D) split over `batch_axes`; codebook (K, D) split along K over `codebook_axis`, or
  replicated (None: every device searches its own tokens against the whole codebook, no
  communication). With a codebook axis each device searches its K / size codes (for the
  tokens of every device along that axis, gathered, when it is also a batch axis) and a
  global arg-max combines the shards: the largest score, ties (and NaNs, which win as in
  jnp.argmax) to the lowest global index, so the answer is the single-device one.
  """
  batch_axes = _axes(batch_axes)
  n, k_rows = z.shape[0], codebook.shape[0]
  _check_mesh_axes("nearest_code_sharded", mesh, n, k_rows, batch_axes, codebook_axis)
  gather = codebook_axis is not None and codebook_axis in batch_axes

  def local(z_l, e_l):
    zz = lax.all_gather(z_l, codebook_axis, axis=0, tiled=True) if gather else z_l
    best, idx = _nearest_best(zz, e_l, distance, chunk_size, code_chunk_size)
    if codebook_axis is None:
      return idx
    shard = lax.axis_index(codebook_axis)
    idx = _argmax_across(best, idx + shard * e_l.shape[0], codebook_axis)
    if gather:  # back to this device's own tokens
      idx = lax.dynamic_slice_in_dim(idx, shard * z_l.shape[0], z_l.shape[0])
    return idx

  # Indices have no gradient; without the stop-gradient autodiff would look for pmax's.
  return jax.shard_map(
    local, mesh=mesh, in_specs=(P(batch_axes), P(codebook_axis)), out_specs=P(batch_axes)
  )(sg(z), sg(codebook))


def _argmax_across(best, idx, axis):
  """Global (best, idx) over mesh `axis` -> the index: jnp.argmax's answer over all shards.

  The first NaN if any shard has one; else the lowest index among those holding the max.
  """
  nan = jnp.isnan(best)
  any_nan = lax.pmax(nan.astype(jnp.int32), axis) > 0
  top = lax.pmax(jnp.where(nan, -jnp.inf, best), axis)
  hit = jnp.where(any_nan, nan, best == top)
  return lax.pmin(jnp.where(hit, idx, jnp.iinfo(jnp.int32).max), axis)
