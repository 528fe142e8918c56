"""Reading PyTorch state dict files (.pth) into numpy, for the weight converters.

Kept apart from the converters: each converter defines absl flags at import (--out, ...), so
one converter cannot import another. Reading goes through torch_load: no code from the file
runs, and a missing, empty, damaged or code-carrying file is one error naming the file.
"""

from __future__ import annotations

import numpy as np

from arcvq_jax.convert import torch_load


def load_torch_state(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict file -> {key: numpy array} (its tensors; other entries are left out).

  Raises torch_load.CheckpointReadError for a file that is no state dict (missing, damaged,
  another format, or holding something else than a dict), torch_load.UnsafeCheckpointError
  for one that would run code.
  """
  state = torch_load.load_torch_file(path)
  if not isinstance(state, dict):
    raise torch_load.CheckpointReadError(
      f"{path} holds a {type(state).__name__}, not a state dict (a dict of tensors): give the "
      "file of model.state_dict()."
    )
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}
