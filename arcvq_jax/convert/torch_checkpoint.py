"""Imports PyTorch checkpoints of the official ArcVQ-VAE code and of taming-transformers.

  python -m arcvq_jax.convert.torch_checkpoint --kind=taming_vqgan \
      --ckpt=vqgan_imagenet_f16_1024.ckpt --config=configs/imagenet_f16.py --workdir=OUT
  python -m arcvq_jax.main --config=OUT/config.py --workdir=OUT     # evaluate / train on

Kinds (--kind):
  arcvq_vqvae   the official ArcVQ-VAE VQ-VAE (goals4292/ArcVQ-VAE, `best.pt`: a bare
                `model.state_dict()`); cosine matching, beta on the commitment term.
  arcvq_vqgan   the official ArcVQ VQGAN (a taming-transformers fork, same parameter names,
                Lightning `.ckpt`); cosine matching, taming's legacy beta.
  taming_vqgan  a taming-transformers VQGAN (`VQModel`, e.g. vqgan_imagenet_f16_1024.ckpt);
                Euclidean matching, legacy beta, no BBNR and no ArcLoss (the `vq` variant).

What is mapped (source key -> our parameter path; conv weights OIHW -> HWIO by
permute(2, 3, 1, 0), transposed-conv weights (Cin, Cout, kh, kw) -> permute(2, 3, 0, 1)):
  taming VQModel       encoder.down.1.block.0.norm1.weight -> encoder/down_1/block_0/norm1/scale
                       (the table in models/vqgan.py), quantize.embedding.weight -> codebook
  taming discriminator loss.discriminator.main.i.{weight,bias} -> disc params main_i/{kernel,
                       bias} (BatchNorm: scale, bias; running_mean / running_var -> batch_stats
                       main_i/{mean,var}); num_batches_tracked is skipped (flax keeps none).
  taming LPIPS         loss.perceptual_loss.net.slice*.j / lin*.model.1 -> OUT/lpips_vgg16.npz
                       (the file arcvq_jax.convert.lpips_weights writes), set as lpips_path;
                       its scaling_layer shift/scale are checked against LPIPS' constants.
  ArcVQ-VAE Model      _encoder._conv_1 -> encoder/conv_1, ..._residual_stack._layers.i._block.1
                       / ._block.3 -> res_stack/layer_i/conv3x3 / conv1x1, _pre_vq_conv ->
                       quant_conv, _vq_vae.embedding.weight -> codebook, _decoder._conv_trans_k
                       -> decoder/conv_trans_k.
Every source tensor must be used and every parameter filled: otherwise nothing is written and
the error lists the missing, unexpected and wrongly shaped entries by name.

The architecture (widths, levels, blocks, attention levels, z_channels, K, D, image channels,
PatchGAN width and depth) is read from the tensors and overrides the --config values; the
quantiser settings follow --kind. Written:
  OUT/config.json         the full config (what api.Tokenizer.from_workdir reads)
  OUT/config.py           the --config file (and variant, and --config.x=y flags) with these
                          overrides: `main --config=OUT/config.py` trains and evaluates it
  OUT/checkpoints/<step>  the train state of a fresh run of that config holding these weights,
                          fresh optimizer states, no data position (the data starts afresh):
                          `api.write_workdir`, or, when the checkpoint carries its PatchGAN,
                          the same state with the converted discriminator (workdir.py)
  OUT/lpips_vgg16.npz     the LPIPS weights inside a taming checkpoint (config.lpips_path)
  OUT/conversion.json     what was mapped, skipped and changed, and the timings

Step: a Lightning checkpoint's `global_step`, so the BBNR radius M(t), the ArcLoss weight
gamma(t) and gan.disc_start go on where the PyTorch run stopped; a bare state_dict has no step,
so the step is the first one at which a growing BBNR leaves the codebook as it is
(ceil(ln(max row norm) / alpha); 0 for rows inside the unit ball or without growing BBNR), so
that the first training step does not shrink the codebook. `--step=N` overrides both (0 for a
fine-tune with fresh schedules). `main` trains up to config.num_train_steps (or num_epochs): at
or past it, it only evaluates.

Reading never runs code from the file (arcvq_jax/convert/torch_load.py): torch.load with
weights_only=True; a Lightning checkpoint's callback classes / hyper-parameter containers
are admitted as inert stand-ins; anything else that would execute code is refused.
Needs PyTorch (CPU) to read the file; training and evaluation do not.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import math
import os
import re
import time
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags

from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax import cli, quantization
from arcvq_jax import config as config_lib
from arcvq_jax.convert import torch_load
from arcvq_jax.convert import workdir as workdir_lib
from arcvq_jax.losses import lpips as lpips_lib

KINDS = ("taming_vqgan", "arcvq_vqgan", "arcvq_vqvae")

# What each kind fixes in the quantiser (the rest of config.quantizer / config.arc is the
# --config's): the matching the weights were trained with and taming's legacy beta.
QUANTIZER_OF_KIND = {
  "arcvq_vqvae": dict(name="arcvq", distance="cosine", legacy_beta=False),
  "arcvq_vqgan": dict(name="arcvq", distance="cosine", legacy_beta=True),
  # taming's VectorQuantizer2 (legacy=True by default): plain VQ, the 'vq' variant.
  "taming_vqgan": dict(
    name="vq", distance="euclidean", legacy_beta=True, init="uniform", bbnr="off"
  ),
}


class ConversionError(ValueError):
  """The checkpoint does not map onto our networks (the message lists every mismatch)."""


# --------------------------------------------------------------------------- mapping


def _conv(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(w, (2, 3, 1, 0)))  # OIHW -> HWIO


def _conv_transpose(w: np.ndarray) -> np.ndarray:
  return np.ascontiguousarray(np.transpose(w, (2, 3, 0, 1)))  # (Cin, Cout, kh, kw) -> HWIO


def _copy(w: np.ndarray) -> np.ndarray:
  # A copy, never a view: a view would keep the memory-mapped source file resident.
  return np.array(w, dtype=w.dtype, copy=True)


@dataclasses.dataclass
class Mapped:
  """A filled parameter tree and the source keys it used."""

  tree: dict[str, Any]
  used: set[str]
  problems: list[str]


def map_tree(
  abstract: Any,
  state: dict[str, np.ndarray],
  source_of: Callable[[tuple[str, ...]], tuple[str, Callable]],
) -> Mapped:
  """Fills every leaf of `abstract` (a nested dict of ShapeDtypeStructs) from `state`.

  source_of(path) -> (source key, transform): the torch key of the leaf at `path` and the
  function mapping its array to our layout. Records a problem, naming the leaf and the key,
  for each missing key and each shape that does not match after the transform.
  """
  used: set[str] = set()
  problems: list[str] = []

  def fill(path: tuple[str, ...], leaf) -> Any:
    key, transform = source_of(path)
    name = "/".join(path)
    if key not in state:
      problems.append(f"missing {key} (for {name}, shape {tuple(leaf.shape)})")
      return None
    used.add(key)
    value = transform(state[key])
    if tuple(value.shape) != tuple(leaf.shape):
      problems.append(
        f"{key}: shape {tuple(state[key].shape)} gives {tuple(value.shape)}, "
        f"but {name} is {tuple(leaf.shape)}"
      )
      return None
    return value.astype(np.float32, copy=False)

  def walk(node, path):
    if isinstance(node, dict):
      return {k: walk(v, (*path, k)) for k, v in node.items()}
    return fill(path, node)

  return Mapped(tree=walk(abstract, ()), used=used, problems=problems)


_LIST_ITEM = re.compile(r"^(down|up|block|attn)_(\d+)$")
_LEAF = {
  "kernel": "weight",
  "scale": "weight",
  "bias": "bias",
  "mean": "running_mean",
  "var": "running_var",
}


def vqgan_source(path: tuple[str, ...]) -> tuple[str, Callable]:
  """taming's VQModel key of one of our VQGAN parameters (table in models/vqgan.py)."""
  if path == ("codebook",):
    return "quantize.embedding.weight", _copy
  *modules, leaf = path
  parts = []
  for i, m in enumerate(modules):
    match = _LIST_ITEM.match(m)
    # taming's ModuleLists (down.1, block.0, attn.0) vs the mid block's attributes (block_1).
    parts += [f"{match[1]}.{match[2]}"] if match and (i == 0 or modules[i - 1] != "mid") else [m]
  return ".".join([*parts, _LEAF[leaf]]), (_conv if leaf == "kernel" else _copy)


