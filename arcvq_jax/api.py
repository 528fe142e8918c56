"""The tokenizer as a library: load a trained run, turn images into tokens and back.

```python
from arcvq_jax import api
tok = api.Tokenizer.from_workdir("/tmp/arcvq_demo")      # latest checkpoint of a run
tokens = tok.encode(images)            # (B, H, W, C) in [-1, 1] -> int32 (B, h, w)
images_hat = tok.decode(tokens)        # -> float32 (B, H, W, C), about [-1, 1]
x_hat, tokens = tok.reconstruct(images)
```

A run's workdir holds `config.json` (written by `python -m arcvq_jax.main`) and orbax
checkpoints of the whole train state; only the autoencoder's parameters are kept here.
`write_workdir` goes the other way: it wraps given parameters (e.g. converted from a PyTorch
checkpoint) in a fresh train state and writes a workdir that `main` resumes from and
`Tokenizer.from_workdir` loads.

The methods are jitted once per input shape; the quantiser is the run's own (cosine or
Euclidean search, blocked for large codebooks), so tokens equal the training run's.
"""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

from arcvq_jax import checkpoint_files
from arcvq_jax import config as config_lib
from arcvq_jax.quantizers.base import Quantizer
from arcvq_jax.train import state as state_lib
from arcvq_jax.train import tokenizer_steps

CONFIG_FILE = "config.json"


class TokenizerLoadError(RuntimeError):
  """A workdir, config or checkpoint that cannot give a tokenizer."""


class TokenizerInputError(ValueError):
  """Images, latents or tokens the tokenizer cannot take (wrong shape or dtype, an empty
  batch, NaN or out-of-range values); the message says what was given and what is wanted."""


def _host_min_max(x: Any) -> tuple[float, float] | None:
  """(min, max) of a non-empty array in one transfer (numpy on the host, one jnp reduction
  fetched for a device array; NaN if it holds any), or None for an array spread over
  several processes (no host sees all of it)."""
  if isinstance(x, jax.Array):
    if not x.is_fully_addressable:
      return None
    lo, hi = jax.device_get((x.min(), x.max()))
  else:
    lo, hi = np.min(x), np.max(x)
  return float(lo), float(hi)


def _check_tokens(tokens: Any, num_codes: int, ndim: int | None) -> jax.Array:
  """Tokens as int32, after checking them: integers, `ndim` axes (None: any), non-empty, in
  [0, num_codes). A host array is checked before the int32 conversion, so int64 tokens
  beyond int32 are refused instead of wrapped."""
  if not isinstance(tokens, jax.Array):
    tokens = np.asarray(tokens)
  shape, dtype = tuple(tokens.shape), tokens.dtype
  if not np.issubdtype(dtype, np.integer) or (ndim is not None and len(shape) != ndim):
    want = "integers of shape (B, h, w)" if ndim == 3 else "integers"
    raise TokenizerInputError(f"tokens must be {want}, got {dtype} {shape}.")
  if not math.prod(shape):
    raise TokenizerInputError(f"tokens of shape {shape} are empty: give at least one token.")
  bounds = _host_min_max(tokens)
  if bounds is not None and (bounds[0] < 0 or bounds[1] >= num_codes):
    raise TokenizerInputError(
      f"tokens must lie in [0, {num_codes}) (the vocabulary), got [{bounds[0]:.0f}, "
      f"{bounds[1]:.0f}]."
    )
  return jnp.asarray(tokens, jnp.int32)


