"""Reads PyTorch checkpoint files without running code from them.

A `.pt` / `.ckpt` file is a pickle, and unpickling can call any Python function the file
names (`os.system`, `exec`, ...). Everything here goes through `torch.load(weights_only=True)`,
whose unpickler only builds tensors and plain containers and refuses every other global.

Lightning checkpoints (taming-transformers' `.ckpt`) carry a few non-tensor objects besides
the `state_dict`: old Lightning versions key `callbacks` by the callback *class*
(`pytorch_lightning.callbacks.model_checkpoint.ModelCheckpoint`), newer ones keep
`hyper_parameters` as omegaconf containers, some hold numpy scalars. Those names, and only
those (`METADATA_GLOBALS`), are admitted -- as inert stand-ins (`Inert`): the real class or
function is never imported or called, so admitting them cannot run code. A file that names
anything else (a pickled nn.Module, `os.system`, `builtins.exec`, ...) is refused with the
list of names, before any of it is built.

`read_checkpoint` returns the tensors as numpy arrays: {key: np.ndarray}.
"""

from __future__ import annotations

import dataclasses
import os
import pickle
import re
from typing import Any

import numpy as np

# Names a Lightning / taming checkpoint holds outside its state_dict, admitted as inert
# stand-ins. Exact names, and prefixes ending in '.'.
METADATA_GLOBALS = (
  # Old Lightning keys ckpt['callbacks'] by the callback class.
  "pytorch_lightning.callbacks.",
  "lightning.pytorch.callbacks.",
  # Hyper-parameters: omegaconf containers and Lightning's AttributeDict.
  "omegaconf.",
  "typing.Any",
  "pytorch_lightning.utilities.parsing.AttributeDict",
  "lightning.pytorch.utilities.parsing.AttributeDict",
  "lightning.fabric.utilities.data.AttributeDict",
  "argparse.Namespace",
  "pathlib.PosixPath",
  "pathlib.WindowsPath",
  # numpy scalars and arrays in callback states (e.g. a best score).
  "numpy.core.multiarray.scalar",
  "numpy._core.multiarray.scalar",
  "numpy.core.multiarray._reconstruct",
  "numpy._core.multiarray._reconstruct",
  "numpy.ndarray",
  "numpy.dtype",
  "numpy.dtypes.",
)

TRUSTED_EXTRACT = (
  "python -c \"import torch; ckpt = torch.load('IN', map_location='cpu', weights_only=False); "
  "torch.save(ckpt.get('state_dict', ckpt), 'state_dict.pt')\""
)


class UnsafeCheckpointError(ValueError):
  """The file needs code execution to load (it names functions or classes we do not admit)."""


class CheckpointReadError(ValueError):
  """The file is missing, damaged, or not a checkpoint this converter understands."""


class Inert:
  """Stands in for a class or function a checkpoint names (see METADATA_GLOBALS).

  Calling it (pickle's REDUCE / NEWOBJ) only records the arguments; BUILD records the state.
  Nothing of the named object runs.
  """

  torch_name = "?"

  def __new__(cls, *args, **kwargs):
    del args, kwargs
    return object.__new__(cls)

  def __init__(self, *args, **kwargs):
    self.args, self.kwargs, self.state = args, kwargs, None

  def __setstate__(self, state):
    self.state = state

  def __repr__(self) -> str:
    return f"<inert stand-in for {self.torch_name}>"


def is_metadata_global(name: str) -> bool:
  return any(name.startswith(p) if p.endswith(".") else name == p for p in METADATA_GLOBALS)


def _stand_ins(names: list[str]) -> list[tuple[type, str]]:
  """(inert class, name) pairs for torch.serialization.safe_globals."""
  out = []
  for name in names:
    cls = type(name.rsplit(".", 1)[-1], (Inert,), {"torch_name": name, "__module__": __name__})
    out.append((cls, name))
  return out


_GLOBAL_IN_MESSAGE = re.compile(r"GLOBAL ([\w.]+)")


def _unsafe_globals(path: str, error: Exception) -> list[str]:
  """The globals of `path` that weights_only refuses: a static scan of the pickle (zip
  format), or the one named in the error (legacy format)."""
  import torch  # noqa: PLC0415

  try:
    return sorted(set(torch.serialization.get_unsafe_globals_in_checkpoint(path)))
  except Exception:
    return _GLOBAL_IN_MESSAGE.findall(str(error))[:1]


def _unpickler_message(error: Exception) -> str:
  """The weights-only unpickler's own reason, without torch's advice to load unsafely."""
  for line in str(error).splitlines():
    if "WeightsUnpickler error:" in line:
      return line.split("WeightsUnpickler error:", 1)[1].strip()
  return str(error).splitlines()[0]


