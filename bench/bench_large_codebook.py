"""Large codebooks: peak memory and time of ArcLoss and the nearest-code search, naive vs blocked.

  python bench/bench_large_codebook.py                       # N 32768, K 1024/16384/100000, D 16/64
  python bench/bench_large_codebook.py --ks 16384 --ds 16 --runs 6

For each (K, D) at N tokens:
- ArcLoss, forward + backward: jax.jit(jax.value_and_grad(loss)) w.r.t. z (N, D), naive
  (quantization.arc_loss, K x N logits) against blocked (blockwise.arc_loss_blocked);
- the nearest-code search (cosine; --distance euclidean for the other): jax.jit(search),
  naive (quantization.nearest_code, N x K scores) against blocked
  (blockwise.nearest_code_blocked). The search has no backward pass: its indices carry no
  gradient (the straight-through estimator goes around it), so only its forward is timed.

Peak memory is XLA's account of the compiled program: arguments + outputs + temporaries
(compiled.memory_analysis()), what the device must hold at once. It is computed for every
form, also where the naive one is too large to run: that form is then compiled but not run
(its time reads 'skipped') when its peak exceeds --max-naive-gb (default 6.5 GiB, on a
23 GiB machine shared with other jobs). Time: median of --runs calls after a warm-up, in two
rounds (naive, blocked, naive, blocked) so that load from other processes hits both alike
(bench_arcloss.time_each). Where both run, they are first checked to agree (value and
gradient to float32 round-off; indices exactly).

  python bench/bench_large_codebook.py --mesh-devices 8    # per-device memory on a mesh

--mesh-devices P instead compiles (without running: simulated CPU devices share the cores,
so their times mean nothing) the sharded forms on P simulated devices, batch and codebook
both split over 'data' (blockwise.arc_loss_sharded / nearest_code_sharded with
codebook_axis='data'), and prints XLA's peak per device.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

if "--mesh-devices" in sys.argv:  # before jax is imported
  _devices = sys.argv[sys.argv.index("--mesh-devices") + 1]
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={_devices}"
  )

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import numpy as np
from bench_arcloss import fmt_bytes, make_data, time_each
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from arcvq_jax import blockwise, sharding
from arcvq_jax import quantization as vq


def peak_bytes(fn, *args) -> int:
  """XLA's arguments + outputs + temporaries of the compiled fn(*args)."""
  m = fn.lower(*args).compile().memory_analysis()
  return m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes


def measure(naive, blocked, z, e, args, check):
  """(times ms [naive or None, blocked], peaks [naive, blocked]) of two jitted forms."""
  peaks = [peak_bytes(naive, z, e), peak_bytes(blocked, z, e)]
  run_naive = peaks[0] <= args.max_naive_gb * 2**30
  if run_naive:
    check(naive(z, e), blocked(z, e))
  fns = [naive, blocked] if run_naive else [blocked]
  times = time_each(fns, (z, e), args.runs, args.warmup)
  return ([times[0], times[1]] if run_naive else [None, times[0]]), peaks


def check_arc(want, got):
  (v0, g0), (v1, g1) = want, got
  np.testing.assert_allclose(v1, v0, rtol=1e-5)
  g0, g1 = np.asarray(g0), np.asarray(g1)
  np.testing.assert_allclose(g1, g0, rtol=1e-3, atol=1e-4 * np.abs(g0).max())


def check_search(want, got):
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def mesh_memory(args):
  """Per-device peak of the sharded forms (compiled, not run) on a mesh of all devices."""
  mesh = sharding.make_mesh((-1,), ("data",))
  split = NamedSharding(mesh, P("data"))
  print(f"{mesh.size} devices, batch and codebook split over 'data'; peak per device\n")
  print(
    "| K | D | ArcLoss fwd+bwd, 1 device | ArcLoss fwd+bwd, per device | search, 1 device | "
    "search, per device |"
  )
  print("|---" * 6 + "|")
  for k_rows in args.ks:
    for d in args.ds:
      z = jax.ShapeDtypeStruct((args.n, d), np.float32, sharding=split)
      e = jax.ShapeDtypeStruct((k_rows, d), np.float32, sharding=split)
      z1, e1 = jax.ShapeDtypeStruct(z.shape, z.dtype), jax.ShapeDtypeStruct(e.shape, e.dtype)
      arc = jax.jit(
        jax.value_and_grad(
          lambda a, b: blockwise.arc_loss_sharded(
            a, b, args.s, args.m, args.top_k, mesh=mesh, codebook_axis="data"
          )
        )
      )
      arc1 = jax.jit(
        jax.value_and_grad(
          lambda a, b: blockwise.arc_loss_blocked(a, b, args.s, args.m, args.top_k)
        )
      )
      search = jax.jit(
        lambda a, b: blockwise.nearest_code_sharded(
          a, b, args.distance, mesh=mesh, codebook_axis="data"
        )
      )
      search1 = jax.jit(functools.partial(blockwise.nearest_code_blocked, distance=args.distance))
      print(
        f"| {k_rows} | {d} | {fmt_bytes(peak_bytes(arc1, z1, e1))} | "
        f"{fmt_bytes(peak_bytes(arc, z, e))} | {fmt_bytes(peak_bytes(search1, z1, e1))} | "
        f"{fmt_bytes(peak_bytes(search, z, e))} |",
        flush=True,
      )


