"""The official ArcVQ-VAE code, run from a local copy that the user names: the pieces that
bench/trajectory_parity.py and bench/official_runs.py share.

Nothing of that code is copied into this repository. `load(path)` imports its
`ArcVQ-VAE/modules.py` (the network, quantiser, ArcLoss and BBNR) and `ArcVQ-VAE/main.py`
(the training loop `train`, `make_loader`, `seed_everything`) from the folder named at run
time; the functions below call them as its main.py does for `--dataset fashion-mnist`:

  Model(1, 128, 2, 32, 512, 64, 0.25, use_arc_loss=True, arc_s=5.0, arc_m=0.1)
  Adam(model.parameters(), lr=3e-4)            PyTorch's defaults: betas (0.9, 0.999), eps 1e-8
  images: ToTensor() then Normalize((0.5,), (0.5,)), so (u / 255 - 0.5) / 0.5 in [-1, 1]
  data_variance = np.var(train_images / 255.0) * 4.0      (the variance in [-1, 1])
  per step t (args.steps from 0): the forward pass projects the codebook into the ball of
  radius exp(3e-4 t) after the encoder (`clip_codebook_norms`, alpha is its default), then
  loss = mse(x_hat, x) / data_variance + vq + exp(-5e-4 t) ArcLoss, backward, Adam.

main.py fixes ArcLoss's s at 5; `build_model(arc_s=...)` passes the value to compare (the
paper's and configs/fashion_mnist.py's MNIST setting is 10). main.py imports tensorboardX
for its logging only: where it is not installed, a stand-in that records nothing is put in
its place (`load`). Its quantiser appends a line to ./codebook_usage_log.txt at every
forward pass, so every call here runs inside a scratch folder (`scratch_cwd`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import os
import sys
import tempfile
import types
from collections.abc import Iterator
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import torch

from arcvq_jax import sharding
from arcvq_jax.convert import torch_checkpoint
from arcvq_jax.data import pipeline
from arcvq_jax.evaluation import metrics
from arcvq_jax.train import tokenizer_steps

# main.py's argparse defaults (and the constants it passes to Model) for Fashion-MNIST.
MAIN_ARGS = dict(
  num_channels=1,
  hidden_size=128,
  num_residual_layers=2,
  num_residual_hidden=32,
  num_embedding=512,
  embedding_dim=64,
  commitment_cost=0.25,
  arc_s=5.0,
  arc_m=0.1,
  lr=3e-4,
  gamma=1.0,
  gamma_decay=5e-4,
  batch_size=1024,
  seed=1,
)


@dataclasses.dataclass(frozen=True)
class Official:
  """The official code's modules, imported from `folder` (its ArcVQ-VAE/ directory)."""

  folder: str
  modules: types.ModuleType
  main: types.ModuleType


class UsageError(ValueError):
  """A bad --official path; the message says what to pass."""


def _tensorboardx_stand_in() -> types.ModuleType:
  """A `tensorboardX` whose SummaryWriter records nothing (main.py imports it at the top)."""
  module = types.ModuleType("tensorboardX")

  class SummaryWriter:
    def __init__(self, *args, **kwargs):
      del args, kwargs

    def add_scalar(self, *args, **kwargs):
      del args, kwargs

    def add_image(self, *args, **kwargs):
      del args, kwargs

  module.SummaryWriter = SummaryWriter
  return module


def load(path: str) -> Official:
  """Imports modules.py and main.py from `path`: the repository root or its ArcVQ-VAE/."""
  path = os.path.abspath(os.path.expanduser(path))
  folder = path if os.path.isfile(os.path.join(path, "modules.py")) else None
  if folder is None and os.path.isfile(os.path.join(path, "ArcVQ-VAE", "modules.py")):
    folder = os.path.join(path, "ArcVQ-VAE")
  if folder is None:
    raise UsageError(
      f"--official={path} holds neither modules.py nor ArcVQ-VAE/modules.py: pass a copy "
      "of the official repository (git clone https://github.com/goals4292/ArcVQ-VAE)."
    )
  for name in ("modules", "quantise", "main"):
    loaded = sys.modules.get(name)
    if loaded is not None and not getattr(loaded, "__file__", "").startswith(folder):
      raise UsageError(f"another module named {name!r} is already imported ({loaded.__file__}).")
  if importlib.util.find_spec("tensorboardX") is None:
    sys.modules.setdefault("tensorboardX", _tensorboardx_stand_in())
  sys.path.insert(0, folder)
  try:
    modules = importlib.import_module("modules")
    main = importlib.import_module("main")
  finally:
    sys.path.remove(folder)
  return Official(folder=folder, modules=modules, main=main)


