"""A training run's hold on its --workdir: one run at a time, and nothing written until the
run's config has been checked against what the workdir holds.

Every training stage (tokenizer, LDM, PixelCNN) does, in this order:

  with workdir.hold(workdir):               # the lock: WORKDIR/.lock
    changes = workdir.check_config(config, workdir, image_shape)   # reads only
    ... build the state, restore the newest checkpoint (a shape mismatch raises here) ...
    workdir.commit(config, workdir, changes, step)   # config.json, config_changes.json
    ... train, write events, checkpoints, evaluation ...

so a run refused for its config, its data or its checkpoint leaves every file of the workdir
as it was. Which config keys may change on resume, and why: `RESUMABLE` below and
docs/training.md, "Errors and resuming".

The lock is `fcntl.flock` on WORKDIR/.lock, which holds the holder's pid, host, start time
and command while it runs (and is emptied when it ends). The kernel releases a flock when
its process dies, however it dies (kill -9 included), so a stale file never blocks a run:
only a live holder does. In a multi-process run only process 0 locks and checks; the other
processes follow its verdict. Remote workdirs (gs://) are not locked (no flock there).
Evaluation and sampling read a workdir without the lock (docs/training.md says why).
"""

from __future__ import annotations

import contextlib
import fcntl
import fnmatch
import json
import math
import os
import socket
import sys
import time
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from arcvq_jax import checkpoint_files

LOCK_FILE = ".lock"
CONFIG_FILE = "config.json"
CHANGES_FILE = "config_changes.json"
IMAGE_SHAPE_FILE = "image_shape.json"

# Config keys (fnmatch patterns over dotted paths) that a resumed run may change; every other
# key is refused while the workdir holds a checkpoint. Decided key by key from what the
# checkpoint's shapes and structure depend on, and from what would change results without
# the user asking for it.
RESUMABLE = (
  # How long and how fast: the run's length and the learning rate (not the optimizer's kind,
  # its betas or its state).
  "num_train_steps",
  "num_epochs",
  "optimizer.lr",
  "optimizer.scale_lr",
  # What is logged, drawn, evaluated and kept, and when.
  "log_every_steps",
  "image_every_steps",
  "sample_every_steps",
  "eval_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "checkpoint_async",
  "eval_batch_size",
  "data.eval_split",
  # Where the inputs are (the data's image shape is checked on its own, image_shape.json).
  "data.path",
  "data.data_dir",
  "lpips_path",
  "latents.dir",
  "latents.encode_batch_size",
  # How the same computation is laid out and which kernels run it.
  "sharding.*",
  "model.deconv_impl",
  "model.cpu_conv_library",
  "pixelcnn.cpu_conv_library",
  "arc.impl",
  "quantizer.search_impl",
  "quantizer.codebook_axis",
  # Compute precision: parameters and optimizer states are float32 either way.
  "model.dtype",
  "unet.dtype",
  # A prior's sampling settings (its grids, `arcvq_jax.sample`) and what it asserts about its
  # tokenizer (checked against the tokenizer itself).
  "sampling.*",
  "tokenizer_expect.*",
)

# Keys that a record file in the workdir pins, where it exists: the stage compares them with
# that record before writing anything (a prior's tokenizer.json: the tokenizer's resolved
# path, step, codebook size and latent shape; train/prior_common.load_tokenizer), so the
# config check leaves them to it. Without the file they are refused like any other key.
PINNED_BY = {"tokenizer_workdir": "tokenizer.json", "tokenizer_step": "tokenizer.json"}

# Keys that may change only between some values: (allowed(old, new), why not otherwise).
CONDITIONAL = {
  "optimizer.grad_clip_norm": (
    lambda old, new: (old > 0) == (new > 0),
    "turning clipping on or off changes the optimizer state's structure",
  ),
}

# Keys that a run may also change where the workdir's newest checkpoint is a starting point
# rather than a run in progress: weights written by a converter or `api.write_workdir`, with
# no data position saved. Nothing of the data stream is resumed from it, so the data, its
# order and the batch are the new run's to choose (the weights' shapes are still checked by
# the restore, before anything is written).
STARTING_POINT = ("seed", "batch_size", "data.*")

# Keys whose absence from a config.json written before they existed means a value other than
# today's default: such a workdir's run computed that value, and resuming it with the default
# would change its network under it.
ABSENT_MEANS = {"model.residual_skip": "identity"}

# Keys compared as paths (the same directory written another way is no change).
PATH_KEYS = ("tokenizer_workdir",)


class WorkdirError(RuntimeError):
  """The workdir cannot take this run; the message names why and the fix."""


class ConfigConflictError(WorkdirError):
  """The run's config differs from the workdir's in keys that cannot change on resume."""


class WorkdirLockedError(WorkdirError):
  """Another run holds the workdir."""


# --------------------------------------------------------------------------- the lock


def holder_line(info: dict[str, Any]) -> str:
  """'pid 1234 on host h since 2026-12-08 10:42:03: python -m arcvq_jax.main ...' (a lock's
  record)."""
  since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("since", 0)))
  return (
    f"pid {info.get('pid', '?')} on host {info.get('host', '?')} since {since}: "
    f"{info.get('command', '?')}"
  )


