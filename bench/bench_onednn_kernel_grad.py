"""oneDNN's backward-weights convolution for the VQ-VAE's kernel gradients: an experiment.

  pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0   # and g++ on PATH
  python bench/bench_onednn_kernel_grad.py --batch 128 1024

With `cpu_conv_library='onednn'` the VQ-VAE's forward convolutions and input gradients run on
oneDNN (`models/onednn.py`), but the kernel gradients of the wide layers stay on XLA's Eigen
convolution, in front of which XLA transposes both operands: XLA:CPU's custom calls reach
oneDNN's forward convolution only. PyTorch runs them with oneDNN's backward-weights primitive.
This bench reaches that primitive through a handler of our own (bench/onednn_kernel_grad.cc,
registered with `jax.ffi`), compiled here against the oneDNN build on PyPI (the GNU OpenMP one:
jaxlib exports none of its own oneDNN symbols), and measures, alternating in one process:

1. layers: the kernel gradient alone, of encoder conv_2, conv_3 and decoder conv_1 (the
   layers whose kernel gradient is Eigen's in the oneDNN forms), each after the ReLU that
   precedes it in the net, as XLA compiles it for the step (`layers.compiler_options`):
   Eigen (with its transposes) against the handler;
2. step: the train step of configs/fashion_mnist.py as bench_train_step.py builds it, with
   `layers._conv_onednn`'s backward pass as it is and with the kernel gradients it leaves to
   Eigen taken from the handler instead (its custom VJP rebound: nothing in arcvq_jax changes).

The process starts over with glibc's huge-page tunable as the commands do
(`host_memory.reexec_with_huge_pages`) and with OMP_WAIT_POLICY=passive unless set: libgomp's
threads otherwise spin after each call on the cores XLA's own threads need (measured: batch
128, no gain with spinning threads, 7 % with passive ones).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
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
from arcvq_jax.models import layers

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "onednn_kernel_grad.cc")
TARGET = "arcvq_onednn_kernel_grad"
PIP = "pip install onednn-cpu-gomp==2023.2.0 onednn-devel-cpu-gomp==2023.2.0"
# The layers whose kernel gradient the oneDNN forms leave to Eigen (bench_conv_layers.LAYERS).
EIGEN_KERNEL_GRAD_LAYERS = ("encoder conv_2", "encoder conv_3", "decoder conv_1")


def build(out_dir: str) -> str:
  """Compiles the handler against the oneDNN wheels in this environment; the library's path."""
  include, lib = os.path.join(sys.prefix, "include"), os.path.join(sys.prefix, "lib")
  missing = [
    p
    for p in (os.path.join(include, "oneapi", "dnnl", "dnnl.hpp"), os.path.join(lib, "libdnnl.so"))
    if not os.path.exists(p)
  ]
  if missing:
    sys.exit(f"error: oneDNN's headers or library not found ({', '.join(missing)}): {PIP}")
  if shutil.which("g++") is None:
    sys.exit("error: no g++ on PATH: the handler is compiled here (apt install g++)")
  so = os.path.join(out_dir, "libonednn_kernel_grad.so")
  cmd = [
    "g++", "-O2", "-shared", "-fPIC", "-std=c++17", "-w",
    "-I", jax.ffi.include_dir(), "-I", include, SOURCE,
    "-L", lib, "-ldnnl", f"-Wl,-rpath,{lib}", "-o", so,
  ]  # fmt: skip
  subprocess.run(cmd, check=True)
  return so


def register(so: str) -> None:
  handler = ctypes.cdll.LoadLibrary(so).OnednnKernelGrad
  jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(handler), platform="cpu")


def kernel_grad_onednn(x, g, kernel_shape, strides, pads):
  """dk (kh, kw, Cin, Cout) of lax.conv_general_dilated(x, k, strides, pads) (NHWC, HWIO)
  for the cotangent g, by the handler."""
  (pt, pb), (pl, pr) = pads
  attrs = dict(zip(("sh", "sw", "pt", "pb", "pl", "pr"), (*strides, pt, pb, pl, pr), strict=True))
  out = jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32)
  return jax.ffi.ffi_call(TARGET, out)(x, g, **{k: np.int64(v) for k, v in attrs.items()})


def kernel_grad_eigen(x, g, kernel_shape, strides, pads):
  conv = lambda k: lax.conv_general_dilated(
    x, k, strides, pads, dimension_numbers=layers._DIMENSION_NUMBERS
  )
  return jax.vjp(conv, jnp.zeros(kernel_shape, jnp.float32))[1](g)[0]


