"""Generation metrics: FID, Inception Score, precision and recall of samples against a reference.

  # Reference statistics, once (a data set through config.data, here ImageNet's train split):
  python -m arcvq_jax.evaluate_samples --reference_config=configs/imagenet.py \
      --reference_config.data.data_dir=DIR --reference_split=train \
      --reference_stats=~/fid_stats/imagenet256_train.npz
  # Then, for every set of samples:
  python -m arcvq_jax.evaluate_samples --samples=samples.npz \
      --reference_stats=~/fid_stats/imagenet256_train.npz --out=results.json

Samples (`--samples`):
  - an .npz with key 'images' (or 'arr_0', the guided-diffusion / ADM sample format):
    (N, H, W, C) uint8 in [0, 255], or float in [-1, 1] (rounded to 8-bit levels, as if saved
    as PNG); C = 1 or 3. It is streamed from the file, never loaded whole.
  - or a folder of image files (.png, .jpg, ...; searched recursively, in sorted order), all
    of one size, read as RGB as pytorch-fid reads them.
Reference (one of):
  - `--reference_stats=PATH` where PATH exists: statistics written by this command (or a
    pytorch-fid statistics file with mu/sigma, which gives FID but no precision/recall), or
    an ADM evaluator reference batch (guided-diffusion's `VIRTUAL_imagenet256_labeled.npz`:
    mu and sigma of the whole training set, 10k images in arr_0): FID against its mu/sigma,
    the numbers LlamaGen and MaskGIT-style papers report; `--reference_batch_images` also
    passes its images through our Inception, for precision/recall and a second FID against
    our own statistics of them (docs/evaluation.md, "The protocol");
  - `--reference=X.npz|DIR`: images as above;
  - `--reference_config=configs/...py --reference_split=train`: a data set through the
    project's pipeline (TFDS, IDX or folder, resized and centre-cropped as in evaluation).
  With `--reference_stats=PATH` and PATH missing, the statistics of --reference /
  --reference_config are computed and written to PATH for the next runs.

Results (printed, and written to --out as JSON, with a markdown table beside it): fid,
inception_score (mean and std over 10 splits), precision and recall (k = 3, on up to
--pr_features random features of each set), the counts and the reference's description.
Features come from pytorch-fid's FID Inception (`--inception_path`, converted once with
`python -m arcvq_jax.convert.inception_weights`). Statistics record the network's
fingerprint and the image size: statistics of other weights or another image size are refused.

In Python (e.g. right after sampling):

  from arcvq_jax import evaluate_samples as es
  from arcvq_jax.evaluation import fid, inception
  extractor = inception.InceptionFeatures(inception.load_params(inception.DEFAULT_PATH))
  results = es.evaluate_samples(es.open_samples("samples.npz"),
                                fid.FeatureStats.load("imagenet256_train.npz"), extractor)
"""

from __future__ import annotations

import io
import json
import warnings
import zipfile
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import jax
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from PIL import Image
from tqdm.auto import tqdm

from arcvq_jax import cli
from arcvq_jax.data import pipeline
from arcvq_jax.evaluation import fid as fid_lib
from arcvq_jax.evaluation import inception as inception_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
NPZ_KEYS = ("images", "arr_0")


class ImageSetError(ValueError):
  """Images that cannot be read or compared."""


def _progress(total: int, desc: str):
  """A tqdm progress bar over images on the main process (a no-op elsewhere)."""
  return tqdm(total=total, desc=desc, unit="img", disable=jax.process_index() != 0)


# ------------------------------------------------------------------------------ image sets


