"""Converts the public LPIPS (VGG16) weights into the file `arcvq_jax.losses.lpips` loads.

  python -m arcvq_jax.convert.lpips_weights --vgg16=vgg16-397923af.pth \
      --out=~/.cache/arcvq_jax/lpips_vgg16.npz

--vgg16: torchvision's ImageNet VGG16 state dict (https://download.pytorch.org/models/
vgg16-397923af.pth; keys features.{j}.weight / .bias, the classifier is ignored).
--lin: the `lpips` package's v0.1 linear weights (lin{l}.model.1.weight, (1, C, 1, 1));
by default the copy inside the installed package (`pip install lpips`).
Needs PyTorch to read the .pth files (`pip install torch`); training does not.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import app, flags

from arcvq_jax.losses import lpips as lpips_lib


def convert(vgg16_state: dict[str, np.ndarray], lin_state: dict[str, np.ndarray]) -> Any:
  """torchvision VGG16 + lpips v0.1 state dicts (as numpy arrays) -> LPIPS params."""
  flat = {}
  for name, index in lpips_lib.VGG_CONV_INDICES.items():
    for suffix in ("weight", "bias"):
      key = f"features.{index}.{suffix}"
      if key not in vgg16_state:
        raise lpips_lib.LPIPSWeightsError(
            f"the VGG16 state dict has no {key!r} ({name}): pass torchvision's VGG16 "
            f"ImageNet weights ({lpips_lib.VGG16_URL}), not another network.")
    w = np.asarray(vgg16_state[f"features.{index}.weight"], np.float32)
    if w.ndim != 4:
      raise lpips_lib.LPIPSWeightsError(
          f"features.{index}.weight has shape {w.shape}; a VGG16 conv weight is (Cout, Cin, 3, 3).")
    flat[f"vgg/{name}/kernel"] = w.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    flat[f"vgg/{name}/bias"] = np.asarray(vgg16_state[f"features.{index}.bias"], np.float32)
  for l in range(len(lpips_lib.LIN_CHANNELS)):
    key = f"lin{l}.model.1.weight"
    if key not in lin_state:
      raise lpips_lib.LPIPSWeightsError(
          f"the lpips linear weights have no {key!r}: pass lpips' weights/v0.1/vgg.pth.")
    flat[f"lin/lin{l}"] = np.asarray(lin_state[key], np.float32).reshape(-1)
  lpips_lib.check_params(flat, "the converted weights")
  return lpips_lib.from_flat(flat)


def default_lin_path() -> str:
  """lpips/weights/v0.1/vgg.pth inside the installed `lpips` package."""
  try:
    import lpips  # noqa: PLC0415
  except ImportError as e:
    raise SystemExit("the lpips package is not installed: `pip install lpips`, or pass "
                     "--lin=PATH/vgg.pth (lpips' weights/v0.1/vgg.pth).") from e
  return os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")


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


FLAGS = flags.FLAGS
flags.DEFINE_string("vgg16", None, "torchvision's VGG16 ImageNet state dict (.pth).")
flags.DEFINE_string("lin", None, "lpips v0.1 linear weights (default: from the lpips package).")
flags.DEFINE_string("out", "~/.cache/arcvq_jax/lpips_vgg16.npz", "Output .npz file.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.vgg16:
    raise app.UsageError(f"--vgg16 is required: download {lpips_lib.VGG16_URL} first.")
  params = convert(load_torch_state(os.path.expanduser(FLAGS.vgg16)),
                   load_torch_state(os.path.expanduser(FLAGS.lin or default_lin_path())))
  out = os.path.expanduser(FLAGS.out)
  lpips_lib.save_params(params, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  app.run(main)
