"""The GPU/TPU benchmark runs end to end (on the CPU, with --tiny models): it is what a
session lent an accelerator runs first, so it must not be found broken there."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
def test_accelerator_benchmark_runs_every_part_on_tiny_models():
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "bench", "bench_accelerator.py"),
      "--tiny",
      "--dtypes=float32",
      "--steps=1",
      "--warmup=0",
    ],
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = {}
  for line in proc.stdout.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 10 and re.fullmatch(r"[0-9.]+", cells[3]):
      rows[cells[0]] = cells
  assert sorted(rows) == ["encode", "ldm", "taming", "vqgan"], proc.stdout
  for part, cells in rows.items():
    seconds, images_per_s, gflop = (float(cells[i]) for i in (3, 4, 5))
    assert seconds > 0 and images_per_s > 0, (part, cells)
    assert gflop > 0, (part, cells)  # XLA's cost analysis (taming: our step's FLOPs)
