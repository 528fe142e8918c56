"""The VQ-VAE train step against the PyTorch step, side by side in one run.

  python bench/bench_vs_pytorch.py                          # batch 128 and 1024, 15 rounds
  python bench/bench_vs_pytorch.py --batch 128 --steps 30 --forms default ynn before
  python bench/bench_vs_pytorch.py --malloc jemalloc hugepages --torch-malloc plain jemalloc

Every contender runs in a process of its own (glibc's malloc is set per process: --malloc,
--torch-malloc), built one after the other; then each round asks every contender in turn
(each round starting with the next one: whichever runs right after PyTorch is slowed, so each
takes that place as often), so load from other processes falls on all of them alike,
for a short sleep (--gap), one untimed step (the other runtime's spinning worker threads go
idle meanwhile; a JAX call right after a torch call ran up to 1.6x slower) and --block steps
back to back, as a training loop runs them, whose mean is the round's time. The table gives
the median, the 10th and 90th percentiles over the rounds and the ratio PyTorch median / this
median (> 1: faster than PyTorch with glibc's malloc as it comes). JAX steps are waited for
with block_until_ready; warmup steps (compilation included) are not timed.

The malloc, per contender: 'plain' glibc's as it comes, as the official PyTorch script runs
(a step's large buffers are mmap'd, unmapped, and page-faulted in again at the next step, 4
KiB at a time); 'hugepages' started with GLIBC_TUNABLES=glibc.malloc.hugetlb=1, as arcvq_jax's
commands run where the kernel gives transparent huge pages on request and jemalloc is not
installed; 'jemalloc' preloaded with `host_memory.JEMALLOC_CONF` (freed memory kept, in
huge pages), as arcvq_jax's commands run where it is installed (`host_memory`; the JAX
contender's default is what the commands use on this machine); 'kept' (`keep_freed_memory`)
keeps freed memory in glibc's malloc.
'kept' made PyTorch's step 1.2x (batch 128) and 1.7x (1024) faster and ours 1.0x and 1.05x;
in `arcvq_jax.main` it gave nothing (1.01 against 1.02 steps/s at 1024) for 1.3 GiB more
memory, so the project does not set it. The last column is the contender's memory in huge
pages after its warmup (0 where none were given).

JAX: the full step of arcvq_jax.train.tokenizer_steps (BBNR projection, encoder, cosine
search, VQ loss, ArcLoss, decoder, MSE / var, grads, Adam, usage statistics) for
configs/fashion_mnist.py. --forms picks the convolutions:
  default  as shipped: config.model.cpu_conv_library = 'onednn' (oneDNN's convolution
           through XLA:CPU's custom call for the forward passes and input gradients,
           models/onednn.py; the kernel gradients on oneDNN's backward-weights primitive
           where the `onednn` extra is installed, models/onednn_kernel_grad.py, else on
           Eigen; Eigen throughout where the jaxlib lacks oneDNN)
  onednn_fwd  'default' as without the `onednn` extra: the kernel gradients on Eigen (and
           GEMMs for the residual 3x3)
  eigen    cpu_conv_library = 'eigen' (the step compiled with
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
import ctypes
import multiprocessing
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train_step
import jax
import numpy as np

from arcvq_jax import host_memory
from arcvq_jax.models import layers, onednn_kernel_grad


def _choose_conv_before(kernel_shape, backend=None, library=None):
  kh, kw, cin, _ = kernel_shape
  if (backend or jax.default_backend()) != "cpu":
    return "xla"
  return "gemm" if kh * kw > 1 and kh * kw * cin <= 576 else "xla"


def _choose_conv_transpose_before(features, backend=None, library=None):
  return "phase" if features >= 8 else "matmul"


FORMS = ("default", "onednn_fwd", "eigen", "ynn", "before")


@contextlib.contextmanager
def conv_forms(forms: str):
  """Trace-time choice of the convolution forms: 'before' swaps layers' choosers for the old
  ones while the step is traced, 'onednn_fwd' turns the kernel-gradient handler off (a
  benchmark's trick; the package has no such switch)."""
  if forms not in FORMS:
    raise ValueError(f"forms: one of {FORMS}, got {forms!r}")
  saved = (layers.choose_conv_impl, layers.choose_conv_transpose_impl)
  saved_handler = onednn_kernel_grad.available
  if forms == "before":
    layers.choose_conv_impl = _choose_conv_before
    layers.choose_conv_transpose_impl = _choose_conv_transpose_before
  if forms == "onednn_fwd":
    onednn_kernel_grad.available = lambda: False
  try:
    yield
  finally:
    layers.choose_conv_impl, layers.choose_conv_transpose_impl = saved
    onednn_kernel_grad.available = saved_handler


def jax_step(batch: int, forms: str):
  """A function running one compiled train step (state carried along), and the step's FLOPs."""
  # 'default' is configs/fashion_mnist.py as shipped (oneDNN), 'onednn_fwd' the same without
  # the kernel-gradient handler; 'eigen' Eigen alone; the
  # others trace the step under XLA's default library.
  overrides = {"default": {}, "onednn_fwd": {}, "eigen": {"cpu_conv_library": "eigen"}}.get(
    forms, {"cpu_conv_library": "ynn"}
  )
  with conv_forms(forms):
    step_fn, state, batch_arr = bench_train_step.fashion_mnist_step(batch, **overrides)
    compiled = step_fn.lower(state, batch_arr).compile()
  holder = {"state": state}

  def run():
    holder["state"], m = compiled(holder["state"], batch_arr)
    jax.block_until_ready(m["loss"])

  return run, _flops(compiled, batch, forms)


def _flops(compiled, batch: int, forms: str) -> float:
  """XLA's FLOP count of a compiled step. XLA's cost analysis does not count custom calls: for
  a step with oneDNN's convolutions, the count of the same step on Eigen (the same arithmetic)."""
  if "__onednn$" in compiled.as_text():
    with conv_forms(forms):
      step_fn, state, batch_arr = bench_train_step.fashion_mnist_step(
        batch, cpu_conv_library="eigen"
      )
      compiled = step_fn.lower(state, batch_arr).compile()
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


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


MALLOCS = ("plain", "hugepages", "kept", "jemalloc")
JEMALLOC = host_memory.find_jemalloc()
# How each project's command runs on this machine: the suffix-free name in the table.
DEFAULT_MALLOC = {"pytorch": "plain", "jax": "hugepages" if JEMALLOC is None else "jemalloc"}
HUGEPAGES_TUNABLE = f"{host_memory.TUNABLE}=1"
MALLOC_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")


def malloc_environment(malloc: str) -> dict[str, str]:
  """The variables a contender with `malloc` starts with (none of MALLOC_VARIABLES besides):
  'jemalloc' and 'hugepages' as arcvq_jax's commands set them (`host_memory`)."""
  if malloc == "jemalloc":
    return host_memory.start_environment({}, None, None, JEMALLOC)
  if malloc == "hugepages":
    return {"GLIBC_TUNABLES": HUGEPAGES_TUNABLE}
  return {}


def keep_freed_memory() -> None:
  """glibc's malloc set to keep freed memory in the process (one arena, no mmap'd chunks, a
  2 GiB trim threshold), as MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0
  MALLOC_TRIM_THRESHOLD_=2147483647 would at start-up. By default a step's large buffers are
  mmap'd and unmapped again, so every step page-faults them in afresh (zeroed); how much that
  costs each framework is what 'kept' shows. Before any thread of JAX or torch starts."""
  libc = ctypes.CDLL(None)
  for param, value in ((-8, 1), (-4, 0), (-1, 2**31 - 1)):  # M_ARENA_MAX, M_MMAP_MAX, M_TRIM_
    if libc.mallopt(param, value) != 1:
      raise RuntimeError(f"mallopt({param}, {value}) refused")


def _jemalloc_loaded() -> bool:
  """Whether this process runs with jemalloc mapped (Linux)."""
  with open("/proc/self/maps") as f:
    return "libjemalloc" in f.read()


def anon_huge_mib() -> float:
  """MiB of this process's anonymous memory in transparent huge pages now (Linux; else nan)."""
  try:
    with open("/proc/self/smaps_rollup") as f:
      for line in f:
        if line.startswith("AnonHugePages:"):
          return int(line.split()[1]) / 1024
  except OSError:
    pass
  return float("nan")


def _contender(conn, kind: str, batch: int, forms: str, malloc: str, warmup: int, threads: int):
  """One contender in its own process: builds its step, then times blocks of steps on demand.

  Each runs apart, so that glibc's malloc can be set per contender (a process-wide setting):
  'plain', 'hugepages', 'jemalloc' (its environment) or 'kept' (`keep_freed_memory`).
  """
  if malloc == "kept":
    keep_freed_memory()
  if malloc == "hugepages" and HUGEPAGES_TUNABLE not in os.environ.get("GLIBC_TUNABLES", ""):
    raise RuntimeError("glibc's hugetlb tunable did not reach the contender's process")
  if malloc == "jemalloc" and not _jemalloc_loaded():
    raise RuntimeError("jemalloc was not preloaded into the contender's process")
  if kind == "pytorch":
    import torch  # noqa: PLC0415

    if threads:
      torch.set_num_threads(threads)
    run, flops = torch_step(batch), float("nan")
  else:
    run, flops = jax_step(batch, forms)
  for _ in range(warmup):
    run()
  conn.send((flops, anon_huge_mib()))
  while (block := conn.recv()) is not None:
    run()  # untimed: the other runtime's worker threads spin down meanwhile
    t0 = time.perf_counter()
    for _ in range(block):
      run()
    conn.send((time.perf_counter() - t0) / block)


def bench(
  batch: int,
  contenders: dict[str, tuple[str, str, str]],
  steps: int,
  warmup: int,
  gap: float,
  block: int = 3,
  torch_threads: int = 0,
):
  """contenders: name -> (kind 'pytorch' | 'jax', forms, malloc). Returns the times (ms) of
  every round per name, and the XLA FLOPs per step of the JAX ones."""
  ctx = multiprocessing.get_context("spawn")
  procs, conns, flops, huge = {}, {}, {}, {}
  try:
    for name, (kind, forms, malloc) in contenders.items():
      parent, child = ctx.Pipe()
      procs[name] = ctx.Process(
        target=_contender, args=(child, kind, batch, forms, malloc, warmup, torch_threads)
      )
      # The C library reads these once, when a process starts: the child's environment.
      saved = {k: os.environ.pop(k, None) for k in MALLOC_VARIABLES}
      os.environ.update(malloc_environment(malloc))
      try:
        procs[name].start()
      finally:
        for k, v in saved.items():
          os.environ.pop(k, None)
          if v is not None:
            os.environ[k] = v
      child.close()  # the child's end lives in the child: its exit must end recv() here
      conns[name] = parent
      try:
        flops[name], huge[name] = parent.recv()  # built one at a time: compilation is not timed
      except EOFError:
        sys.exit(f"{name}: its process failed (its traceback is above)")
    times = {name: [] for name in contenders}
    names = list(conns)
    for r in range(steps):
      # Each round starts with the next contender: the one that runs right after PyTorch's
      # step ran 5-25 % slower than the same step run after ours (both JAX forms alike, still
      # after an untimed step and a 1.5 s pause), so every contender takes that place as often.
      for name in names[r % len(names) :] + names[: r % len(names)]:
        time.sleep(gap)
        conns[name].send(block)
        times[name].append(conns[name].recv())
    for name, conn in conns.items():
      conn.send(None)
      procs[name].join(timeout=30)
  finally:
    for proc in procs.values():
      if proc.is_alive():
        proc.kill()
  return {name: 1e3 * np.asarray(t) for name, t in times.items()}, flops, huge


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", type=int, nargs="*", default=[128, 1024])
  p.add_argument("--forms", nargs="*", default=["default"], choices=FORMS)
  p.add_argument("--steps", type=int, default=15, help="timed rounds")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--gap", type=float, default=0.02, help="seconds of sleep before each step")
  p.add_argument(
    "--block", type=int, default=3, help="timed steps in a row per contender and round"
  )
  p.add_argument(
    "--malloc",
    nargs="*",
    default=[DEFAULT_MALLOC["jax"]],
    choices=MALLOCS,
    help="malloc for the JAX steps (module docstring); default: the one arcvq_jax's "
    "commands run with on this machine",
  )
  p.add_argument(
    "--torch-malloc",
    nargs="*",
    default=[DEFAULT_MALLOC["pytorch"]],
    choices=MALLOCS,
    help="malloc for the PyTorch step; 'plain' as the official script runs",
  )
  p.add_argument("--no-torch", action="store_true")
  p.add_argument("--torch-threads", type=int, default=0, help="0: torch's default")
  args = p.parse_args()

  import torch  # noqa: PLC0415

  contenders = {}
  if "jemalloc" in args.malloc + args.torch_malloc and JEMALLOC is None:
    sys.exit("error: --malloc jemalloc: no libjemalloc.so.2 here (apt-get install libjemalloc2)")
  for malloc in [] if args.no_torch else args.torch_malloc:
    suffix = "" if malloc == DEFAULT_MALLOC["pytorch"] else f", malloc {malloc}"
    contenders["pytorch" + suffix] = (
      "pytorch",
      "",
      malloc,
    )
  for forms in args.forms:
    for malloc in args.malloc:
      suffix = "" if malloc == DEFAULT_MALLOC["jax"] else f", malloc {malloc}"
      name = f"jax ({forms}{suffix})"
      contenders[name] = ("jax", forms, malloc)
  print(
    f"jax {jax.__version__}, torch {torch.__version__} "
    f"({args.torch_threads or torch.get_num_threads()} threads), "
    f"{len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs, "
    f"load average {os.getloadavg()[0]:.2f}, XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  print(
    "| batch | step | median ms | p10-p90 ms | PyTorch / this (median) | GFLOP/step (XLA) "
    "| huge pages MiB |"
  )
  print("|---|---|---|---|---|---|---|")
  for b in args.batch:
    times, flops, huge = bench(
      b, contenders, args.steps, args.warmup, args.gap, args.block, args.torch_threads
    )
    ref = np.median(times["pytorch"]) if "pytorch" in times else float("nan")
    for name, t in times.items():
      med = np.median(t)
      gf = f"{flops[name] / 1e9:.1f}" if np.isfinite(flops[name]) else ""
      print(
        f"| {b} | {name} | {med:.1f} | {np.percentile(t, 10):.0f}-{np.percentile(t, 90):.0f} | "
        f"{ref / med:.2f} | {gf} | {huge[name]:.0f} |",
        flush=True,
      )
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