def _command() -> str:
  argv = list(getattr(sys, "orig_argv", None) or sys.argv)
  if argv:
    argv[0] = os.path.basename(argv[0])
  return " ".join(argv)


def _read_holder(fd: int) -> dict[str, Any] | None:
  try:
    text = os.pread(fd, 1 << 16, 0).decode("utf-8", "replace")
    return json.loads(text) if text.strip() else None
  except (OSError, ValueError):
    return None


def _agree(error: Exception | None, what: str) -> None:
  """Raises `error` on process 0; in a multi-process run every other process raises too
  when process 0 did (one small collective), so none of them goes on alone."""
  if jax.process_count() > 1:
    failed = bool(multihost_utils.broadcast_one_to_all(np.int32(error is not None)))
    if failed and jax.process_index() != 0:
      raise WorkdirError(f"process 0 refused the workdir ({what}); its log says why.")
  if error is not None:
    raise error


@contextlib.contextmanager
def hold(workdir: str) -> Iterator[None]:
  """Holds WORKDIR/.lock for the block; WorkdirLockedError naming the holder where another
  run has it. Process 0 only (the others follow); gs:// workdirs are not locked."""
  if "://" in workdir:
    logging.info("%s is remote: not locked (two runs in it at once are not detected).", workdir)
    yield
    return
  fd, error = None, None
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, LOCK_FILE)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      holder = _read_holder(fd)
      os.close(fd)
      fd = None
      who = holder_line(holder) if holder else "a process that is just starting"
      error = WorkdirLockedError(
        f"--workdir={workdir} is in use by another run: {who}. Wait for it to finish (or "
        f"stop it), or give this run another --workdir. ({path} is held with flock.)"
      )
    else:
      record = dict(pid=os.getpid(), host=socket.gethostname(), since=time.time())
      record["command"] = _command()
      os.ftruncate(fd, 0)
      os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
  _agree(error, "another run holds it")
  try:
    yield
  finally:
    if fd is not None:
      os.ftruncate(fd, 0)  # an idle workdir's .lock is empty
      fcntl.flock(fd, fcntl.LOCK_UN)
      os.close(fd)


# --------------------------------------------------------------------------- the config


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
  """{'a': {'b': 1}} -> {'a.b': 1}: a config as JSON values by dotted key."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def as_json(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as config.json holds it (tuples as lists, None as null)."""
  return json.loads(config.to_json_best_effort())


def _same(key: str, old: Any, new: Any) -> bool:
  if key in PATH_KEYS and isinstance(old, str) and isinstance(new, str) and old and new:
    norm = lambda p: os.path.abspath(os.path.expanduser(p))
    return norm(old) == norm(new)
  if isinstance(old, float) and isinstance(new, float) and math.isnan(old) and math.isnan(new):
    return True
  return old == new and (type(old) is type(new) or _numbers(old, new))


def _numbers(*values: Any) -> bool:
  return all(isinstance(v, int | float) and not isinstance(v, bool) for v in values)


def compare(
  old: dict[str, Any],
  new: dict[str, Any],
  resuming: bool = True,
  pinned: frozenset[str] = frozenset(),
  starting_point: bool = False,
) -> tuple[dict[str, tuple[Any, Any]], dict[str, tuple[Any, Any]]]:
  """(allowed, refused) changes {dotted key: (old, new)} between two configs as JSON.

  'stage' is always compared (a workdir belongs to one stage); the other keys only when
  `resuming` (the workdir holds a checkpoint), by RESUMABLE and CONDITIONAL; `pinned` keys
  are left to the record that pins them (PINNED_BY); with `starting_point` (the newest
  checkpoint holds no data position) the STARTING_POINT keys may change too. A key that only
  one side has is allowed (older versions wrote fewer keys; a real change of kind also changes
  a key both have, such as model.name or quantizer.name); None stands for absent.
  """
  old_flat, new_flat = flatten(old), flatten(new)
  old_flat.setdefault("stage", "tokenizer")  # written before configs had a stage
  for key, value in ABSENT_MEANS.items():
    if key in new_flat and key not in old_flat:
      old_flat[key] = value
  new_flat.setdefault("stage", "tokenizer")
  allowed, refused = {}, {}
  for key in sorted(old_flat.keys() | new_flat.keys()):
    before, after = old_flat.get(key), new_flat.get(key)
    if key in old_flat and key in new_flat and _same(key, before, after):
      continue
    both = key in old_flat and key in new_flat
    ok = key != "stage" and (
      not resuming
      or not both
      or key in pinned
      or any(fnmatch.fnmatchcase(key, p) for p in RESUMABLE)
      or (starting_point and any(fnmatch.fnmatchcase(key, p) for p in STARTING_POINT))
      or (key in CONDITIONAL and _numbers(before, after) and CONDITIONAL[key][0](before, after))
    )
    (allowed if ok else refused)[key] = (before, after)
  return allowed, refused


def _value(value: Any) -> str:
  return json.dumps(value)