def bench_layers(batch: int, rounds: int) -> None:
  rng = np.random.default_rng(0)
  options = layers.compiler_options("onednn")
  for name in EIGEN_KERNEL_GRAD_LAYERS:
    _, h, cin, cout, k, stride, pad = LAYERS[name][:7]
    k_shape, strides, pads = (k, k, cin, cout), (stride, stride), ((pad, pad), (pad, pad))
    ho = (h + 2 * pad - k) // stride + 1
    x = jnp.asarray(rng.standard_normal((batch, h, h, cin), dtype=np.float32))
    g = jnp.asarray(rng.standard_normal((batch, ho, ho, cout), dtype=np.float32))

    def compiled(fn, k_shape=k_shape, strides=strides, pads=pads, x=x, g=g):
      body = lambda x, g: fn(jax.nn.relu(x), g, k_shape, strides, pads)
      return jax.jit(body).lower(x, g).compile(options)

    forms = {"eigen": compiled(kernel_grad_eigen), "onednn": compiled(kernel_grad_onednn)}
    ref, got = (np.asarray(forms[f](x, g)) for f in ("eigen", "onednn"))
    err = float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))
    times = alternate({f: (lambda fn=fn, x=x, g=g: fn(x, g)) for f, fn in forms.items()}, rounds)
    print(
      f"| {batch} | {name} | {times['eigen']:.2f} | {times['onednn']:.2f} "
      f"| {times['eigen'] / times['onednn']:.2f}x | {err:.1e} |",
      flush=True,
    )


def _backward_with_onednn_kernel_grad(strides, pads, res, g):
  """`layers._conv_onednn_bwd`, the kernel gradients it leaves to Eigen from the handler
  (its own dk is then dead code, which XLA drops)."""
  x, kernel = res
  dx, dk = layers._conv_onednn_bwd(strides, pads, res, g)
  padding = tuple(lo for lo, _ in pads)
  symmetric = all(lo == hi for lo, hi in pads)
  if not (symmetric and layers._narrowing_same_conv(kernel.shape, strides, padding)):
    dk = kernel_grad_onednn(x, g, kernel.shape, strides, pads)
  return dx, dk


def bench_step(batch: int, rounds: int) -> None:
  steps = {}
  for form, bwd in (
    ("eigen", layers._conv_onednn_bwd),
    ("onednn", _backward_with_onednn_kernel_grad),
  ):
    layers._conv_onednn.defvjp(layers._conv_onednn_fwd, bwd)
    step_fn, state, x = fashion_mnist_step(batch, cpu_conv_library="onednn")
    state, _ = step_fn(state, x)  # one update from the same fresh state, then its loss
    state, m = step_fn(state, x)
    steps[form] = {"fn": step_fn, "state": state, "x": x, "loss": float(m["loss"])}
  layers._conv_onednn.defvjp(layers._conv_onednn_fwd, layers._conv_onednn_bwd)

  def run(form):
    s = steps[form]
    s["state"], m = s["fn"](s["state"], s["x"])
    return m["loss"]

  times = alternate({f: (lambda f=f: run(f)) for f in steps}, rounds)
  print(
    f"| {batch} | train step | {times['eigen']:.1f} | {times['onednn']:.1f} "
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


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[128, 1024])
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--parts", nargs="+", choices=("layers", "step"), default=["layers", "step"])
  args = parser.parse_args()
  if jax.default_backend() != "cpu":
    sys.exit("error: this bench is for the CPU (oneDNN's x86 kernels)")
  with tempfile.TemporaryDirectory() as tmp:
    register(build(tmp))
  huge = host_memory.TUNABLE in os.environ.get("GLIBC_TUNABLES", "")
  omp = os.environ.get("OMP_WAIT_POLICY")
  print(f"jax {jax.__version__}, OMP_WAIT_POLICY={omp}, huge pages asked for: {huge}")
  print("| batch | what | Eigen (now), ms | oneDNN backward-weights, ms | Eigen / oneDNN | check |")
  print("|---|---|---|---|---|---|")
  for batch in args.batch:
    if "layers" in args.parts:
      bench_layers(batch, args.rounds)
    if "step" in args.parts:
      bench_step(batch, max(3, args.rounds // 2) if batch >= 512 else args.rounds)


if __name__ == "__main__":
  os.environ.setdefault("OMP_WAIT_POLICY", "passive")  # read by libgomp when it loads
  host_memory.reexec_with_huge_pages()
  main()
