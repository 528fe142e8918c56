"""Checkpoints are atomic: a save killed half-way never hides the last good checkpoint."""

import os
import signal
import subprocess
import sys

import numpy as np

from arcvq_jax.checkpoint import Checkpointer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_killed_save_leaves_previous_checkpoint_latest_and_restorable(tmp_path):
  directory = str(tmp_path / "ckpt")
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "checkpoint_kill_script.py"), directory],
    env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == -signal.SIGKILL, (proc.returncode, proc.stdout, proc.stderr[-3000:])
  # The half-written step 2 is still on disk, under its temporary name.
  assert any(".orbax-checkpoint-tmp" in n for n in os.listdir(directory)), os.listdir(directory)
  ckpt = Checkpointer(directory)
  assert ckpt.latest_step() == 1
  assert ckpt.all_steps() == [1]
  state = ckpt.restore(1, None, None)
  np.testing.assert_array_equal(state["w"], np.arange(1000, dtype=np.float32))
  assert int(state["step"]) == 1