def _tuples(value: Any) -> Any:
  """JSON turns the config's tuples into lists; the models want tuples back."""
  if isinstance(value, dict):
    return {k: _tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_tuples(v) for v in value)
  return value


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The ConfigDict a run saved as workdir/config.json."""
  if not str(workdir).strip():
    raise TokenizerLoadError(
      "the workdir is an empty path: give the --workdir of a run (the directory "
      "`python -m arcvq_jax.main --workdir=...` trained in)."
    )
  path = epath.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise TokenizerLoadError(
      f"{path} not found: {workdir} is not the --workdir of an arcvq_jax run. Give the "
      "directory `python -m arcvq_jax.main --workdir=...` trained in (it holds config.json "
      "and checkpoints/), or write one with arcvq_jax.api.write_workdir."
    )
  try:
    raw = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise TokenizerLoadError(f"{path} is not valid JSON ({e}); the workdir is damaged.") from e
  return ml_collections.ConfigDict(_tuples(raw))


def _params_of(state: dict[str, Any]) -> Any:
  """The autoencoder's params in a restored state: a VQ-VAE's TrainState or a VQGAN's
  GANTrainState (whose autoencoder is under 'gen')."""
  if "gen" in state:
    state = state["gen"]
  if "params" not in state or "encoder" not in state["params"]:
    raise TokenizerLoadError(
      f"the checkpoint holds {sorted(state)} but no autoencoder params: it was not written "
      "by the tokenizer stage."
    )
  return state["params"]


def checkpoint_dir(workdir: str) -> epath.Path:
  """Where a run keeps its orbax checkpoints: one folder per step, each with a 'state' item
  (and, from training, a 'data' item: the input iterator's position, which the API never
  reads, so it needs no grain)."""
  return epath.Path(workdir) / "checkpoints"


def restore_params(workdir: str, step: int | None = None) -> tuple[Any, int]:
  """(params, step) of checkpoint `step` (default: the newest readable one) of a run, on
  the first device. A damaged newest step is skipped with a warning (read-only: the next
  training run in the workdir moves it aside)."""
  directory = str(checkpoint_dir(workdir))
  try:
    # Onto one device whatever mesh wrote it: inference needs no sharding.
    found = checkpoint_files.restore_newest_state(directory, step=step)
  except checkpoint_files.CheckpointError as e:
    raise TokenizerLoadError(str(e)) from e
  if found is None:
    damaged = checkpoint_files.checkpoint_steps(directory)
    raise TokenizerLoadError(
      f"no readable checkpoint in {directory}"
      + (f" (steps {damaged} are damaged)" if damaged else "")
      + f": train first (python -m arcvq_jax.main --config=... --workdir={workdir}) or "
      "convert one (python -m arcvq_jax.convert.torch_checkpoint ...)."
    )
  state, step = found
  return _params_of(state), step


def _check_params(quantizer: Quantizer, params: Any) -> None:
  """The checkpoint holds the parameters the config's quantizer wants, in their shapes."""
  for name, init in quantizer.param_inits().items():
    want = tuple(jax.eval_shape(init, jax.random.PRNGKey(0)).shape)
    have = tuple(np.shape(params[name])) if name in params else None
    if have != want:
      raise TokenizerLoadError(
        f"the checkpoint's {name!r} is {have or 'missing'} but its config's {quantizer.name} "
        f"quantizer wants {want}: config.json and checkpoints/ do not belong to the same run."
      )


def _channels(params: Any) -> int:
  """Image channels, from the encoder's first conv kernel (HWIO)."""
  first = params["encoder"].get("conv_in", params["encoder"].get("conv_1"))
  return int(first["kernel"].shape[2])