def describe(changes: dict[str, tuple[Any, Any]], limit: int = 8) -> str:
  """'a.b 1 -> 2, c "x" -> "y"' (at most `limit` keys, then how many more)."""
  parts = [f"{k} {_value(a)} -> {_value(b)}" for k, (a, b) in list(changes.items())[:limit]]
  if len(changes) > limit:
    parts.append(f"and {len(changes) - limit} more")
  return ", ".join(parts)


def _read_json(path: epath.Path) -> Any:
  try:
    return json.loads(path.read_text())
  except ValueError as e:
    raise WorkdirError(
      f"{path} is not valid JSON ({e}); the workdir is damaged. Repair or remove the file, "
      "or give another --workdir."
    ) from e


def _refusal(workdir: str, refused: dict[str, tuple[Any, Any]]) -> ConfigConflictError:
  reasons = sorted(
    {CONDITIONAL[k][1] for k, (a, b) in refused.items() if k in CONDITIONAL and _numbers(a, b)}
  )
  why = f" ({'; '.join(reasons)})" if reasons else ""
  return ConfigConflictError(
    f"--workdir={workdir} holds a run whose config differs in keys that cannot change on "
    f"resume: {describe(refused)}{why}. Give this config a new --workdir, or put the old "
    f"values back ({os.path.join(workdir, CONFIG_FILE)} has them). What may change on "
    'resume: docs/training.md, "Errors and resuming".'
  )


def check_config(
  config: ml_collections.ConfigDict,
  workdir: str,
  image_shape: tuple[int, ...] | None = None,
) -> dict[str, tuple[Any, Any]]:
  """The allowed changes {key: (old, new)} from the workdir's config.json to `config`;
  ConfigConflictError (nothing written) where a key changes that cannot, or where the data's
  `image_shape` (H, W, C) is not the one the workdir's checkpoints were trained on. Reads
  only. Process 0 checks, the others follow its verdict (and get {})."""
  if jax.process_index() != 0:
    _agree(None, "its config")
    return {}
  changes, error = {}, None
  try:
    changes = _check(config, workdir, image_shape)
  except WorkdirError as e:
    error = e
  _agree(error, "its config")
  return changes


def _check(
  config: ml_collections.ConfigDict, workdir: str, image_shape: tuple[int, ...] | None
) -> dict[str, tuple[Any, Any]]:
  path = epath.Path(workdir) / CONFIG_FILE
  checkpoints = epath.Path(workdir) / "checkpoints"
  steps = checkpoint_files.checkpoint_steps(str(checkpoints)) if checkpoints.is_dir() else []
  resuming = bool(steps)
  # A converter's or write_workdir's checkpoint: weights without a data position.
  starting_point = resuming and not (checkpoints / str(max(steps)) / "data").exists()
  changes: dict[str, tuple[Any, Any]] = {}
  if path.exists():
    old = _read_json(path)
    pinned = frozenset(k for k, f in PINNED_BY.items() if (epath.Path(workdir) / f).exists())
    changes, refused = compare(old, as_json(config), resuming, pinned, starting_point)
    if refused:
      raise _refusal(workdir, refused)
  shape_path = epath.Path(workdir) / IMAGE_SHAPE_FILE
  if image_shape is not None and resuming and shape_path.exists():
    old_shape = list(_read_json(shape_path).get("image_shape", []))
    if old_shape != list(image_shape):
      raise ConfigConflictError(
        f"--workdir={workdir} holds a run trained on {'x'.join(map(str, old_shape))} images "
        f"(H x W x C), but config.data now gives {'x'.join(map(str, image_shape))} images. "
        "Point config.data at the data it was trained on, or give this run a new --workdir."
      )
  return changes


def _write_text(path: epath.Path, text: str) -> None:
  """Writes `path` whole or not at all (a temporary file renamed over it)."""
  tmp = path.parent / (path.name + ".tmp")
  tmp.write_text(text)
  tmp.replace(path)


def commit(
  config: ml_collections.ConfigDict,
  workdir: str,
  changes: dict[str, tuple[Any, Any]],
  step: int,
  image_shape: tuple[int, ...] | None = None,
) -> None:
  """After the checks and the restore: writes config.json (what the tokenizer API, sampling
  and evaluation read) and image_shape.json, and appends the allowed `changes` to
  config_changes.json with the step they take effect at (one log line). Process 0."""
  if jax.process_index() != 0:
    return
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  _write_text(root / CONFIG_FILE, config.to_json_best_effort(indent=2))
  if image_shape is not None:
    _write_text(root / IMAGE_SHAPE_FILE, json.dumps(dict(image_shape=list(image_shape))))
  if not changes:
    return
  record_path = root / CHANGES_FILE
  records = _read_json(record_path) if record_path.exists() else []
  records.append(
    dict(
      step=int(step),
      time=time.strftime("%Y-%m-%d %H:%M:%S"),
      changes={k: [a, b] for k, (a, b) in changes.items()},
    )
  )
  _write_text(record_path, json.dumps(records, indent=2))
  logging.info(
    "Config changed at step %d: %s (recorded in %s).", step, describe(changes), record_path
  )