class Samples:
  """An image set read in global batches: `batches(G)` yields this process's rows of each
  global batch of G images (process p: rows [p G/P, (p + 1) G/P) of it) and their mask,
  always G/P rows (padding rows are masked out), so processes run the same number of steps.

  Attributes: num_images, image_shape (H, W, C) and a description.
  """

  num_images: int
  image_shape: tuple[int, int, int]
  description: str

  def _rows(self, start: int, stop: int) -> np.ndarray:
    raise NotImplementedError

  def batches(self, global_batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    p, n_proc = jax.process_index(), jax.process_count()
    local = global_batch_size // n_proc
    for b in range(-(-self.num_images // global_batch_size)):
      start = min(b * global_batch_size + p * local, self.num_images)
      stop = min(start + local, self.num_images)
      rows = self._rows(start, stop)
      mask = np.arange(local) < len(rows)
      if len(rows) < local:
        rows = np.concatenate([rows, np.zeros((local - len(rows), *rows.shape[1:]), rows.dtype)])
      yield rows, mask


class NpzSamples(Samples):
  """The 'images' (or 'arr_0') array of an .npz, streamed row by row from the zip member."""

  def __init__(self, path: str, limit: int = 0):
    self.path = path
    self._file = epath.Path(path).expanduser().open("rb")
    try:
      self._zip = zipfile.ZipFile(self._file)
    except zipfile.BadZipFile as e:
      raise ImageSetError(f"{path} is not an .npz file ({e}).") from e
    names = {n[: -len(".npy")]: n for n in self._zip.namelist() if n.endswith(".npy")}
    key = next((k for k in NPZ_KEYS if k in names), None)
    if key is None:
      raise ImageSetError(
        f"{path} has no array {' or '.join(map(repr, NPZ_KEYS))} (it holds "
        f"{sorted(names)}); save samples as np.savez(path, images=x)."
      )
    self._member = names[key]
    self._open_member()
    if len(self._shape) != 4 or self._shape[-1] not in (1, 3):
      raise ImageSetError(
        f"{path}: '{key}' has shape {self._shape}; expected (N, H, W, C) with C = 1 or 3."
      )
    if self._dtype != np.uint8 and self._dtype.kind != "f":
      raise ImageSetError(
        f"{path}: '{key}' has dtype {self._dtype}; expected uint8 in [0, 255] or float in [-1, 1]."
      )
    if not self._shape[0] or not all(self._shape[1:]):
      raise ImageSetError(f"{path}: '{key}' of shape {self._shape} holds no images.")
    self.num_images = self._shape[0] if not limit else min(limit, self._shape[0])
    self.image_shape = tuple(int(s) for s in self._shape[1:])
    self.description = f"{path} ({self._shape[0]} images)"

  def _open_member(self) -> None:
    self._stream = self._zip.open(self._member)
    version = np.lib.format.read_magic(self._stream)
    header = (
      np.lib.format.read_array_header_1_0
      if version == (1, 0)
      else np.lib.format.read_array_header_2_0
    )
    shape, fortran, dtype = header(self._stream)
    if fortran:
      raise ImageSetError(f"{self.path}: the array is in Fortran order; save it C-contiguous.")
    self._shape, self._dtype, self._pos = shape, np.dtype(dtype), 0

  def _rows(self, start: int, stop: int) -> np.ndarray:
    if start < self._pos:
      self._open_member()  # a new pass: back to the first row
    row_bytes = int(np.prod(self._shape[1:])) * self._dtype.itemsize
    if start > self._pos:  # other processes' rows
      self._stream.read((start - self._pos) * row_bytes)
    data = self._stream.read((stop - start) * row_bytes)
    self._pos = stop
    rows = np.frombuffer(data, self._dtype).reshape(stop - start, *self._shape[1:])
    if rows.dtype == np.uint8:
      return rows
    if not np.isfinite(rows).all():  # NaN would pass through the Inception into every metric
      raise ImageSetError(
        f"{self.path}: images {start} to {stop - 1} hold NaN or infinite values; check the "
        "sampler (a diverged model?) before scoring them."
      )
    return rows.astype(np.float32)


def _walk(folder: epath.Path) -> Iterator[epath.Path]:
  """Every file under a folder (local or gs://: epath has no recursive glob for GCS)."""
  for entry in folder.iterdir():
    if entry.is_dir():
      yield from _walk(entry)
    else:
      yield entry


class FolderSamples(Samples):
  """Image files under a folder (recursively, sorted), decoded as RGB uint8."""

  def __init__(self, path: str, limit: int = 0, threads: int = 8):
    root = epath.Path(path).expanduser()
    if not root.is_dir():
      raise ImageSetError(f"{path} is neither an .npz file nor a folder of images.")
    self.files = sorted(str(f) for f in _walk(root) if f.suffix.lower() in IMAGE_EXTENSIONS)
    if not self.files:
      raise ImageSetError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) under {path}.")
    self.num_images = len(self.files) if not limit else min(limit, len(self.files))
    self.image_shape = self._read(self.files[0]).shape
    self.description = f"{path} ({len(self.files)} images)"
    self._pool = ThreadPoolExecutor(threads)

  @staticmethod
  def _read(file: str) -> np.ndarray:
    with Image.open(io.BytesIO(epath.Path(file).read_bytes())) as img:
      return np.asarray(img.convert("RGB"))

  def _rows(self, start: int, stop: int) -> np.ndarray:
    images = list(self._pool.map(self._read, self.files[start:stop]))
    for file, img in zip(self.files[start:stop], images, strict=True):
      if img.shape != self.image_shape:
        raise ImageSetError(
          f"{file} is {img.shape[1]}x{img.shape[0]} but {self.files[0]} is "
          f"{self.image_shape[1]}x{self.image_shape[0]}: all images of a set must have one "
          "size (resize them first; FID depends on the resolution)."
        )
    return np.stack(images) if images else np.zeros((0, *self.image_shape), np.uint8)


class DatasetSamples(Samples):
  """A split of the data set config.data names, through the evaluation pipeline (float
  images in [-1, 1] that are exactly 8-bit levels)."""

  def __init__(self, data_config: Any, split: str, limit: int = 0):
    self.data_config = data_config.copy_and_resolve_references()
    with self.data_config.unlocked():
      self.data_config.eval_split = split
    info = pipeline.dataset_info(self.data_config)
    self.num_images = info["num_eval"] if not limit else min(limit, info["num_eval"])
    self.image_shape = tuple(info["image_shape"])
    name = self.data_config.get("name") or self.data_config.get("path")
    self.description = f"{self.data_config.source} {name} split {split}"

  def batches(self, global_batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    p, n_proc = jax.process_index(), jax.process_count()
    local = global_batch_size // n_proc
    it = pipeline.create_eval_iterator(
      self.data_config, global_batch_size=global_batch_size, process_index=p, process_count=n_proc
    )
    for b, batch in enumerate(it):
      if b * global_batch_size >= self.num_images:
        break
      positions = b * global_batch_size + p * local + np.arange(local)
      yield batch["image"], batch["mask"] & (positions < self.num_images)


def open_samples(path: str, limit: int = 0) -> Samples:
  """An .npz file or a folder of images."""
  if str(path).endswith(".npz"):
    if not epath.Path(path).expanduser().exists():
      raise ImageSetError(f"no such file: {path}")
    return NpzSamples(path, limit)
  return FolderSamples(path, limit)


# ------------------------------------------------------------------------------ ADM batches

ADM_KEYS = ("arr_0", "mu", "sigma")


def _npz_members(path: str) -> list[str]:
  """The array names of an .npz, from its zip directory (no array is read)."""
  try:
    with epath.Path(path).expanduser().open("rb") as f, zipfile.ZipFile(f) as zf:
      return [n[: -len(".npy")] for n in zf.namelist() if n.endswith(".npy")]
  except (OSError, zipfile.BadZipFile):
    return []


def is_adm_batch(path: str) -> bool:
  """Whether `path` is an ADM evaluator reference batch (guided-diffusion's evaluations/:
  arr_0 images, mu / sigma of the 2048-d pool features, usually mu_s / sigma_s), not
  statistics this command wrote (those hold num_images)."""
  names = set(_npz_members(path))
  return set(ADM_KEYS) <= names and "num_images" not in names


def load_adm_batch(
  path: str,
  extractor: inception_lib.InceptionFeatures | None = None,
  *,
  keep: int = 10000,
  seed: int = 0,
) -> tuple[fid_lib.FeatureStats, fid_lib.FeatureStats | None]:
  """An ADM reference batch as (reference, images): reference holds the file's mu / sigma
  (computed by ADM with TensorFlow's FID Inception, the network pytorch-fid's weights port)
  for FID; images is None, or with an `extractor` the statistics of its arr_0 images through
  our Inception, whose `keep` features the reference then carries for precision/recall.
  Only mu and sigma are read unless the images are asked for (arr_0 is ~2 GB at 256)."""
  with epath.Path(path).expanduser().open("rb") as f, np.load(f) as data:
    mu, sigma = np.asarray(data["mu"]), np.asarray(data["sigma"])
  batch = NpzSamples(path)  # arr_0's header only, until its rows are read
  info = dict(
    image_shape=list(batch.image_shape),
    source=f"ADM reference batch {path} (its mu / sigma; {batch.num_images} images in arr_0)",
  )
  images = None
  if extractor is not None:
    images = compute_stats(batch, extractor, keep=keep, seed=seed, desc="reference batch")
  features = None if images is None else images.features
  reference = fid_lib.FeatureStats.from_mean_cov(mu, sigma, features=features, info=info)
  return reference, images


# ------------------------------------------------------------------------------ statistics


def compute_stats(
  samples: Samples,
  extractor: inception_lib.InceptionFeatures,
  *,
  keep: int = 10000,
  inception_score: bool = False,
  seed: int = 0,
  desc: str = "Inception features",
) -> fid_lib.FeatureStats:
  """Streams `samples` through the Inception: mean/covariance of the pool features, `keep`
  random features and (optionally) the Inception Score sums. info: image_shape, source,
  network (the weights' fingerprint)."""
  stats = fid_lib.FeatureStats(
    keep=keep, seed=seed, total=samples.num_images if inception_score else None
  )
  stats.info = dict(
    image_shape=list(samples.image_shape), source=samples.description, network=extractor.fingerprint
  )
  with _progress(samples.num_images, desc) as bar:
    for images, mask in samples.batches(extractor.batch_size):
      pool, logits = extractor(images, mask)
      stats.update(pool, logits if inception_score else None)
      bar.update(len(pool))
  if stats.count != samples.num_images:
    raise ImageSetError(
      f"read {stats.count} of the {samples.num_images} images of {samples.description}."
    )
  return stats


def check_comparable(
  samples: dict[str, Any], reference: dict[str, Any], allow_size_mismatch: bool = False
) -> None:
  """Raises when two sets' statistics (their `FeatureStats.info`) were made by different
  networks or (unless allowed) from images of different sizes."""
  a, b = samples.get("network"), reference.get("network")
  if a and b and a != b:
    raise fid_lib.StatisticsError(
      f"the reference statistics ({reference.get('source')}) were computed with other "
      f"Inception weights (fingerprint {b}) than these (fingerprint {a}); compute them again "
      "with the same --inception_path."
    )
  a, b = samples.get("image_shape"), reference.get("image_shape")
  if a and b and list(a)[:2] != list(b)[:2] and not allow_size_mismatch:
    raise ImageSetError(
      f"the samples are {a[0]}x{a[1]} images but the reference's are {b[0]}x{b[1]}: FID "
      "depends on the resolution (both are resized to 299). Resize one set to the other's "
      "size, or pass --allow_size_mismatch to compare anyway."
    )


def evaluate_samples(
  samples: Samples,
  reference: fid_lib.FeatureStats,
  extractor: inception_lib.InceptionFeatures,
  *,
  pr_features: int = 10000,
  allow_size_mismatch: bool = False,
  seed: int = 0,
  reference_images: fid_lib.FeatureStats | None = None,
) -> dict[str, Any]:
  """FID, Inception Score, precision and recall of `samples` against `reference` stats;
  with `reference_images` (an ADM batch's images through our Inception, `load_adm_batch`)
  also 'fid_reference_images', the FID against those."""
  check_comparable(
    dict(image_shape=samples.image_shape, network=extractor.fingerprint),
    reference.info,
    allow_size_mismatch,
  )  # before the long pass
  fid_lib.warn_if_few(samples.num_images, inception_lib.POOL_DIM, "samples")
  stats = compute_stats(
    samples, extractor, keep=pr_features, inception_score=True, seed=seed, desc="samples"
  )
  is_mean, is_std = stats.inception_score()
  results: dict[str, Any] = dict(
    fid=fid_lib.fid_from_stats(stats, reference),
    inception_score=is_mean,
    inception_score_std=is_std,
    precision=None,
    recall=None,
    num_samples=stats.count,
    num_reference=reference.count,
    samples=samples.description,
    reference=reference.info.get("source", "unknown"),
  )
  if reference_images is not None:
    results["fid_reference_images"] = fid_lib.fid_from_stats(stats, reference_images)
  if len(reference.features) > fid_lib.PR_NEIGHBOURS:
    feats = reference.features[:pr_features]
    results["precision"], results["recall"] = fid_lib.precision_recall(feats, stats.features)
    results["num_pr_features"] = [len(feats), len(stats.features)]
  else:
    warnings.warn(
      "the reference statistics hold no features (a pytorch-fid mu/sigma file?): "
      "precision and recall are not computed.",
      stacklevel=2,
    )
  return results


def markdown_table(results: dict[str, Any]) -> str:
  def fmt(v, digits):
    return "n/a" if v is None else f"{v:.{digits}f}"

  return (
    "| samples | reference | FID | IS | precision | recall |\n"
    "|---|---|---|---|---|---|\n"
    f"| {results['num_samples']} | {results['num_reference'] or 'n/a'} | "
    f"{fmt(results['fid'], 2)} | {fmt(results['inception_score'], 2)} ± "
    f"{fmt(results['inception_score_std'], 2)} | {fmt(results['precision'], 3)} | "
    f"{fmt(results['recall'], 3)} |\n"
  )


# ---------------------------------------------------------------------------------- the CLI

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs as a program: absl flags are global,
  and other modules (main, the converters) define some of the same names."""
  flags.DEFINE_string(
    "samples",
    None,
    "Samples: an .npz ('images' uint8 or [-1, 1] floats) or "
    "a folder of images. Without it, only the reference statistics are made.",
  )
  flags.DEFINE_string("reference", None, "Reference images: an .npz or a folder of images.")
  config_flags.DEFINE_config_file(
    "reference_config", None, "A config whose config.data is the reference data set."
  )
  flags.DEFINE_string("reference_split", "train", "Split of --reference_config's data set.")
  flags.DEFINE_string(
    "reference_stats",
    None,
    "Reference statistics file: read if it exists, "
    "else computed from --reference / --reference_config and written here.",
  )
  flags.DEFINE_bool(
    "reference_batch_images",
    False,
    "With an ADM reference batch as --reference_stats: also pass its images (arr_0) through "
    "the Inception, for precision/recall and an FID against our statistics of them.",
  )
  flags.DEFINE_string("out", None, "Results JSON (a .md table is written beside it).")
  flags.DEFINE_string("inception_path", inception_lib.DEFAULT_PATH, "FID Inception weights.")
  flags.DEFINE_integer(
    "batch_size", 100, "Global Inception batch (a multiple of the devices).", lower_bound=1
  )
  flags.DEFINE_integer(
    "num_samples", 0, "Use the first N samples (0: all); fewer is an error.", lower_bound=0
  )
  flags.DEFINE_integer(
    "num_reference", 0, "Use the first N reference images (0: all).", lower_bound=0
  )
  flags.DEFINE_integer(
    "pr_features", 10000, "Random features per set for precision/recall.", lower_bound=1
  )
  flags.DEFINE_bool(
    "allow_size_mismatch", False, "Compare samples and a reference of different image sizes."
  )
  flags.DEFINE_integer("seed", 0, "Seed of the random feature subsets.")


def _reference_samples() -> Samples:
  if FLAGS.reference and FLAGS.reference_config:
    raise app.UsageError("give --reference or --reference_config, not both.")
  if FLAGS.reference:
    return open_samples(FLAGS.reference, FLAGS.num_reference)
  if FLAGS.reference_config:
    return DatasetSamples(FLAGS.reference_config.data, FLAGS.reference_split, FLAGS.num_reference)
  raise app.UsageError(
    "no reference: give --reference_stats=FILE (existing), --reference="
    "X.npz|DIR or --reference_config=configs/...py."
  )


def load_stats(path: str, flag: str) -> fid_lib.FeatureStats:
  """fid_lib.FeatureStats.load, a file that is no statistics file (damaged, another format)
  raising StatisticsError naming the flag and the fix instead of numpy's error."""
  try:
    return fid_lib.FeatureStats.load(path)
  except fid_lib.StatisticsError as e:
    raise fid_lib.StatisticsError(f"{flag}={path}: {e}") from e
  except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
    raise fid_lib.StatisticsError(
      f"{flag}={path} is not a statistics file this command wrote ({type(e).__name__}: "
      f"{str(e).splitlines()[0] if str(e) else ''}). Delete it to compute the statistics "
      "again, or give another path."
    ) from e


def _is_stats_file(path: str) -> bool:
  """Whether the .npz at `path` holds FID statistics ('mu') rather than images."""
  if not epath.Path(path).expanduser().is_file():
    raise ImageSetError(f"--reference={path}: no such file. Check the path.")
  try:
    with np.load(epath.Path(path).expanduser().open("rb")) as data:
      return "mu" in data.files
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    raise ImageSetError(f"--reference={path} is not an .npz file ({e}).") from e


def _load_reference(
  extractor: inception_lib.InceptionFeatures,
) -> tuple[fid_lib.FeatureStats, fid_lib.FeatureStats | None]:
  """The reference statistics and, for an ADM batch with --reference_batch_images, those of
  its images (else None)."""
  cache = FLAGS.reference_stats
  given = None  # a file of statistics: --reference_stats that exists, or --reference=X.npz
  if cache and epath.Path(cache).expanduser().exists():
    given = (cache, "--reference_stats")
  elif FLAGS.reference and FLAGS.reference.endswith(".npz") and _is_stats_file(FLAGS.reference):
    given = (FLAGS.reference, "--reference")
  if given is not None and is_adm_batch(given[0]):
    logging.info("ADM reference batch %s: FID against its mu / sigma", given[0])
    images = extractor if FLAGS.reference_batch_images else None
    return load_adm_batch(given[0], images, keep=FLAGS.pr_features, seed=FLAGS.seed + 1)
  if FLAGS.reference_batch_images:
    raise app.UsageError(
      "--reference_batch_images needs an ADM reference batch (an .npz of arr_0, mu and sigma, "
      "e.g. VIRTUAL_imagenet256_labeled.npz) as --reference_stats."
    )
  if given is not None:
    logging.info("Reference statistics from %s", given[0])
    return load_stats(*given), None
  return _computed_reference(_reference_samples(), cache, extractor), None


def _computed_reference(
  reference: Samples, cache: str | None, extractor: inception_lib.InceptionFeatures
) -> fid_lib.FeatureStats:
  """The statistics of the reference images, written to `cache` if given."""
  fid_lib.warn_if_few(reference.num_images, inception_lib.POOL_DIM, "reference")
  stats = compute_stats(
    reference, extractor, keep=FLAGS.pr_features, seed=FLAGS.seed + 1, desc="reference"
  )
  if cache and jax.process_index() == 0:
    stats.save(cache)
    logging.info("Wrote reference statistics of %d images to %s", stats.count, cache)
  return stats


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not FLAGS.samples and not FLAGS.reference_stats:
    raise app.UsageError("give --samples (to evaluate) or --reference_stats (to precompute).")
  samples = None
  if FLAGS.samples:  # checked before the weights are read and the (long) reference pass
    samples = open_samples(FLAGS.samples)
    if FLAGS.num_samples:
      if samples.num_images < FLAGS.num_samples:
        raise ImageSetError(
          f"--num_samples={FLAGS.num_samples} but {samples.description} "
          f"has only {samples.num_images}."
        )
      samples.num_images = FLAGS.num_samples
    if samples.num_images < fid_lib.IS_SPLITS:
      raise ImageSetError(
        f"{samples.description}: {samples.num_images} images are too few; the Inception "
        f"Score needs at least {fid_lib.IS_SPLITS} (one per split), FID thousands (the "
        "protocol uses 10k-50k). Give more samples."
      )
  extractor = inception_lib.InceptionFeatures(
    inception_lib.load_params(FLAGS.inception_path), batch_size=FLAGS.batch_size
  )
  reference, reference_images = _load_reference(extractor)
  if samples is None:
    print(f"reference statistics of {reference.count} images: {FLAGS.reference_stats}")
    return
  results = evaluate_samples(
    samples,
    reference,
    extractor,
    pr_features=FLAGS.pr_features,
    allow_size_mismatch=FLAGS.allow_size_mismatch,
    seed=FLAGS.seed,
    reference_images=reference_images,
  )
  print(json.dumps(results, indent=2))
  print(markdown_table(results))
  if FLAGS.out and jax.process_index() == 0:
    out = epath.Path(FLAGS.out).expanduser()
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2))
    out.with_suffix(".md").write_text(markdown_table(results))


if __name__ == "__main__":
  define_flags()
  cli.run(main)
