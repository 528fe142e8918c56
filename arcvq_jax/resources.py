"""Will a run fit? A rough but honest memory estimate from the config's shapes, checked
against the device's memory before anything is allocated (docs/training.md, "Errors and
resuming").

Without it a config that cannot fit (`--config.quantizer.num_codes=2000000000`: a 128 GB
codebook) takes all of the machine's memory until the kernel kills the process. The estimate
costs three traces, no compilation and no allocation (~0.5 s for a VQ-VAE, ~2 s for a VQGAN
on a 2-core CPU):

- the train state (parameters, Adam's two moments, the quantizer's statistics; a VQGAN's
  discriminator too), exactly, from `jax.eval_shape` of the stage's initialiser, plus the
  gradients (as large as the parameters);
- the step's activations, from a trace (`jax.make_jaxpr`) of the tokenizer loss's forward
  pass at the per-device batch: the outputs of its convolutions and matrix products (the
  nearest-code search and the ArcLoss among them, naive or blocked as the config chooses)
  twice, since the backward pass keeps them and makes gradients as large, and the im2col
  patches (concatenations) once; elementwise work is fused by XLA and not counted. On the
  VQ-VAE at batch 128 and 1024 and the small VQGAN this came within 0.9-1.1x of XLA's own
  figure for the compiled step (`memory_analysis().temp_size_in_bytes`);
- the evaluation's activations: twice the largest tensor of its reconstruction (a trace at
  config.eval_batch_size) (inference frees each tensor once the next layer has read it; XLA's
  figure for the compiled evaluation step was 1.1-1.7x this);
- the prefetched input batches.

The memory: on the CPU the RAM the kernel says is available (MemAvailable in /proc/meminfo),
shared by all of the host's CPU devices; on a GPU / TPU `device.memory_stats()`'s
bytes_limit less bytes_in_use, per device. The state is taken as split over the mesh's
non-'data' axes (the least it can be per device), so the estimate errs low: a run it refuses
cannot fit; one it admits may still run short (LPIPS, XLA's workspace and fragmentation are
not counted).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from jax.extend import core as jax_core

from arcvq_jax import cli
from arcvq_jax.train import state as state_lib
from arcvq_jax.train import tokenizer_steps

MEMINFO = "/proc/meminfo"
# Batches the input pipeline holds at once (pipeline._PREFETCH_BATCHES, the one being
# copied to the device and the one the step reads).
INPUT_BATCHES = 6
# Primitives whose outputs XLA materialises (no fusion into neighbours): kept for the
# backward pass (KEPT), or consumed at once by the product after them (ONCE).
KEPT = ("conv_general_dilated", "dot_general", "onednn_convolution")
ONCE = ("concatenate",)
GIB = 2**30


class ResourceError(cli.UserError):
  """The run cannot fit in the device's memory; the message gives the estimate and the key
  to change."""


def meminfo_available(path: str = MEMINFO) -> int | None:
  """Bytes of RAM the kernel can give without swapping (MemAvailable), or None where the
  file or the line is missing (not Linux)."""
  try:
    with open(path) as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          return int(line.split()[1]) * 1024  # kB
  except (OSError, ValueError, IndexError):
    return None
  return None


def device_memory(device: Any) -> tuple[int, str] | None:
  """(bytes free for the run, what they are) of `device`: the host's available RAM for a CPU
  device, bytes_limit - bytes_in_use of memory_stats() for an accelerator; None where
  unknown."""
  if device.platform == "cpu":
    available = meminfo_available()
    return None if available is None else (available, "of RAM available: /proc/meminfo")
  try:
    stats = device.memory_stats() or {}
  except Exception:  # some backends raise for memory_stats
    return None
  if "bytes_limit" not in stats:
    return None
  free = int(stats["bytes_limit"]) - int(stats.get("bytes_in_use", 0))
  return free, f"free on {device.device_kind} {device.id}: memory_stats()"


def tree_bytes(tree: Any) -> int:
  """Bytes of the arrays (or ShapeDtypeStructs) of a pytree."""
  return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))


def _subjaxprs(value: Any) -> Iterable[jax_core.Jaxpr]:
  """The jaxprs inside an equation's parameter (closed or not, alone or in a sequence)."""
  if isinstance(value, jax_core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax_core.Jaxpr):
    yield value
  elif isinstance(value, tuple | list):
    for item in value:
      yield from _subjaxprs(item)


