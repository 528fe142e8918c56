"""Reading checkpoints without the training machinery, and setting damaged ones aside.

Imports only orbax, etils and jax (no grain, clu or TensorFlow), so that the tokenizer API
and the evaluation commands can use it; `arcvq_jax.checkpoint.Checkpointer` builds on it.

A checkpoint step is the directory `<checkpoint_dir>/<step>/` with the items `state` (the
train state, orbax's StandardCheckpointHandler) and `data` (the grain iterator's position,
JSON). A step whose files cannot be read (a truncated array file, a garbled metadata file:
a full disk, a copy cut short, a bad sector) is *damaged*. `set_aside` moves it to
`<checkpoint_dir>/damaged/<step>-<time>/` (never deleting it; orbax's step listing sees only
integer names), with a note of what was wrong, so that the run resumes from the newest
readable step. A step that is readable but does not fit the run's state (another config) is
not damaged: that raises CheckpointError and nothing is moved.
"""

from __future__ import annotations

import json
import logging as std_logging
import os
import sys
import time
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath

DAMAGED_DIR = "damaged"
REASON_FILE = "DAMAGED.txt"


class CheckpointError(RuntimeError):
  """A checkpoint that cannot be restored into the current run."""


class DamagedCheckpointError(CheckpointError):
  """A checkpoint step whose files cannot be read."""


def checkpoint_steps(checkpoint_dir: str) -> list[int]:
  """The finalized steps in `checkpoint_dir` (orbax's listing), ascending; [] if none."""
  directory = epath.Path(checkpoint_dir)
  if not directory.exists():
    return []
  return sorted(ocp.utils.checkpoint_steps(directory))


def set_aside(checkpoint_dir: str, step: int, reason: str) -> str:
  """Moves step `step` of `checkpoint_dir` to `checkpoint_dir/damaged/<step>-<time>/` (with
  DAMAGED.txt saying why), out of orbax's step listing; logs a warning naming both places.
  Nothing is deleted. Returns the new path."""
  directory = epath.Path(checkpoint_dir)
  source = directory / str(step)
  stamp = time.strftime("%Y%m%d-%H%M%S")
  target = directory / DAMAGED_DIR / f"{step}-{stamp}"
  n = 1
  while target.exists():
    n += 1
    target = directory / DAMAGED_DIR / f"{step}-{stamp}-{n}"
  target.parent.mkdir(parents=True, exist_ok=True)
  source.rename(target)
  (target / REASON_FILE).write_text(
    f"Checkpoint step {step} of {directory}, moved here on {time.ctime()} because it could "
    f"not be read:\n{reason}\n"
  )
  logging.warning(
    "Checkpoint step %d is damaged (%s). Moved it aside to %s (not deleted).",
    step,
    _short(reason),
    target,
  )
  return str(target)


def _short(text: str, limit: int = 160) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[: limit - 3] + "..."


def _leaf_signature(tree: Any) -> list[tuple[tuple[int, ...], str]]:
  """Sorted (shape, dtype) of every array leaf: comparable between a metadata tree and an
  abstract state whatever their container types."""
  leaves = [x for x in jax.tree.leaves(tree) if hasattr(x, "shape") and hasattr(x, "dtype")]
  return sorted((tuple(int(d) for d in x.shape), str(x.dtype)) for x in leaves)


def quiet_abandoned_reads(checkpoint_dir: Any) -> None:
  """Stops the noise orbax's unfinished reads of a damaged checkpoint make, for this process.

  orbax reads a step's arrays in asyncio tasks. When one file cannot be read the restore
  raises at once (we report that, in one line); the other reads are left behind, and each
  reports itself later, at any time, interleaved with the training log: "Exception ignored
  in: <coroutine ...>" when it is garbage-collected, "Task (or Future, or _GatheringFuture)
  exception was never retrieved" (asyncio's logger) with the TensorStore error, "RuntimeError:
  Event loop is closed" from TensorStore's threads that finish after the loop closed (some
  before the restore has even raised): ~2,300 lines for one truncated file.

  Call it before reading `checkpoint_dir` with orbax. Once per process it wraps
  `sys.unraisablehook` (dropping coroutines of orbax closed unfinished and the closed loop's
  complaint to TensorStore's callbacks) and filters asyncio's logger, which from then on
  drops the unretrieved errors that name a directory given here. Every other unraisable
  exception and asyncio message goes on as before.
  """
  asyncio_logger = std_logging.getLogger("asyncio")
  reports = next((f for f in asyncio_logger.filters if isinstance(f, _AbandonedReadReports)), None)
  if reports is None:
    reports = _AbandonedReadReports()
    asyncio_logger.addFilter(reports)
  directory = str(checkpoint_dir)
  reports.directories.add(directory if "://" in directory else os.path.abspath(directory))

  previous = sys.unraisablehook
  if getattr(previous, "drops_abandoned_orbax_reads", False):
    return

  def hook(unraisable: Any) -> None:
    if not _is_abandoned_orbax_read(unraisable):
      previous(unraisable)

  hook.drops_abandoned_orbax_reads = True
  sys.unraisablehook = hook


class _AbandonedReadReports(std_logging.Filter):
  """Drops asyncio's "... exception was never retrieved" for reads of the given directories.

  A task's report names its orbax coroutine, a future's only the TensorStore error; both
  name the checkpoint's path, which is what identifies them as ours.
  """

  def __init__(self) -> None:
    super().__init__()
    self.directories: set[str] = set()

  def filter(self, record: std_logging.LogRecord) -> bool:
    message = record.getMessage()
    if "exception was never retrieved" not in message.partition("\n")[0]:
      return True
    return not any(directory in message for directory in self.directories)