def disc_source(path: tuple[str, ...]) -> tuple[str, Callable]:
  """taming's key (loss.discriminator.main.i.*) of a PatchGAN param or BatchNorm statistic."""
  module, leaf = path
  index = module.removeprefix("main_")
  return f"loss.discriminator.main.{index}.{_LEAF[leaf]}", (_conv if leaf == "kernel" else _copy)


_VQVAE_MODULES = {"res_stack": "_residual_stack", "conv3x3": "_block.1", "conv1x1": "_block.3"}


def vqvae_source(path: tuple[str, ...]) -> tuple[str, Callable]:
  """The official ArcVQ-VAE `Model` key of one of our VQVAE parameters."""
  if path == ("codebook",):
    return "_vq_vae.embedding.weight", _copy
  *modules, leaf = path
  parts = []
  for m in modules:
    if m == "quant_conv":
      parts.append("_pre_vq_conv")
    elif m in _VQVAE_MODULES:
      parts.append(_VQVAE_MODULES[m])
    elif m.startswith("layer_"):
      parts.append(f"_layers.{m.removeprefix('layer_')}")
    else:  # encoder, decoder, conv_1, conv_trans_1, ...
      parts.append(f"_{m}")
  transposed = any(m.startswith("conv_trans") for m in modules)
  transform = _copy if leaf != "kernel" else (_conv_transpose if transposed else _conv)
  return ".".join([*parts, _LEAF[leaf]]), transform


