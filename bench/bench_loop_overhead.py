"""What the training loop adds over the bare train step, and where it goes.

  python bench/bench_loop_overhead.py                      # batch 1024: a 200-step run
  python bench/bench_loop_overhead.py --batch 128 --steps 200 --bench-steps 100

In one process, one after the other on the same machine:

1. bench:  the jitted train step of configs/fashion_mnist.py (as bench_train_step.py) called
           --bench-steps times on one fixed device batch, each call waited for
           (block_until_ready); its mean is the step time.
2. run:    `python -m arcvq_jax.main --config=configs/fashion_mnist.py` for the same batch and
           number of steps in a fresh workdir: Fashion-MNIST from Debian's IDX files through
           grain, metrics every log_every_steps to TensorBoard, the reconstruction grid, a
           checkpoint at the end, the final evaluation. Its throughput is read back from its
           TensorBoard events (train/steps_per_sec of every logged interval, which the loop
           measures from completed steps after the first), so compilation, start-up and the
           final evaluation are not counted; they are reported apart, from its log.
3. parts:  the input pipeline alone (the run's grain iterator, --steps batches, no training)
           and the host-to-device copy of a batch (sharding.global_batch), per step.

The bench's process first starts over with the malloc `python -m arcvq_jax.main` starts
with (`host_memory.reexec_with_fast_malloc`: jemalloc where installed, else glibc's huge
pages), so that both sides run with the same malloc.

The loop's overhead is (run seconds per step) / (bench seconds per step) - 1. What it could
be made of: the input pipeline and the copy (both run on the host while XLA's step runs on
the same two cores), the metric fetch and writing every log_every_steps, the image grid and
the checkpoint.
"""

from __future__ import annotations

import argparse
import atexit
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import bench_train_step
import jax
import numpy as np

from arcvq_jax import host_memory, sharding
from arcvq_jax.ablate import events
from arcvq_jax.data import pipeline
from configs import fashion_mnist

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def bench_steps(batch: int, steps: int, warmup: int) -> np.ndarray:
  """Seconds of each of `steps` train steps on one fixed batch, after `warmup` steps."""
  step_fn, state, device_batch = bench_train_step.fashion_mnist_step(batch)
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    state, metrics = step_fn(state, device_batch)
    jax.block_until_ready(metrics["loss"])
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return np.asarray(times)


def run_main(batch: int, steps: int, log_every: int, workdir: str) -> dict:
  """Runs the real job; its throughput from the events, its phases from the log."""
  cmd = [
    sys.executable,
    "-m",
    "arcvq_jax.main",
    "--config=configs/fashion_mnist.py",
    f"--workdir={workdir}",
    f"--config.batch_size={batch}",
    f"--config.num_train_steps={steps}",
    f"--config.log_every_steps={log_every}",
  ]
  t0 = time.perf_counter()
  proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
  wall = time.perf_counter() - t0
  if proc.returncode != 0:
    sys.exit(f"the run failed:\n{proc.stderr[-3000:]}")
  rates = events.read_scalars(workdir, {"train/steps_per_sec"})["train/steps_per_sec"]
  # Interval i covers the steps since the previous logged step (the first: since step 1,
  # whose compilation the loop leaves out).
  logged = sorted(rates)
  spans = np.diff([1, *logged])
  seconds = float(np.sum(spans / np.asarray([rates[s] for s in logged])))
  first = re.search(r"first step \(with compilation\) took ([\d.]+) s", proc.stderr)
  return dict(
    wall=wall,
    steps_timed=int(spans.sum()),
    loop_seconds=seconds,
    first_step=float(first.group(1)) if first else float("nan"),
    interval_rates=[rates[s] for s in logged],
  )


def pipeline_parts(batch: int, steps: int) -> tuple[float, float]:
  """Seconds per batch of the input pipeline alone, and of its host-to-device copy."""
  c = fashion_mnist.get_config()
  it = pipeline.create_train_iterator(
    c.data, global_batch_size=batch, seed=0, process_index=0, process_count=1
  )
  next(it)  # start-up (worker threads, the first file read)
  t0 = time.perf_counter()
  host = [next(it) for _ in range(steps)]
  data = (time.perf_counter() - t0) / steps
  to_device = sharding.batch_sharding(sharding.make_mesh((-1,), ("data",)))
  t0 = time.perf_counter()
  for b in host:
    jax.block_until_ready(sharding.global_batch(b, to_device))
  return data, (time.perf_counter() - t0) / steps


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", type=int, default=1024)
  p.add_argument("--steps", type=int, default=200, help="steps of the real run")
  p.add_argument("--bench-steps", type=int, default=50, help="timed steps of the bench")
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--log-every", type=int, default=50, help="the run's log_every_steps")
  p.add_argument("--workdir", default=None, help="the run's workdir (default: a fresh temp dir)")
  args = p.parse_args()
  malloc = host_memory.reexec_with_fast_malloc()  # as the run's command does: the same malloc
  print(
    f"jax {jax.__version__}, {jax.device_count()} {jax.default_backend()} device(s), "
    f"malloc: {malloc}"
  )

  times = bench_steps(args.batch, args.bench_steps, args.warmup)
  bench = float(np.mean(times))
  print(
    f"bench: {args.bench_steps} steps at batch {args.batch}: mean {1e3 * bench:.1f} ms/step "
    f"(median {1e3 * np.median(times):.1f}), {times.sum():.1f} s"
  )

  workdir = args.workdir or tempfile.mkdtemp(prefix="loop_overhead_")
  if not args.workdir:
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
  r = run_main(args.batch, args.steps, args.log_every, workdir)
  per_step = r["loop_seconds"] / r["steps_timed"]
  print(
    f"run:   steps 2-{args.steps}: {r['loop_seconds']:.1f} s, {1e3 * per_step:.1f} ms/step "
    f"(intervals: {', '.join(f'{x:.3f}' for x in r['interval_rates'])} steps/s); first "
    f"step with compilation {r['first_step']:.1f} s; whole command {r['wall']:.1f} s "
    f"(the rest: start-up, data preparation, final checkpoint, evaluation, plots)"
  )
  print(f"loop overhead over the bench step: {100 * (per_step / bench - 1):+.1f} %")

  data, copy = pipeline_parts(args.batch, args.steps)
  print(
    f"parts: input pipeline {1e3 * data:.1f} ms/batch ({100 * data / bench:.1f} % of a "
    f"step, run on the host beside XLA), host-to-device copy {1e3 * copy:.2f} ms/batch"
  )


if __name__ == "__main__":
  main()
