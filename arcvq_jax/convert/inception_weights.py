"""Converts pytorch-fid's FID Inception weights into the file `arcvq_jax.evaluation.inception`
loads.

  wget https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth
  python -m arcvq_jax.convert.inception_weights --pt=pt_inception-2015-12-05-6726825d.pth \
      --out=~/.cache/arcvq_jax/pt_inception-2015-12-05.npz

--pt: the state dict of pytorch-fid's `fid_inception_v3()` (torchvision's Inception3 with
1008 classes, no aux logits and the FID blocks): '{module}.conv.weight' and
'{module}.bn.{weight,bias,running_mean,running_var}' for every BasicConv2d, 'fc.weight',
'fc.bias' (AuxLogits and num_batches_tracked entries are ignored). Each BatchNorm (eval mode,
eps 1e-3) is folded into its convolution here, in float64. Needs PyTorch to read the file
(`pip install torch`); evaluation does not.
"""

from __future__ import annotations

import os
from typing import Any

import numpy as np
from absl import app, flags

from arcvq_jax import cli
from arcvq_jax.convert.torch_state import load_torch_state
from arcvq_jax.evaluation import inception as inception_lib

_NOT_FID = (
  f"pass pytorch-fid's FID Inception weights ({inception_lib.FID_WEIGHTS_URL}), "
  "not another network (torchvision's ImageNet Inception-v3 has 1000 classes and "
  "other blocks)."
)


def _get(state: dict[str, np.ndarray], key: str, shape: tuple[int, ...]) -> np.ndarray:
  if key not in state:
    raise inception_lib.InceptionWeightsError(f"the state dict has no {key!r}: {_NOT_FID}")
  value = np.asarray(state[key], np.float64)
  if value.shape != shape:
    raise inception_lib.InceptionWeightsError(
      f"{key} has shape {value.shape}, expected {shape}: {_NOT_FID}"
    )
  return value


def convert(state: dict[str, np.ndarray]) -> Any:
  """pytorch-fid Inception state dict (numpy arrays) -> our params, BatchNorm folded.

  Raises InceptionWeightsError naming the first missing or wrongly shaped array.
  """
  flat = {}
  for name, ((kh, kw), cin, cout) in inception_lib.layer_specs().items():
    module = name.replace("/", ".")
    w = _get(state, f"{module}.conv.weight", (cout, cin, kh, kw))
    gamma, beta, mean, var = (
      _get(state, f"{module}.bn.{k}", (cout,))
      for k in ("weight", "bias", "running_mean", "running_var")
    )
    scale = gamma / np.sqrt(var + inception_lib.BN_EPS)
    flat[f"{name}/kernel"] = (w.transpose(2, 3, 1, 0) * scale).astype(np.float32)  # OIHW->HWIO
    flat[f"{name}/bias"] = (beta - mean * scale).astype(np.float32)
  flat["fc/kernel"] = _get(
    state, "fc.weight", (inception_lib.NUM_LOGITS, inception_lib.POOL_DIM)
  ).T.astype(np.float32)
  flat["fc/bias"] = _get(state, "fc.bias", (inception_lib.NUM_LOGITS,)).astype(np.float32)
  return inception_lib.from_flat(flat, "the converted weights")


FLAGS = flags.FLAGS


def _define_flags() -> None:
  # Defined only when run as a program: the tests import this module beside the LPIPS
  # converter, which defines --out at import.
  flags.DEFINE_string("pt", None, "pytorch-fid's pt_inception-2015-12-05-6726825d.pth.")
  flags.DEFINE_string("out", inception_lib.DEFAULT_PATH, "Output .npz file.")


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.pt:
    raise app.UsageError(f"--pt is required: download {inception_lib.FID_WEIGHTS_URL} first.")
  params = convert(load_torch_state(os.path.expanduser(FLAGS.pt)))
  out = os.path.expanduser(FLAGS.out)
  inception_lib.save_params(params, out)
  print(f"wrote {out}")


if __name__ == "__main__":
  _define_flags()
  cli.run(main, fast_malloc=False)  # one pass over a weights file: nothing to gain