def _is_abandoned_orbax_read(unraisable: Any) -> bool:
  code = getattr(unraisable.object, "cr_code", None)  # a coroutine closed unfinished
  if code is not None:
    return f"{os.sep}orbax{os.sep}" in code.co_filename
  tb, frames = unraisable.exc_traceback, []
  while tb is not None:
    frames.append(tb.tb_frame.f_code.co_name)
    tb = tb.tb_next
  return (
    unraisable.object is None
    and isinstance(unraisable.exc_value, RuntimeError)
    and str(unraisable.exc_value) == "Event loop is closed"
    and "call_soon_threadsafe" in frames
  )


def state_metadata(checkpoint_dir: str, step: int) -> Any:
  """The tree of ArrayMetadata (shape, dtype) of a step's 'state' item; DamagedCheckpointError
  where it cannot be read."""
  path = epath.Path(checkpoint_dir) / str(step) / "state"
  handler = ocp.StandardCheckpointHandler()
  try:
    metadata = handler.metadata(path)
  except Exception as e:  # orbax and tensorstore raise many kinds, some a bare Exception
    raise DamagedCheckpointError(f"the metadata of {path} cannot be read: {_short(e)}") from e
  finally:
    handler.close()
  tree = getattr(metadata, "tree", metadata)
  if tree is None:
    raise DamagedCheckpointError(f"{path} has no train-state metadata")
  return tree


def read_state(
  checkpoint_dir: str, step: int, abstract_state: Any = None, sharding: Any = None
) -> Any:
  """The 'state' item of one step, read-only.

  abstract_state: a pytree of jax.ShapeDtypeStruct (with shardings) to restore into; None:
  the saved tree (nested dicts) onto `sharding` (default: the first device).
  Raises DamagedCheckpointError where the files cannot be read, CheckpointError where they
  can but do not fit `abstract_state`.
  """
  path = epath.Path(checkpoint_dir) / str(step) / "state"
  if not path.exists():
    raise CheckpointError(f"{path} does not exist: step {step} has no train state.")
  tree = state_metadata(checkpoint_dir, step)
  if abstract_state is None:
    # This process's own first device: in a multi-process run the global first device
    # belongs to process 0, and the others could not read onto it.
    sharding = sharding or jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract_state = jax.tree.map(
      lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding), tree
    )
  elif _leaf_signature(tree) != _leaf_signature(abstract_state):
    raise CheckpointError(mismatch_message(checkpoint_dir, step))
  handler = ocp.StandardCheckpointHandler()
  quiet_abandoned_reads(checkpoint_dir)
  try:
    return handler.restore(path, args=ocp.args.StandardRestore(abstract_state))
  except Exception as e:  # tensorstore's unreadable chunks arrive as a bare Exception
    raise DamagedCheckpointError(f"the arrays of {path} cannot be read: {_short(e)}") from e
  finally:
    handler.close()


def mismatch_message(checkpoint_dir: str, step: int, detail: str = "") -> str:
  return (
    f"checkpoint {epath.Path(checkpoint_dir) / str(step)} does not match this run's config "
    f"(model size, quantiser or optimizer changed?){': ' + _short(detail) if detail else ''}. "
    "Resume with the config it was written with (the workdir's config.json), or start the "
    "new config in a new --workdir."
  )


def diagnose(checkpoint_dir: str, step: int, abstract_state: Any = None) -> str | None:
  """Why step `step` cannot be read (its files are damaged), or None where its files read
  fine (then a failed restore means it does not fit the run: not damage). Read-only."""
  try:
    tree = state_metadata(checkpoint_dir, step)
  except DamagedCheckpointError as e:
    return str(e)
  if abstract_state is not None and _leaf_signature(tree) != _leaf_signature(abstract_state):
    return None
  try:  # into the run's own shardings where given (a large state may not fit one device)
    read_state(checkpoint_dir, step, abstract_state)
  except DamagedCheckpointError as e:
    return str(e)
  data = epath.Path(checkpoint_dir) / str(step) / "data"
  if data.exists():
    for f in data.glob("*.json"):
      try:
        json.loads(f.read_text())
      except (OSError, ValueError) as e:
        return f"the data iterator position {f} cannot be read: {_short(e)}"
  return None


def restore_newest_state(
  checkpoint_dir: str,
  *,
  step: int | None = None,
  abstract_state: Any = None,
  sharding: Any = None,
) -> tuple[Any, int] | None:
  """(state, step) of the newest readable step of `checkpoint_dir` (or of `step` exactly),
  read-only: damaged steps are skipped with a warning (the next training run sets them
  aside); None where no step is readable or there is none.

  abstract_state / sharding: as `read_state`. With `step`, a damaged step raises
  DamagedCheckpointError naming the readable ones. A step that does not fit
  `abstract_state` raises CheckpointError.
  """
  steps = checkpoint_steps(checkpoint_dir)
  if step is not None:
    if step not in steps:
      raise CheckpointError(f"no checkpoint of step {step} in {checkpoint_dir}; it has {steps}.")
    try:
      return read_state(checkpoint_dir, step, abstract_state, sharding), step
    except DamagedCheckpointError as e:
      others = [s for s in steps if s != step]
      raise DamagedCheckpointError(
        f"checkpoint step {step} is damaged: {e}. Pick another step"
        f"{' (' + ', '.join(map(str, others)) + ')' if others else ''}, or leave out the step "
        "to take the newest readable one."
      ) from e
  for s in reversed(steps):
    try:
      return read_state(checkpoint_dir, s, abstract_state, sharding), s
    except DamagedCheckpointError as e:
      logging.warning(
        "Checkpoint step %d in %s is damaged (%s); trying the one before. The next training "
        "run in this workdir moves it aside.",
        s,
        checkpoint_dir,
        _short(e),
      )
  return None
