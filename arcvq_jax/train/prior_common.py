"""What the prior stages (train/prior_ldm.py, train/prior_pixelcnn.py,
train/prior_transformer.py) share: the frozen tokenizer and its compatibility checks, the
precompute pass over the training images, the token shards, the batches of stored latents or
tokens, the optimizer and the EMA of the weights.

Why a precompute pass (not the encoder inside the train step): the tokenizer is frozen, so
its output for an image never changes. Measured (bench/bench_ldm.py, 2-core CPU): the VQGAN
f8 encoder costs 224 GFLOP and 4.1 s per 256x256 image, against 331 GFLOP and 13.4 s per
image for a Table 8 UNet training step (batch 2): in the step it would add ~68 % of the FLOPs
(~30 % of the CPU time) to every step, for each of the ~60 epochs of 1.2M steps at batch 64;
a pass over the training split pays it once. The price: the latents are of the images as
the tokenizer's evaluation pipeline sees them (resized and centre-cropped, no random crops or
flips), and disk for them (ImageNet f8: 1.28M x 32 x 32 x 16 float32 = 84 GB; 10k Fashion-MNIST
images through the tiny tokenizer: 31 MB).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from etils import epath

from arcvq_jax import api, prior_config
from arcvq_jax.data import pipeline
from arcvq_jax.data import token_shards as shards_lib

TOKENIZER_RECORD = "tokenizer.json"


class PriorSetupError(RuntimeError):
  """The tokenizer or the stored latents cannot serve this prior run."""


# --------------------------------------------------------------------------- the tokenizer


def data_config(config: ml_collections.ConfigDict, tok: api.Tokenizer) -> ml_collections.ConfigDict:
  """The tokenizer run's config.data with the prior's non-None config.data keys on top."""
  data = ml_collections.ConfigDict(tok.config.data.to_dict())
  for key, value in config.data.items():
    if value is not None:
      data[key] = value
  return data


def load_tokenizer(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  image_shape: tuple[int, int, int] | None = None,
  default_step: int | None = None,
  check: Callable[[api.Tokenizer, int], None] | None = None,
) -> tuple[api.Tokenizer, dict[str, Any]]:
  """The frozen tokenizer of config.tokenizer_workdir, checked against the config, and its
  record {workdir, step, num_codes, latent_shape, image_shape}.

  The first run of a prior pins the tokenizer (its resolved path and checkpoint step) in
  workdir/tokenizer.json; resumed runs and `arcvq_jax.sample` load that step again and refuse
  another tokenizer, or one that no longer matches, before writing anything. Raises
  PriorSetupError (missing or incompatible tokenizer) or ValueError (config.tokenizer_expect
  / the UNet against the latent shape).

  image_shape: the images' (H, W, C) where the caller knows it (token shards record it), so
  the data need not be reached; default_step: the checkpoint step to load when neither
  config.tokenizer_step nor a pinned record names one (token shards: the step they were
  made with), else the latest; check: called with the tokenizer and its step before
  anything is pinned (token shards: are they this tokenizer's?).
  """
  record_path = os.path.join(workdir, TOKENIZER_RECORD)
  pinned = None
  if os.path.exists(record_path):
    with open(record_path) as f:
      pinned = json.load(f)
  step = config.tokenizer_step if config.tokenizer_step >= 0 else None
  if pinned is not None and step is None:
    step = pinned["step"]
  elif step is None:
    step = default_step
  try:
    tok_config = api.load_config(config.tokenizer_workdir)
    if tok_config.get("stage", "tokenizer") != "tokenizer":
      raise api.TokenizerLoadError(f"it is a {tok_config.stage!r} run, not a tokenizer")
    params, tok_step = api.restore_params(config.tokenizer_workdir, step)
    tok = api.Tokenizer(tok_config, params)
  except api.TokenizerLoadError as e:
    raise PriorSetupError(
      f"config.tokenizer_workdir={config.tokenizer_workdir!r} gives no tokenizer: {e}"
    ) from e
  if pinned is not None:  # no need to reach the data (sampling may run without it)
    h, w, c = pinned["image_shape"]
  elif image_shape is not None:
    h, w, c = image_shape
  else:
    h, w, c = pipeline.dataset_info(data_config(config, tok))["image_shape"]
  f = tok.downsample_factor
  if c != tok.channels:
    raise PriorSetupError(
      f"the data has {c}-channel images but the tokenizer at "
      f"{config.tokenizer_workdir} encodes {tok.channels}-channel ones; "
      "check config.data."
    )
  record = dict(
    workdir=os.path.abspath(config.tokenizer_workdir),
    step=int(tok_step),
    num_codes=tok.num_codes,
    latent_shape=[h // f, w // f, tok.embed_dim],
    image_shape=[h, w, c],
  )
  where = f"{config.tokenizer_workdir} (step {tok_step})"
  prior_config.validate_against_tokenizer(
    config, tok.num_codes, tuple(record["latent_shape"]), where
  )
  if check is not None:
    check(tok, int(tok_step))
  if pinned is not None:
    for key in ("workdir", "num_codes", "latent_shape", "step"):
      if pinned[key] != record[key]:
        raise PriorSetupError(
          f"this prior ({workdir}) was trained on the tokenizer {pinned['workdir']} at step "
          f"{pinned['step']} ({key} = {pinned[key]}), but config.tokenizer_workdir / "
          f"tokenizer_step now give {key} = {record[key]} ({where}). Use the tokenizer it "
          "was trained on, or train the prior afresh in a new --workdir."
        )
  elif jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    with open(record_path, "w") as f:
      json.dump(record, f, indent=2)
  return tok, record


# --------------------------------------------------------------------------- precompute pass


def latents_dir(config: ml_collections.ConfigDict, workdir: str) -> str:
  base = config.latents.dir or os.path.join(workdir, "latents")
  if "://" in base:
    raise ValueError(
      f"config.latents.dir: the stored latents are memory-mapped, so they need a local path, "
      f"got {base!r} (the default is WORKDIR/latents). Set --config.latents.dir=/local/disk/"
      "latents."
    )
  if jax.process_count() > 1:  # Each host keeps its own copy (local disks or a shared one).
    base = os.path.join(base, f"process_{jax.process_index()}")
  return base


def precompute(
  tok: api.Tokenizer,
  data_cfg: ml_collections.ConfigDict,
  out_dir: str,
  kind: str,
  record: dict[str, Any],
  batch_size: int,
  num_classes: int,
) -> dict[str, np.ndarray]:
  """One ordered pass of the tokenizer over the training split, stored in `out_dir`.

  kind 'latents': pre-quantisation latents float32 (N, h, w, D) (the LDM's data); 'tokens':
  code indices int32 (N, h, w) (the PixelCNN's). Also labels int32 (N,). Returns the arrays,
  memory-mapped. A finished pass of the same tokenizer (workdir and step) is reused; its
  meta file is written last, so an interrupted pass is redone.
  """
  out = epath.Path(out_dir)
  meta_path = out / f"{kind}_meta.json"
  names = {"x": out / f"{kind}.npy", "label": out / f"{kind}_labels.npy"}
  source = {k: record[k] for k in ("workdir", "step", "num_codes", "latent_shape")}
  source["split"] = data_cfg.get("train_split", "train")
  if meta_path.exists():
    meta = json.loads(meta_path.read_text())
    if meta["source"] == source:
      logging.info("Using the stored %s of %d images in %s", kind, meta["count"], out_dir)
      return _load_arrays(names, num_classes)
    logging.info(
      "Stored %s in %s are of another tokenizer or split (%s): recomputing.",
      kind,
      out_dir,
      meta["source"],
    )
    meta_path.unlink()
  out.mkdir(parents=True, exist_ok=True)

  pass_cfg = ml_collections.ConfigDict(data_cfg.to_dict())
  pass_cfg.eval_split = source["split"]  # an ordered, padded pass over the train split
  info = pipeline.dataset_info(pass_cfg)
  n = info["num_train"]
  h, w, d = record["latent_shape"]
  shape, dtype = ((n, h, w, d), np.float32) if kind == "latents" else ((n, h, w), np.int32)
  tmp = {k: str(p) + ".tmp.npy" for k, p in names.items()}
  x_out = np.lib.format.open_memmap(tmp["x"], "w+", dtype, shape)
  labels_out = np.lib.format.open_memmap(tmp["label"], "w+", np.int32, (n,))
  logging.info("Encoding the %d training images with the frozen tokenizer into %s", n, out_dir)
  pos, total, total_sq = 0, 0.0, 0.0
  batches = pipeline.create_eval_iterator(
    pass_cfg, global_batch_size=batch_size, process_index=0, process_count=1
  )
  for batch in batches:
    count = int(batch["mask"].sum())
    z = tok.encode_latents(batch["image"])
    values = np.asarray(z if kind == "latents" else tok.quantize(z))[:count]
    x_out[pos : pos + count] = values
    labels_out[pos : pos + count] = batch["label"][:count]
    if kind == "latents":
      total += float(np.sum(values, dtype=np.float64))
      total_sq += float(np.sum(np.square(values, dtype=np.float64)))
    pos += count
  if pos != n:
    raise PriorSetupError(f"the pass over {source['split']} gave {pos} images, expected {n}")
  x_out.flush()
  labels_out.flush()
  del x_out, labels_out
  for k in names:
    os.replace(tmp[k], names[k])
  meta = dict(source=source, kind=kind, count=n, shape=list(shape))
  if kind == "latents":
    mean = total / (n * h * w * d)
    meta.update(mean=mean, std=float(np.sqrt(max(total_sq / (n * h * w * d) - mean**2, 0.0))))
  tmp_meta = out / (meta_path.name + ".tmp")
  tmp_meta.write_text(json.dumps(meta, indent=2))
  tmp_meta.rename(meta_path)
  logging.info("Stored %s: %s", kind, meta)
  return _load_arrays(names, num_classes)


def _load_arrays(names: dict[str, epath.Path], num_classes: int) -> dict[str, np.ndarray]:
  arrays = {k: np.load(str(p), mmap_mode="r") for k, p in names.items()}
  labels = np.asarray(arrays["label"])
  if num_classes and (labels.min() < 0 or labels.max() >= num_classes):
    raise ValueError(
      f"config.num_classes: is {num_classes}, but the training labels span "
      f"[{labels.min()}, {labels.max()}]. Set it to {int(labels.max()) + 1} (or 0 for an "
      "unconditional prior)."
    )
  return arrays


def latent_stats(out_dir: str) -> dict[str, float]:
  """Mean and std of the stored latents (from the precompute pass's meta file)."""
  meta = json.loads((epath.Path(out_dir) / "latents_meta.json").read_text())
  return dict(mean=meta["mean"], std=meta["std"])


# --------------------------------------------------------------------------- token grids


def open_token_shards(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[Any, dict[str, Any], shards_lib.TokenShards]:
  """The frozen tokenizer, its record and the token shards of config.data.token_shards
  (made by `python -m arcvq_jax.tokenize`), checked together before anything is written:
  shards of another tokenizer (step or fingerprint) are refused by name, with the command
  that makes the right ones. Without config.tokenizer_step (or a pinned one) the tokenizer
  is loaded at the shards' step. The prior's other config.data keys are not read."""
  shards = shards_lib.open(config.data.token_shards)

  def same_tokenizer(tok: Any, step: int) -> None:
    identity = shards_lib.identity_of(tok, config.tokenizer_workdir, step)
    shards.check_tokenizer(identity, who="this prior's config.tokenizer_workdir")

  tok, record = load_tokenizer(
    config,
    workdir,
    image_shape=shards.image_shape,
    default_step=shards.tokenizer.step,
    check=same_tokenizer,
  )
  if config.num_classes:
    low, high = shards.label_range or (-1, -1)
    if low < 0 or high >= config.num_classes:
      raise ValueError(
        f"config.num_classes: is {config.num_classes}, but the labels of the token shards in "
        f"{shards.directory} span [{low}, {high}] (-1: the split has none). Set it to "
        f"{high + 1 if low >= 0 else 0} (0 for an unconditional prior)."
      )
  logging.info(
    "Training on the token shards in %s: %d images of split %r, %d view(s)",
    shards.directory,
    shards.num_images,
    shards.index["split"],
    shards.views,
  )
  return tok, record, shards


def token_grids(
  config: ml_collections.ConfigDict, workdir: str
) -> tuple[api.Tokenizer, dict[str, Any], grain.DatasetIterator, int]:
  """What a prior over token grids trains on: the frozen tokenizer, its record, an endless
  iterator of this process's rows of the shuffled global batches {'tokens': (B, h, w)
  int32, 'label': (B,) int32}, and the number of training grids. From the token shards of
  config.data.token_shards where set (no pass over the images), else from this run's own
  precompute pass (`precompute`, kind 'tokens'): the same batches for the same seed."""
  if config.data.get("token_shards"):
    tok, record, shards = open_token_shards(config, workdir)
    return tok, record, shards.train_iterator(config.batch_size, config.seed), shards.num_images
  tok, record = load_tokenizer(config, workdir)
  arrays = precompute(
    tok,
    data_config(config, tok),
    latents_dir(config, workdir),
    "tokens",
    record,
    config.latents.encode_batch_size,
    config.num_classes,
  )
  batches = create_array_iterator(
    {"tokens": arrays["x"], "label": arrays["label"]}, config.batch_size, config.seed
  )
  return tok, record, batches, len(arrays["x"])


# --------------------------------------------------------------------------- batches


class _ReadArrayBatch:
  """Step number -> this process's rows of that step's global batch, from (N, ...) arrays.

  Epoch e is `default_rng([seed, e]).permutation(N)` (as the image pipeline's); the last
  N mod G rows of each permutation are dropped; process p keeps positions p::P.
  """

  def __init__(
    self,
    arrays: dict[str, np.ndarray],
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
  ):
    self.arrays = arrays
    self.n = len(next(iter(arrays.values())))
    self.g = global_batch_size
    self.steps_per_epoch = self.n // global_batch_size
    self.seed, self.p, self.num_p = seed, process_index, process_count
    self._perm: tuple[int, np.ndarray] | None = None

  def __call__(self, step: int, unused_element: Any = None) -> dict[str, np.ndarray]:
    epoch, k = divmod(step, self.steps_per_epoch)
    memo = self._perm
    if memo is None or memo[0] != epoch:
      memo = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
      self._perm = memo
    rows = memo[1][k * self.g : (k + 1) * self.g][self.p :: self.num_p]
    order = np.argsort(rows)  # memory maps read faster in order; put the rows back after
    out = {}
    for name, array in self.arrays.items():
      values = np.asarray(array[rows[order]])
      out[name] = values[np.argsort(order)]
    return out


def create_array_iterator(
  arrays: dict[str, np.ndarray], global_batch_size: int, seed: int
) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of shuffled batches {name: (B_local, ...)}."""
  n = len(next(iter(arrays.values())))
  if n < global_batch_size:
    raise ValueError(
      f"config.batch_size: {global_batch_size} is more than the {n} stored "
      "training examples. Lower it."
    )
  reader = _ReadArrayBatch(
    arrays, global_batch_size, seed, jax.process_index(), jax.process_count()
  )
  dataset = (
    grain.MapDataset.range(reader.steps_per_epoch)
    .repeat(None)
    .map_with_index(reader)
    .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
  )
  return iter(dataset)


# --------------------------------------------------------------------------- optimisation


def learning_rate(o: ml_collections.ConfigDict) -> float | optax.Schedule:
  """config.optimizer.lr, ramped up linearly from 0 over optimizer.warmup_steps where that
  key is set above 0 (the transformer priors; a config without it: the constant rate)."""
  warmup = o.get("warmup_steps", 0)
  if not warmup:
    return o.lr
  return optax.join_schedules(
    [optax.linear_schedule(0.0, o.lr, warmup), optax.constant_schedule(o.lr)], [warmup]
  )


def matrices(params: Any) -> Any:
  """True for the parameters of two or more dimensions (kernels, embeddings): the ones
  LlamaGen's AdamW decays; biases and norm scales are not."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """Adam (or AdamW) at config.optimizer.lr (with its warm-up, `learning_rate`), with
  optional global-norm clipping. AdamW decays every parameter unless
  optimizer.decay_vectors is False (then only `matrices`)."""
  o = config.optimizer
  lr = learning_rate(o)
  if o.name == "adam":
    tx = optax.adam(lr, b1=o.b1, b2=o.b2)
  else:
    mask = None if o.get("decay_vectors", True) else matrices
    tx = optax.adamw(lr, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay, mask=mask)
  if o.grad_clip_norm > 0:
    tx = optax.chain(optax.clip_by_global_norm(o.grad_clip_norm), tx)
  return tx


def ema_decay(step: jax.Array, decay: float, warmup: bool) -> jax.Array:
  """LDM's LitEma: min(decay, (1 + n) / (10 + n)) for the n-th update (n = step + 1)."""
  decay = jnp.asarray(decay, jnp.float32)
  if not warmup:
    return decay
  n = step.astype(jnp.float32) + 1.0
  return jnp.minimum(decay, (1.0 + n) / (10.0 + n))


def ema_update(ema: Any, params: Any, decay: jax.Array) -> Any:
  """ema <- ema - (1 - decay) (ema - params), leaf by leaf (LitEma's forward)."""
  return jax.tree.map(lambda e, p: e - (1.0 - decay) * (e - p), ema, params)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Float images about [-1, 1] -> uint8 [0, 255] (clipped, rounded)."""
  return np.clip(np.round((np.asarray(images, np.float32) + 1.0) * 127.5), 0, 255).astype(np.uint8)
