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
      resize the shorter side to image_size and centre-crop; None is only
      allowed when all images already share one size.

Batches are dicts of numpy arrays: 'image' (B, H, W, C) float32 in [-1, 1]
(x / 127.5 - 1), 'label' (B,) int32, and for evaluation 'mask' (B,) bool.

The train pipeline is a grain MapDataset over *step numbers*: step -> this
process's example indices (`_TrainIndices`, a numpy permutation per epoch) ->
one batched read (`_ReadBatch`: a vectorised gather for in-memory data, one
`__getitems__` for ArrayRecord). grain adds prefetch threads, optional worker
processes and checkpointable state. Pushing 1024 single examples per batch
through grain's per-element `shuffle`/`slice`/`batch` layers instead measured
~20 ms per batch in Python, against ~2 ms this way; the CPU training step at
batch 1024 is ~100 ms.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import grain
import numpy as np

from arcvq_jax.data import folder as folder_lib
from arcvq_jax.data import idx as idx_lib
from arcvq_jax.data.idx import DataError

__all__ = [
    'DataError',
    'create_eval_iterator',
    'create_train_iterator',
    'dataset_info',
    'train_image_variance',
]

_SOURCES = ('idx', 'folder', 'tfds')
# Batches prefetched per iterator (at least); each holds B x H x W x C float32.
_PREFETCH_BATCHES = 4
# Threads reading batches: decoding (PIL, ArrayRecord, protobuf) releases the
# GIL often enough to overlap; an in-memory gather needs little help.
_READ_THREADS = {'idx': 2, 'folder': 8, 'tfds': 4}