@contextlib.contextmanager
def scratch_cwd() -> Iterator[str]:
  """Runs the block in a fresh temporary folder (the quantiser writes a log file into cwd)."""
  with tempfile.TemporaryDirectory(prefix="arcvq_official_") as folder, contextlib.chdir(folder):
    yield folder


def build_model(official: Official, arc_s: float) -> torch.nn.Module:
  """The official Model as main.py builds it for Fashion-MNIST, with ArcLoss scale `arc_s`,
  initialised from torch's global RNG (seed it first: `official.main.seed_everything`)."""
  a = MAIN_ARGS
  return official.modules.Model(
    a["num_channels"],
    a["hidden_size"],
    a["num_residual_layers"],
    a["num_residual_hidden"],
    a["num_embedding"],
    a["embedding_dim"],
    a["commitment_cost"],
    use_arc_loss=True,
    arc_s=arc_s,
    arc_m=a["arc_m"],
  )


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
  """main.py's optimizer: torch.optim.Adam(model.parameters(), lr=args.lr)."""
  return torch.optim.Adam(model.parameters(), lr=MAIN_ARGS["lr"])


def normalise(images: np.ndarray) -> torch.Tensor:
  """uint8 (B, H, W) or (B, H, W, 1) -> float32 (B, 1, H, W): ToTensor's u.float().div(255)
  then Normalize's sub_(0.5).div_(0.5), the same operations in the same order."""
  u = torch.from_numpy(np.ascontiguousarray(images.reshape(images.shape[0], 1, *images.shape[1:3])))
  return u.float().div(255).sub(0.5).div(0.5)


def data_variance(train_images: np.ndarray) -> float:
  """main.py's data_variance: np.var(train_dataset.data.numpy() / 255.0) * 4.0."""
  return float(np.var(train_images / 255.0) * 4.0)


def to_uint8(x: np.ndarray) -> np.ndarray:
  """Our [-1, 1] images (x = u / 127.5 - 1 in float32) -> the uint8 u they came from."""
  return np.rint((np.asarray(x, np.float64) + 1.0) * 127.5).astype(np.uint8)


class _Recorder:
  """Forward hooks on the official Model that keep the last pass's VQ loss, tokens, ArcLoss
  and quantiser total (main.train logs only the reconstruction loss and ArcLoss)."""

  def __init__(self, model: torch.nn.Module):
    self.values: dict[str, Any] = {}
    model._vq_vae.register_forward_hook(self._quantiser)
    model.register_forward_hook(self._model)

  def _quantiser(self, module, args, output):
    del module, args
    _, loss, (_, indices) = output
    self.values.update(loss_vq=loss.detach(), indices=indices.detach())

  def _model(self, module, args, output):
    del module, args
    x_hat, total, _, arc = output
    self.values.update(x_hat=x_hat.detach(), quantiser_total=total.detach(), arc=arc.detach())


def recorder(model: torch.nn.Module) -> _Recorder:
  """Attaches the hooks once per model; `train_step` and `evaluate` read them."""
  if not hasattr(model, "_parity_recorder"):
    model._parity_recorder = _Recorder(model)
  return model._parity_recorder


class _Writer:
  """main.train's `writer`: keeps the scalars it logs."""

  def __init__(self):
    self.scalars: dict[str, float] = {}

  def add_scalar(self, name: str, value: float, step: int) -> None:
    del step
    self.scalars[name] = float(value)


