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
import pickletools
import re
import tarfile
import warnings
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
  """The weights-only unpickler's own reason, without torch's advice to load unsafely (the
  reason may follow "WeightsUnpickler error:" on the lines after it)."""
  text = str(error)
  if "WeightsUnpickler error:" in text:
    reason = text.split("WeightsUnpickler error:", 1)[1].split("Check the documentation")[0]
    return " ".join(reason.split())
  return text.strip().splitlines()[0] if text.strip() else ""


def _imported_names(path: str, max_pickles: int = 8) -> list[str]:
  """The names the pickles at the start of `path` import (GLOBAL, INST, STACK_GLOBAL), by a
  static scan (pickletools; nothing is built or run). A legacy torch file is several pickles
  in a row, then raw tensor bytes, where the scan stops."""
  names: list[str] = []
  with open(path, "rb") as f:
    for _ in range(max_pickles):
      strings: list[str] = []
      try:
        for op, arg, _ in pickletools.genops(f):
          if op.name in ("GLOBAL", "INST"):
            names.append(str(arg).replace(" ", "."))
          elif op.name == "STACK_GLOBAL":
            names.append(".".join(strings[-2:]) if len(strings) >= 2 else "?")
          elif isinstance(arg, str):
            strings.append(arg)
      except Exception:  # the end of the pickles (or damage): what was read is enough
        break
  return names


def _is_tensor_machinery(name: str) -> bool:
  """Names a torch.save file imports for its tensors and containers (the weights-only
  unpickler admits these)."""
  return name.startswith("torch.") or name in ("collections.OrderedDict", "_codecs.encode")


def _torch_load(path: str, stand_ins: list[tuple[type, str]]) -> Any:
  import torch  # noqa: PLC0415

  with torch.serialization.safe_globals(stand_ins), warnings.catch_warnings():
    # A pickle of another protocol than torch's is read or refused here either way.
    warnings.filterwarnings("ignore", message="Detected pickle protocol")
    try:
      # mmap: tensors are read from the page cache on demand, so optimizer states that the
      # conversion never touches cost no memory.
      return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError as e:
      if "mmap" not in str(e):
        raise
      return torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) file


# What torch.save writes starts with one of these: a zip archive (since PyTorch 1.6), or a
# pickle of protocol 2 or more (the legacy format; PROTO opcode).
_ZIP_MAGIC = (b"PK\x03\x04", b"PK\x05\x06")
_PICKLE_PROTO = b"\x80"
# Pickle opcodes that import a Python object by name (GLOBAL is read and checked by name).
_IMPORTING_OPCODES = {"INST", "OBJ", "STACK_GLOBAL", "EXT1", "EXT2", "EXT4"}
# The weights-only unpickler's refusals to call or build an object it was not given.
_REFUSED_CALL = ("Trying to call reduce", "Can only create new object", "Can only build")
FIX_DAMAGED = "Download or save the file again (a cut-short copy reads like this)."


def check_file(path: str) -> None:
  """Raises CheckpointReadError for a path that cannot be a checkpoint file: missing, a
  directory, empty, or starting as neither a zip archive nor a pickle (a text file, an image,
  random bytes). Reads the first bytes only."""
  if os.path.isdir(path):
    raise CheckpointReadError(
      f"{path} is a directory, not a checkpoint file: give the .pt / .pth / .ckpt file in it."
    )
  if not os.path.exists(path):
    raise CheckpointReadError(f"no such file: {path} (relative to {os.getcwd()}). Check the path.")
  try:
    with open(path, "rb") as f:
      head = f.read(8)
  except OSError as e:
    raise CheckpointReadError(f"cannot read {path} ({e.strerror or e}).") from e
  if not head:
    raise CheckpointReadError(f"{path} is empty (0 bytes): not a PyTorch checkpoint. {FIX_DAMAGED}")
  if not head.startswith((*_ZIP_MAGIC, _PICKLE_PROTO)) and not tarfile.is_tarfile(path):
    raise CheckpointReadError(
      f"{path} is not a PyTorch checkpoint: it is neither a zip archive (what torch.save "
      f"writes) nor a pickle (it starts with {head!r}). Give the file torch.save wrote. "
      f"{FIX_DAMAGED}"
    )


