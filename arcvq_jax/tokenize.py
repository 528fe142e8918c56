"""Pre-tokenize a split once, for every prior and every host:

  python -m arcvq_jax.tokenize --workdir=TOKENIZER --out=DIR [--config=configs/x.py] [--flip]

Encodes every image of the split (default: the data config's train split) with checkpoint
--step (default: the latest) of the tokenizer in --workdir and writes the tokens, labels and
image ids as ArrayRecord shards with an index (the format: arcvq_jax/data/token_shards.py;
docs/priors.md, "Token shards"). The images are read as evaluation reads them: resized and
centre-cropped, no random augmentation; --flip stores the horizontal mirror's tokens too.
--config is a data config (configs/*.py: only its `data` section is read; a prior's config
puts its set keys on top of the tokenizer's); without it, the tokenizer's own config.data.

Each batch is encoded over the host's devices (the batch split along a 'data' mesh axis).
Over several processes, process p writes the shards s with s % P == p; the shards need no
collective, so JAX's distributed runtime is not started: --num_processes and --process_id
(or a detected launcher's environment) say which shards are this process's, and every
process must see the same --out. Each shard is written to a temporary file and renamed
when complete, then its sidecar marks it finished: a killed run, started again, keeps the
finished shards (checked against their sha256) and writes the rest. index.json is written
by whichever process finds every shard finished.
"""

from __future__ import annotations

import contextlib
import fcntl
import math
import os
import shlex
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags

from arcvq_jax import api, cli, distributed, sharding
from arcvq_jax.data import pipeline
from arcvq_jax.data import token_shards as shards_lib
from arcvq_jax.train import tokenizer_steps

FLAGS = flags.FLAGS
PRIOR_STAGES = ("ldm", "pixelcnn")
# Seconds between progress lines when stderr is not a terminal.
LOG_EVERY_SECONDS = 10.0


def define_flags() -> None:
  """The command's flags, defined only when it runs as a program: absl flags are global,
  and other commands (main, evaluate) define some of the same names."""
  flags.DEFINE_string("workdir", None, "The tokenizer's --workdir (a run or a converted one).")
  flags.DEFINE_integer("step", None, "Checkpoint step of the tokenizer (default: the latest).")
  config_flags.DEFINE_config_file(
    "config",
    None,
    "Data config (configs/*.py[:variant]); only its `data` section is read (default: the "
    "tokenizer's own config.data).",
    lock_config=True,
  )
  flags.DEFINE_string("split", None, "Split to tokenize (default: config.data.train_split).")
  flags.DEFINE_string("out", None, "Directory for the shards (new, or one this command made).")
  flags.DEFINE_bool("flip", False, "Also store the tokens of each image's horizontal mirror.")
  flags.DEFINE_integer("batch_size", 64, "Images encoded at a time on this host.")
  flags.DEFINE_integer("images_per_shard", 10000, "Images per shard file.")
  flags.DEFINE_enum(
    "distributed",
    "auto",
    ["auto", "on", "off"],
    "Without --num_processes / --process_id: 'auto' and 'on' take them from a detected "
    "launcher (SLURM, Open MPI, a Cloud TPU slice), 'off' runs alone.",
  )
  flags.DEFINE_string(
    "coordinator_address", None, "Accepted as main's, not used: the processes never talk."
  )
  flags.DEFINE_integer("num_processes", None, "Number of processes writing shards.")
  flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")
  flags.mark_flags_as_required(["workdir", "out"])


# --------------------------------------------------------------------------- inputs


def load_tokenizer(workdir: str, step: int | None) -> tuple[api.Tokenizer, int]:
  """The tokenizer of `workdir` at checkpoint `step` (None: the latest) and that step."""
  config = api.load_config(workdir)
  stage = config.get("stage", "tokenizer")
  if stage != "tokenizer":
    raise cli.UserError(
      f"--workdir={workdir} is a {stage!r} run, not a tokenizer: give the tokenizer's workdir"
      + (f" (this prior's is {config.get('tokenizer_workdir')})." if stage in PRIOR_STAGES else ".")
    )
  params, step = api.restore_params(workdir, step)
  return api.Tokenizer(config, params), int(step)