class _Source(Protocol):
  """Random access to one split: len() images, read(indices) -> a batch."""

  image_shape: tuple[int, int, int]

  def __len__(self) -> int:
    ...

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Returns images (B, H, W, C) uint8 and labels (B,) integers."""
    ...


# ----------------------------------------------------------------------------
# Sources.


class _ArraySource:
  """A split held in memory: images (N, H, W, C) uint8, labels (N,) int."""

  def __init__(self, images: np.ndarray, labels: np.ndarray):
    self.images = images
    self.labels = labels
    self.image_shape = tuple(images.shape[1:])

  def __len__(self) -> int:
    return len(self.images)

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    indices = np.asarray(indices, np.int64)
    return self.images[indices], self.labels[indices]


class _TfdsSource:
  """A TFDS ArrayRecord split; decodes 'image' and 'label' of each record."""

  def __init__(self, builder: Any, split: str, image_size: int | None):
    self.name = builder.info.name
    self.data_source = builder.as_data_source(split=split, file_format='array_record')
    self.image_shape, self.resize_to = _tfds_image_shape(builder, image_size)
    self.has_label = 'label' in builder.info.features

  def __len__(self) -> int:
    return len(self.data_source)

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    records = self.data_source.__getitems__([int(i) for i in indices])
    images = np.empty((len(records), *self.image_shape), np.uint8)
    for row, record in enumerate(records):
      image = np.asarray(record['image'])
      if image.ndim == 2:
        image = image[..., None]
      if self.resize_to is not None:
        image = folder_lib.resize_and_center_crop(image, self.resize_to)
      images[row] = image
    if self.has_label:
      labels = np.asarray([r['label'] for r in records], np.int64)
    else:  # Unlabelled data sets (e.g. celeb_a images only): label 0.
      labels = np.zeros(len(records), np.int64)
    return images, labels


def _tfds_image_shape(
    builder: Any, image_size: int | None
) -> tuple[tuple[int, int, int], int | None]:
  """Returns ((H, W, C) of the output, side to resize to or None)."""
  features = builder.info.features
  if 'image' not in features:
    raise DataError(
        f'TFDS dataset {builder.info.name!r} has no "image" feature (features: '
        f'{list(features.keys())}). Set config.data.name to an image dataset.'
    )
  shape = tuple(features['image'].shape)
  if len(shape) == 2:
    shape = (*shape, 1)
  channels = shape[-1] if shape[-1] is not None else 3
  if None not in shape[:2]:
    if image_size is not None and (image_size, image_size) != shape[:2]:
      raise DataError(
          f'TFDS dataset {builder.info.name!r} has {shape[:2]} images but '
          f'config.data.image_size={image_size}: set config.data.image_size=None '
          f'(or {shape[0]}) to use the native size.'
      )
    return (shape[0], shape[1], channels), None
  if image_size is None:
    raise DataError(
        f'TFDS dataset {builder.info.name!r} has images of varying size '
        f'{shape}: set config.data.image_size (e.g. 256) to resize the shorter '
        'side and centre-crop.'
    )
  return (image_size, image_size, channels), image_size


def _tfds_builder(data_cfg: Any) -> Any:
  """Returns the TFDS builder of config.data.name, prepared as ArrayRecord."""
  # Imported here: only the TFDS source pays for TensorFlow Datasets.
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  name = data_cfg.get('name')
  data_dir = data_cfg.get('data_dir')
  if not name:
    raise DataError(
        "config.data.source='tfds' needs config.data.name (e.g. 'mnist', "
        "'fashion_mnist', 'cifar10', 'imagenet2012' or 'idx_images')."
    )
  build_cmd = f'tfds build {name} --data_dir={data_dir or "DIR"} --file_format=array_record'
  if name == 'idx_images':
    # Registers the builder with TFDS.
    from arcvq_jax.data import idx_tfds  # pylint: disable=g-import-not-at-top
    build_cmd = (
        f'tfds build idx_images --imports=arcvq_jax.data.idx_tfds '
        f'--manual_dir=IDX_DIR --data_dir={data_dir or "DIR"} '
        '--file_format=array_record (or set config.data.path=IDX_DIR to prepare '
        'it automatically, or call arcvq_jax.data.idx_tfds.prepare_idx_tfds)'
    )
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError as e:
    raise DataError(
        f'TFDS dataset {name!r} (config.data.name) is neither a known TFDS '
        f'dataset nor prepared in config.data.data_dir={data_dir!r}. Check the '
        f'name, or prepare it with: {build_cmd}'
    ) from e
  if not builder.is_prepared():
    if name == 'idx_images' and data_cfg.get('path'):
      builder = idx_tfds.prepare_idx_tfds(data_cfg.path, data_dir)
    else:
      raise DataError(
          f'TFDS dataset {name!r} is not prepared in {builder.data_dir}. '
          f'Prepare it once with: {build_cmd}  (datasets that need a '
          'manual download, e.g. imagenet2012, also take --manual_dir=DIR), or '
          'set config.data.data_dir to where it was prepared.'
      )
  formats = builder.info.available_file_formats()
  if tfds.core.file_adapters.FileFormat.ARRAY_RECORD not in formats:
    found = ', '.join(sorted(f.value for f in formats)) or 'unknown'
    raise DataError(
        f'TFDS dataset {name!r} in {builder.data_dir} is stored as {found}; '
        'grain needs random access (array_record). Convert it once with: '
        f'tfds convert_format --dataset_version_dir={builder.data_dir} '
        '--out_file_format=array_record  (the ArrayRecord files are written '
        f'next to the {found} ones), or prepare it again with {build_cmd} '
        '(download_and_prepare(file_format="array_record") from Python).'
    )
  return builder


def _open_source(data_cfg: Any, split: str) -> _Source:
  """Opens one split of the data set named by config.data."""
  source = data_cfg.get('source')
  image_size = data_cfg.get('image_size')
  if source == 'idx':
    images, labels = idx_lib.load_idx_split(data_cfg.get('path'), split)
    if image_size is not None and (image_size, image_size) != images.shape[1:3]:
      raise DataError(
          f'IDX images in {data_cfg.path!r} are {images.shape[1:3]} but '
          f'config.data.image_size={image_size}: set config.data.image_size='
          f'None (or {images.shape[1]}); IDX data is not resized.'
      )
    return _ArraySource(images, labels)
  if source == 'folder':
    return folder_lib.ImageFolderSource(data_cfg.get('path'), split, image_size)
  if source == 'tfds':
    return _TfdsSource(_tfds_builder(data_cfg), split, image_size)
  raise DataError(
      f'config.data.source={source!r} is not one of {_SOURCES}: set it to '
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

  def __init__(self, num_examples: int, global_batch_size: int, seed: int,
               process_index: int, process_count: int):
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
      self._permutations = {epoch: perm, **{
          e: p for e, p in self._permutations.items() if e == epoch - 1}}
    return perm

  def __call__(self, step: int, unused_element: Any = None) -> np.ndarray:
    """(B_local,) int64 indices of step `step` (a `map_with_index` transform)."""
    epoch, k = divmod(step, self.steps_per_epoch)
    start = k * self.global_batch_size
    block = self.permutation(epoch)[start:start + self.global_batch_size]
    return block[self.process_index::self.process_count]

  def __getstate__(self) -> dict[str, Any]:
    # Worker processes rebuild the memo instead of receiving a copy.
    return {**self.__dict__, '_permutations': {}}


class _ReadBatch:
  """Maps a (B,) index batch to {'image': (B, H, W, C) f32, 'label': (B,) i32}."""

  def __init__(self, source: _Source):
    self.source = source

  def __call__(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    images, labels = self.source.read(indices)
    return {'image': _to_float(images), 'label': labels.astype(np.int32)}


class _ReadEvalBatch:
  """Maps a global batch number to this process's padded eval batch.

  Global batch b holds dataset positions [b * G, (b + 1) * G); process p reads
  the contiguous block starting at b * G + p * B_local, so gathering the local
  batches in process order gives the data set in order. Positions >= N are
  padding: zero images, label 0, mask False.
  """

  def __init__(self, source: _Source, global_batch_size: int, process_index: int,
               local_batch_size: int):
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
      image = np.concatenate(
          [image, np.zeros((num_pad, *self.source.image_shape), np.float32)])
      labels = np.concatenate([labels, np.zeros(num_pad, labels.dtype)])
    return {'image': image, 'label': labels.astype(np.int32), 'mask': mask}


# ----------------------------------------------------------------------------
# Public API.


def _processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise DataError(
        f'process_index={process_index} is not in [0, process_count='
        f'{process_count}): pass both, or neither to use jax.process_index().'
    )
  return process_index, process_count


def _local_batch_size(global_batch_size: int, process_count: int) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise DataError(
        f'global batch size {global_batch_size} must be a positive multiple of '
        f'the number of processes ({process_count}): change the batch size in '
        'the config.'
    )
  return global_batch_size // process_count


def _read_options(data_cfg: Any) -> grain.ReadOptions:
  threads = _READ_THREADS.get(data_cfg.get('source'), 2)
  # grain can keep at most prefetch_buffer_size threads busy.
  return grain.ReadOptions(
      num_threads=threads, prefetch_buffer_size=max(threads, _PREFETCH_BATCHES))


def dataset_info(data_cfg: Any) -> dict[str, Any]:
  """Describes the data set without reading it all.

  Args:
    data_cfg: config.data.

  Returns:
    {'image_shape': (H, W, C), 'num_train': int, 'num_eval': int}; the shape is
    the one the iterators yield (after any resizing).
  """
  train_split = data_cfg.get('train_split', 'train')
  eval_split = data_cfg.get('eval_split', 'test')
  if data_cfg.get('source') == 'idx':
    # Headers only: no need to decompress 47 MB to learn three numbers.
    num_train, shape = idx_lib.idx_split_info(data_cfg.get('path'), train_split)
    num_eval, _ = idx_lib.idx_split_info(data_cfg.get('path'), eval_split)
    size = data_cfg.get('image_size')
    if size is not None and (size, size) != shape[:2]:
      raise DataError(
          f'IDX images in {data_cfg.path!r} are {shape[:2]} but '
          f'config.data.image_size={size}: set config.data.image_size=None '
          f'(or {shape[0]}); IDX data is not resized.'
      )
    return {'image_shape': shape, 'num_train': num_train, 'num_eval': num_eval}
  if data_cfg.get('source') == 'tfds':
    builder = _tfds_builder(data_cfg)
    shape, _ = _tfds_image_shape(builder, data_cfg.get('image_size'))
    splits = builder.info.splits
    return {'image_shape': shape, 'num_train': splits[train_split].num_examples,
            'num_eval': splits[eval_split].num_examples}
  train = _open_source(data_cfg, train_split)
  evaluation = _open_source(data_cfg, eval_split)
  return {'image_shape': tuple(train.image_shape), 'num_train': len(train),
          'num_eval': len(evaluation)}


def train_image_variance(data_cfg: Any, chunk_size: int = 8192) -> float:
  """Variance of all training pixels after mapping to [-1, 1].

  The VQ-VAE reconstruction loss divides by it (SPEC section 2). Streams over
  the split in chunks, summing the uint8 values and their squares exactly in
  int64, so the result does not depend on the chunking.

  Args:
    data_cfg: config.data.
    chunk_size: images read at a time.

  Returns:
    var(x / 127.5 - 1) over every pixel and channel of the training split.
  """
  source = _open_source(data_cfg, data_cfg.get('train_split', 'train'))
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
  the global batch. No random augmentation: batches depend only on the seed.

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
  """
  process_index, process_count = _processes(process_index, process_count)
  _local_batch_size(global_batch_size, process_count)  # Fails early on a bad split.
  source = _open_source(data_cfg, data_cfg.get('train_split', 'train'))
  steps_per_epoch = len(source) // global_batch_size
  if steps_per_epoch == 0:
    raise DataError(
        f'The training split has {len(source)} images, fewer than one global '
        f'batch of {global_batch_size}: lower the batch size in the config.'
    )
  if not isinstance(seed, (int, np.integer)) or seed < 0:
    raise DataError(f'seed must be a non-negative integer, got {seed!r} (config.seed).')
  indices = _TrainIndices(len(source), global_batch_size, int(seed),
                          process_index, process_count)
  # Element k of this endless MapDataset is training step k's batch, so the
  # iterator state is just the next step number.
  dataset = (
      grain.MapDataset.range(steps_per_epoch)
      .repeat(None)
      .map_with_index(indices)
      .map(_ReadBatch(source))
      .to_iter_dataset(_read_options(data_cfg))
  )
  num_workers = int(data_cfg.get('num_workers', 0) or 0)
  if num_workers > 0:
    from absl import flags  # pylint: disable=g-import-not-at-top
    if not flags.FLAGS.is_parsed():
      # Starting grain workers reads absl flags, which raises outside absl.app
      # (pytest, notebooks); parsing no arguments keeps every default.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=num_workers, per_worker_buffer_size=_PREFETCH_BATCHES))
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
  source = _open_source(data_cfg, data_cfg.get('eval_split', 'test'))
  num_batches = math.ceil(len(source) / global_batch_size)
  dataset = grain.MapDataset.range(num_batches).map(
      _ReadEvalBatch(source, global_batch_size, process_index, local_batch))
  return iter(dataset.to_iter_dataset(_read_options(data_cfg)))
