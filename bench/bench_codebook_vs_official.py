"""Large codebooks: our ArcLoss against the official PyTorch form, time and memory.

  python bench/bench_codebook_vs_official.py            # N 32768, D 64, K 16384 / 100000 / 2^20
  python bench/bench_codebook_vs_official.py --ks 16384 --runs 3

ArcLoss forward + backward (the gradient w.r.t. the encoder's tokens z, (N, D); the codebook
is detached, as in the loss) at N tokens, D dimensions, K codes, s 5, m 0.1, top-k 3:

- ours:      what `config.arc.impl='auto'` runs at these sizes: blockwise.arc_loss_blocked
             under jax.jit(jax.value_and_grad), compiled ahead of the timed calls;
- official:  the form of the official PyTorch code (goals4292/ArcVQ-VAE, ArcLoss.forward), in
             PyTorch 2.14.1 on the same CPU: the whole K x N cosine matrix, a copy with each
             code's top-k entries moved by the margin, exp and row sums of the scaled copy
             (docs/math.md, eq. 9-10), then backward. Run only where its estimated peak
             (bytes per K x N entry measured at the first K it runs, times K x N) fits in
             --max-official-gb; otherwise the estimate is printed.

Each (form, K) runs in a fresh child process so that memory figures do not mix: `+RSS` is
the growth of the process's peak resident set during the timed calls over its resident set
just before them (Linux: /proc/self/clear_refs resets the peak; the inputs and, for ours,
the compiled program are already resident). Time: the median of --runs calls.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

S, M, TOP_K = 5.0, 0.1, 3


def _status_kib(field: str) -> int:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith(field + ":"):
        return int(line.split()[1])
  raise RuntimeError(f"/proc/self/status has no {field}")


def _reset_peak() -> None:
  with open("/proc/self/clear_refs", "w") as f:
    f.write("5")


def _data(k: int, d: int, n: int):
  import numpy as np  # noqa: PLC0415 (the child imports only what its form needs)

  rng = np.random.default_rng(0)
  return rng.normal(size=(n, d)).astype(np.float32), rng.normal(size=(k, d)).astype(np.float32)


def _ours(k: int, d: int, n: int, runs: int) -> tuple[list[float], int, int]:
  import jax  # noqa: PLC0415

  from arcvq_jax import blockwise  # noqa: PLC0415

  z, e = (jax.device_put(a) for a in _data(k, d, n))
  fn = (
    jax.jit(jax.value_and_grad(lambda zz, ee: blockwise.arc_loss_blocked(zz, ee, S, M, TOP_K)))
    .lower(z, e)
    .compile()
  )
  before = _status_kib("VmRSS")
  _reset_peak()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(z, e))
    times.append(time.perf_counter() - t0)
  return times, before, _status_kib("VmHWM")


def _official(k: int, d: int, n: int, runs: int) -> tuple[list[float], int, int]:
  import torch  # noqa: PLC0415
  import torch.nn.functional as F  # noqa: PLC0415

  z_np, e_np = _data(k, d, n)
  z, e = torch.from_numpy(z_np), torch.from_numpy(e_np)

  def loss_and_grad():
    zz = z.clone().requires_grad_(True)
    zn, en = F.normalize(zz, dim=1), F.normalize(e, dim=1)
    cos = en @ zn.t()  # (K, N)
    top_v, top_i = torch.topk(cos, TOP_K, dim=1)
    moved = torch.cos(torch.acos(top_v.clamp(-1 + 1e-7, 1 - 1e-7)) + M)
    logits = cos.clone()
    rows = torch.arange(k).unsqueeze(1).expand(-1, TOP_K)
    logits[rows, top_i] = moved
    logits = S * logits
    positive = torch.exp(logits[rows, top_i]).sum(1)
    loss = -torch.log(positive / torch.exp(logits).sum(1)).mean()
    loss.backward()
    return loss.item(), zz.grad

  before = _status_kib("VmRSS")
  _reset_peak()
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    loss_and_grad()
    times.append(time.perf_counter() - t0)
  return times, before, _status_kib("VmHWM")


def child(form: str, k: int, d: int, n: int, runs: int) -> None:
  times, before, peak = (_ours if form == "ours" else _official)(k, d, n, runs)
  print(json.dumps(dict(times=times, rss_before_kib=before, rss_peak_kib=peak)))


def run_child(form: str, k: int, d: int, n: int, runs: int) -> dict:
  cmd = [sys.executable, __file__, "--child", form, str(k), str(d), str(n), str(runs)]
  proc = subprocess.run(cmd, capture_output=True, text=True)
  if proc.returncode != 0:
    return dict(error=(proc.stderr.strip().splitlines() or ["killed"])[-1])
  r = json.loads(proc.stdout.strip().splitlines()[-1])
  times = sorted(r["times"])
  r["median_s"] = times[len(times) // 2]
  r["delta_gib"] = (r["rss_peak_kib"] - r["rss_before_kib"]) / 2**20
  return r


def _mem_available_gib() -> float:
  with open("/proc/meminfo") as f:
    for line in f:
      if line.startswith("MemAvailable:"):
        return int(line.split()[1]) / 2**20
  return float("nan")


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1] == "--child":
    form, k, d, n, runs = sys.argv[2], *map(int, sys.argv[3:7])
    child(form, k, d, n, runs)
    return
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--n", type=int, default=32768)
  p.add_argument("--d", type=int, default=64)
  p.add_argument("--ks", type=int, nargs="+", default=[16384, 100000, 2**20])
  p.add_argument("--runs", type=int, default=3)
  p.add_argument(
    "--max-official-gb",
    type=float,
    default=None,
    help="run the official form only below this estimated peak (default: 80 %% of MemAvailable)",
  )
  args = p.parse_args()
  limit = args.max_official_gb or 0.8 * _mem_available_gib()
  print(
    f"N {args.n}, D {args.d}, s {S}, m {M}, top-k {TOP_K}; {os.cpu_count()} CPUs, "
    f"{_mem_available_gib():.1f} GiB available; median of {args.runs} calls\n"
  )
  print("| K | ours | ours +RSS | official PyTorch | official +RSS | official / ours |")
  print("|---|---|---|---|---|---|")
  bytes_per_entry = None
  for k in args.ks:
    ours = run_child("ours", k, args.d, args.n, args.runs)
    ours_cells = (
      [f"{ours['median_s']:.2f} s", f"+{ours['delta_gib']:.2f} GiB"]
      if "error" not in ours
      else [f"failed: {ours['error']}", "-"]
    )
    estimate = None if bytes_per_entry is None else bytes_per_entry * k * args.n / 2**30
    if estimate is not None and estimate > limit:
      official_cells = [f"not run: needs ~{estimate:.0f} GiB", "-", "-"]
    else:
      off = run_child("official", k, args.d, args.n, args.runs)
      if "error" in off:
        official_cells = [f"failed: {off['error']}", "-", "-"]
      else:
        bytes_per_entry = bytes_per_entry or off["delta_gib"] * 2**30 / (k * args.n)
        ratio = "-" if "error" in ours else f"{off['median_s'] / ours['median_s']:.1f}x"
        official_cells = [f"{off['median_s']:.2f} s", f"+{off['delta_gib']:.2f} GiB", ratio]
    print(f"| {k:,} | " + " | ".join(ours_cells + official_cells) + " |", flush=True)
  if bytes_per_entry is not None:
    print(
      f"\nThe official form's peak grows by {bytes_per_entry:.1f} bytes per K x N entry "
      "(measured at the first K it ran); the estimates above are that times K x N."
    )


if __name__ == "__main__":
  main()
