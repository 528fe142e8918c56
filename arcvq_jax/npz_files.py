"""Weight and statistics files as .npz: flat '/'-joined keys, written atomically (local or gs://).

The pretrained networks (LPIPS, the FID Inception) and cached FID statistics are stored this
way: no pickle, readable with plain numpy.
"""

from __future__ import annotations

import io
import uuid
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from etils import epath


def flatten(params: Any) -> dict[str, np.ndarray]:
  """Nested dict of arrays -> {'a/b/kernel': float32 numpy array}."""
  return {
    "/".join(str(getattr(k, "key", k)) for k in path): np.asarray(leaf, np.float32)
    for path, leaf in jax.tree_util.tree_leaves_with_path(params)
  }


def unflatten(flat: dict[str, np.ndarray]) -> dict[str, Any]:
  """{'a/b/kernel': array} -> nested dict of float32 jax arrays."""
  tree: dict[str, Any] = {}
  for key, value in flat.items():
    *parents, leaf = key.split("/")
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = jnp.asarray(value, jnp.float32)
  return tree


def save_npz(path: str, arrays: dict[str, Any]) -> None:
  """np.savez of `arrays` to `path`, atomically: a temporary file in the same folder, then a
  rename (an interrupted write never leaves a half file at `path`)."""
  buf = io.BytesIO()
  np.savez(buf, **arrays)
  target = epath.Path(path).expanduser()
  target.parent.mkdir(parents=True, exist_ok=True)
  tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex}"
  try:
    tmp.write_bytes(buf.getvalue())
    tmp.replace(target)
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def read_npz(path: str) -> dict[str, np.ndarray]:
  """All arrays of an .npz (local or gs://). Raises OSError / ValueError on a bad file."""
  data = epath.Path(path).expanduser().read_bytes()
  # numpy would call other bytes "pickled (object) data", and raise EOFError / BadZipFile
  # (neither an OSError nor a ValueError) for an empty or cut-short file.
  if not data.startswith((b"PK\x03\x04", b"PK\x05\x06")):
    what = f"is not an .npz file (it starts with {data[:8]!r})" if data else "is empty (0 bytes)"
    raise ValueError(f"{path} {what}")
  try:
    with np.load(io.BytesIO(data), allow_pickle=False) as d:
      return {k: d[k] for k in d.files}
  except (EOFError, zipfile.BadZipFile) as e:
    raise ValueError(f"{path} is damaged or cut short ({type(e).__name__}: {e})") from e


def check_shapes(
  flat: dict[str, np.ndarray],
  expected: dict[str, tuple[int, ...]],
  source: str,
  error: type[Exception],
  what: str,
  convert_command: str,
) -> None:
  """Raises `error` naming the first array of `expected` that `flat` lacks or holds in another
  shape; `what` names the file kind ('an LPIPS VGG16 weights file') and `convert_command`
  how to make a good one."""
  for key, shape in expected.items():
    if key not in flat:
      raise error(
        f"{source} has no array {key!r} (expected shape {shape}): not {what}. "
        f"Convert one with: {convert_command}"
      )
    if tuple(flat[key].shape) != shape:
      raise error(
        f"{source}: {key!r} has shape {tuple(flat[key].shape)}, expected {shape}. "
        f"Convert the weights again with: {convert_command}"
      )


def read_weights(
  path: str, error: type[Exception], what: str, how_to_get: str, convert_command: str
) -> dict[str, np.ndarray]:
  """The arrays of a converted weights file; `error` if it is missing (with `how_to_get`) or
  unreadable (with `convert_command`). `what` names the file kind ('LPIPS weights')."""
  if not epath.Path(path).expanduser().exists():
    raise error(f"no {what} file at {path}. {how_to_get}")
  try:
    return read_npz(path)
  except (OSError, ValueError) as e:
    raise error(
      f"{path} is not a readable .npz {what} file ({e}). Convert the weights "
      f"again with: {convert_command}"
    ) from e
