"""Checkpoints: the train state and the data iterator's position, through orbax.

Orbax writes every checkpoint into a temporary directory and renames it into place only
once all of it is on disk, so a save killed half-way leaves the previous checkpoint as
the latest one (tests/test_checkpoint.py kills a save to check that). A step damaged later
(a truncated array file, a garbled metadata file) is moved aside by `restore_latest`, which
resumes from the newest readable one (checkpoint_files.py).
"""

from __future__ import annotations

import os
from typing import Any

import grain
import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from arcvq_jax import checkpoint_files
from arcvq_jax.checkpoint_files import CheckpointError, DamagedCheckpointError

__all__ = [
  "CheckpointError",
  "Checkpointer",
  "DamagedCheckpointError",
  "abstract_like",
  "checkpoint_dir",
]


class Checkpointer:
  """Saves and restores {'state': train state pytree, 'data': grain iterator}.

  `directory` may be local or a gs:// path. Keeps the newest `keep` checkpoints.
  """

  def __init__(self, directory: str, keep: int = 3, async_save: bool = False):
    self.directory = epath.Path(directory)
    self._keep, self._async_save = keep, async_save
    self._manager = self._make_manager()

  def _make_manager(self) -> ocp.CheckpointManager:
    keep, async_save = self._keep, self._async_save
    return ocp.CheckpointManager(
      self.directory,
      item_names=("state", "data"),
      item_handlers={
        "state": ocp.StandardCheckpointHandler(),
        "data": grain.checkpoint.CheckpointHandler(),
      },
      options=ocp.CheckpointManagerOptions(
        max_to_keep=keep, create=True, enable_async_checkpointing=async_save
      ),
    )

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_iter: Any | None, force: bool = True) -> None:
    items = {"state": ocp.args.StandardSave(state)}
    if data_iter is not None:
      items["data"] = grain.checkpoint.CheckpointSave(data_iter)
    self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def restore(self, step: int, abstract_state: Any, data_iter: Any | None) -> Any:
    """Restores `step` into the structure, shapes and shardings of `abstract_state`.

    abstract_state: a pytree of jax.ShapeDtypeStruct (with .sharding), e.g. from
    `jax.eval_shape`; data_iter, if given, is moved to the saved position in place.
    """
    items = {"state": ocp.args.StandardRestore(abstract_state)}
    # A checkpoint written outside a training run (api.write_workdir, the converters) has
    # no iterator position: the data then starts from the beginning of the first epoch.
    if data_iter is not None and (self.directory / str(step) / "data").exists():
      items["data"] = grain.checkpoint.CheckpointRestore(data_iter)
    checkpoint_files.quiet_abandoned_reads(self.directory)
    try:
      restored = self._manager.restore(step, args=ocp.args.Composite(**items))
    except (ValueError, KeyError, TypeError, FileNotFoundError) as e:
      raise CheckpointError(
        checkpoint_files.mismatch_message(str(self.directory), step, str(e))
      ) from e
    return restored["state"]

  def restore_latest(self, abstract_state: Any, data_iter: Any | None) -> Any | None:
    """The newest readable checkpoint, restored as `restore` does; None where there is none.

    A damaged step (files that cannot be read: a truncated array file, a garbled metadata
    file) is moved aside, never deleted (`checkpoint_files.set_aside`: a warning names it),
    and the step before it is tried. A readable step that does not fit `abstract_state`
    (another config) raises CheckpointError and moves nothing. Where every step was damaged,
    `data_iter` is put back where it started (a failed restore may have moved it to the
    damaged step's position), so the run that starts afresh is a fresh run, data order
    included; one warning says so.
    """
    # The iterator's position before any restore: orbax may restore the 'data' item of a
    # step whose 'state' then fails to read.
    start = data_iter.get_state() if data_iter is not None else None
    steps = sorted(self.all_steps(), reverse=True)
    for step in steps:
      try:
        return self.restore(step, abstract_state, data_iter)
      except Exception as e:  # orbax raises a bare Exception for unreadable array files
        reason = checkpoint_files.diagnose(str(self.directory), step, abstract_state)
        if reason is None:
          if isinstance(e, CheckpointError):
            raise
          raise CheckpointError(
            checkpoint_files.mismatch_message(str(self.directory), step, str(e))
          ) from e
      if jax.process_index() == 0:
        checkpoint_files.set_aside(str(self.directory), step, reason)
      if jax.process_count() > 1:
        multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
      self._manager.close()  # its step list still names the moved step
      self._manager = self._make_manager()
    if steps:
      if data_iter is not None:
        data_iter.set_state(start)
      which = "The only checkpoint" if len(steps) == 1 else f"All {len(steps)} checkpoints"
      logging.warning(
        "%s in %s %s damaged and set aside in %s; starting afresh from step 0 (a fresh "
        "state, the data from its beginning).",
        which,
        self.directory,
        "was" if len(steps) == 1 else "were",
        self.directory / checkpoint_files.DAMAGED_DIR,
      )
    return None

  def close(self) -> None:
    self._manager.close()


def abstract_like(tree: Any) -> Any:
  """ShapeDtypeStructs (with shardings) of a pytree of arrays, as `restore` wants."""
  return jax.tree.map(
    lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree
  )


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(workdir, "checkpoints")