def materialised_bytes(jaxpr: jax_core.Jaxpr) -> tuple[int, int, int]:
  """(bytes of the KEPT outputs, bytes of the ONCE outputs, bytes of the largest output) of
  `jaxpr` and the jaxprs inside it (a loop's body counted once: its buffers are reused by
  every iteration)."""
  kept = once = largest = 0
  for eqn in jaxpr.eqns:
    size = sum(tree_bytes(v.aval) for v in eqn.outvars if hasattr(v.aval, "shape"))
    largest = max(largest, size)
    if eqn.primitive.name in KEPT:
      kept += size
    elif eqn.primitive.name in ONCE:
      once += size
    for value in eqn.params.values():
      for sub in _subjaxprs(value):
        k, o, big = materialised_bytes(sub)
        kept, once, largest = kept + k, once + o, max(largest, big)
  return kept, once, largest


@dataclasses.dataclass(frozen=True)
class Estimate:
  """A tokenizer run's memory, in bytes, per device: the train state with the gradients
  (`codebook`: the part of it that is the codebook's), the train step's and the
  evaluation's activations (per-device batches `batch`, `eval_batch`), the input batches."""

  state: int
  codebook: int
  train_activations: int
  eval_activations: int
  inputs: int
  batch: int
  eval_batch: int

  @property
  def total(self) -> int:
    return self.state + max(self.train_activations, self.eval_activations) + self.inputs


def _forward_bytes(
  model: Any,
  abstract_params: Any,
  batch: int,
  image_shape: tuple[int, int, int],
  train: bool = True,
) -> tuple[int, int, int]:
  """materialised_bytes of the tokenizer loss's forward pass at `batch` images, or (train
  False) of the evaluation's reconstruction."""
  x = jax.ShapeDtypeStruct((batch, *image_shape), jnp.float32)
  if train:
    loss = functools.partial(tokenizer_steps.tokenizer_loss, model=model, data_variance=1.0)
    closed = jax.make_jaxpr(loss)(abstract_params, x, jnp.zeros((), jnp.int32))
  else:
    recon = functools.partial(tokenizer_steps.reconstruct, model=model)
    closed = jax.make_jaxpr(recon)(abstract_params, x)
  return materialised_bytes(closed.jaxpr)