def _torch_load(path: str, stand_ins: list[tuple[type, str]]) -> Any:
  import torch  # noqa: PLC0415

  with torch.serialization.safe_globals(stand_ins):
    try:
      # mmap: tensors are read from the page cache on demand, so optimizer states that the
      # conversion never touches cost no memory.
      return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file


def load_torch_file(path: str) -> Any:
  """torch.load(path, weights_only=True), admitting METADATA_GLOBALS as inert stand-ins.

  Raises UnsafeCheckpointError, naming the globals, when the file needs anything else;
  nothing from the file is executed either way. CheckpointReadError for an unreadable file.
  """
  try:
    import torch  # noqa: PLC0415, F401
  except ImportError as e:
    raise SystemExit(
      "reading PyTorch checkpoints needs PyTorch (CPU is enough): "
      "`pip install torch`. Training and evaluation do not."
    ) from e
  if not os.path.isfile(path):
    raise CheckpointReadError(f"no such file: {path}")
  stand_ins: list[tuple[type, str]] = []
  admitted: set[str] = set()
  for _ in range(64):  # one retry per newly admitted name (legacy files reveal one at a time)
    try:
      return _torch_load(path, stand_ins)
    except pickle.UnpicklingError as e:
      names = [n for n in _unsafe_globals(path, e) if n not in admitted]
      refused = [n for n in names if not is_metadata_global(n)]
      if refused or not names:
        detail = ", ".join(refused) if refused else _unpickler_message(e)
        raise UnsafeCheckpointError(
          f"refusing to load {path}: unpickling it would import and call Python objects "
          f"that are not tensors or checkpoint metadata ({detail}). This converter reads "
          "tensors only and never runs code from a checkpoint. A whole pickled model "
          "(torch.save(model)) is refused too: save model.state_dict() instead. If you "
          "trust the file, extract its state_dict in a trusted environment and convert "
          f"that:\n  {TRUSTED_EXTRACT.replace('IN', path)}"
        ) from None
      admitted.update(names)
      stand_ins += _stand_ins(names)
    except (RuntimeError, EOFError, OSError, ValueError) as e:
      raise CheckpointReadError(f"cannot read {path} as a PyTorch checkpoint: {e}") from e
  raise CheckpointReadError(f"cannot read {path}: too many non-tensor globals")


@dataclasses.dataclass
class TorchCheckpoint:
  """The tensors of a checkpoint and what the file says about its training.

  state: {state_dict key: float32 / integer numpy array}.
  global_step: Lightning's `global_step` (None for a bare state_dict).
  format: 'state_dict' (a bare state_dict, e.g. ArcVQ-VAE's best.pt) or 'lightning'.
  metadata: the other top-level keys of a Lightning checkpoint (not used for weights).
  """

  state: dict[str, np.ndarray]
  global_step: int | None
  format: str
  metadata: list[str]


def _to_numpy(key: str, value: Any) -> np.ndarray:
  import torch  # noqa: PLC0415

  if not isinstance(value, torch.Tensor):
    raise CheckpointReadError(f"state_dict entry {key!r} is a {type(value).__name__}, not a tensor")
  value = value.detach()
  if value.is_floating_point() and value.dtype != torch.float32:
    value = value.float()  # fp16 / bf16 / fp64 checkpoints: parameters are float32 here
  return value.numpy()


def _is_state_dict(obj: Any) -> bool:
  import torch  # noqa: PLC0415

  return (
    isinstance(obj, dict)
    and bool(obj)
    and all(isinstance(k, str) for k in obj)
    and any(isinstance(v, torch.Tensor) for v in obj.values())
  )


def read_checkpoint(path: str) -> TorchCheckpoint:
  """A bare state_dict (`torch.save(model.state_dict())`) or a Lightning checkpoint
  ({'state_dict': ..., 'global_step': ...}) -> TorchCheckpoint, without running code."""
  obj = load_torch_file(path)
  if isinstance(obj, dict) and "state_dict" in obj:
    if not _is_state_dict(obj["state_dict"]):
      raise CheckpointReadError(f"{path}: ckpt['state_dict'] holds no tensors")
    step = obj.get("global_step")
    state = {k: _to_numpy(k, v) for k, v in obj["state_dict"].items()}
    return TorchCheckpoint(
      state=state,
      global_step=int(step) if isinstance(step, int) else None,
      format="lightning",
      metadata=sorted(str(k) for k in obj if k != "state_dict"),
    )
  if _is_state_dict(obj):
    return TorchCheckpoint(
      state={k: _to_numpy(k, v) for k, v in obj.items()},
      global_step=None,
      format="state_dict",
      metadata=[],
    )
  raise CheckpointReadError(
    f"{path} holds a {type(obj).__name__} that is neither a state_dict (a dict of tensors) "
    "nor a Lightning checkpoint (a dict with 'state_dict')"
  )
