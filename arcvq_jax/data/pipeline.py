"""Input pipelines: one config (config.data) -> grain iterators of image batches.

Sources (config.data.source):
  'idx'     MNIST-style IDX files in config.data.path, read into memory.
  'folder'  an image folder at config.data.path (see `folder.py` for layout).
  'tfds'    a prepared TFDS dataset config.data.name in config.data.data_dir,
            stored as ArrayRecord (grain needs random access). For the local
            builder 'idx_images' (see `idx_tfds.py`) an unprepared dataset is
            prepared automatically from the IDX files in config.data.path
            (single host only: on several hosts prepare it once beforehand).

config.data.image_size:
  'idx', and 'tfds' datasets with a fixed image shape (mnist, cifar10, ...):
      None keeps the native size; any other value must equal it (no resizing).
  'tfds' datasets with variable image sizes (imagenet2012, ...) and 'folder':
      resize the shorter side to image_size (PIL bicubic, antialiased) and
      crop a square; None is only allowed when all images already share one
      size.

Train augmentation (train split only; evaluation always centre-crops):
  config.data.random_crop  crop at a random position instead of the centre
                           (needs resized images: the line above); taming's
                           SmallestMaxSize + RandomCrop.
  config.data.random_flip  flip horizontally with probability 1/2 (any source).
Both are drawn per global batch from (config.seed, step) (`_TrainAugment`), so
they do not depend on threads, workers or the number of processes, and a
restored iterator repeats them.

Batches are dicts of numpy arrays: 'image' (B, H, W, C) float32 in [-1, 1]
(x / 127.5 - 1), 'label' (B,) int32, and for evaluation 'mask' (B,) bool.

The train pipeline is a grain MapDataset over *step numbers*: step -> this
process's example indices (`_TrainIndices`, a numpy permutation per epoch) and
augmentation (`_TrainAugment`) -> one batched read (`_ReadTrainBatch`: a
vectorised gather for in-memory data, one `__getitems__` for ArrayRecord).
grain adds prefetch threads, optional worker processes and checkpointable
state. Pushing 1024 single examples per batch
through grain's per-element `shuffle`/`slice`/`batch` layers instead measured
~20 ms per batch in Python, against ~2 ms this way; the CPU training step at
batch 1024 is ~100 ms.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import jax
import numpy as np
from absl import flags

from arcvq_jax.data import folder as folder_lib
from arcvq_jax.data import idx as idx_lib
from arcvq_jax.data.idx import DataError

__all__ = [
  "DataError",
  "check_splits",
  "create_eval_iterator",
  "create_train_iterator",
  "dataset_info",
  "train_image_variance",
]

_SOURCES = ("idx", "folder", "tfds")
# Batches prefetched per iterator (at least); each holds B x H x W x C float32.
_PREFETCH_BATCHES = 4
# Threads reading batches: decoding (PIL, ArrayRecord, protobuf) releases the
# GIL often enough to overlap; an in-memory gather needs little help.
_READ_THREADS = {"idx": 2, "folder": 8, "tfds": 4}
# Entropy word that keeps the augmentation draws, default_rng([seed,
# _AUGMENT_STREAM, step]), apart from the epoch permutations, default_rng([seed,
# epoch]).
_AUGMENT_STREAM = 1


class _Source(Protocol):
  """Random access to one split: len() images, read(indices) -> a batch."""

  image_shape: tuple[int, int, int]
  # True when every image is resized to a shorter side of image_shape[0] and
  # then cropped, so that the crop position is a choice (random_crop).
  resizes: bool

  def __len__(self) -> int: ...

  def read(
    self, indices: Sequence[int], crop_fractions: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Returns images (B, H, W, C) uint8 and labels (B,) integers.

    crop_fractions: None for centre crops, else (B, 2) in [0, 1), where each
    resized image is cropped (`folder.crop_square`); only when `resizes`.
    """
    ...


# ----------------------------------------------------------------------------
# Sources.