def fmt_ms(t):
  return "skipped" if t is None else f"{t:,.0f}"


def ratio(a, b, fmt):
  return "-" if a is None or b is None else fmt.format(a / b)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--n", type=int, default=32768, help="tokens N")
  parser.add_argument("--ks", type=int, nargs="+", default=[1024, 16384, 100000])
  parser.add_argument("--ds", type=int, nargs="+", default=[16, 64])
  parser.add_argument("--runs", type=int, default=4)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--s", type=float, default=10.0)
  parser.add_argument("--m", type=float, default=0.1)
  parser.add_argument("--top-k", type=int, default=3)
  parser.add_argument("--distance", default="cosine", choices=vq.DISTANCES)
  parser.add_argument(
    "--max-naive-gb",
    type=float,
    default=6.5,
    help="compile but do not run a naive form whose peak exceeds this",
  )
  parser.add_argument("--skip-search", action="store_true")
  parser.add_argument("--skip-arc", action="store_true")
  parser.add_argument(
    "--mesh-devices",
    type=int,
    default=0,
    help="per-device memory of the sharded forms on this many CPU devices",
  )
  args = parser.parse_args()
  if args.mesh_devices:
    mesh_memory(args)
    return

  print(
    f"jax {jax.__version__}, backend {jax.default_backend()}, {os.cpu_count()} CPUs; "
    f"N={args.n}, "
    f"s={args.s} m={args.m} top_k={args.top_k}; median of {args.runs} runs, ms; peak = "
    "XLA arguments + outputs + temporaries\n"
  )
  s, m, top_k = args.s, args.m, args.top_k
  arc_rows, search_rows = [], []
  for k_rows in args.ks:
    for d in args.ds:
      z, e = make_data(k_rows, d, args.n)
      if not args.skip_arc:
        naive = jax.jit(jax.value_and_grad(lambda a, b: vq.arc_loss(a, b, s, m, top_k)))
        blocked = jax.jit(
          jax.value_and_grad(lambda a, b: blockwise.arc_loss_blocked(a, b, s, m, top_k))
        )
        (tn, ts), (pn, ps) = measure(naive, blocked, z, e, args, check_arc)
        arc_rows.append(
          f"| {k_rows} | {d} | {fmt_ms(tn)} | {fmt_ms(ts)} | "
          f"{ratio(ts, tn, '{:.2f}x')} | {fmt_bytes(pn)} | {fmt_bytes(ps)} | "
          f"{pn / ps:,.0f}x |"
        )
        print(arc_rows[-1], flush=True)
      if not args.skip_search:
        naive = jax.jit(functools.partial(vq.nearest_code, distance=args.distance))
        blocked = jax.jit(functools.partial(blockwise.nearest_code_blocked, distance=args.distance))
        (tn, ts), (pn, ps) = measure(naive, blocked, z, e, args, check_search)
        search_rows.append(
          f"| {k_rows} | {d} | {fmt_ms(tn)} | {fmt_ms(ts)} | "
          f"{ratio(ts, tn, '{:.2f}x')} | {fmt_bytes(pn)} | {fmt_bytes(ps)} | "
          f"{pn / ps:,.0f}x |"
        )
        print(search_rows[-1], flush=True)
  if arc_rows:
    print("\nArcLoss forward + backward\n")
    print(
      "| K | D | naive ms | blocked ms | time blocked / naive | peak naive | peak blocked "
      "| memory naive / blocked |"
    )
    print("|---" * 8 + "|")
    print("\n".join(arc_rows))
  if search_rows:
    print(f"\nNearest-code search ({args.distance}), forward\n")
    print(
      "| K | D | naive ms | blocked ms | time blocked / naive | peak naive | peak blocked "
      "| memory naive / blocked |"
    )
    print("|---" * 8 + "|")
    print("\n".join(search_rows))


if __name__ == "__main__":
  main()