def model_parallel_size(config: ml_collections.ConfigDict, num_devices: int) -> int:
  """The product of the mesh's non-'data' axis sizes (-1 resolved): the most ways the state
  can be split."""
  shape, axes = list(config.sharding.mesh_shape), list(config.sharding.mesh_axes)
  known = math.prod(s for s in shape if s != -1) or 1
  sizes = [num_devices // known if s == -1 else s for s in shape]
  return max(1, math.prod(s for s, a in zip(sizes, axes, strict=False) if a != "data"))


def tokenizer_estimate(
  config: ml_collections.ConfigDict,
  model: Any,
  image_shape: tuple[int, int, int],
  num_devices: int,
) -> Estimate:
  """The memory a tokenizer run of `config` needs per device (module docstring)."""
  abstract = jax.eval_shape(state_lib.init_fn(config, image_shape), jax.random.PRNGKey(0))
  split = model_parallel_size(config, num_devices)
  leaves = jax.tree_util.tree_leaves_with_path(abstract)
  in_codebook = lambda path: "codebook" in jax.tree_util.keystr(path)
  codebook = sum(tree_bytes(x) for p, x in leaves if in_codebook(p))
  codebook_grads = sum(
    tree_bytes(x) for p, x in jax.tree_util.tree_leaves_with_path(abstract.params) if in_codebook(p)
  )
  state = tree_bytes(abstract) + tree_bytes(abstract.params)  # with the gradients
  batch = max(1, config.batch_size // num_devices)
  eval_batch = max(1, config.eval_batch_size // num_devices)
  try:
    kept, once, _ = _forward_bytes(model, abstract.params, batch, image_shape)
    _, _, largest = _forward_bytes(model, abstract.params, eval_batch, image_shape, train=False)
  except Exception as e:  # the estimate is advice; the step itself will tell
    logging.warning("Memory estimate without activations (the forward pass did not trace: %s)", e)
    kept = once = largest = 0
  return Estimate(
    state=state // split,
    codebook=(codebook + codebook_grads) // split,
    train_activations=2 * kept + once,
    # Inference frees each tensor once used: the largest one and its neighbour.
    eval_activations=2 * largest,
    inputs=INPUT_BATCHES * batch * math.prod(image_shape) * 4,
    batch=batch,
    eval_batch=eval_batch,
  )


def _gib(n: int) -> str:
  return f"{n / GIB:.1f} GiB" if n >= GIB / 10 else f"{n / 2**20:.1f} MiB"


def _fix(config: ml_collections.ConfigDict, e: Estimate) -> str:
  """The key to change: the largest part of the estimate's."""
  q = config.quantizer
  parts = {
    "codebook": e.codebook,
    "state": e.state - e.codebook,
    "train": e.train_activations,
    "eval": e.eval_activations,
  }
  largest = max(parts, key=parts.get)
  if largest == "codebook":
    return (
      f"The codebook ({q.num_codes} x {q.embed_dim}) is the largest part: lower "
      "config.quantizer.num_codes (or config.quantizer.embed_dim)."
    )
  if largest == "state":
    width = "config.model.ch" if config.model.name == "vqgan" else "config.model.hidden"
    return f"The model's parameters are the largest part: make it narrower ({width})."
  if largest == "train":
    return (
      f"The train step's activations at {e.batch} images per device are the largest part: "
      "lower config.batch_size (or config.data.image_size)."
    )
  return (
    f"The evaluation's activations at {e.eval_batch} images per device are the largest part: "
    "lower config.eval_batch_size."
  )


def fit_message(
  config: ml_collections.ConfigDict, e: Estimate, needed: int, free: int, what: str
) -> str:
  """The refusal: the estimate, its parts, the memory there is, and the key to change."""
  return (
    f"this run needs about {_gib(needed)} of memory, more than the {_gib(free)} {what}. "
    "Estimated from the config's shapes, per device: the train state with its "
    f"gradients {_gib(e.state)} (the codebook's share {_gib(e.codebook)}), the train step's "
    f"activations at batch {e.batch} {_gib(e.train_activations)}, the evaluation's at batch "
    f"{e.eval_batch} {_gib(e.eval_activations)}. {_fix(config, e)}"
  )


def check_tokenizer_fits(
  config: ml_collections.ConfigDict,
  model: Any,
  image_shape: tuple[int, int, int],
  devices: list[Any] | None = None,
) -> Estimate:
  """Raises ResourceError where the tokenizer run of `config` cannot fit in the memory of
  `devices` (default: this process's local devices); returns the estimate. Call before
  anything of the run is allocated."""
  devices = jax.local_devices() if devices is None else devices
  e = tokenizer_estimate(config, model, image_shape, jax.device_count())
  memory = device_memory(devices[0])
  if memory is None:
    logging.info("Memory estimate: %s per device (the device's memory is unknown)", _gib(e.total))
    return e
  free, what = memory
  # CPU devices share the host's RAM: each holds its own copy of the state.
  needed = e.total * len(devices) if devices[0].platform == "cpu" else e.total
  if needed > free:
    raise ResourceError(fit_message(config, e, needed, free, what))
  logging.info("Memory estimate: %s of the %s %s", _gib(needed), _gib(free), what)
  return e


def check_state_fits(
  init_fn: Any,
  config: ml_collections.ConfigDict,
  narrower: str,
  devices: list[Any] | None = None,
) -> int:
  """Raises ResourceError where a prior's train state, `init_fn(key)`'s pytree (parameters,
  optimizer moments, EMA), with the gradients of its `params` cannot fit in the memory of
  `devices` (default: this process's local devices); returns the bytes per device. The
  activations are not counted, so this errs low: a refused run cannot fit. `narrower` names
  the key that shrinks the model (e.g. 'config.unet.model_channels')."""
  devices = jax.local_devices() if devices is None else devices
  abstract = jax.eval_shape(init_fn, jax.random.PRNGKey(0))
  params = getattr(abstract, "params", None)
  split = model_parallel_size(config, jax.device_count())
  per_device = (tree_bytes(abstract) + tree_bytes(params)) // split
  memory = device_memory(devices[0])
  if memory is None:
    return per_device
  free, what = memory
  needed = per_device * len(devices) if devices[0].platform == "cpu" else per_device
  if needed > free:
    raise ResourceError(
      f"this prior's train state alone (parameters, optimizer moments, EMA and gradients, "
      f"split over the mesh's non-'data' axes) needs about {_gib(needed)} of memory, more than "
      f"the {_gib(free)} {what}, before any activation. Make the model narrower ({narrower}), "
      "or shard the state over more devices (an 'fsdp' axis in config.sharding.mesh_axes)."
    )
  logging.info("Memory of the train state: %s of the %s %s", _gib(needed), _gib(free), what)
  return per_device
