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

from arcvq_jax import cli
from arcvq_jax.convert.torch_state import load_torch_state
from arcvq_jax.losses import lpips as lpips_lib


def convert(vgg16_state: dict[str, np.ndarray], lin_state: dict[str, np.ndarray]) -> Any:
  """torchvision VGG16 + lpips v0.1 state dicts (as numpy arrays) -> LPIPS params.

  vgg16_state: 'features.{j}.weight' (Cout, Cin, 3, 3) and 'features.{j}.bias' (Cout,) for j
  in VGG_CONV_INDICES (other keys, e.g. the classifier, are ignored); lin_state:
  'lin{l}.model.1.weight' (1, C_l, 1, 1). Raises LPIPSWeightsError naming the first missing
  or wrongly shaped array (e.g. a VGG19 or a VGG16 with batch norm).
  """
  not_vgg16 = (
    f"pass torchvision's VGG16 ImageNet weights ({lpips_lib.VGG16_URL}), not another network."
  )
  shapes = lpips_lib.expected_shapes()
  flat = {}
  for name, index in lpips_lib.VGG_CONV_INDICES.items():
    kh, kw, cin, cout = shapes[f"vgg/{name}/kernel"]
    arrays = {}
    for suffix, shape in (("weight", (cout, cin, kh, kw)), ("bias", (cout,))):
      key = f"features.{index}.{suffix}"
      if key not in vgg16_state:
        raise lpips_lib.LPIPSWeightsError(
          f"the VGG16 state dict has no {key!r} ({name}): {not_vgg16}"
        )
      arrays[suffix] = np.asarray(vgg16_state[key], np.float32)
      if arrays[suffix].shape != shape:
        raise lpips_lib.LPIPSWeightsError(
          f"{key} ({name}) has shape {arrays[suffix].shape}, expected {shape}: {not_vgg16}"
        )
    flat[f"vgg/{name}/kernel"] = arrays["weight"].transpose(2, 3, 1, 0)  # OIHW -> HWIO
    flat[f"vgg/{name}/bias"] = arrays["bias"]
  for layer, c in enumerate(lpips_lib.LIN_CHANNELS):
    key = f"lin{layer}.model.1.weight"
    if key not in lin_state:
      raise lpips_lib.LPIPSWeightsError(
        f"the lpips linear weights have no {key!r}: pass lpips' weights/v0.1/vgg.pth."
      )
    w = np.asarray(lin_state[key], np.float32)
    if w.shape != (1, c, 1, 1):
      raise lpips_lib.LPIPSWeightsError(
        f"{key} has shape {w.shape}, expected {(1, c, 1, 1)}: pass lpips' "
        f"weights/v0.1/vgg.pth (the VGG variant, not alex or squeeze)."
      )
    flat[f"lin/lin{layer}"] = w.reshape(-1)
  lpips_lib.check_params(flat, "the converted weights")  # also: linear weights >= 0
  return lpips_lib.from_flat(flat)


def default_lin_path() -> str:
  """lpips/weights/v0.1/vgg.pth inside the installed `lpips` package."""
  try:
    import lpips  # noqa: PLC0415
  except ImportError as e:
    raise cli.UserError(
      "the lpips package is not installed: `pip install lpips`, or pass "
      "--lin=PATH/vgg.pth (lpips' weights/v0.1/vgg.pth)."
    ) from e
  return os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs as a program: absl's flags are global,
  and other modules that share names (--out) are imported beside this one."""
  flags.DEFINE_string("vgg16", None, "torchvision's VGG16 ImageNet state dict (.pth).")
  flags.DEFINE_string("lin", None, "lpips v0.1 linear weights (default: from the lpips package).")
  flags.DEFINE_string("out", "~/.cache/arcvq_jax/lpips_vgg16.npz", "Output .npz file.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.vgg16:
    raise app.UsageError(f"--vgg16 is required: download {lpips_lib.VGG16_URL} first.")
  params = convert(
    load_torch_state(os.path.expanduser(FLAGS.vgg16)),
    load_torch_state(os.path.expanduser(FLAGS.lin or default_lin_path())),
  )
  out = os.path.expanduser(FLAGS.out)
  lpips_lib.save_params(params, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  define_flags()
  cli.run(main, fast_malloc=False)  # one pass over a weights file: nothing to gain