def data_section(
  tokenizer_config: ml_collections.ConfigDict, config: ml_collections.ConfigDict | None
) -> ml_collections.ConfigDict:
  """The data config to read: the tokenizer's config.data without --config; a tokenizer
  config's data section; a prior config's set (non-None) data keys on the tokenizer's."""
  base = ml_collections.ConfigDict(tokenizer_config.data.to_dict())
  if config is None:
    return base
  if "data" not in config:
    raise cli.UserError("--config has no `data` section: give a config file under configs/.")
  if config.get("stage", "tokenizer") not in PRIOR_STAGES:
    return ml_collections.ConfigDict(config.data.to_dict())
  for key, value in config.data.items():
    if value is not None and key in base:
      base[key] = value
  return base


def _local_path(path: str | None) -> str | None:
  if not path or "://" in path:
    return path or None
  return os.path.abspath(os.path.expanduser(path))


def data_record(data: ml_collections.ConfigDict, split: str) -> dict[str, Any]:
  """What was read, for the index: source, name, path, data_dir, split, size, crop."""
  return dict(
    source=data.get("source"),
    name=data.get("name") or None,
    path=_local_path(data.get("path")),
    data_dir=_local_path(data.get("data_dir")),
    split=split,
    image_size=data.get("image_size"),
    crop="centre",
  )


def check_images(tok: api.Tokenizer, image_shape: Sequence[int], workdir: str, what: str) -> None:
  """The tokenizer takes the data's images: channels, sides multiples of its downsampling."""
  h, w, c = image_shape
  if c != tok.channels:
    raise cli.UserError(
      f"{what} has {c}-channel images but the tokenizer at {workdir} encodes "
      f"{tok.channels}-channel ones: give a --config whose data the tokenizer was trained on "
      "(or leave --config out to read the tokenizer's own data)."
    )
  f = tok.downsample_factor
  if h % f or w % f:
    raise cli.UserError(
      f"{what} has {h}x{w} images, but the tokenizer at {workdir} downsamples by {f}: set "
      f"--config.data.image_size to a multiple of {f} (TFDS and folder images are resized)."
    )


def command_line(
  *,
  workdir: str,
  step: int,
  out: str,
  split: str,
  flip: bool,
  images_per_shard: int,
  config_arg: str | None = None,
  overrides: Sequence[str] = (),
) -> str:
  """The command that makes these shards again, as the index records it (the resolved step,
  no process or batch flags: the same text from every process)."""
  args = ["python", "-m", "arcvq_jax.tokenize", f"--workdir={workdir}", f"--step={step}"]
  if config_arg:
    args += [f"--config={config_arg}", *overrides]
  args += [f"--split={split}", f"--out={out}", f"--images_per_shard={images_per_shard}"]
  if flip:
    args.append("--flip")
  return shlex.join(args)


# --------------------------------------------------------------------------- encoding


def make_encoder(
  tok: api.Tokenizer, devices: Sequence[jax.Device], batch_size: int
) -> Callable[[np.ndarray], jax.Array]:
  """images (B <= batch_size, H, W, C) float32 in [-1, 1] -> tokens int32 (B', h, w), B' >= B
  (padded to a multiple of the devices; the caller keeps the first B), computed
  asynchronously with the batch split over `devices`. The same two programs as
  `Tokenizer.encode` (the encoder with the training steps' XLA options, then the
  quantizer's search), so the same tokens."""
  mesh = sharding.make_mesh((-1,), (sharding.DATA_AXIS,), devices=devices)
  rep, split = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  params = jax.device_put(tok.params, rep)
  model, quantizer = tok.model, tok.quantizer

  def latents_of(p: Any, x: jax.Array) -> jax.Array:
    return model.apply({"params": p}, x, method="encode").astype(jnp.float32)

  def tokens_of(p: Any, z: jax.Array) -> jax.Array:
    idx = quantizer.tokens(p, z.reshape(-1, z.shape[-1]))
    return idx.reshape(z.shape[:-1]).astype(jnp.int32)

  latents = jax.jit(
    latents_of,
    in_shardings=(rep, split),
    out_shardings=split,
    compiler_options=tokenizer_steps.compiler_options(model),
  )
  tokens = jax.jit(tokens_of, in_shardings=(rep, split), out_shardings=split)
  width = math.ceil(batch_size / len(devices)) * len(devices)

  def encode(images: np.ndarray) -> jax.Array:
    if len(images) < width:  # one compiled shape: the last batch of a shard is padded
      pad = np.zeros((width - len(images), *images.shape[1:]), images.dtype)
      images = np.concatenate([images, pad])
    return tokens(params, latents(params, jax.device_put(images, split)))

  return encode


