"""The VQ-VAE train step against the PyTorch step, side by side in one process.

  python bench/bench_vs_pytorch.py                          # batch 128 and 1024, 15 rounds
  python bench/bench_vs_pytorch.py --batch 128 --steps 30 --forms default ynn before

Each round runs one step of every contender in turn (PyTorch, then each JAX variant), so
load from other processes falls on all of them alike; the table gives the median, the 10th
and 90th percentiles over the rounds and the ratio PyTorch median / JAX median (> 1: the JAX
step is faster). JAX steps are waited for with block_until_ready; warmup steps (compilation
included) are not timed. A short sleep (--gap) between contenders lets the other runtime's
spinning worker threads go idle first.

JAX: the full step of arcvq_jax.train.tokenizer_steps (BBNR projection, encoder, cosine
search, VQ loss, ArcLoss, decoder, MSE / var, grads, Adam, usage statistics) for
configs/fashion_mnist.py. --forms picks the convolutions:
  default  as shipped: config.model.cpu_conv_library = 'eigen' (the step compiled with
           layers.EIGEN_CONV_COMPILER_OPTIONS: convolutions on Eigen rather than XLA's
           default YNNPACK, with the forms 'auto' picks for Eigen)
  ynn      cpu_conv_library = 'ynn': XLA's default library, the forms 'auto' picks for it
           (GEMM for narrow patches, 'hybrid' with a GEMM kernel gradient for wide ones)
  before   YNNPACK with the forms 'auto' chose before this work (GEMM for patches <= 576
           wide and kh*kw > 1, else the lax convolution with XLA's own gradients;
           ConvTranspose 'phase' / 'matmul' with autodiff gradients)
PyTorch: bench_torch_reference.py's step (same network, quantiser, ArcLoss, Adam), with
torch's default intra-op threads.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train_step
import jax
import numpy as np

from arcvq_jax.models import layers


def _choose_conv_before(kernel_shape, backend=None, library=None):
  kh, kw, cin, _ = kernel_shape
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  return "gemm" if kh * kw > 1 and kh * kw * cin <= 576 else "xla"


def _choose_conv_transpose_before(features, backend=None, library=None):
  return "phase" if features >= 8 else "matmul"


FORMS = ("default", "ynn", "before")


@contextlib.contextmanager
def conv_forms(forms: str):
  """Trace-time choice of the convolution forms: 'before' swaps layers' choosers for the old
  ones while the step is traced (a benchmark's trick; the package has no such switch)."""
  if forms not in FORMS:
    raise ValueError(f"forms: one of {FORMS}, got {forms!r}")
  saved = (layers.choose_conv_impl, layers.choose_conv_transpose_impl)
  if forms == "before":
    layers.choose_conv_impl = _choose_conv_before
    layers.choose_conv_transpose_impl = _choose_conv_transpose_before
  try:
    yield
  finally:
    layers.choose_conv_impl, layers.choose_conv_transpose_impl = saved


def jax_step(batch: int, forms: str):
  """A function running one compiled train step (state carried along), and the step's FLOPs."""
  # 'default' is configs/fashion_mnist.py as shipped (Eigen); the others trace the step under
  # XLA's default library.
  overrides = {} if forms == "default" else {"cpu_conv_library": "ynn"}
  with conv_forms(forms):
    step_fn, state, batch_arr = bench_train_step.fashion_mnist_step(batch, **overrides)
    compiled = step_fn.lower(state, batch_arr).compile()
  holder = {"state": state}

  def run():
    holder["state"], m = compiled(holder["state"], batch_arr)
    jax.block_until_ready(m["loss"])

  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return run, float(analysis.get("flops", float("nan")))


def torch_step(batch: int):
  import torch  # noqa: PLC0415
  from bench_torch_reference import VQVAE  # noqa: PLC0415

  torch.manual_seed(0)
  model = VQVAE()
  opt = torch.optim.Adam(model.parameters(), lr=3e-4)
  x = torch.from_numpy(
    np.random.default_rng(0).uniform(-1, 1, (batch, 1, 28, 28)).astype(np.float32)
  )
  counter = {"i": 0}

  def run():
    opt.zero_grad(set_to_none=True)
    loss = model(x, counter["i"])
    loss.backward()
    opt.step()
    counter["i"] += 1

  return run


def bench(batch: int, forms: list[str], steps: int, warmup: int, gap: float, with_torch: bool):
  runs = {}
  flops = {}
  if with_torch:
    runs["pytorch"] = torch_step(batch)
  for f in forms:
    runs[f"jax ({f})"], flops[f"jax ({f})"] = jax_step(batch, f)
  for run in runs.values():
    for _ in range(warmup):
      run()
  times = {name: [] for name in runs}
  for _ in range(steps):
    for name, run in runs.items():
      time.sleep(gap)
      t0 = time.perf_counter()
      run()
      times[name].append(time.perf_counter() - t0)
  return {name: 1e3 * np.asarray(t) for name, t in times.items()}, flops


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", type=int, nargs="*", default=[128, 1024])
  p.add_argument("--forms", nargs="*", default=["default"], choices=FORMS)
  p.add_argument("--steps", type=int, default=15, help="timed rounds")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--gap", type=float, default=0.02, help="seconds of sleep before each step")
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
  args = p.parse_args()

  import torch  # noqa: PLC0415

  if args.torch_threads:
    torch.set_num_threads(args.torch_threads)

  print(
    f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} "
    f"({torch.get_num_threads()} threads), {len(os.sched_getaffinity(0))} of {os.cpu_count()} "
    "CPUs, "
    f"load average {os.getloadavg()[0]:.2f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  print("| batch | step | median ms | p10-p90 ms | PyTorch / this (median) | GFLOP/step (XLA) |")
  print("|---|---|---|---|---|---|")
  for b in args.batch:
    times, flops = bench(b, args.forms, args.steps, args.warmup, args.gap, not args.no_torch)
    ref = np.median(times["pytorch"]) if "pytorch" in times else float("nan")
    for name, t in times.items():
      med = np.median(t)
      gf = f"{flops[name] / 1e9:.1f}" if name in flops else ""
      print(
        f"| {b} | {name} | {med:.1f} | {np.percentile(t, 10):.0f}-{np.percentile(t, 90):.0f} | "
        f"{ref / med:.2f} | {gf} |",
        flush=True,
      )
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