# --------------------------------------------------------------------------- architecture


def _count(state: dict[str, np.ndarray], pattern: str) -> int:
  """Number of distinct values of the (\\d+) group in the keys matching `pattern`."""
  rx = re.compile(pattern)
  return len({m[1] for k in state if (m := rx.match(k))})


def _need(state: dict[str, np.ndarray], key: str, kind: str) -> np.ndarray:
  if key not in state:
    sample = ", ".join(sorted(state)[:5])
    raise ConversionError(
      f"no {key!r} in the checkpoint, so it is not a {kind} checkpoint "
      f"(its first keys: {sample}). Check --kind."
    )
  return state[key]


def vqgan_architecture(state: dict[str, np.ndarray], resolution: int, kind: str) -> dict[str, Any]:
  """config.model / quantizer / gan values of a taming VQModel, read from its tensors.

  resolution: taming's nominal image size (config.model.resolution), which names the
  attention levels: attention at level i means attn_resolutions holds resolution / 2**i.
  """
  conv_in = _need(state, "encoder.conv_in.weight", kind)
  ch, channels = int(conv_in.shape[0]), int(conv_in.shape[1])
  levels = _count(state, r"^encoder\.down\.(\d+)\.")
  ch_mult = tuple(
    int(state[f"encoder.down.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(levels)
  )
  blocks = _count(state, r"^encoder\.down\.0\.block\.(\d+)\.")
  attn_levels = [i for i in range(levels) if f"encoder.down.{i}.attn.0.q.weight" in state]
  codebook = _need(state, "quantize.embedding.weight", kind)
  z_channels = int(_need(state, "post_quant_conv.weight", kind).shape[0])
  encoder_out = int(state["encoder.conv_out.weight"].shape[0])
  if encoder_out != z_channels:
    raise ConversionError(
      f"encoder.conv_out has {encoder_out} output channels but z_channels is {z_channels} "
      "(taming's double_z=True, a KL autoencoder?): only VQModels (double_z=False) convert."
    )
  out = {
    "model.ch": ch,
    "model.ch_mult": ch_mult,
    "model.num_res_blocks": blocks,
    "model.attn_resolutions": tuple(resolution // 2**i for i in attn_levels),
    "model.z_channels": z_channels,
    "quantizer.num_codes": int(codebook.shape[0]),
    "quantizer.embed_dim": int(codebook.shape[1]),
  }
  actnorm = sorted(k for k in state if re.match(r"^loss\.discriminator\..*\.(loc|initialized)$", k))
  if actnorm:
    raise ConversionError(
      f"the discriminator uses ActNorm ({', '.join(actnorm[:3])}, ...; taming's "
      "use_actnorm=True): our PatchGAN has BatchNorm. Drop the loss.discriminator.* tensors "
      "from the state_dict to convert the autoencoder with a fresh discriminator."
    )
  if "loss.discriminator.main.0.weight" in state:
    disc_layers = _count(state, r"^loss\.discriminator\.main\.(\d+)\.running_mean$")
    out["gan.ndf"] = int(state["loss.discriminator.main.0.weight"].shape[0])
    out["gan.n_layers"] = disc_layers
  return {"channels": channels, **out}


def vqvae_architecture(state: dict[str, np.ndarray], kind: str) -> dict[str, Any]:
  """config.model / quantizer values of an official ArcVQ-VAE Model, read from its tensors."""
  conv_1 = _need(state, "_encoder._conv_1.weight", kind)
  codebook = _need(state, "_vq_vae.embedding.weight", kind)
  layers = _count(state, r"^_encoder\._residual_stack\._layers\.(\d+)\.")
  res_hidden = (
    int(state["_encoder._residual_stack._layers.0._block.1.weight"].shape[0]) if layers else None
  )
  out = {
    "channels": int(conv_1.shape[1]),
    "model.hidden": int(_need(state, "_encoder._conv_2.weight", kind).shape[0]),
    "model.num_res_layers": layers,
    "quantizer.num_codes": int(codebook.shape[0]),
    "quantizer.embed_dim": int(codebook.shape[1]),
    # The official residual layer adds relu(x), not x (its first ReLU is in place).
    "model.residual_skip": "relu",
  }
  if res_hidden is not None:
    out["model.res_hidden"] = res_hidden
  return out


# --------------------------------------------------------------------------- config


def _set(config: ml_collections.ConfigDict, key: str, value: Any) -> None:
  *parents, leaf = key.split(".")
  node = config
  for p in parents:
    node = node[p]
  node[leaf] = value


def _get(config: ml_collections.ConfigDict, key: str) -> Any:
  node = config
  for p in key.split("."):
    node = node[p]
  return node


def config_overrides(
  kind: str, arch: dict[str, Any], config: ml_collections.ConfigDict
) -> dict[str, Any]:
  """The dotted config keys the checkpoint fixes, with their values."""
  want_model = "vqvae" if kind == "arcvq_vqvae" else "vqgan"
  if config.model.name != want_model:
    examples = (
      "configs/fashion_mnist.py, mnist.py or cifar10.py"
      if want_model == "vqvae"
      else "configs/imagenet.py or imagenet_f16.py"
    )
    raise ConversionError(
      f"--kind={kind} is a {want_model}, but the --config builds a "
      f"{config.model.name} (config.model.name): use {examples}."
    )
  out = {k: v for k, v in arch.items() if k != "channels"}
  out.update({f"quantizer.{k}": v for k, v in QUANTIZER_OF_KIND[kind].items()})
  if kind == "taming_vqgan":
    out["arc.enabled"] = False
    out["variant"] = "vq"
  return out


def apply_overrides(config: ml_collections.ConfigDict, overrides: dict[str, Any]) -> dict[str, Any]:
  """Sets the overrides in `config` (unlocked); returns those that changed a value."""
  changed = {}
  with config.unlocked():
    for key, value in overrides.items():
      if _get(config, key) != value and not (
        isinstance(value, tuple) and tuple(_get(config, key)) == value
      ):
        changed[key] = value
      _set(config, key, value)
  return changed


def write_config_py(path: str, base: str, overrides: dict[str, Any], note: str) -> None:
  """A config file for `main`: the --config file (and variant) with the overrides set."""
  base_file, _, variant = base.partition(":")
  lines = [
    f'"""{note}"""',
    "",
    "import importlib.util",
    "",
    f"BASE = {os.path.abspath(base_file)!r}",
    f"VARIANT = {variant!r}",
    f"OVERRIDES = {overrides!r}",
    "",
    "",
    "def get_config():",
    "  spec = importlib.util.spec_from_file_location('base_config', BASE)",
    "  module = importlib.util.module_from_spec(spec)",
    "  spec.loader.exec_module(module)",
    "  c = module.get_config(VARIANT) if VARIANT else module.get_config()",
    "  for key, value in OVERRIDES.items():",
    "    *parents, leaf = key.split('.')",
    "    node = c",
    "    for p in parents:",
    "      node = node[p]",
    "    node[leaf] = value",
    "  return c",
    "",
  ]
  epath.Path(path).write_text("\n".join(lines))


def _flatten(config: ml_collections.ConfigDict, prefix: str = "") -> dict[str, Any]:
  out = {}
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out.update(_flatten(value, f"{prefix}{key}."))
    else:
      out[f"{prefix}{key}"] = value
  return out


def command_line_overrides(config: ml_collections.ConfigDict, spec: str) -> dict[str, Any]:
  """The values of `config` that differ from a fresh load of its file (the --config.x=y
  flags), so that OUT/config.py keeps them too."""
  base = _flatten(load_config_file(spec))
  return {k: v for k, v in _flatten(config).items() if k in base and base[k] != v}


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """A configs/*.py[:variant] file's get_config() (as config_flags loads it)."""
  path, _, variant = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("converted_base_config", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


def default_step(
  global_step: int | None, codebook: np.ndarray, q: ml_collections.ConfigDict
) -> int:
  """The Lightning global_step; for a bare state_dict, the first step at which a growing
  BBNR radius exp(alpha t) holds every codebook row (0 when none is outside the unit ball)."""
  if global_step is not None:
    return int(global_step)
  # Rows a hair outside a radius (float rounding of unit rows) are not worth a step.
  max_norm = float(np.max(np.linalg.norm(codebook.astype(np.float64), axis=-1))) / (1 + 1e-6)
  if q.bbnr != "growing" or q.bbnr_alpha <= 0 or max_norm <= 1.0:
    return 0
  return math.ceil(math.log(max_norm) / q.bbnr_alpha)


# --------------------------------------------------------------------------- LPIPS


_LPIPS_VGG = re.compile(r"^loss\.perceptual_loss\.net\.slice\d\.(\d+)\.(weight|bias)$")
_LPIPS_LIN = re.compile(r"^loss\.perceptual_loss\.lin(\d)\.model\.1\.weight$")
_LPIPS_SCALING = {
  "loss.perceptual_loss.scaling_layer.shift": lpips_lib.SHIFT,
  "loss.perceptual_loss.scaling_layer.scale": lpips_lib.SCALE,
}


def lpips_from_taming(state: dict[str, np.ndarray]) -> tuple[Any, set[str]] | None:
  """taming's LPIPS copy inside a VQGAN checkpoint (loss.perceptual_loss.*) -> our LPIPS
  params (as arcvq_jax.convert.lpips_weights makes them) and the keys used; None when the
  checkpoint has none.

  taming's vgg16 slices keep torchvision's `features` indices (slice2.5 is features.5), so
  VGG_CONV_INDICES names them; lin{l}.model.1.weight (1, C, 1, 1) are the linear weights.
  """
  if not any(k.startswith("loss.perceptual_loss.") for k in state):
    return None
  conv_name = {index: name for name, index in lpips_lib.VGG_CONV_INDICES.items()}
  flat, used = {}, set()
  for k, value in state.items():
    if m := _LPIPS_VGG.match(k):
      name = conv_name.get(int(m[1]))
      if name is None:
        continue  # not one of VGG16's convs: reported as unused
      w = np.asarray(value, np.float32)
      flat[f"vgg/{name}/{'kernel' if m[2] == 'weight' else 'bias'}"] = (
        _conv(w) if m[2] == "weight" else _copy(w)
      )
    elif m := _LPIPS_LIN.match(k):
      flat[f"lin/lin{m[1]}"] = _copy(np.asarray(value, np.float32).reshape(-1))
    elif k in _LPIPS_SCALING:
      got = np.asarray(value, np.float64).reshape(-1)
      if not np.allclose(got, _LPIPS_SCALING[k], atol=1e-6):
        raise ConversionError(
          f"{k} is {got.tolist()}, not LPIPS' {_LPIPS_SCALING[k]}: "
          "this is not the standard LPIPS (VGG16, v0.1)."
        )
    else:
      continue
    used.add(k)
  try:
    lpips_lib.check_params(flat, "the checkpoint's LPIPS (loss.perceptual_loss.*)")
  except lpips_lib.LPIPSWeightsError as e:
    raise ConversionError(str(e)) from e
  return lpips_lib.from_flat(flat), used


# --------------------------------------------------------------------------- conversion


@dataclasses.dataclass
class Converted:
  """The result of `convert`: the config to run, our trees, and what happened to each key."""

  config: ml_collections.ConfigDict
  image_shape: tuple[int, int, int]
  params: dict[str, Any]
  disc_params: dict[str, Any] | None
  disc_batch_stats: dict[str, Any] | None
  lpips_params: Any
  step: int
  source_format: str
  overrides: dict[str, Any]
  changed: dict[str, Any]
  skipped: dict[str, str]
  notes: list[str]
  num_tensors: int


def convert(
  ckpt: torch_load.TorchCheckpoint,
  kind: str,
  config: ml_collections.ConfigDict,
  step: int | None = None,
) -> Converted:
  """Maps a read checkpoint onto our parameter trees for `config` (updated in place with the
  architecture and quantiser the checkpoint fixes). Raises ConversionError listing every
  missing, unexpected or wrongly shaped tensor; nothing is written here."""
  if kind not in KINDS:
    raise ConversionError(f"--kind={kind!r} is not one of {KINDS}")
  state = ckpt.state
  if kind == "arcvq_vqvae":
    arch = vqvae_architecture(state, kind)
  else:
    arch = vqgan_architecture(state, int(config.model.resolution), kind)
  channels = arch["channels"]
  overrides = config_overrides(kind, arch, config)
  changed = apply_overrides(config, overrides)
  try:
    config_lib.validate(config, num_devices=1)
  except ValueError as e:
    raise ConversionError(
      f"the network these tensors describe ({overrides}) is not one this project builds: {e}"
    ) from e
  side = 16 * config_lib.downsample_factor(config)  # any size the network takes
  image_shape = (side, side, channels)

  abstract = workdir_lib.abstract_state(config, image_shape)
  gen_abstract = abstract.gen.params if kind != "arcvq_vqvae" else abstract.params
  mapped = map_tree(gen_abstract, state, vqvae_source if kind == "arcvq_vqvae" else vqgan_source)
  problems, used = list(mapped.problems), set(mapped.used)
  skipped: dict[str, str] = {}
  notes: list[str] = []
  disc_params = disc_stats = lpips_params = None

  if kind != "arcvq_vqvae":
    has_disc = any(k.startswith("loss.discriminator.") for k in state)
    if has_disc:
      disc_in = int(state.get("loss.discriminator.main.0.weight", np.zeros((0, 0))).shape[1])
      if disc_in and disc_in != channels:
        problems.append(
          f"loss.discriminator.main.0.weight takes {disc_in} channels, the "
          f"autoencoder {channels} (a conditional discriminator?)"
        )
      p = map_tree(abstract.disc.params, state, disc_source)
      s = map_tree(abstract.disc.batch_stats, state, disc_source)
      problems += p.problems + s.problems
      used |= p.used | s.used
      disc_params, disc_stats = p.tree, s.tree
      for k in state:
        if k.startswith("loss.discriminator.") and k.endswith(".num_batches_tracked"):
          skipped[k] = "BatchNorm step counter (flax's BatchNorm uses a fixed momentum)"
    else:
      notes.append(
        "no discriminator (loss.discriminator.*) in the checkpoint: the PatchGAN "
        "starts from a fresh initialisation, as in a new run"
      )
    lp = lpips_from_taming(state)
    if lp is not None:
      lpips_params, lpips_used = lp
      used |= lpips_used
    else:
      notes.append(
        "no LPIPS (loss.perceptual_loss.*) in the checkpoint: lpips_path stays "
        f"{config.get('lpips_path')!r}"
      )

  unused = sorted(k for k in state if k not in used and k not in skipped)
  problems += [f"unexpected {k} {tuple(state[k].shape)} (no parameter takes it)" for k in unused]
  if problems:
    raise ConversionError(
      f"the {kind} checkpoint does not map onto the network its tensors describe "
      f"({len(problems)} problem(s)); nothing was written:\n  " + "\n  ".join(problems)
    )

  codebook = mapped.tree["codebook"]
  if step is None:
    step = default_step(ckpt.global_step, codebook, config.quantizer)
    if ckpt.global_step is None and step:
      notes.append(
        f"no global_step in a bare state_dict: step {step} is the first at which "
        f"BBNR (alpha {config.quantizer.bbnr_alpha}) keeps the codebook (max row "
        f"norm {float(np.max(np.linalg.norm(codebook, axis=-1))):.4g}) unchanged"
      )
  radius = quantization.bbnr_radius(
    np.asarray(step), config.quantizer.bbnr_alpha, config.quantizer.bbnr
  )
  max_norm = float(np.max(np.linalg.norm(codebook, axis=-1)))
  if config.quantizer.bbnr != "off" and max_norm > float(radius) * (1 + 1e-6):
    notes.append(
      f"codebook rows reach norm {max_norm:.4g} > M({step}) = {float(radius):.4g}: "
      "the first training step projects them into the ball (BBNR)"
    )
  return Converted(
    config=config,
    image_shape=image_shape,
    params=mapped.tree,
    disc_params=disc_params,
    disc_batch_stats=disc_stats,
    lpips_params=lpips_params,
    step=int(step),
    source_format=ckpt.format,
    overrides=overrides,
    changed=changed,
    skipped=skipped,
    notes=notes,
    num_tensors=len(used) + len(skipped),
  )


def _refuse_used_workdir(workdir: str) -> None:
  directory = epath.Path(ckpt_lib.checkpoint_dir(workdir))
  if directory.exists() and any(p.name.isdigit() for p in directory.iterdir()):
    raise workdir_lib.WorkdirError(
      f"{directory} already has checkpoints; write into an empty --workdir so no run is "
      "overwritten."
    )


def run(
  ckpt_path: str,
  kind: str,
  config: ml_collections.ConfigDict,
  config_spec: str,
  workdir: str,
  step: int | None = None,
) -> dict[str, Any]:
  """Reads, converts and writes the workdir; returns the conversion report (also written
  to workdir/conversion.json).

  config: the loaded --config (with any command-line overrides); config_spec: its file as
  given (path[:variant]), named in workdir/config.py.
  """
  t0 = time.perf_counter()
  _refuse_used_workdir(workdir)
  user_overrides = command_line_overrides(config, config_spec)
  ckpt = torch_load.read_checkpoint(ckpt_path)
  t_read = time.perf_counter() - t0
  result = convert(ckpt, kind, config, step)
  t_map = time.perf_counter() - t0 - t_read
  del ckpt  # unmaps the source file: only the converted arrays are needed from here on
  # Device arrays now, dropping the numpy copies (peak memory: one copy of the weights
  # plus the fresh Adam moments).
  params, result.params = jax.tree.map(jnp.asarray, result.params), None
  disc_params, result.disc_params = jax.tree.map(jnp.asarray, result.disc_params), None

  config = result.config
  extra: dict[str, Any] = {}
  if result.lpips_params is not None:
    lpips_file = os.path.join(workdir, "lpips_vgg16.npz")
    epath.Path(workdir).mkdir(parents=True, exist_ok=True)
    lpips_lib.save_params(result.lpips_params, lpips_file)
    extra["lpips_path"] = lpips_file if "://" in lpips_file else os.path.abspath(lpips_file)
  overrides = {**user_overrides, **result.overrides, **extra}
  apply_overrides(config, extra)
  path = workdir_lib.write_workdir(
    workdir,
    config,
    result.image_shape,
    params,
    step=result.step,
    disc_params=disc_params,
    disc_batch_stats=result.disc_batch_stats,
  )
  config_py = os.path.join(workdir, "config.py")
  write_config_py(
    config_py,
    config_spec,
    overrides,
    f"Config of the run converted from {ckpt_path} (--kind={kind}) by "
    "arcvq_jax.convert.torch_checkpoint: the base config with the values the "
    "checkpoint fixes.",
  )
  report = dict(
    source=os.path.abspath(ckpt_path),
    kind=kind,
    source_format=result.source_format,
    base_config=config_spec,
    checkpoint=f"{path}/{result.step}",
    step=result.step,
    tensors_converted=result.num_tensors - len(result.skipped),
    parameters=int(sum(np.size(x) for x in jax.tree.leaves(params))),
    discriminator=disc_params is not None,
    lpips=result.lpips_params is not None,
    config_changes=result.changed,
    skipped=result.skipped,
    notes=result.notes,
    seconds=dict(
      read=round(t_read, 3), map=round(t_map, 3), total=round(time.perf_counter() - t0, 3)
    ),
    run_command=f"python -m arcvq_jax.main --config={config_py} --workdir={workdir}",
  )
  (epath.Path(workdir) / "conversion.json").write_text(json.dumps(report, indent=2, default=str))
  return report


# --------------------------------------------------------------------------- CLI

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags; defined when run as a program only, so importing this module
  next to another command (main, evaluate) cannot clash with their --config / --workdir."""
  flags.DEFINE_string("ckpt", None, "PyTorch checkpoint: best.pt (ArcVQ-VAE) or a Lightning .ckpt.")
  flags.DEFINE_enum("kind", None, KINDS, "What the checkpoint holds (see the module docstring).")
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Base config (configs/*.py[:variant]) for everything the weights do not "
    "fix: data, optimizer, schedules, ArcLoss.",
    lock_config=False,
  )
  flags.DEFINE_string("workdir", None, "New run directory to write (must hold no checkpoints).")
  flags.DEFINE_integer(
    "step",
    None,
    "Step to store (default: the checkpoint's global_step, "
    "or the first step at which BBNR keeps the codebook).",
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  for name in ("ckpt", "kind", "config", "workdir"):
    if FLAGS[name].value is None:
      raise app.UsageError(f"--{name} is required")
  for name in ("ckpt", "workdir"):
    if not FLAGS[name].value.strip():
      raise app.UsageError(f"--{name} is empty: give a path")
  if os.path.isfile(FLAGS.workdir):
    raise cli.UserError(f"--workdir={FLAGS.workdir} is a file: give a new directory.")
  spec = config_flags.get_config_filename(FLAGS["config"])  # path[:variant] as given
  # Its errors (torch_load's, ConversionError, WorkdirError, api.TokenizerLoadError) are in
  # cli.USER_ERRORS: one "error:" line, exit status 2.
  report = run(
    os.path.expanduser(FLAGS.ckpt), FLAGS.kind, FLAGS.config, spec, FLAGS.workdir, FLAGS.step
  )
  logging.info("conversion report: %s", report)
  print(
    f"converted {report['tensors_converted']} tensors ({report['parameters']:,} autoencoder "
    f"parameters) from {report['source']} into {report['checkpoint']} "
    f"in {report['seconds']['total']:.1f} s"
  )
  for key, value in report["config_changes"].items():
    print(f"  config.{key} = {value!r}")
  if report["skipped"]:
    print(
      f"  skipped {len(report['skipped'])} tensor(s): "
      + "; ".join(sorted(set(report["skipped"].values())))
    )
  for note in report["notes"]:
    print(f"  note: {note}")
  print(f"next: {report['run_command']}")


if __name__ == "__main__":
  define_flags()
  cli.run(main, fast_malloc=False)  # one pass over a weights file: nothing to gain
