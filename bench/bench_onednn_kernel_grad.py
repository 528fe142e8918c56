"""oneDNN's backward-weights convolution for the VQ-VAE's kernel gradients, against Eigen's.

  pip install -e '.[onednn]'       # onednn-cpu-gomp + onednn-devel-cpu-gomp 2023.2; and g++
  python bench/bench_onednn_kernel_grad.py --batch 128 1024

With `cpu_conv_library='onednn'` the VQ-VAE's forward convolutions and input gradients run on
oneDNN (`models/onednn.py`); the kernel gradients of the wide layers run on oneDNN's
backward-weights primitive where the `onednn` extra is installed (`models/onednn_kernel_grad.py`,
an XLA FFI handler of our own), else on XLA's Eigen convolution, in front of which XLA
transposes both operands. This bench measures, alternating in one process:

1. layers: the kernel gradient alone, of encoder conv_2, conv_3 and decoder conv_1, each after
   the ReLU that precedes it in the net, as XLA compiles it for the step
   (`layers.compiler_options`): Eigen (with its transposes) against the handler; and of the
   residual 3x3, whose kernel gradient the layers take as GEMMs (`layers.conv_kernel_grad`),
   against the handler;
2. step: the train step of configs/fashion_mnist.py as bench_train_step.py builds it, traced
   with the handler off (`onednn_kernel_grad.available` False: Eigen's kernel gradients, as
   without the extra) and on (as shipped with the extra).

The process starts over with the commands' malloc (`host_memory.reexec_with_fast_malloc`).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from bench_conv_layers import LAYERS
from bench_train_step import fashion_mnist_step

from arcvq_jax import host_memory
from arcvq_jax.models import layers, onednn_kernel_grad

# The layers whose kernel gradient is Eigen's without the handler (bench_conv_layers.LAYERS),
# and the narrowing one whose kernel gradient the layers keep as GEMMs.
EIGEN_KERNEL_GRAD_LAYERS = ("encoder conv_2", "encoder conv_3", "decoder conv_1")
GEMM_KERNEL_GRAD_LAYERS = ("residual conv3x3",)


def kernel_grad_eigen(x, g, kernel_shape, strides, pads):
  conv = lambda k: lax.conv_general_dilated(
    x, k, strides, pads, dimension_numbers=layers._DIMENSION_NUMBERS
  )
  return jax.vjp(conv, jnp.zeros(kernel_shape, jnp.float32))[1](g)[0]


def kernel_grad_gemm(x, g, kernel_shape, strides, pads):
  return layers.conv_kernel_grad(x, g, kernel_shape, strides, tuple(lo for lo, _ in pads))


@contextlib.contextmanager
def handler_off():
  """Traces as without the extra: `_conv_onednn`'s backward pass takes Eigen's kernel
  gradients."""
  saved = onednn_kernel_grad.available
  onednn_kernel_grad.available = lambda: False
  try:
    yield
  finally:
    onednn_kernel_grad.available = saved


def bench_layers(batch: int, rounds: int) -> None:
  rng = np.random.default_rng(0)
  options = layers.compiler_options("onednn")
  for name in EIGEN_KERNEL_GRAD_LAYERS + GEMM_KERNEL_GRAD_LAYERS:
    now = kernel_grad_gemm if name in GEMM_KERNEL_GRAD_LAYERS else kernel_grad_eigen
    _, h, cin, cout, k, stride, pad = LAYERS[name][:7]
    k_shape, strides, pads = (k, k, cin, cout), (stride, stride), ((pad, pad), (pad, pad))
    ho = (h + 2 * pad - k) // stride + 1
    x = jnp.asarray(rng.standard_normal((batch, h, h, cin), dtype=np.float32))
    g = jnp.asarray(rng.standard_normal((batch, ho, ho, cout), dtype=np.float32))

    def compiled(fn, k_shape=k_shape, strides=strides, pads=pads, x=x, g=g):
      body = lambda x, g: fn(jax.nn.relu(x), g, k_shape, strides, pads)
      return jax.jit(body).lower(x, g).compile(options)

    forms = {"now": compiled(now), "onednn": compiled(onednn_kernel_grad.kernel_grad)}
    ref, got = (np.asarray(forms[f](x, g)) for f in ("now", "onednn"))
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    times = alternate({f: (lambda fn=fn, x=x, g=g: fn(x, g)) for f, fn in forms.items()}, rounds)
    print(
      f"| {batch} | {name} | {now.__name__[12:]} | {times['now']:.2f} | {times['onednn']:.2f} "
      f"| {times['now'] / times['onednn']:.2f}x | {err:.1e} |",
      flush=True,
    )


def bench_step(batch: int, rounds: int) -> None:
  steps = {}
  for form, tracing in (("eigen", handler_off), ("onednn", contextlib.nullcontext)):
    with tracing():
      step_fn, state, x = fashion_mnist_step(batch, cpu_conv_library="onednn")
      state, _ = step_fn(state, x)  # traced here; one update from the same fresh state,
    state, m = step_fn(state, x)  # then its loss
    steps[form] = {"fn": step_fn, "state": state, "x": x, "loss": float(m["loss"])}

  def run(form):
    s = steps[form]
    s["state"], m = s["fn"](s["state"], s["x"])
    return m["loss"]

  times = alternate({f: (lambda f=f: run(f)) for f in steps}, rounds)
  print(
    f"| {batch} | train step | Eigen | {times['eigen']:.1f} | {times['onednn']:.1f} "
    f"| {times['eigen'] / times['onednn']:.2f}x | loss after one update "
    f"{steps['eigen']['loss']:.6f} / {steps['onednn']['loss']:.6f} |",
    flush=True,
  )


def alternate(fns: dict, rounds: int) -> dict:
  """Median ms per call: each round runs each contender for one untimed and three timed calls
  back to back, the rounds starting with each contender in turn."""
  names, times = list(fns), {f: [] for f in fns}
  for r in range(rounds):
    for f in names[r % len(names) :] + names[: r % len(names)]:
      jax.block_until_ready(fns[f]())
      for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(fns[f]())
        times[f].append(time.perf_counter() - t0)
  return {f: 1e3 * float(np.median(t)) for f, t in times.items()}


def main(malloc: str) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[128, 1024])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--parts", nargs="+", choices=("layers", "step"), default=["layers", "step"])
  args = parser.parse_args()
  if jax.default_backend() != "cpu":
    sys.exit("error: this bench is for the CPU (oneDNN's x86 kernels)")
  if not onednn_kernel_grad.available():
    sys.exit(f"error: {onednn_kernel_grad.unavailable_reason()}")
  print(f"jax {jax.__version__}, malloc: {malloc}")
  print("| batch | what | without the handler | ms | oneDNN backward-weights, ms | ratio | check |")
  print("|---|---|---|---|---|---|---|")
  for batch in args.batch:
    if "layers" in args.parts:
      bench_layers(batch, args.rounds)
    if "step" in args.parts:
      bench_step(batch, max(3, args.rounds // 2) if batch >= 512 else args.rounds)


if __name__ == "__main__":
  main(host_memory.reexec_with_fast_malloc())
