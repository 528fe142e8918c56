"""Time to build a fresh train state (trace + compile + run), three forms side by side.

  python bench/bench_fresh_state.py                 # tiny VQGAN (configs/tiny_vqgan.py), 2 rounds
  python bench/bench_fresh_state.py --config tiny --rounds 3

Forms: `plain` (jit at XLA's default level), `unoptimised` (LLVM's optimisation off, as
init_in_place did before threefry batching) and `batched` (sharding.init_in_place: the draws
hashed together, unoptimised). Each measurement runs in a fresh interpreter with the compile
cache off, the forms alternating, so that they share the machine's state; medians are printed.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FORMS = ("plain", "unoptimised", "batched")


def measure(config_name: str, form: str) -> float:
  """Seconds from the model's description to its fresh state on the device (one process)."""
  sys.path.insert(0, ROOT)
  import functools  # noqa: PLC0415
  import importlib  # noqa: PLC0415

  import jax  # noqa: PLC0415

  from arcvq_jax import sharding  # noqa: PLC0415
  from arcvq_jax.models import discriminator  # noqa: PLC0415
  from arcvq_jax.train import gan_steps  # noqa: PLC0415
  from arcvq_jax.train import state as state_lib  # noqa: PLC0415

  c = importlib.import_module(f"configs.{config_name}").get_config()
  mesh = sharding.make_mesh((-1,), ("data",))
  model = state_lib.build_model(c, channels=1)
  image_shape = (28, 28, 1)  # both configs read Fashion-MNIST
  start = time.perf_counter()
  if c.model.name == "vqgan":
    init_fn = gan_steps.init_fn(
      model,
      discriminator.from_config(c),
      state_lib.make_optimizer(c),
      state_lib.make_disc_optimizer(c),
      image_shape,
    )
  else:
    init_fn = functools.partial(
      state_lib.init_train_state,
      model=model,
      tx=state_lib.make_optimizer(c),
      image_shape=image_shape,
    )
  key, _, shardings = sharding.abstract_state(init_fn, c.seed, mesh, c.sharding)
  if form == "batched":
    state = sharding.init_in_place(init_fn, key, shardings)
  else:
    options = {"xla_backend_optimization_level": 0} if form == "unoptimised" else None
    state = jax.jit(init_fn, out_shardings=shardings, compiler_options=options)(key)
  jax.block_until_ready(state)
  return time.perf_counter() - start


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--config", default="tiny_vqgan", help="a file in configs/ (its name)")
  parser.add_argument("--rounds", type=int, default=2)
  parser.add_argument("--form", choices=FORMS, help=argparse.SUPPRESS)  # one measurement
  args = parser.parse_args()
  if args.form:
    print(f"{measure(args.config, args.form):.3f}")
    return
  env = dict(os.environ, JAX_PLATFORMS="cpu", JAX_ENABLE_COMPILATION_CACHE="false")
  env.pop("JAX_COMPILATION_CACHE_DIR", None)
  times: dict[str, list[float]] = {form: [] for form in FORMS}
  for _ in range(args.rounds):
    for form in FORMS:
      out = subprocess.run(
        [sys.executable, __file__, f"--config={args.config}", f"--form={form}"],
        capture_output=True,
        text=True,
        env=env,
        check=True,
      )
      times[form].append(float(out.stdout.split()[-1]))
  plain = statistics.median(times["plain"])
  print(f"fresh state of configs/{args.config}.py, median of {args.rounds} (s):")
  for form in FORMS:
    t = statistics.median(times[form])
    print(f"  {form:12s} {t:6.1f}  ({plain / t:.1f}x plain)   all: {times[form]}")


if __name__ == "__main__":
  main()