class Tokenizer:
  """A trained tokenizer (VQ-VAE or VQGAN): encode images to token grids and back.

  Images are float (B, H, W, C) in [-1, 1] (numpy or jax); tokens int32 (B, h, w) with
  h, w = H / f, W / f for the model's downsampling factor f.
  """

  def __init__(self, config: ml_collections.ConfigDict, params: Any):
    self.config = config
    self.params = params
    self.channels = _channels(params)
    self.model = state_lib.build_model(config, channels=self.channels)
    self.quantizer: Quantizer = self.model.quantizer
    _check_params(self.quantizer, params)
    # The vocabulary (the priors' token range) and the latent width D.
    self.num_codes, self.embed_dim = self.quantizer.vocab_size, self.quantizer.dim
    self.downsample_factor = config_lib.downsample_factor(config)
    # Compiled with the XLA options the model's convolution forms were chosen for (the
    # training steps' own): without them a VQ-VAE on the CPU encoded and decoded ~1.9x
    # slower (1000 Fashion-MNIST images: 274 -> 147 ms, 245 -> 131 ms).
    jit = functools.partial(jax.jit, compiler_options=tokenizer_steps.compiler_options(self.model))
    self._encode = jit(functools.partial(self._encode_latents_fn, model=self.model))
    self._decode_z = jit(functools.partial(self._decode_fn, model=self.model))
    self._tokens = jit(self.quantizer.tokens)
    self._lookup = jit(self.quantizer.lookup)

  @classmethod
  def from_workdir(cls, workdir: str, step: int | None = None) -> Tokenizer:
    """The run in `workdir` at checkpoint `step` (default: its latest)."""
    config = load_config(workdir)
    if config.get("stage", "tokenizer") != "tokenizer":
      raise TokenizerLoadError(
        f"{workdir} is a {config.stage!r} run, not a tokenizer; give the tokenizer's workdir."
      )
    params, _ = restore_params(workdir, step)
    return cls(config, params)

  @staticmethod
  def _encode_latents_fn(params: Any, x: jax.Array, *, model) -> jax.Array:
    return model.apply({"params": params}, x, method="encode").astype(jnp.float32)

  @staticmethod
  def _decode_fn(params: Any, z_q: jax.Array, *, model) -> jax.Array:
    return model.apply({"params": params}, z_q, method="decode").astype(jnp.float32)

  def _check_images(self, images: Any) -> jax.Array:
    """Images as float32 after checking them (TokenizerInputError otherwise): (B, H, W, C)
    with the model's channels, B >= 1, sides multiples of the downsampling, floats, finite
    and about [-1, 1]. One reduction's (min, max) is fetched (numpy for a host array)."""
    x = images if isinstance(images, jax.Array) else np.asarray(images)
    if x.ndim != 4 or x.shape[-1] != self.channels:
      raise TokenizerInputError(f"images must be (B, H, W, {self.channels}), got {x.shape}.")
    if not math.prod(x.shape):
      raise TokenizerInputError(
        f"images of shape {x.shape} are empty: give at least one image of at least one pixel."
      )
    f = self.downsample_factor
    if x.shape[1] % f or x.shape[2] % f:
      raise TokenizerInputError(
        f"image height and width must be multiples of {f} (the model's "
        f"downsampling), got {x.shape[1:3]}; resize or crop them first."
      )
    if not np.issubdtype(x.dtype, np.floating) and x.dtype != jnp.bfloat16:
      raise TokenizerInputError(
        f"images must be floats in [-1, 1], got dtype {x.dtype}; convert uint8 with x / 127.5 - 1."
      )
    # Pixel values in [0, 255] would encode without complaint, to tokens of nothing the model
    # has seen, and NaN to token 0. A resize's overshoot (bicubic: a few per cent) stays well
    # inside the margin; images in [0, 1] cannot be told apart from dark images in [-1, 1]
    # and are not caught.
    bounds = _host_min_max(x)
    if bounds is not None:
      lo, hi = bounds
      if not (math.isfinite(lo) and math.isfinite(hi)):
        raise TokenizerInputError(
          f"images hold NaN or infinite values (min {lo}, max {hi}): check the data (a "
          "division by zero in a normalisation?) before encoding."
        )
      if lo < -1.5 or hi > 1.5:
        raise TokenizerInputError(
          f"images must be in [-1, 1], got values in [{lo:.4g}, {hi:.4g}]; convert [0, 255] "
          "with x / 127.5 - 1, [0, 1] with 2 * x - 1."
        )
    return jnp.asarray(x, jnp.float32)

  def _check_latents(self, z: Any) -> jax.Array:
    """Latents as float32 after checking them: (B, h, w, D) with the quantizer's D, non-empty,
    finite (one reduction fetched)."""
    z = z if isinstance(z, jax.Array) else np.asarray(z)
    if z.ndim != 4 or z.shape[-1] != self.embed_dim:
      raise TokenizerInputError(
        f"latents must be (B, h, w, {self.embed_dim}) (D = {self.embed_dim}, the quantizer's "
        f"width), got {z.shape}."
      )
    if not math.prod(z.shape):
      raise TokenizerInputError(f"latents of shape {z.shape} are empty: give at least one.")
    if not np.issubdtype(z.dtype, np.floating) and z.dtype != jnp.bfloat16:
      raise TokenizerInputError(f"latents must be floats, got dtype {z.dtype}.")
    bounds = _host_min_max(z)
    if bounds is not None and not all(math.isfinite(v) for v in bounds):
      raise TokenizerInputError(
        f"latents hold NaN or infinite values (min {bounds[0]}, max {bounds[1]}): they would "
        "all map to one token."
      )
    return jnp.asarray(z, jnp.float32)

  def _tokens_of(self, z: jax.Array) -> jax.Array:
    """Checked latents (B, h, w, D) -> tokens int32 (B, h, w)."""
    idx = self._tokens(self.params, z.reshape(-1, z.shape[-1]))
    return idx.reshape(z.shape[:-1]).astype(jnp.int32)

  def encode_latents(self, images: Any) -> jax.Array:
    """(B, H, W, C) in [-1, 1] -> pre-quantisation latents z, float32 (B, h, w, D).
    TokenizerInputError for images of another shape or dtype, empty, NaN or out of range."""
    return self._encode(self.params, self._check_images(images))

  def quantize(self, z: Any) -> jax.Array:
    """Latents (B, h, w, D) -> tokens int32 (B, h, w), as the run's quantizer picks them.
    TokenizerInputError for latents of another width D, empty, or not finite."""
    return self._tokens_of(self._check_latents(z))

  def encode(self, images: Any) -> jax.Array:
    """(B, H, W, C) in [-1, 1] -> tokens int32 (B, h, w)."""
    return self._tokens_of(self.encode_latents(images))

  def decode(self, tokens: Any) -> jax.Array:
    """Tokens (B, h, w) -> images float32 (B, H, W, C), about [-1, 1] (not clipped).
    TokenizerInputError for tokens that are not integers (B, h, w) in [0, num_codes)."""
    tokens = _check_tokens(tokens, self.num_codes, ndim=3)
    return self._decode_z(self.params, self._lookup(self.params, tokens))

  def decode_latents(self, z: Any) -> jax.Array:
    """Latents (B, h, w, D): quantise to the nearest codes, then decode."""
    tokens = self.quantize(z)
    return self._decode_z(self.params, self._lookup(self.params, tokens))

  def reconstruct(self, images: Any) -> tuple[jax.Array, jax.Array]:
    """(B, H, W, C) in [-1, 1] -> (x_hat float32 (B, H, W, C), tokens int32 (B, h, w))."""
    tokens = self.encode(images)
    return self._decode_z(self.params, self._lookup(self.params, tokens)), tokens

  @property
  def codebook(self) -> jax.Array | None:
    """The (K, D) float32 rows the tokens index, or None for a quantizer without a codebook
    (FSQ, LFQ: `lookup` gives the vector of a token)."""
    rows = self.quantizer.codebook(self.params)
    return None if rows is None else jnp.asarray(rows, jnp.float32)

  def lookup(self, tokens: Any) -> jax.Array:
    """Tokens (...) -> the vectors (..., D) float32 the decoder takes for them.
    TokenizerInputError for tokens that are not integers in [0, num_codes), or none."""
    return self._lookup(self.params, _check_tokens(tokens, self.num_codes, ndim=None))


