"""The environment of a test's subprocess that runs on several simulated CPU devices."""

from __future__ import annotations

import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def simulated_devices(count: int, *, unoptimised: bool = False) -> dict[str, str]:
  """os.environ with `count` CPU devices (the caller's XLA_FLAGS kept) and the repository
  importable.

  unoptimised: XLA:CPU skips LLVM's optimisation, for scripts that run a few steps of many
  programs: compile is nearly all of their time, and it is ~40 % shorter (the same HLO; ~2x
  slower to run, see docs/contributing.md).
  """
  flags = os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
  if unoptimised:
    flags += " --xla_backend_optimization_level=0"
  return dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
