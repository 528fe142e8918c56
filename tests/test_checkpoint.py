"""Checkpoints are atomic: a save killed half-way never hides the last good checkpoint; a
checkpoint damaged afterwards is set aside (not deleted) and the one before it restored."""

import asyncio
import gc
import glob
import logging
import os
import signal
import subprocess
import sys

import grain
import jax.numpy as jnp
import numpy as np
import pytest

from arcvq_jax import checkpoint_files
from arcvq_jax.checkpoint import Checkpointer, CheckpointError, abstract_like

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.slow
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


# ------------------------------------------------------------------- damaged checkpoints


def _two_checkpoints(directory: str, data_iter=None) -> None:
  """Steps 1 and 2 of a small state (and of `data_iter`'s position, 5 and 8 elements in)."""
  ckpt = Checkpointer(directory)
  for step, consumed in ((1, 5), (2, 3)):
    if data_iter is not None:
      for _ in range(consumed):
        next(data_iter)
    state = {"w": jnp.arange(1000, dtype=jnp.float32) * step, "step": jnp.asarray(step)}
    ckpt.save(step, state, data_iter)
  ckpt.wait()
  ckpt.close()


def _truncate_array_file(directory: str, step: int) -> None:
  files = glob.glob(os.path.join(directory, str(step), "state", "ocdbt.process_0", "d", "*"))
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(100)


def _garble_metadata(directory: str, step: int) -> None:
  with open(os.path.join(directory, str(step), "state", "_METADATA"), "w") as f:
    f.write('{"tree_metadata": ')


ABSTRACT = abstract_like({"w": jnp.zeros(1000, jnp.float32), "step": jnp.asarray(0)})


@pytest.mark.parametrize("damage", [_truncate_array_file, _garble_metadata])
def test_a_damaged_newest_checkpoint_is_set_aside_and_the_older_one_restored(
  tmp_path, caplog, damage
):
  directory = str(tmp_path / "checkpoints")
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  _two_checkpoints(directory, it)
  damage(directory, 2)
  ckpt = Checkpointer(directory)
  resumed = iter(grain.MapDataset.range(100).to_iter_dataset())
  with caplog.at_level(logging.WARNING):
    state = ckpt.restore_latest(ABSTRACT, resumed)
  assert int(state["step"]) == 1
  np.testing.assert_array_equal(state["w"], np.arange(1000, dtype=np.float32))
  assert next(resumed) == 5  # the iterator is at step 1's position
  assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
  # Moved, not deleted: all of step 2 is under damaged/, with a note of why.
  (moved,) = glob.glob(os.path.join(directory, checkpoint_files.DAMAGED_DIR, "2-*"))
  assert os.path.isdir(os.path.join(moved, "state"))
  with open(os.path.join(moved, checkpoint_files.REASON_FILE)) as f:
    assert "could not be read" in f.read()
  (warning,) = [r.getMessage() for r in caplog.records if "is damaged" in r.getMessage()]
  assert "Checkpoint step 2 is damaged" in warning and moved in warning
  # The next save at step 2 goes where the damaged one was, and orbax lists it.
  ckpt.save(2, {"w": jnp.zeros(1000, jnp.float32), "step": jnp.asarray(2)}, None)
  ckpt.wait()
  assert ckpt.all_steps() == [1, 2]
  ckpt.close()


def test_no_readable_checkpoint_gives_none(tmp_path):
  directory = str(tmp_path / "checkpoints")
  assert Checkpointer(directory).restore_latest(ABSTRACT, None) is None  # none at all
  _two_checkpoints(directory)
  _truncate_array_file(directory, 1)
  _garble_metadata(directory, 2)
  assert Checkpointer(directory).restore_latest(ABSTRACT, None) is None
  assert len(os.listdir(os.path.join(directory, checkpoint_files.DAMAGED_DIR))) == 2


def test_a_checkpoint_of_another_config_is_an_error_and_stays(tmp_path):
  directory = str(tmp_path / "checkpoints")
  _two_checkpoints(directory)
  other = abstract_like({"w": jnp.zeros(999, jnp.float32), "step": jnp.asarray(0)})
  with pytest.raises(CheckpointError, match="does not match this run's config"):
    Checkpointer(directory).restore_latest(other, None)
  assert Checkpointer(directory).all_steps() == [1, 2]
  assert not os.path.exists(os.path.join(directory, checkpoint_files.DAMAGED_DIR))


def test_read_only_restore_skips_damaged_steps_and_moves_nothing(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  _two_checkpoints(directory)
  _truncate_array_file(directory, 2)
  with caplog.at_level(logging.WARNING):
    state, step = checkpoint_files.restore_newest_state(directory)
  assert step == 1 and int(state["step"]) == 1
  assert any("step 2" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records)
  assert checkpoint_files.checkpoint_steps(directory) == [1, 2]  # nothing moved
  with pytest.raises(checkpoint_files.DamagedCheckpointError, match=r"step 2 is damaged.*\(1\)"):
    checkpoint_files.restore_newest_state(directory, step=2)
  state, step = checkpoint_files.restore_newest_state(directory, step=1, abstract_state=ABSTRACT)
  assert step == 1
  path = checkpoint_files.set_aside(directory, 2, "test")
  assert checkpoint_files.checkpoint_steps(directory) == [1] and os.path.isdir(path)


def test_reads_left_behind_by_a_damaged_checkpoint_make_no_noise(tmp_path):
  """orbax abandons its other array reads when one file is unreadable; once the damage is
  reported they must print nothing (through sys.unraisablehook or asyncio's logger), while
  other unraisable exceptions still do. In a fresh process: another test's abandoned reads
  may otherwise be collected during this one."""
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "damaged_restore_script.py"), str(tmp_path)],
    env=dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=300,
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.split("\n")[:2] == ["restored 1", "restored 1"]
  for noise in ("never retrieved", "Event loop is closed", "Exception ignored in: <coroutine"):
    assert noise not in proc.stderr, proc.stderr[-3000:]
  assert proc.stderr.count("Traceback") == 1 and "ValueError: not orbax" in proc.stderr


def test_unretrieved_errors_of_reads_of_a_checkpoint_are_dropped_and_others_reported(caplog):
  """asyncio reports a future's unretrieved error without naming its coroutine (a gathering
  future, a TensorStore future); the checkpoint's path in the error is what identifies it."""
  checkpoint = os.path.join(os.sep, "runs", "a", "checkpoints")
  checkpoint_files.quiet_abandoned_reads(checkpoint)

  def unretrieved_gather(path: str) -> None:
    async def read():
      raise OSError(f"Error reading {path}/2/state/w3: byte range not valid")

    async def start_and_abandon():
      gathered = asyncio.gather(read())
      await asyncio.sleep(0)  # the read fails; nobody asks the gather for its error
      await asyncio.sleep(0)
      assert gathered.done()

    loop = asyncio.new_event_loop()
    loop.run_until_complete(start_and_abandon())
    loop.close()
    gc.collect()

  def reports() -> list[str]:
    return [r.getMessage() for r in caplog.records if "never retrieved" in r.getMessage()]

  with caplog.at_level(logging.DEBUG, logger="asyncio"):
    unretrieved_gather(checkpoint)
    assert reports() == []
    unretrieved_gather(os.path.join(os.sep, "runs", "b", "checkpoints"))
  (report,) = reports()
  assert report.startswith("_GatheringFuture exception was never retrieved")


def test_checkpoint_files_imports_no_grain():
  code = (
    "import sys; from arcvq_jax import checkpoint_files; "
    "bad = {'grain', 'clu', 'tensorflow'} & set(sys.modules); assert not bad, bad"
  )
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