def write_workdir(
  workdir: str,
  config: ml_collections.ConfigDict,
  params: Any,
  image_shape: tuple[int, int, int],
  step: int = 0,
) -> str:
  """Writes config.json and checkpoint `step` holding `params` in a fresh train state.

  The optimizer state, EMA statistics and usage are fresh (as at step 0); the data iterator
  starts at the beginning. A VQGAN's discriminator starts from its initialisation. Returns
  the checkpoint directory. Refuses a workdir that already has checkpoints.
  """
  fresh = jax.eval_shape(state_lib.init_fn(config, image_shape), jax.random.PRNGKey(config.seed))
  want = fresh.gen.params if isinstance(fresh, state_lib.GANTrainState) else fresh.params
  got = jax.tree.structure(params)
  if got != jax.tree.structure(want):
    raise TokenizerLoadError(
      "the params do not have the tree of the model this config builds; expected "
      f"{jax.tree.structure(want)}, got {got}."
    )
  for (path, w), have in zip(
    jax.tree_util.tree_leaves_with_path(want), jax.tree.leaves(params), strict=True
  ):
    if tuple(w.shape) != tuple(np.shape(have)):
      raise TokenizerLoadError(
        f"param {jax.tree_util.keystr(path)} has shape {np.shape(have)}, the config's "
        f"model wants {w.shape}."
      )
  refuse_nonempty(workdir)
  state = state_lib.state_from_params(config, image_shape, params, step=step)
  return save_state(workdir, config, state, step)


def refuse_nonempty(workdir: str) -> None:
  """Raises TokenizerLoadError if `workdir` already holds checkpoints (so none is overwritten)."""
  steps = checkpoint_files.checkpoint_steps(str(checkpoint_dir(workdir)))
  if steps:
    raise TokenizerLoadError(
      f"{checkpoint_dir(workdir)} already has checkpoints ({steps}); write into an empty "
      "--workdir so no run is overwritten."
    )


def save_state(workdir: str, config: ml_collections.ConfigDict, state: Any, step: int) -> str:
  """workdir/config.json and workdir/checkpoints/<step> holding the train state `state`, in
  the layout training writes (without a data position: `main` then starts the data stream
  from its beginning). Both are written atomically. Returns the checkpoint directory."""
  root = epath.Path(workdir)
  root.mkdir(parents=True, exist_ok=True)
  tmp = root / (CONFIG_FILE + ".tmp")
  tmp.write_text(config.to_json_best_effort(indent=2))
  tmp.rename(root / CONFIG_FILE)
  directory = checkpoint_dir(workdir)
  manager = ocp.CheckpointManager(
    directory, item_names=("state",), options=ocp.CheckpointManagerOptions(create=True)
  )
  try:
    manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state)), force=True)
    manager.wait_until_finished()
  finally:
    manager.close()
  return str(directory)
