"""Reading PyTorch state dict files (.pth) into numpy, for the weight converters.

Kept apart from the converters: each converter defines absl flags at import (--out, ...), so
one converter cannot import another.
"""

from __future__ import annotations

import os

import numpy as np


def load_torch_state(path: str) -> dict[str, np.ndarray]:
  """A PyTorch state dict file -> {key: numpy array}."""
  try:
    import torch  # noqa: PLC0415
  except ImportError as e:
    raise SystemExit("reading .pth files needs PyTorch: `pip install torch`.") from e
  if not os.path.exists(path):
    raise SystemExit(f"no such file: {path}")
  state = torch.load(path, map_location="cpu", weights_only=True)
  if not isinstance(state, dict):
    raise SystemExit(f"{path} holds a {type(state).__name__}, not a state dict.")
  return {k: v.detach().cpu().numpy() for k, v in state.items() if hasattr(v, "detach")}