class _ReadImages:
  """(shard, start, stop) -> the images [start, stop) of the split as evaluation reads them
  (centre crop, x / 127.5 - 1), their labels (-1 without labels) and ids."""

  def __init__(self, source: Any, has_labels: bool):
    self.source, self.has_labels = source, has_labels

  def __call__(self, item: tuple[int, int, int]) -> dict[str, Any]:
    shard, start, stop = item
    ids = np.arange(start, stop, dtype=np.int64)
    images, labels = self.source.read(ids)
    image = images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)
    labels = labels.astype(np.int32) if self.has_labels else np.full(len(ids), -1, np.int32)
    return {"shard": shard, "ids": ids, "image": image, "label": labels}


class _Progress:
  """Images done, images/s (after the first batch, which compiles) and an ETA: a tqdm bar on
  a terminal, a log line every LOG_EVERY_SECONDS otherwise."""

  def __init__(self, total: int, name: str):
    self.total, self.name, self.done = total, name, 0
    self.t0 = time.perf_counter()
    self.first: tuple[int, float] | None = None  # (images, time) when the first batch was done
    self.last_log = self.t0
    self.bar = None
    if sys.stderr.isatty() and total:
      from tqdm.auto import tqdm  # noqa: PLC0415 (only for a terminal)

      self.bar = tqdm(total=total, desc=name, unit="img", dynamic_ncols=True, leave=False)

  def rate(self) -> float | None:
    if self.first is None or self.done <= self.first[0]:
      return None
    return (self.done - self.first[0]) / (time.perf_counter() - self.first[1])

  def update(self, count: int) -> None:
    self.done += count
    now = time.perf_counter()
    if self.first is None:
      self.first = (self.done, now)
      logging.info("%s: first batch (with compilation) took %.1f s", self.name, now - self.t0)
    if self.bar is not None:
      self.bar.update(count)
    elif now - self.last_log >= LOG_EVERY_SECONDS:
      self.last_log = now
      rate = self.rate()
      eta = f", ETA {(self.total - self.done) / rate:.0f} s" if rate else ""
      logging.info(
        "%s: %d/%d images (%.0f %%)%s%s",
        self.name,
        self.done,
        self.total,
        100 * self.done / max(self.total, 1),
        f", {rate:.0f} images/s" if rate else "",
        eta,
      )

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


# --------------------------------------------------------------------------- the out dir


def prepare_out(out: str, spec: dict[str, Any]) -> None:
  """Creates --out, or checks that it holds shards of exactly `spec` (else refuses by name),
  and writes spec.json there (first, so that any later run can check against it)."""
  if os.path.exists(out) and not os.path.isdir(out):
    raise cli.UserError(f"--out={out} is a file, not a directory. Give a directory for the shards.")
  try:
    os.makedirs(out, exist_ok=True)
  except OSError as e:
    raise cli.UserError(
      f"--out={out} cannot be made ({e.strerror or e}). Give another directory."
    ) from e
  spec_path = os.path.join(out, shards_lib.SPEC_FILE)
  index_path = os.path.join(out, shards_lib.INDEX_FILE)
  have = None
  for path in (spec_path, index_path):
    if have is None and os.path.exists(path):
      try:
        have = shards_lib.read_json(path)
      except shards_lib.TokenShardsError as e:
        raise cli.UserError(
          f"{e}: delete it (the shards are checked against their sidecars)."
        ) from e
  if have is not None:
    have = {k: v for k, v in have.items() if k not in ("shards", "command", "label_range")}
    differences = shards_lib.spec_differences(have, spec)
    if differences:
      raise cli.UserError(
        f"--out={out} holds token shards of something else ({'; '.join(differences)}; "
        f"have -> want). Give another --out, or delete {out} to make these there."
      )
  else:  # this command's own names may be there: another process is starting in it
    names = sorted(n for n in os.listdir(out) if not shards_lib.is_own_file(n))
    if names:
      shown = ", ".join(names[:5]) + (", ..." if len(names) > 5 else "")
      raise cli.UserError(
        f"--out={out} is not empty ({shown}) and holds no token shards: give a new or empty "
        "directory."
      )
  if not os.path.exists(spec_path):
    shards_lib.write_json_atomic(spec_path, spec)
  digest = shards_lib.spec_digest(spec)
  for s in range(spec["num_shards"]):  # sidecars of another spec: the directory was mixed
    side = shards_lib.read_sidecar(out, s, spec["num_shards"])
    if side is not None and side.get("spec") != digest:
      raise cli.UserError(
        f"{os.path.join(out, shards_lib.sidecar_name(s, spec['num_shards']))} belongs to "
        f"other shards than {spec_path} describes: delete {out} and make the shards again."
      )


