"""ArcLoss and nearest-code search: the naive K x N form against the blocked one.

  python bench/bench_arcloss.py                 # the default cases below, markdown table
  python bench/bench_arcloss.py --cases 512,64,50176 --runs 20
  python bench/bench_arcloss.py --sweep         # blocked time against block shape
  python bench/bench_arcloss.py --nearest       # also quantization.nearest_code, and the
                                                # search taken from the ArcLoss's pass

Each case is K,D,N. Timed: jax.jit(jax.value_and_grad(loss)) w.r.t. z (forward+backward)
and jax.jit(loss) (forward), median of --runs calls after --warmup, each waited for with
block_until_ready, in two rounds (naive, blocked, naive, blocked) so that load from other
processes hits both alike. Memory: XLA's temporaries of the compiled forward+backward
(memory_analysis().temp_size_in_bytes). The naive form is skipped where those would exceed
--max-naive-gb. Both forms are checked to agree before they are timed.

Block-shape sweep (--sweep --runs 6) on the 2-core CPU this was written on (AMD EPYC, 2 MB L2
per core, 32 MB L3, other jobs running now and then), blocked fwd+bwd ms, s=10, m=0.1,
top_k=3; rows: codes per block, columns: tokens per chunk:

| K | D | N | codes per block | C=1024 | C=2048 | C=4096 | C=8192 |
|---|---|---|---|---|---|---|---|
| 512 | 64 | 6272 | 256 | 9.4 | 7.5 | 7.6 | 8.3 |
| 512 | 64 | 6272 | 512 | 8.3 | 6.9 | 7.8 | 7.4 |
| 512 | 64 | 50176 | 256 | 65.4 | 60.8 | 53.7 | 52.6 |
| 512 | 64 | 50176 | 512 | 56.4 | 53.5 | 53.1 | 68.7 |
| 1024 | 16 | 32768 | 256 | 64.4 | 47.9 | 39.7 | 38.2 |
| 1024 | 16 | 32768 | 512 | 55.4 | 49.4 | 35.9 | 40.7 |
| 1024 | 16 | 32768 | 1024 | 50.8 | 47.7 | 40.8 | 51.7 |
| 16384 | 16 | 32768 | 256 | 711.6 | 594.4 | 543.9 | 459.3 |
| 16384 | 16 | 32768 | 512 | 556.3 | 516.7 | 508.2 | 521.9 |
| 16384 | 16 | 32768 | 1024 | 601.4 | 518.8 | 527.9 | 609.7 |

512 codes x 4096 tokens (8 MB, blockwise.ARC_CODE_CHUNK x BLOCK_ELEMENTS / ARC_CODE_CHUNK) is
the best or within about 10 % of it in every case, and is the default.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from arcvq_jax import blockwise
from arcvq_jax import quantization as vq

DEFAULT_CASES = ["512,64,6272", "512,64,50176", "1024,16,32768", "16384,16,32768"]


def parse_case(text):
  k_rows, d, n = (int(v) for v in text.split(","))
  return k_rows, d, n


def make_data(k_rows, d, n, seed=0):
  kz, ke = jax.random.split(jax.random.key(seed))
  z = jax.random.normal(kz, (n, d), jnp.float32)
  e = vq.l2_normalize(jax.random.normal(ke, (k_rows, d), jnp.float32))
  return z, e


def temp_bytes(fn, *args):
  return fn.lower(*args).compile().memory_analysis().temp_size_in_bytes


def time_each(fns, args, runs, warmup, rounds=2):
  """Median ms of each fn: `rounds` rounds, each fn warmed up then called runs/rounds times
  in a row. (Calls of different fns are not interleaved one by one: the naive form's large
  temporaries, freed and re-mapped on each call, would slow the next call of the other.)"""
  times = [[] for _ in fns]
  per_round = max(1, -(-runs // rounds))
  for _ in range(rounds):
    for fn, ts in zip(fns, times, strict=True):
      for _ in range(warmup):
        jax.block_until_ready(fn(*args))
      for _ in range(per_round):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        ts.append(time.perf_counter() - t0)
  return [1e3 * statistics.median(ts) for ts in times]


def fmt_bytes(b):
  return "-" if b is None else f"{b / 2**20:,.1f} MiB" if b < 2**30 else f"{b / 2**30:.2f} GiB"


def fmt_ms(t):
  return "skipped" if t is None else f"{t:,.1f}"


def arc_row(k_rows, d, n, args):
  s, m, top_k = args.s, args.m, args.top_k
  z, e = make_data(k_rows, d, n)
  naive = lambda a, b: vq.arc_loss(a, b, s, m, top_k)
  blocked = lambda a, b: blockwise.arc_loss_blocked(a, b, s, m, top_k, args.chunk, args.code_chunk)
  forms = [("naive", naive), ("blocked", blocked)]
  fb = {name: jax.jit(jax.value_and_grad(f)) for name, f in forms}
  fw = {name: jax.jit(f) for name, f in forms}
  mem = {name: temp_bytes(f, z, e) for name, f in fb.items()}
  use_naive = mem["naive"] <= args.max_naive_gb * 2**30
  names = ["naive", "blocked"] if use_naive else ["blocked"]
  if use_naive:
    (v0, g0), (v1, g1) = fb["naive"](z, e), fb["blocked"](z, e)
    np.testing.assert_allclose(v1, v0, rtol=1e-5)
    np.testing.assert_allclose(g1, g0, rtol=1e-3, atol=1e-4 * float(jnp.abs(g0).max()))
  t_fb = dict(
    zip(names, time_each([fb[x] for x in names], (z, e), args.runs, args.warmup), strict=True)
  )
  t_fw = dict(
    zip(names, time_each([fw[x] for x in names], (z, e), args.runs, args.warmup), strict=True)
  )
  rows = min(k_rows, args.code_chunk or blockwise.ARC_CODE_CHUNK)
  chunk = min(n, args.chunk or blockwise.auto_chunk_size(rows))
  speed = f"{t_fb['naive'] / t_fb['blocked']:.1f}x" if use_naive else "-"
  cells = [
    k_rows,
    d,
    n,
    f"{rows} x {chunk}",
    fmt_ms(t_fw.get("naive")),
    fmt_ms(t_fw["blocked"]),
    fmt_ms(t_fb.get("naive")),
    fmt_ms(t_fb["blocked"]),
    speed,
    fmt_bytes(mem["naive"]),
    fmt_bytes(mem["blocked"]),
  ]
  return "| " + " | ".join(str(c) for c in cells) + " |"


def nearest_row(k_rows, d, n, args):
  z, e = make_data(k_rows, d, n)
  out = []
  for distance in ("cosine", "euclidean"):
    naive = jax.jit(functools.partial(vq.nearest_code, distance=distance))
    blocked = jax.jit(functools.partial(blockwise.nearest_code_blocked, distance=distance))
    mem = [temp_bytes(naive, z, e), temp_bytes(blocked, z, e)]
    use_naive = mem[0] <= args.max_naive_gb * 2**30
    fns = [naive, blocked] if use_naive else [blocked]
    if use_naive:
      np.testing.assert_array_equal(naive(z, e), blocked(z, e))
    ts = time_each(fns, (z, e), args.runs, args.warmup)
    t_naive = ts[0] if use_naive else None
    out.append(
      f"| {k_rows} | {d} | {n} | {distance} | {fmt_ms(t_naive)} | {ts[-1]:,.1f} | "
      f"{fmt_bytes(mem[0])} | {fmt_bytes(mem[1])} |"
    )
  return out


def together_row(k_rows, d, n, args):
  """ArcLoss forward + backward and the cosine search: apart (`arc_loss_blocked`,
  `nearest_code_blocked`) and in one pass (`arc_loss_and_nearest_blocked`, as ArcVQ runs them
  where both are blocked on one device)."""
  z, e = make_data(k_rows, d, n)
  settings = dict(
    s=args.s, m=args.m, top_k=args.top_k, chunk_size=args.chunk, code_chunk_size=args.code_chunk
  )
  loss = functools.partial(blockwise.arc_loss_blocked, **settings)
  apart = jax.jit(
    lambda a, b: (jax.value_and_grad(loss)(a, b), blockwise.nearest_code_blocked(a, b, "cosine"))
  )
  both = functools.partial(blockwise.arc_loss_and_nearest_blocked, **settings)

  @jax.jit
  def together(a, b):
    (value, indices), grad = jax.value_and_grad(both, has_aux=True)(a, b)
    return (value, grad), indices

  ((v0, g0), i0), ((v1, g1), i1) = apart(z, e), together(z, e)
  np.testing.assert_array_equal(i1, i0)
  np.testing.assert_allclose(v1, v0, rtol=1e-6)
  np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-6 * float(jnp.abs(g0).max()))
  t_apart, t_together = time_each([apart, together], (z, e), args.runs, args.warmup)
  return (
    f"| {k_rows} | {d} | {n} | {t_apart:,.1f} | {t_together:,.1f} | {t_apart - t_together:,.1f} |"
  )


def sweep(args):
  """Blocked fwd+bwd ms for each block shape (codes per block x tokens per chunk)."""
  chunks = (1024, 2048, 4096, 8192)
  print("| K | D | N | codes per block | " + " | ".join(f"C={c}" for c in chunks) + " |")
  print("|---" * (4 + len(chunks)) + "|")
  for case in args.cases:
    k_rows, d, n = parse_case(case)
    z, e = make_data(k_rows, d, n)
    configs = [(r, c) for r in (256, 512, 1024) if r <= k_rows for c in chunks]
    fns = [
      jax.jit(
        jax.value_and_grad(
          functools.partial(
            blockwise.arc_loss_blocked,
            s=args.s,
            m=args.m,
            top_k=args.top_k,
            chunk_size=c,
            code_chunk_size=r,
          )
        )
      )
      for r, c in configs
    ]
    ts = dict(zip(configs, time_each(fns, (z, e), args.runs, args.warmup), strict=True))
    for r in sorted({r for r, _ in configs}):
      print(
        f"| {k_rows} | {d} | {n} | {r} | " + " | ".join(f"{ts[r, c]:.1f}" for c in chunks) + " |",
        flush=True,
      )


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--cases", nargs="+", default=DEFAULT_CASES, help="K,D,N triples")
  parser.add_argument("--runs", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--s", type=float, default=10.0)
  parser.add_argument("--m", type=float, default=0.1)
  parser.add_argument("--top-k", type=int, default=3)
  parser.add_argument("--chunk", type=int, default=None, help="tokens per block (default: auto)")
  parser.add_argument(
    "--code-chunk",
    type=int,
    default=None,
    help="codes per ArcLoss block (default: blockwise.ARC_CODE_CHUNK)",
  )
  parser.add_argument(
    "--max-naive-gb",
    type=float,
    default=6.0,
    help="skip the naive form where its temporaries exceed this",
  )
  parser.add_argument(
    "--sweep", action="store_true", help="blocked fwd+bwd time per block shape instead"
  )
  parser.add_argument("--nearest", action="store_true", help="also time nearest-code search")
  args = parser.parse_args()

  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
    f"s={args.s} m={args.m} top_k={args.top_k}; median of {args.runs} runs, ms\n"
  )
  if args.sweep:
    sweep(args)
    return
  print(
    "| K | D | N | block (codes x tokens) | fwd naive | fwd blocked | fwd+bwd naive "
    "| fwd+bwd blocked | speed-up (fwd+bwd) | temp naive | temp blocked |"
  )
  print("|---" * 11 + "|")
  for case in args.cases:
    print(arc_row(*parse_case(case), args), flush=True)
  if args.nearest:
    print("\n| K | D | N | distance | naive | blocked | temp naive | temp blocked |")
    print("|---" * 8 + "|")
    for case in args.cases:
      for row in nearest_row(*parse_case(case), args):
        print(row, flush=True)
    print("\n| K | D | N | ArcLoss fwd+bwd and search, apart | in one pass | saved ms |")
    print("|---" * 6 + "|")
    for case in args.cases:
      print(together_row(*parse_case(case), args), flush=True)


if __name__ == "__main__":
  main()