class _ArraySource:
  """A split held in memory: images (N, H, W, C) uint8, labels (N,) int."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels
    self.image_shape = tuple(images.shape[1:])
    self.resizes = False

  def __len__(self) -> int:
    return len(self.images)

  def read(
    self, indices: Sequence[int], crop_fractions: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    del crop_fractions  # Native size: nothing to crop (create_train_iterator checks).
    indices = np.asarray(indices, np.int64)
    return self.images[indices], self.labels[indices]


class _TfdsSource:
  """A TFDS ArrayRecord split; decodes 'image' and 'label' of each record.

  Images that get resized (variable-size datasets such as imagenet2012) are
  read as their encoded bytes and decoded, resized and cropped by
  `folder.decode_image`, exactly like image folders: TFDS's own numpy decoding
  uses OpenCV where it is installed and PIL otherwise, so the pixels would
  depend on the environment, and a PIL image resizes without a numpy copy.
  Measured on 333-500 px JPEGs (2-core CPU): ~1 ms per image either way, plus
  ~2 ms for the resize to 256.
  """

  def __init__(self, builder: Any, split: str, image_size: int | None):
    import tensorflow_datasets as tfds  # noqa: PLC0415 (optional: only the TFDS source needs it)

    self.name = builder.info.name
    self.split = split
    self.image_shape, self.resize_to = _tfds_image_shape(builder, image_size)
    self.resizes = self.resize_to is not None
    features = builder.info.features
    self.decode_bytes = (
      self.resizes
      and isinstance(features["image"], tfds.features.Image)
      and self.image_shape[2] in (1, 3)
    )
    decoders = {"image": tfds.decode.SkipDecoding()} if self.decode_bytes else None
    self.data_source = builder.as_data_source(
      split=split, file_format="array_record", decoders=decoders
    )
    self.has_label = "label" in features
    self.has_file_name = "file_name" in features

  def __len__(self) -> int:
    return len(self.data_source)

  def _describe(self, index: int, record: dict[str, Any]) -> str:
    """Names a record in errors: split, index and file name (ImageNet has one)."""
    name = record.get("file_name") if self.has_file_name else None
    if isinstance(name, bytes):
      name = name.decode("utf-8", "replace")
    return f"{self.name} {self.split}[{index}]" + (f" ({name})" if name else "")

  def read(
    self, indices: Sequence[int], crop_fractions: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    indices = [int(i) for i in indices]
    records = self.data_source.__getitems__(indices)
    images = np.empty((len(records), *self.image_shape), np.uint8)
    for row, record in enumerate(records):
      fraction = None if crop_fractions is None else crop_fractions[row]
      if self.decode_bytes:
        images[row] = folder_lib.decode_image(
          io.BytesIO(record["image"]),
          self.resize_to,
          channels=self.image_shape[2],
          fraction=fraction,
          name=self._describe(indices[row], record),
        )
        continue
      image = np.asarray(record["image"])
      if image.ndim == 2:
        image = image[..., None]
      if self.resize_to is not None:
        image = folder_lib.resize_and_crop(image, self.resize_to, fraction)
      images[row] = image
    if self.has_label:
      labels = np.asarray([r["label"] for r in records], np.int64)
    else:  # Unlabelled data sets (e.g. celeb_a images only): label 0.
      labels = np.zeros(len(records), np.int64)
    return images, labels


def _tfds_image_shape(
  builder: Any, image_size: int | None
) -> tuple[tuple[int, int, int], int | None]:
  """Returns ((H, W, C) of the output, side to resize to or None)."""
  features = builder.info.features
  if "image" not in features:
    raise DataError(
      f'TFDS dataset {builder.info.name!r} has no "image" feature (features: '
      f"{list(features.keys())}). Set config.data.name to an image dataset."
    )
  shape = tuple(features["image"].shape)
  if len(shape) == 2:
    shape = (*shape, 1)
  channels = shape[-1] if shape[-1] is not None else 3
  if None not in shape[:2]:
    if image_size is not None and (image_size, image_size) != shape[:2]:
      raise DataError(
        f"TFDS dataset {builder.info.name!r} has {shape[:2]} images but "
        f"config.data.image_size={image_size}: set config.data.image_size=None "
        f"(or {shape[0]}) to use the native size."
      )
    return (shape[0], shape[1], channels), None
  if image_size is None:
    raise DataError(
      f"TFDS dataset {builder.info.name!r} has images of varying size "
      f"{shape}: set config.data.image_size (e.g. 256) to resize the shorter "
      "side and centre-crop."
    )
  return (image_size, image_size, channels), image_size


def _tfds_builder(data_cfg: Any) -> Any:
  """Returns the TFDS builder of config.data.name, prepared as ArrayRecord."""
  # Imported here: only the TFDS source pays for TensorFlow Datasets.
  import tensorflow_datasets as tfds  # noqa: PLC0415 (optional: only the TFDS source needs it)

  name = data_cfg.get("name")
  data_dir = data_cfg.get("data_dir")
  if not name:
    raise DataError(
      "config.data.source='tfds' needs config.data.name (e.g. 'mnist', "
      "'fashion_mnist', 'cifar10', 'imagenet2012' or 'idx_images')."
    )
  build_cmd = f"tfds build {name} --data_dir={data_dir or 'DIR'} --file_format=array_record"
  # The tfds command line of TFDS 4.9.x imports apache_beam even to build or
  # convert without Beam.
  cli_note = "(the tfds command needs `pip install apache-beam`)"
  if name == "idx_images":
    # Registers the builder with TFDS.
    from arcvq_jax.data import idx_tfds  # noqa: PLC0415 (imports tensorflow_datasets)

    build_cmd = (
      f"tfds build idx_images --imports=arcvq_jax.data.idx_tfds "
      f"--manual_dir=IDX_DIR --data_dir={data_dir or 'DIR'} "
      "--file_format=array_record (or set config.data.path=IDX_DIR to prepare "
      "it automatically, or call arcvq_jax.data.idx_tfds.prepare_idx_tfds)"
    )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(
      f"TFDS dataset {name!r} (config.data.name) is neither a known TFDS "
      f"dataset nor prepared in config.data.data_dir={data_dir!r}. Check the "
      f"name, or prepare it with: {build_cmd}"
    ) from e
  if not builder.is_prepared():
    if name == "idx_images" and data_cfg.get("path"):
      builder = idx_tfds.prepare_idx_tfds(data_cfg.path, data_dir)
    else:
      raise DataError(
        f"TFDS dataset {name!r} is not prepared in {builder.data_dir}. "
        f"{_prepare_hint(builder, name, data_dir, build_cmd, cli_note)} Or set "
        "config.data.data_dir to where it was prepared."
      )
  formats = builder.info.available_file_formats()
  if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in formats:
    found = ", ".join(sorted(f.value for f in formats)) or "unknown"
    raise DataError(
      f"TFDS dataset {name!r} in {builder.data_dir} is stored as {found}; "
      "grain needs random access (array_record). Convert it once with: "
      f"tfds convert_format --dataset_version_dir={builder.data_dir} "
      "--out_file_format=array_record  (the ArrayRecord files are written "
      f"next to the {found} ones; {cli_note[1:-1]}), or prepare it again with "
      f'{build_cmd} (download_and_prepare(file_format="array_record") from Python).'
    )
  return builder


def _prepare_hint(
  builder: Any, name: str, data_dir: str | None, build_cmd: str, cli_note: str
) -> str:
  """How to prepare `name` once; names the manual download where TFDS needs one."""
  instructions = getattr(builder, "MANUAL_DOWNLOAD_INSTRUCTIONS", None)
  if name == "idx_images" or not instructions:
    return f"Prepare it once with: {build_cmd} {cli_note}."
  # Datasets behind a registration (imagenet2012) are prepared from files the
  # user downloaded; TFDS's instructions say which.
  data_dir = data_dir or "DIR"
  hint = (
    f"It is prepared from a manual download: {' '.join(instructions.split())} "
    f"Prepare it once with: tfds build {name} --data_dir={data_dir} "
    f"--manual_dir=MANUAL_DIR --file_format=array_record {cli_note}"
  )
  if name == "imagenet2012":
    hint += (
      ", or without apache-beam: python -m arcvq_jax.data.imagenet "
      f"--manual_dir=MANUAL_DIR --data_dir={data_dir}"
    )
  return hint + "."


def _open_source(data_cfg: Any, split: str) -> _Source:
  """Opens one split of the data set named by config.data."""
  source = data_cfg.get("source")
  image_size = data_cfg.get("image_size")
  if source == "idx":
    images, labels = idx_lib.load_idx_split(data_cfg.get("path"), split)
    if image_size is not None and (image_size, image_size) != images.shape[1:3]:
      raise DataError(
        f"IDX images in {data_cfg.path!r} are {images.shape[1:3]} but "
        f"config.data.image_size={image_size}: set config.data.image_size="
        f"None (or {images.shape[1]}); IDX data is not resized."
      )
    return _ArraySource(images, labels)
  if source == "folder":
    return folder_lib.ImageFolderSource(data_cfg.get("path"), split, image_size)
  if source == "tfds":
    return _TfdsSource(_tfds_builder(data_cfg), split, image_size)
  raise DataError(
    f"config.data.source={source!r} is not one of {_SOURCES}: set it to "
    "'idx' (IDX files in config.data.path), 'folder' (image folder in "
    "config.data.path) or 'tfds' (config.data.name in config.data.data_dir)."
  )


# ----------------------------------------------------------------------------
# Batch readers (module-level classes so grain worker processes can pickle them).


def _to_float(images: np.ndarray) -> np.ndarray:
  """(B, H, W, C) uint8 -> float32 in [-1, 1], as x / 127.5 - 1."""
  return images.astype(np.float32) / np.float32(127.5) - np.float32(1.0)


class _TrainIndices:
  """Step number -> this process's (B_local,) example indices for that step.

  Epoch e is the permutation `default_rng([seed, e]).permutation(N)`; step k of
  the epoch takes its positions [k * G, (k + 1) * G) (the tail N mod G of each
  permutation is dropped) and process p keeps every P-th of them from p on.
  One vectorised permutation per epoch costs ~1 ms; grain's per-element
  `shuffle` + `slice` + `batch` cost ~16 ms per batch of 1024 in Python.
  """

  def __init__(
    self,
    num_examples: int,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
  ):
    self.num_examples = num_examples
    self.global_batch_size = global_batch_size
    self.steps_per_epoch = num_examples // global_batch_size
    self.seed = seed
    self.process_index = process_index
    self.process_count = process_count
    # Memo of recent epochs' permutations; prefetch threads may straddle an
    # epoch boundary, hence two. Recomputing is deterministic, so races are
    # harmless.
    self._permutations: dict[int, np.ndarray] = {}

  def permutation(self, epoch: int) -> np.ndarray:
    """(N,) int64: the order of epoch `epoch`."""
    perm = self._permutations.get(epoch)
    if perm is None:
      perm = np.random.default_rng([self.seed, epoch]).permutation(self.num_examples)
      self._permutations = {
        epoch: perm,
        **{e: p for e, p in self._permutations.items() if e == epoch - 1},
      }
    return perm

  def __call__(self, step: int, unused_element: Any = None) -> np.ndarray:
    """(B_local,) int64 indices of step `step`, in global-batch positions p::P."""
    epoch, k = divmod(step, self.steps_per_epoch)
    start = k * self.global_batch_size
    block = self.permutation(epoch)[start : start + self.global_batch_size]
    return block[self.process_index :: self.process_count]

  def __getstate__(self) -> dict[str, Any]:
    # Worker processes rebuild the memo instead of receiving a copy.
    return {**self.__dict__, "_permutations": {}}


class _TrainAugment:
  """Step number -> this process's crop positions and flips for that step.

  Global batch k draws u = default_rng([seed, _AUGMENT_STREAM, k]).random((G, 3));
  the example at position j of the global batch is cropped at fractions
  u[j, :2] of its slack (`folder.crop_square`) and flipped when u[j, 2] < 0.5.
  Process p keeps rows p::P, the positions `_TrainIndices` gives it. So the
  augmentation of an example is a function of (seed, step, position) alone:
  the same for any number of processes, reading threads or workers, and
  repeated exactly after `set_state`. One (G, 3) draw per step costs ~10-25 us.
  """

  def __init__(
    self,
    seed: int,
    global_batch_size: int,
    process_index: int,
    process_count: int,
    random_crop: bool,
    random_flip: bool,
  ):
    self.seed = seed
    self.global_batch_size = global_batch_size
    self.process_index = process_index
    self.process_count = process_count
    self.random_crop = random_crop
    self.random_flip = random_flip

  def __call__(self, step: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """Returns crop fractions (B_local, 2) in [0, 1) and flips (B_local,) bool.

    Either is None when its augmentation is off (centre crop, no flip).
    """
    if not (self.random_crop or self.random_flip):
      return None, None
    # Both draws always happen, so turning one augmentation off leaves the
    # other's values unchanged.
    rng = np.random.default_rng([self.seed, _AUGMENT_STREAM, step])
    draws = rng.random((self.global_batch_size, 3))[self.process_index :: self.process_count]
    crops = draws[:, :2] if self.random_crop else None
    flips = draws[:, 2] < 0.5 if self.random_flip else None
    return crops, flips


class _ReadTrainBatch:
  """Step number -> this process's {'image': (B, H, W, C) f32, 'label': (B,) i32}.

  A `map_with_index` transform over the step numbers: indices and augmentation
  of the step, one batched read, then flips.
  """

  def __init__(self, source: _Source, indices: _TrainIndices, augment: _TrainAugment):
    self.source = source
    self.indices = indices
    self.augment = augment

  def __call__(self, step: int, unused_element: Any = None) -> dict[str, np.ndarray]:
    crops, flips = self.augment(step)
    images, labels = self.source.read(self.indices(step), crops)
    image = _to_float(images)
    if flips is not None:
      image[flips] = image[flips, :, ::-1]  # Fancy indexing copies: no aliasing.
    return {"image": image, "label": labels.astype(np.int32)}


class _ReadEvalBatch:
  """Maps a global batch number to this process's padded eval batch.

  Global batch b holds dataset positions [b * G, (b + 1) * G); process p reads
  the contiguous block starting at b * G + p * B_local, so gathering the local
  batches in process order gives the data set in order. Positions >= N are
  padding: zero images, label 0, mask False.
  """

  def __init__(
    self, source: _Source, global_batch_size: int, process_index: int, local_batch_size: int
  ):
    self.source = source
    self.offset = process_index * local_batch_size
    self.global_batch_size = global_batch_size
    self.local_batch_size = local_batch_size

  def __call__(self, batch_number: int) -> dict[str, np.ndarray]:
    start = batch_number * self.global_batch_size + self.offset
    positions = np.arange(start, start + self.local_batch_size)
    mask = positions < len(self.source)
    images, labels = self.source.read(positions[mask])
    num_pad = self.local_batch_size - len(labels)
    image = _to_float(images)
    if num_pad:
      image = np.concatenate([image, np.zeros((num_pad, *self.source.image_shape), np.float32)])
      labels = np.concatenate([labels, np.zeros(num_pad, labels.dtype)])
    return {"image": image, "label": labels.astype(np.int32), "mask": mask}


# ----------------------------------------------------------------------------
# Public API.


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(
      f"process_index={process_index} is not in [0, process_count="
      f"{process_count}): pass both, or neither to use jax.process_index()."
    )
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(
      f"global batch size {global_batch_size} must be a positive multiple of "
      f"the number of processes ({process_count}): change the batch size in "
      "the config."
    )
  return global_batch_size // process_count


def _read_options(data_cfg: Any) -> grain.ReadOptions:
  threads = _READ_THREADS.get(data_cfg.get("source"), 2)
  # grain can keep at most prefetch_buffer_size threads busy.
  return grain.ReadOptions(
    num_threads=threads, prefetch_buffer_size=max(threads, _PREFETCH_BATCHES)
  )


def dataset_info(data_cfg: Any) -> dict[str, Any]:
  """Describes the data set without reading it all.

  Args:
    data_cfg: config.data.

  Returns:
    {'image_shape': (H, W, C), 'num_train': int, 'num_eval': int}; the shape is
    the one the iterators yield (after any resizing).
  """
  train_split = data_cfg.get("train_split", "train")
  eval_split = data_cfg.get("eval_split", "test")
  if data_cfg.get("source") == "idx":
    # Headers only: no need to decompress 47 MB to learn three numbers.
    num_train, shape = idx_lib.idx_split_info(data_cfg.get("path"), train_split)
    num_eval, _ = idx_lib.idx_split_info(data_cfg.get("path"), eval_split)
    size = data_cfg.get("image_size")
    if size is not None and (size, size) != shape[:2]:
      raise DataError(
        f"IDX images in {data_cfg.path!r} are {shape[:2]} but "
        f"config.data.image_size={size}: set config.data.image_size=None "
        f"(or {shape[0]}); IDX data is not resized."
      )
    return {"image_shape": shape, "num_train": num_train, "num_eval": num_eval}
  if data_cfg.get("source") == "tfds":
    builder = _tfds_builder(data_cfg)
    shape, _ = _tfds_image_shape(builder, data_cfg.get("image_size"))
    splits = builder.info.splits
    return {
      "image_shape": shape,
      "num_train": splits[train_split].num_examples,
      "num_eval": splits[eval_split].num_examples,
    }
  train = _open_source(data_cfg, train_split)
  evaluation = _open_source(data_cfg, eval_split)
  return {
    "image_shape": tuple(train.image_shape),
    "num_train": len(train),
    "num_eval": len(evaluation),
  }


def _tfds_shard_ends(data_cfg: Any, split: str) -> list[int]:
  """The index of the last example of every shard of a TFDS split (each shard is one
  ArrayRecord file: reading its last record touches its end); [] for a sliced split
  ('train[:90%]'), whose shards TFDS does not list."""
  info = _tfds_builder(data_cfg).info.splits[split]
  lengths = [int(n) for n in getattr(info, "shard_lengths", None) or () if n]
  return [int(end) - 1 for end in np.cumsum(lengths)]


def check_splits(data_cfg: Any) -> None:
  """Checks every split a training run reads, train and eval, before its first step, so
  that a damaged or missing file fails in seconds rather than at the final evaluation;
  DataError (naming the file) otherwise. What is cheap and still catches a truncated copy:
    'idx'     every file read through (`idx.check_idx_file`: the gzip stream complete and
              its CRC right, the data as long as the header says; ~0.3 s for Fashion-MNIST);
    'folder'  the split listed, its first and last image decoded;
    'tfds'    the split opened, its first record and the last record of every shard
              (ArrayRecord file) read and decoded.

  Args:
    data_cfg: config.data.
  """
  source = data_cfg.get("source")
  splits = dict.fromkeys((data_cfg.get("train_split", "train"), data_cfg.get("eval_split", "test")))
  for split in splits:
    if source == "idx":
      idx_lib.idx_split_info(data_cfg.get("path"), split, whole=True)
      continue
    opened = _open_source(data_cfg, split)
    if not len(opened):
      continue
    indices = {0, len(opened) - 1}
    if source == "tfds":
      indices.update(_tfds_shard_ends(data_cfg, split))
    for index in sorted(indices):
      try:
        opened.read([index])
      except DataError:
        raise
      except Exception as e:  # ArrayRecord / TFDS decoding of a damaged shard: any type
        raise DataError(
          f"{source} split {split!r} of config.data ({data_cfg.get('name') or data_cfg.get('path')}"
          f", data_dir {data_cfg.get('data_dir')}): example {index} could not be read "
          f"({type(e).__name__}: {e}); its files are damaged or incomplete. Prepare the data "
          "set again (or copy it again)."
        ) from e


def train_image_variance(data_cfg: Any, chunk_size: int = 8192) -> float:
  """Variance of all training pixels after mapping to [-1, 1].

  The VQ-VAE reconstruction loss divides by it (docs/math.md, eq. 21). Streams over
  the split in chunks, summing the uint8 values and their squares exactly in
  int64, so the result does not depend on the chunking.

  Args:
    data_cfg: config.data.
    chunk_size: images read at a time.

  Returns:
    var(x / 127.5 - 1) over every pixel and channel of the training split.
  """
  source = _open_source(data_cfg, data_cfg.get("train_split", "train"))
  total, total_sq, count = 0, 0, 0
  for start in range(0, len(source), chunk_size):
    images, _ = source.read(np.arange(start, min(start + chunk_size, len(source))))
    values = images.astype(np.int64)
    total += int(values.sum())
    total_sq += int(np.square(values).sum())
    count += values.size
  mean = total / count
  # var(u / 127.5 - 1) = var(u) / 127.5^2 for the raw uint8 values u.
  return float((total_sq / count - mean * mean) / 127.5**2)


def create_train_iterator(
  data_cfg: Any,
  *,
  global_batch_size: int,
  seed: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> grain.DatasetIterator:
  """An endless, checkpointable iterator of shuffled training batches.

  Epoch e is the permutation `np.random.default_rng([seed, e]).permutation(N)`
  of the training split, so every epoch has a different order; the last N mod G
  examples of each permutation are dropped so that every epoch has N // G full
  global batches. Within global batch k, process p of P takes every P-th
  example from p on, so the processes' batches are disjoint and together form
  the global batch. With config.data.random_crop / random_flip, the crop
  position and flip of each example are drawn from (seed, step, position in
  the global batch) (`_TrainAugment`): batches depend only on the seed, never
  on the number of processes, threads or workers.

  `get_state()` is {'next_index': step} (with num_workers > 0, grain's
  per-worker dict of such states), JSON-serialisable; `set_state` on a fresh
  iterator built with the same arguments (and num_workers) resumes exactly.

  Args:
    data_cfg: config.data.
    global_batch_size: G, summed over processes.
    seed: shuffle seed (non-negative int).
    process_index: this process (default jax.process_index()).
    process_count: P (default jax.process_count()).

  Returns:
    Iterator of {'image': (G / P, H, W, C) float32 in [-1, 1],
    'label': (G / P,) int32}.

  Raises:
    DataError: bad batch size or seed, an empty split, or
      config.data.random_crop on images that are not resized.
  """
  process_index, process_count = _processes(process_index, process_count)
  _local_batch_size(global_batch_size, process_count)  # Fails early on a bad split.
  source = _open_source(data_cfg, data_cfg.get("train_split", "train"))
  steps_per_epoch = len(source) // global_batch_size
  if steps_per_epoch == 0:
    raise DataError(
      f"The training split has {len(source)} images, fewer than one global "
      f"batch of {global_batch_size}: lower the batch size in the config."
    )
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f"seed must be a non-negative integer, got {seed!r} (config.seed).")
  random_crop = bool(data_cfg.get("random_crop", False))
  random_flip = bool(data_cfg.get("random_flip", False))
  if random_crop and not source.resizes:
    raise DataError(
      "config.data.random_crop=True crops a square at a random position after "
      "resizing the shorter side, but these images are used at their native "
      f"size {source.image_shape[:2]}: only variable-size TFDS datasets and "
      "'folder' with config.data.image_size set are resized. Set "
      "config.data.random_crop=False (or config.data.image_size for a folder)."
    )
  indices = _TrainIndices(len(source), global_batch_size, int(seed), process_index, process_count)
  augment = _TrainAugment(
    int(seed), global_batch_size, process_index, process_count, random_crop, random_flip
  )
  # Element k of this endless MapDataset is training step k's batch, so the
  # iterator state is just the next step number.
  dataset = (
    grain.MapDataset.range(steps_per_epoch)
    .repeat(None)
    .map_with_index(_ReadTrainBatch(source, indices, augment))
    .to_iter_dataset(_read_options(data_cfg))
  )
  num_workers = int(data_cfg.get("num_workers", 0) or 0)
  if num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # Starting grain workers reads absl flags, which raises outside absl.app
      # (pytest, notebooks); parsing no arguments keeps every default.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(
      grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=_PREFETCH_BATCHES
      )
    )
  return iter(dataset)


def create_eval_iterator(
  data_cfg: Any,
  *,
  global_batch_size: int,
  process_index: int | None = None,
  process_count: int | None = None,
) -> Iterator[dict[str, np.ndarray]]:
  """One ordered pass over config.data.eval_split, padded to full batches.

  Every process yields ceil(N / G) batches (the same number, so collective
  evaluation steps line up); see `_ReadEvalBatch` for the layout.

  Args:
    data_cfg: config.data.
    global_batch_size: G, summed over processes.
    process_index: this process (default jax.process_index()).
    process_count: P (default jax.process_count()).

  Returns:
    Iterator of {'image': (G / P, H, W, C) float32, 'label': (G / P,) int32,
    'mask': (G / P,) bool, True for real images}.
  """
  process_index, process_count = _processes(process_index, process_count)
  local_batch = _local_batch_size(global_batch_size, process_count)
  source = _open_source(data_cfg, data_cfg.get("eval_split", "test"))
  num_batches = math.ceil(len(source) / global_batch_size)
  dataset = grain.MapDataset.range(num_batches).map(
    _ReadEvalBatch(source, global_batch_size, process_index, local_batch)
  )
  return iter(dataset.to_iter_dataset(_read_options(data_cfg)))