@contextlib.contextmanager
def lock_shards(out: str, owned: Sequence[int]) -> Iterator[None]:
  """Holds a lock on each of the `owned` shards (byte s of DIR/.shard_locks, a POSIX record
  lock: the kernel drops it when the process dies, also over NFS) for the block; a
  UserError where another run is writing one of them. Two runs may share --out as long as
  they write different shards (the processes of one job)."""
  path = os.path.join(out, shards_lib.LOCK_FILE)
  fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
  try:
    for s in owned:
      try:
        fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, s)
      except OSError as e:
        raise cli.UserError(
          f"--out={out}: shard {s} is being written by another tokenize run right now ({path} "
          "is locked there). Wait for it to finish or stop it, or give this run another "
          "--out; the processes of one job need --num_processes and their own --process_id."
        ) from e
    yield
  finally:
    os.close(fd)  # drops every lock this process holds on the file


def pending_shards(
  out: str, spec: dict[str, Any], owned: Sequence[int]
) -> tuple[list[int], list[int]]:
  """(finished, to write) among the `owned` shards: finished ones have a sidecar and match its
  size and sha256; a damaged one is written again (with a warning), never a good one."""
  count, finished, todo = spec["num_shards"], [], []
  for s in owned:
    side = shards_lib.read_sidecar(out, s, count)
    problem = shards_lib.shard_problem(out, side, checksum=True) if side else "unfinished"
    if problem is None:
      finished.append(s)
      continue
    if side is not None:
      logging.warning("Writing shard %d again: %s.", s, problem)
      os.remove(os.path.join(out, shards_lib.sidecar_name(s, count)))
    todo.append(s)
  return finished, todo


# --------------------------------------------------------------------------- the pass


