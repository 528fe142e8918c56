"""The environment of a test's subprocess: several simulated CPU devices, or no compilation
cache."""

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


def without_compilation_cache(env: dict[str, str]) -> dict[str, str]:
  """env without the suite's persistent compilation cache (conftest.py), as users run the
  commands: with the cache the layers do not take oneDNN's convolutions (`onednn.available`)."""
  env = {k: v for k, v in env.items() if k != "JAX_COMPILATION_CACHE_DIR"}
  env["JAX_ENABLE_COMPILATION_CACHE"] = "false"
  return env