def train_step(
  official: Official,
  model: torch.nn.Module,
  optimizer: torch.optim.Optimizer,
  images: torch.Tensor,
  step: int,
  data_variance: float,
) -> dict[str, Any]:
  """Step t = `step` of the official run: main.train itself over a one-batch loader.

  images: (B, 1, H, W) float32 in [-1, 1] (`normalise`). Returns the loss terms, the total,
  the ArcLoss weight, the global gradient norm before Adam (float64 sum) and the tokens
  (B*h*w,).
  """
  a = MAIN_ARGS
  args = types.SimpleNamespace(
    device=torch.device("cpu"), gamma=a["gamma"], gamma_decay=a["gamma_decay"], steps=step
  )
  writer, rec = _Writer(), recorder(model)
  with scratch_cwd():
    official.main.train([(images, None)], model, optimizer, args, writer, data_variance)
  assert args.steps == step + 1, "main.train did not run exactly one step"
  grads = [p.grad.double().pow(2).sum() for p in model.parameters() if p.grad is not None]
  loss_rec = writer.scalars["loss/train/reconstruction"]
  v = rec.values
  return dict(
    loss=loss_rec + float(v["quantiser_total"]),
    loss_rec=loss_rec,
    loss_vq=float(v["loss_vq"]),
    loss_arc=float(v["arc"]),
    arc_weight=float(a["gamma"] * np.exp(-a["gamma_decay"] * step)),
    grad_norm=float(torch.stack(grads).sum().sqrt()),
    indices=v["indices"].numpy(),
  )


def state_dict_numpy(model: torch.nn.Module) -> dict[str, np.ndarray]:
  """The model's state_dict as float32 numpy arrays (copies)."""
  return {k: v.detach().cpu().numpy().copy() for k, v in model.state_dict().items()}


def params_as_ours(model: torch.nn.Module, abstract_params: Any) -> dict[str, Any]:
  """The official model's weights as our VQ-VAE's params tree, by the converter's mapping
  (`torch_checkpoint.vqvae_source`, what --kind=arcvq_vqvae does with best.pt)."""
  state = state_dict_numpy(model)
  mapped = torch_checkpoint.map_tree(abstract_params, state, torch_checkpoint.vqvae_source)
  unused = sorted(set(state) - mapped.used)
  if mapped.problems or unused:
    raise ValueError(f"the official weights do not map onto ours: {mapped.problems} {unused}")
  return mapped.tree


def reconstruct(model: torch.nn.Module, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
  """What main.test / generate_samples run: model.eval(), model(images) with no step (so
  no projection: the codebook as the last Adam step left it). images (B, 1, H, W) ->
  (x_hat (B, H, W, 1) float32, tokens (B, h, w) int)."""
  model.eval()
  rec = recorder(model)
  with torch.inference_mode(), scratch_cwd():
    x_hat, _, _, _ = model(images)
  b = images.shape[0]
  tokens = rec.values["indices"].numpy().reshape(b, images.shape[2] // 4, images.shape[3] // 4)
  return x_hat.permute(0, 2, 3, 1).numpy(), tokens


def evaluate(model: torch.nn.Module, config: ml_collections.ConfigDict) -> dict[str, float]:
  """The official model scored by our evaluation (tokenizer_steps.evaluate over
  config.data.eval_split, metrics.psnr / ssim / code counts on [0, 1] images): the same
  batches, padding masks, sums and formulas as ours, its input normalised its own way."""
  num_codes = int(model._vq_vae.num_embed)

  def eval_fn(params, batch, lpips_params):
    del params, lpips_params
    x = np.asarray(batch["image"])
    mask = jnp.asarray(np.asarray(batch["mask"]), jnp.float32)
    x_hat, tokens = reconstruct(model, normalise(to_uint8(x)))
    x01, y01 = metrics.to_unit_range(jnp.asarray(x)), metrics.to_unit_range(jnp.asarray(x_hat))
    mse = jnp.mean((x01 - y01) ** 2, axis=(1, 2, 3))
    return dict(
      count=jnp.sum(mask),
      mse=jnp.sum(mask * mse),
      psnr=jnp.sum(mask * metrics.psnr(x01, y01)),
      ssim=jnp.sum(mask * metrics.ssim(x01, y01)),
      code_counts=metrics.code_counts(jnp.asarray(tokens), num_codes, mask),
    )

  mesh = sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  batches = pipeline.create_eval_iterator(
    config.data, global_batch_size=config.eval_batch_size, process_index=0, process_count=1
  )
  return tokenizer_steps.evaluate(eval_fn, None, batches, sharding.batch_sharding(mesh))
