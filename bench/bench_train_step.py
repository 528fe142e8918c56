"""Train-step time and memory of the VQ-VAE tokenizer, and ArcLoss forward+backward time.

  python bench/bench_train_step.py                      # batch 128 and 1024, Fashion-MNIST shapes
  python bench/bench_train_step.py --batch 128 --variant vanilla
  python bench/bench_train_step.py --batch 1024 --library eigen   # another conv library
  python bench/bench_train_step.py --arcloss            # ArcLoss at N=50176, K=512, D=64,
                                                        # naive and blocked

Times are the median of --steps calls after --warmup calls, each waited for with
block_until_ready. Memory: XLA's own accounting of the compiled step (arguments, outputs,
temporaries) and the process's peak resident set size.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from arcvq_jax import (
  blockwise,
  sharding,
)
from arcvq_jax import quantization as vq
from arcvq_jax.models import layers
from arcvq_jax.train import state as state_lib
from arcvq_jax.train import tokenizer_steps
from arcvq_jax.train.state import make_optimizer


def timeit(fn, warmup: int, steps: int) -> np.ndarray:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return np.asarray(times)


def fashion_mnist_step(batch: int, variant: str = "arcvq", **model_overrides):
  """The jitted train step of configs/fashion_mnist.py (the one `main` runs), its fresh state
  and one fixed device batch of uniform noise: (step_fn, state, device_batch). The other
  benches of the train step build theirs here."""
  from configs import fashion_mnist  # noqa: PLC0415

  c = fashion_mnist.get_config(variant)
  c.batch_size = batch
  c.model.update(model_overrides)
  mesh = sharding.make_mesh((-1,), ("data",))
  model = state_lib.build_model(c, channels=1)
  state, _, step_fn = tokenizer_steps.create_state_and_step(
    c, model, make_optimizer(c), mesh, (28, 28, 1), data_variance=0.5
  )
  x = np.random.default_rng(0).uniform(-1, 1, (batch, 28, 28, 1)).astype(np.float32)
  return step_fn, state, sharding.global_batch({"image": x}, sharding.batch_sharding(mesh))


def bench_step(
  batch: int, variant: str, deconv: str, warmup: int, steps: int, library: str | None = None
) -> dict:
  overrides = {"cpu_conv_library": library} if library else {}
  step_fn, state, batch_arr = fashion_mnist_step(batch, variant, deconv_impl=deconv, **overrides)
  compiled = step_fn.lower(state, batch_arr).compile()
  mem = compiled.memory_analysis()
  holder = {"state": state}

  def run():
    holder["state"], m = step_fn(holder["state"], batch_arr)
    return m["loss"]

  times = timeit(run, warmup, steps)
  xla_bytes = None
  if mem is not None:
    xla_bytes = (
      mem.argument_size_in_bytes
      + mem.output_size_in_bytes
      + mem.temp_size_in_bytes
      - mem.alias_size_in_bytes
    )
  return dict(
    batch=batch,
    variant=variant,
    deconv=deconv,
    library=library or "config's",
    median_ms=1e3 * np.median(times),
    p10_ms=1e3 * np.percentile(times, 10),
    p90_ms=1e3 * np.percentile(times, 90),
    xla_mib=None if xla_bytes is None else xla_bytes / 2**20,
    temp_mib=None if mem is None else mem.temp_size_in_bytes / 2**20,
  )


def bench_arcloss(n: int, k: int, d: int, warmup: int, steps: int, loss_fn) -> dict:
  rng = np.random.default_rng(0)
  z = jnp.asarray(rng.normal(size=(n, d)).astype(np.float32))
  e = jnp.asarray(rng.normal(size=(k, d)).astype(np.float32))
  fn = jax.jit(jax.value_and_grad(lambda zz: loss_fn(zz, e, 10.0, 0.1, 3)))
  mem = fn.lower(z).compile().memory_analysis()
  times = timeit(lambda: fn(z), warmup, steps)
  return dict(
    n=n,
    k=k,
    d=d,
    median_ms=1e3 * np.median(times),
    temp_mib=None if mem is None else mem.temp_size_in_bytes / 2**20,
  )


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", type=int, nargs="*", default=[128, 1024])
  p.add_argument("--variant", default="arcvq")
  p.add_argument(
    "--deconv", default="auto", choices=["auto", *sorted(layers.CONV_TRANSPOSE_4X4S2_IMPLS)]
  )
  p.add_argument(
    "--library",
    default=None,
    choices=layers.CONV_LIBRARIES,
    help="config.model.cpu_conv_library (default: the config's, 'onednn')",
  )
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--arcloss", action="store_true", help="ArcLoss fwd+bwd at N=50176, K=512, D=64")
  args = p.parse_args()

  print(
    f"jax {jax.__version__}, devices: {jax.devices()}, "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  if args.arcloss:
    for name, fn in (("naive", vq.arc_loss), ("blocked", blockwise.arc_loss_blocked)):
      r = bench_arcloss(50176, 512, 64, args.warmup, args.steps, fn)
      print(
        f"ArcLoss ({name}) fwd+bwd N={r['n']} K={r['k']} D={r['d']}: {r['median_ms']:.1f} ms "
        f"(XLA temp {r['temp_mib']:.0f} MiB)"
      )
    return
  print(
    "| batch | variant | deconv | conv library | median ms/step | p10-p90 ms "
    "| XLA MiB (args+out+temp) | XLA temp MiB |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for b in args.batch:
    r = bench_step(b, args.variant, args.deconv, args.warmup, args.steps, args.library)
    print(
      f"| {b} | {r['variant']} | {r['deconv']} | {r['library']} | {r['median_ms']:.1f} | "
      f"{r['p10_ms']:.1f}-{r['p90_ms']:.1f} | {r['xla_mib']:.0f} | {r['temp_mib']:.0f} |",
      flush=True,
    )
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"peak RSS of this process: {peak:.0f} MiB")


if __name__ == "__main__":
  main()