def _unsupported_opcode(error: Exception) -> str | None:
  """The name of the pickle opcode in the unpickler's "Unsupported operand N", or None."""
  match = re.search(r"Unsupported operand (\d+)", str(error))
  if not match:
    return None
  op = pickletools.code2op.get(chr(int(match.group(1))))
  return op.name if op else f"byte {match.group(1)}"


def _refusal(path: str, detail: str) -> UnsafeCheckpointError:
  return UnsafeCheckpointError(
    f"refusing to load {path}: unpickling it would import and call Python objects "
    f"that are not tensors or checkpoint metadata ({detail}). This converter reads "
    "tensors only and never runs code from a checkpoint. A whole pickled model "
    "(torch.save(model)) is refused too: save model.state_dict() instead. If you "
    "trust the file, extract its state_dict in a trusted environment and convert "
    f"that:\n  {TRUSTED_EXTRACT.replace('IN', path)}"
  )


def _damaged(path: str, error: BaseException, reason: str = "") -> CheckpointReadError:
  # The first sentence of the reader's message (torch's go on with advice).
  detail = reason or (str(error).strip().splitlines()[0] if str(error).strip() else "")
  detail = detail.split(". ")[0]
  detail = f"{type(error).__name__}: {detail}" if detail else type(error).__name__
  return CheckpointReadError(
    f"cannot read {path} as a PyTorch checkpoint ({detail}): it is "
    f"damaged or not a checkpoint. {FIX_DAMAGED}"
  )


def load_torch_file(path: str) -> Any:
  """torch.load(path, weights_only=True), admitting METADATA_GLOBALS as inert stand-ins.

  Raises UnsafeCheckpointError, naming the globals (or the pickle opcode), when the file needs
  anything else; nothing from the file is executed either way. CheckpointReadError for a
  missing, empty, damaged or foreign file (check_file), the reason in its message.
  """
  try:
    import torch  # noqa: PLC0415, F401
  except ImportError as e:
    raise CheckpointReadError(
      "reading PyTorch checkpoints needs PyTorch (CPU is enough): "
      "`pip install torch`. Training and evaluation do not."
    ) from e
  check_file(path)
  stand_ins: list[tuple[type, str]] = []
  admitted: set[str] = set()
  for _ in range(64):  # one retry per newly admitted name (legacy files reveal one at a time)
    try:
      return _torch_load(path, stand_ins)
    except pickle.UnpicklingError as e:
      names = [n for n in _unsafe_globals(path, e) if n not in admitted]
      refused = [n for n in names if not is_metadata_global(n)]
      if refused:
        raise _refusal(path, ", ".join(refused)) from None
      if not names:
        # The unpickler stopped before naming a global: at a pickle opcode it lacks (a newer
        # protocol's, or one that imports by name) or at bytes that are no pickle.
        imported = [n for n in _imported_names(path) if not _is_tensor_machinery(n)]
        imported = [n for n in imported if not is_metadata_global(n)]
        opcode = _unsupported_opcode(e)
        reason = _unpickler_message(e)
        if imported or opcode in _IMPORTING_OPCODES or reason.startswith(_REFUSED_CALL):
          detail = ", ".join(sorted(set(imported)))
          detail = detail or (f"pickle opcode {opcode}" if opcode in _IMPORTING_OPCODES else reason)
          raise _refusal(path, detail) from None
        raise _damaged(path, e, reason) from None
      admitted.update(names)
      stand_ins += _stand_ins(names)
    except Exception as e:  # what the unpickler makes of foreign bytes: KeyError, EOFError, ...
      raise _damaged(path, e) from e
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
    "nor a Lightning checkpoint (a dict with 'state_dict'): give the file of "
    "torch.save(model.state_dict()) or a Lightning .ckpt."
  )