def tokenize_split(
  workdir: str,
  out: str,
  *,
  config: ml_collections.ConfigDict | None = None,
  split: str | None = None,
  step: int | None = None,
  flip: bool = False,
  batch_size: int = 64,
  images_per_shard: int = 10000,
  process_index: int = 0,
  process_count: int = 1,
  devices: Sequence[jax.Device] | None = None,
  config_arg: str | None = None,
  overrides: Sequence[str] = (),
  tokenizer: tuple[api.Tokenizer, int] | None = None,
) -> dict[str, Any]:
  """Writes this process's shards of `split` into `out` (and index.json once every shard is
  finished). Returns {'index': the index or None, 'written', 'kept': shard numbers,
  'images', 'seconds', 'images_per_sec'}.

  config: a config with a `data` section (see `data_section`; None: the tokenizer's own);
  devices: where to encode (default: this process's local devices); config_arg, overrides:
  the --config value and its --config.* flags, for the command the index records;
  tokenizer: (an already loaded tokenizer, its step) instead of loading `workdir`'s (which
  then only names it).
  """
  if batch_size < 1:
    raise app.UsageError(f"--batch_size={batch_size}: give a positive number of images.")
  if images_per_shard < 1:
    raise app.UsageError(f"--images_per_shard={images_per_shard}: give a positive number.")
  if not 0 <= process_index < process_count:
    raise app.UsageError(f"--process_id={process_index} is not in [0, {process_count}).")
  tok, step = tokenizer if tokenizer is not None else load_tokenizer(workdir, step)
  data = data_section(tok.config, config)
  split = split or data.get("train_split", "train")
  source = pipeline._open_source(data, split)
  what = (
    f"split {split!r} of the data ({data.get('source')} {data.get('name') or data.get('path')})"
  )
  if not len(source):
    raise cli.UserError(f"{what} has no images.")
  check_images(tok, source.image_shape, workdir, what)
  f = tok.downsample_factor
  grid = (source.image_shape[0] // f, source.image_shape[1] // f)
  identity = shards_lib.identity_of(tok, workdir, step)
  spec = shards_lib.make_spec(
    split=split,
    num_images=len(source),
    image_shape=source.image_shape,
    grid=grid,
    views=2 if flip else 1,
    vocab_size=tok.num_codes,
    has_labels=bool(getattr(source, "has_label", True)),
    images_per_shard=images_per_shard,
    tokenizer=identity,
    data=data_record(data, split),
  )
  prepare_out(out, spec)
  devices = list(devices or jax.local_devices())
  owned = shards_lib.owned_shards(spec["num_shards"], process_index, process_count)
  with lock_shards(out, owned):
    kept, todo = pending_shards(out, spec, owned)
    logging.info(
      "Tokenizing %d images of %s with %s into %s: %d shards of %d; this process (%d of %d, "
      "on %d device(s)) writes %d of them, %d already finished",
      len(source),
      what,
      identity.describe(),
      out,
      spec["num_shards"],
      images_per_shard,
      process_index,
      process_count,
      len(devices),
      len(todo),
      len(kept),
    )
    progress = _Progress(0, "tokenize")
    started = time.perf_counter()
    if todo:
      encode = make_encoder(tok, devices, batch_size)
      reader = _ReadImages(source, spec["has_labels"])
      progress = write_shards(out, spec, todo, encode, reader, batch_size, data)
    seconds = time.perf_counter() - started
  command = command_line(
    workdir=workdir,
    step=step,
    out=out,
    split=split,
    flip=flip,
    images_per_shard=images_per_shard,
    config_arg=config_arg,
    overrides=overrides,
  )
  index = shards_lib.try_write_index(out, spec, command)
  return dict(
    index=index,
    written=todo,
    kept=kept,
    images=progress.done,
    seconds=seconds,
    images_per_sec=progress.rate(),
  )


def write_shards(
  out: str,
  spec: dict[str, Any],
  todo: Sequence[int],
  encode: Callable[[np.ndarray], jax.Array],
  reader: _ReadImages,
  batch_size: int,
  data: ml_collections.ConfigDict,
) -> _Progress:
  """Writes the shards `todo` (each through a temporary file, `ShardWriter`): images read
  by grain's threads, one batch on the devices while the previous one is written."""
  count, flip = spec["num_shards"], spec["views"] == 2
  ranges = shards_lib.shard_ranges(spec["num_images"], spec["images_per_shard"])
  dtype = shards_lib.dtype_from_layout(spec["record"])
  digest = shards_lib.spec_digest(spec)
  items = [
    (s, b, min(b + batch_size, ranges[s][1]))
    for s in todo
    for b in range(ranges[s][0], ranges[s][1], batch_size)
  ]
  batches = grain.MapDataset.source(items).map(reader).to_iter_dataset(pipeline._read_options(data))
  progress = _Progress(sum(ranges[s][1] - ranges[s][0] for s in todo), "tokenize")
  writer: shards_lib.ShardWriter | None = None

  def finish(batch: dict[str, Any], tokens: list[jax.Array]) -> None:
    nonlocal writer
    n, s = len(batch["ids"]), batch["shard"]
    views = np.stack([np.asarray(t)[:n] for t in tokens], axis=1)  # (n, V, h, w)
    if writer is None:
      tmp = os.path.join(out, shards_lib.shard_name(s, count) + ".tmp")
      if os.path.exists(tmp):  # left by a killed run
        os.remove(tmp)
      writer = shards_lib.ShardWriter(out, s, count, *ranges[s], digest)
    records = shards_lib.encode_records(batch["ids"], batch["label"], views, dtype)
    writer.write(records, batch["label"])
    if writer.count == ranges[s][1] - ranges[s][0]:
      entry = writer.commit()
      writer = None
      logging.info("Wrote %s (%d images, %d bytes)", entry["file"], entry["count"], entry["bytes"])
    progress.update(n)

  try:
    queued = None
    for batch in batches:
      tokens = [encode(batch["image"])]
      if flip:
        tokens.append(encode(np.ascontiguousarray(batch["image"][:, :, ::-1])))
      if queued is not None:
        finish(*queued)
      queued = (batch, tokens)
    if queued is not None:
      finish(*queued)
  except BaseException:
    if writer is not None:
      writer.abort()
    raise
  finally:
    progress.close()
  return progress


def summary_lines(result: dict[str, Any], out: str, workdir: str, process_index: int) -> list[str]:
  """What the command prints at the end."""
  rate = result["images_per_sec"]
  lines = [
    f"Process {process_index}: wrote {len(result['written'])} shards ({result['images']} images"
    + (f", {rate:.0f} images/s after the first batch" if rate else "")
    + f"), kept {len(result['kept'])} finished ones."
  ]
  index = result["index"]
  if index is None:
    lines.append(
      f"{os.path.join(out, shards_lib.INDEX_FILE)} is not written yet: other processes are "
      "still writing their shards (the last one to finish writes it)."
    )
    return lines
  size = sum(e["bytes"] for e in index["shards"])
  lines += [
    f"{out}: {index['num_images']} images of split {index['split']!r} in {index['num_shards']} "
    f"shards, {size / 2**20:.1f} MiB ({size / index['num_images']:.0f} bytes per image), "
    f"tokens {index['dtype']} {index['views']} x {index['grid'][0]} x {index['grid'][1]}.",
    "Train a prior on them (configs/demo_ar.py or demo_maskgit.py for the transformers):",
    "  "
    + shlex.join(
      [
        "python",
        "-m",
        "arcvq_jax.main",
        "--config=configs/demo_pixelcnn.py",
        "--workdir=PRIOR_DIR",
        f"--config.tokenizer_workdir={workdir}",
        f"--config.data.token_shards={out}",
      ]
    ),
  ]
  return lines


def process_layout(mode: str, num_processes: int | None, process_id: int | None) -> tuple[int, int]:
  """(this process's index, the number of processes) that share the shards out: from
  --num_processes and --process_id, else from the launcher's environment (SLURM, Open MPI,
  a Cloud TPU slice naming TPU_WORKER_ID), else (0, 1). JAX's distributed runtime is never
  started: the shards need no collective, and the tokenizer is read on each host alone."""
  if (num_processes is None) != (process_id is None):
    raise app.UsageError(
      f"--num_processes and --process_id go together (got {num_processes!r}, "
      f"{process_id!r}), e.g. --num_processes=4 --process_id=0 on the first host."
    )
  if mode not in ("auto", "on", "off"):
    raise app.UsageError(f"--distributed={mode!r}: choose auto, on or off.")
  if num_processes is not None:
    if num_processes < 1 or not 0 <= process_id < num_processes:
      raise app.UsageError(
        f"--process_id={process_id} must be in [0, --num_processes={num_processes})."
      )
    return process_id, num_processes
  if mode == "off":
    return 0, 1
  env, cluster = os.environ, distributed.detected_cluster()
  if cluster == "slurm":
    return int(env["SLURM_PROCID"]), int(env.get("SLURM_STEP_NUM_TASKS", env["SLURM_NTASKS"]))
  if cluster == "ompi":
    return int(env["OMPI_COMM_WORLD_RANK"]), int(env["OMPI_COMM_WORLD_SIZE"])
  if cluster == "tpu" and env.get("TPU_WORKER_ID", "").isdigit():
    return int(env["TPU_WORKER_ID"]), len(env["TPU_WORKER_HOSTNAMES"].split(","))
  if cluster is not None or mode == "on":
    raise app.UsageError(
      f"this process's place among the others is not known ({cluster or 'no launcher'} "
      "detected): give --num_processes=N and --process_id=I (0 .. N-1) to every process."
    )
  return 0, 1


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  process_index, process_count = process_layout(
    FLAGS.distributed, FLAGS.num_processes, FLAGS.process_id
  )
  if FLAGS.coordinator_address:
    logging.info("--coordinator_address is not needed here: the processes never talk.")
  config = FLAGS.config
  result = tokenize_split(
    FLAGS.workdir,
    FLAGS.out,
    config=config,
    split=FLAGS.split,
    step=FLAGS.step,
    flip=FLAGS.flip,
    batch_size=FLAGS.batch_size,
    images_per_shard=FLAGS.images_per_shard,
    process_index=process_index,
    process_count=process_count,
    config_arg=config_flags.get_config_filename(FLAGS["config"]) if config is not None else None,
    overrides=[a for a in sys.argv[1:] if a.startswith("--config.")],
  )
  print("\n".join(summary_lines(result, FLAGS.out, FLAGS.workdir, process_index)), flush=True)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
