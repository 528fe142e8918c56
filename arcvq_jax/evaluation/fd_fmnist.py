"""FD-FMNIST: the Frechet distance between two sets of 28x28 grey images in the 128-d
penultimate features of a small Fashion-MNIST classifier (docs/evaluation.md, "FD-FMNIST").

It is FID's recipe (docs/math.md, eq. 39: the Frechet distance between Gaussians fitted to
the features) with another network, for machines that cannot fetch the FID Inception's
weights: a number to rank samples of one data set against each other, NOT an FID and not
comparable with any published FID. Its scale is the classifier's feature scale, so two
FD-FMNIST values compare only under the same classifier (the same fingerprint).

  images (B, 28, 28, 1), uint8 or float in [-1, 1]
    -> 8-bit levels u (floats are rounded as if saved as PNG), x = u / 255
    -> conv 3x3 stride 2, 32, ReLU -> conv 3x3 stride 2, 64, ReLU          (7x7x64)
    -> dense 128, ReLU = `features` (B, 128) -> dense 10 = `logits` (B, 10)

The classifier is trained here by `train_classifier`, in about 35 s on two shared CPU cores
(89.6 % on the test split with seed 0), deterministic from its seed (init, batch order and
steps), and stored as an .npz of its weights with a sha256 fingerprint of them and its test
accuracy (`save_classifier`).
Statistics record that fingerprint, so features of two classifiers are never compared.

  params, info = fd_fmnist.load_or_train("~/.cache/arcvq_jax/fd_fmnist_classifier.npz")
  extractor = fd_fmnist.FMNISTFeatures(params)
  reference = fd_fmnist.split_stats(extractor, "test")       # the 10k test images
  scores = fd_fmnist.score_samples(images, labels, reference, extractor)
  scores["fd_fmnist"], scores["class_accuracy"]              # labels: the classes asked for

The logits also say whether a class-conditional sample shows its class (`class_accuracy`:
the share of samples the classifier assigns to the class they were drawn for).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from etils import epath

from arcvq_jax import cli, npz_files
from arcvq_jax.data import idx
from arcvq_jax.evaluation import fid as fid_lib
from arcvq_jax.evaluation import inception

NAME = "FD-FMNIST"
IMAGE_SHAPE = (28, 28, 1)
FEATURE_DIM = 128
NUM_CLASSES = 10
DEFAULT_PATH = "~/.cache/arcvq_jax/fd_fmnist_classifier.npz"
DEFAULT_DATA_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's IDX files (launch/setup.sh)
# Three epochs of the 60k training images: ~90 % test accuracy in under a minute on two cores.
DEFAULT_EPOCHS = 3
DEFAULT_BATCH = 128
DEFAULT_LR = 1e-3


class ClassifierError(cli.UserError):
  """A classifier file that is missing, damaged or of another network."""


# ------------------------------------------------------------------------------ the network


class FMNISTClassifier(nn.Module):
  """x (B, 28, 28, 1) float32 in [0, 1] -> (features (B, 128), logits (B, 10)) float32."""

  @nn.compact
  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    # Strided convolutions, not max-pools: XLA's CPU gradient of a max-pool (select and
    # scatter) made the train step 8x slower for no gain in accuracy.
    for i, width in enumerate((32, 64)):
      x = nn.relu(nn.Conv(width, (3, 3), strides=(2, 2), name=f"conv{i}")(x))
    features = nn.relu(nn.Dense(FEATURE_DIM, name="features")(x.reshape(x.shape[0], -1)))
    return features, nn.Dense(NUM_CLASSES, name="logits")(features)


def preprocess(images: jax.Array) -> jax.Array:
  """(B, 28, 28, 1) uint8, or float in [-1, 1] -> float32 in [0, 1] on 8-bit levels (floats
  rounded as if saved as PNG, as the FID Inception's input path does)."""
  if tuple(images.shape[1:]) != IMAGE_SHAPE:
    raise ValueError(
      f"{NAME} takes (B, 28, 28, 1) grey images (Fashion-MNIST's), got {tuple(images.shape)}."
    )
  return inception.to_uint8_levels(images) / 255.0


def apply(params: Any, images: jax.Array) -> tuple[jax.Array, jax.Array]:
  """images (B, 28, 28, 1) uint8 or float in [-1, 1] -> (features (B, 128), logits (B, 10))."""
  return FMNISTClassifier().apply({"params": params}, preprocess(images))


def init_params(seed: int) -> Any:
  x = jnp.zeros((1, *IMAGE_SHAPE), jnp.float32)
  return FMNISTClassifier().init(jax.random.PRNGKey(seed), x)["params"]


def expected_shapes() -> dict[str, tuple[int, ...]]:
  """{'conv0/kernel': (3, 3, 1, 32), ...}: the file's keys and shapes."""
  shapes = jax.eval_shape(lambda: init_params(0))
  return {
    "/".join(k.key for k in path): tuple(leaf.shape)
    for path, leaf in jax.tree_util.tree_leaves_with_path(shapes)
  }


# ------------------------------------------------------------------------------ training


def _batches(n: int, batch_size: int, seed: int, epoch: int) -> Iterator[np.ndarray]:
  """Epoch `epoch`'s full batches of indices 0..n-1: the permutation default_rng([seed,
  epoch]), the last partial batch dropped (one compiled step shape)."""
  order = np.random.default_rng([seed, epoch]).permutation(n)
  for start in range(0, n - batch_size + 1, batch_size):
    yield order[start : start + batch_size]


def train_classifier(
  images: np.ndarray,
  labels: np.ndarray,
  *,
  seed: int = 0,
  epochs: int = DEFAULT_EPOCHS,
  batch_size: int = DEFAULT_BATCH,
  lr: float = DEFAULT_LR,
) -> Any:
  """The classifier's params after `epochs` epochs of Adam on cross-entropy.

  images: (N, 28, 28, 1) uint8 (the train split); labels: (N,) ints in [0, 10). The result
  depends only on the data and the arguments (init from PRNGKey(seed), batches from
  default_rng([seed, epoch])).
  """
  images, labels = np.asarray(images), np.asarray(labels, np.int32)
  if len(images) < batch_size:
    raise ValueError(f"{len(images)} training images are fewer than one batch ({batch_size}).")
  tx = optax.adam(lr)
  params = init_params(seed)
  opt_state = tx.init(params)

  @jax.jit
  def step(params, opt_state, x, y):
    def loss_fn(p):
      _, logits = apply(p, x)
      return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, y))

    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss

  for epoch in range(epochs):
    losses = []
    for batch in _batches(len(images), batch_size, seed, epoch):
      params, opt_state, loss = step(params, opt_state, images[batch], labels[batch])
      losses.append(loss)
    logging.info("%s classifier: epoch %d, loss %.4f", NAME, epoch + 1, np.mean(losses))
  return params


def accuracy(extractor: FMNISTFeatures, images: np.ndarray, labels: np.ndarray) -> float:
  """The share of `images` the classifier assigns to their `labels`."""
  _, logits = extractor(images)
  return float(np.mean(np.argmax(logits, axis=1) == np.asarray(labels)))


# ------------------------------------------------------------------------------ features


class FMNISTFeatures:
  """The classifier jitted for feature extraction, with InceptionFeatures' call shape:

    feats = FMNISTFeatures(params)
    features, logits = feats(images)      # numpy float32 (n, 128), (n, 10)

  Images are run in batches of `batch_size` (the last one padded: one compiled shape), so a
  row's features never depend on the rows beside it. One process (the features of a set of
  28x28 images are seconds of work on a CPU).
  """

  def __init__(self, params: Any, batch_size: int = 500):
    self.params = jax.tree.map(jnp.asarray, params)
    self.batch_size = batch_size
    self.fingerprint = fingerprint(params)
    self._fn = jax.jit(apply)

  def __call__(
    self, images: np.ndarray, mask: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """images (n, 28, 28, 1) uint8 or float in [-1, 1]; mask (n,) bool (False: dropped) ->
    features (m, 128), logits (m, 10) float32 of the kept rows."""
    images = np.asarray(images)
    mask = np.ones(len(images), bool) if mask is None else np.asarray(mask, bool)
    if mask.shape != images.shape[:1]:
      raise ValueError(f"mask {mask.shape} does not match the {len(images)} images.")
    features, logits = [], []
    for start in range(0, len(images), self.batch_size):
      chunk = images[start : start + self.batch_size]
      n = len(chunk)
      if n < self.batch_size:
        pad = np.zeros((self.batch_size - n, *chunk.shape[1:]), chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      f, g = self._fn(self.params, chunk)
      keep = mask[start : start + n]
      features.append(np.asarray(f)[:n][keep])
      logits.append(np.asarray(g)[:n][keep])
    if not features:
      return np.zeros((0, FEATURE_DIM), np.float32), np.zeros((0, NUM_CLASSES), np.float32)
    return np.concatenate(features), np.concatenate(logits)


def image_stats(
  images: np.ndarray,
  extractor: FMNISTFeatures,
  *,
  source: str = "",
  keep: int = 10000,
  seed: int = 0,
) -> fid_lib.FeatureStats:
  """The feature statistics (mean, covariance, `keep` random features) of images
  (N, 28, 28, 1); info records the source, the image shape and the classifier's fingerprint."""
  stats = fid_lib.FeatureStats(dim=FEATURE_DIM, keep=keep, seed=seed)
  stats.info = dict(
    image_shape=list(IMAGE_SHAPE), source=source, network=f"{NAME}:{extractor.fingerprint}"
  )
  for start in range(0, len(images), extractor.batch_size):
    features, _ = extractor(images[start : start + extractor.batch_size])
    stats.update(features)
  return stats


def split_stats(
  extractor: FMNISTFeatures, split: str = "test", data_dir: str = DEFAULT_DATA_DIR
) -> fid_lib.FeatureStats:
  """The statistics of a Fashion-MNIST split (Debian's IDX files by default)."""
  images, _ = idx.load_idx_split(data_dir, split)
  return image_stats(images, extractor, source=f"Fashion-MNIST {split} ({data_dir})")


def fd(a: fid_lib.FeatureStats, b: fid_lib.FeatureStats) -> float:
  """FD-FMNIST between two sets' statistics; StatisticsError if another classifier (or
  another network) made one of them."""
  na, nb = a.info.get("network"), b.info.get("network")
  if na != nb:
    raise fid_lib.StatisticsError(
      f"{NAME}: the two statistics come from different networks ({na} and {nb}); compute "
      "both with the same classifier file."
    )
  return fid_lib.fid_from_stats(a, b)


def class_accuracy(logits: np.ndarray, labels: np.ndarray) -> tuple[float, list[float | None]]:
  """(the share of rows whose argmax is their label, that share per class 0..9; None for a
  class with no rows). logits (N, 10), labels (N,)."""
  labels = np.asarray(labels)
  right = np.argmax(logits, axis=1) == labels
  per_class = [
    float(np.mean(right[labels == c])) if np.any(labels == c) else None for c in range(NUM_CLASSES)
  ]
  return float(np.mean(right)), per_class


def score_samples(
  images: np.ndarray,
  labels: np.ndarray | None,
  reference: fid_lib.FeatureStats,
  extractor: FMNISTFeatures,
  *,
  source: str = "samples",
) -> dict[str, Any]:
  """FD-FMNIST of samples (N, 28, 28, 1) against `reference` and, with their labels (N,)
  (the classes they were drawn for; -1: unconditional), the classifier's accuracy on them."""
  stats = fid_lib.FeatureStats(dim=FEATURE_DIM, keep=0)
  stats.info = dict(network=f"{NAME}:{extractor.fingerprint}", source=source)
  all_logits = []
  for start in range(0, len(images), extractor.batch_size):
    features, logits = extractor(images[start : start + extractor.batch_size])
    stats.update(features)
    all_logits.append(logits)
  fid_lib.warn_if_few(stats.count, FEATURE_DIM, source)
  results: dict[str, Any] = dict(
    fd_fmnist=fd(stats, reference),
    num_samples=stats.count,
    classifier=extractor.fingerprint,
    class_accuracy=None,
    per_class_accuracy=None,
  )
  if labels is not None and np.all(np.asarray(labels) >= 0):
    overall, per_class = class_accuracy(np.concatenate(all_logits), labels)
    results.update(class_accuracy=overall, per_class_accuracy=per_class)
  return results


# ---------------------------------------------------------------------------------- files


def fingerprint(params: Any) -> str:
  """sha256 of the weights (sorted keys, float32 bytes), 16 hex digits."""
  h = hashlib.sha256()
  for key, value in sorted(npz_files.flatten(params).items()):
    h.update(key.encode())
    h.update(np.ascontiguousarray(value).tobytes())
  return h.hexdigest()[:16]


def save_classifier(params: Any, path: str, info: dict[str, Any]) -> None:
  """Writes the weights, their fingerprint and `info` (e.g. test_accuracy, seed, epochs)
  as .npz (local or gs://), atomically."""
  arrays: dict[str, Any] = dict(npz_files.flatten(params))
  arrays["fingerprint"] = np.asarray(fingerprint(params))
  arrays.update({f"info_{k}": np.asarray(v) for k, v in info.items()})
  npz_files.save_npz(path, arrays)


def load_classifier(path: str) -> tuple[Any, dict[str, Any]]:
  """(params, info) of a file `save_classifier` wrote; ClassifierError if it is missing,
  damaged (its weights no longer match the stored fingerprint) or of another network."""
  fix = f"Delete it and call fd_fmnist.load_or_train({path!r}) to train a new one."
  if not epath.Path(path).expanduser().exists():
    raise ClassifierError(
      f"no {NAME} classifier at {path}. Train one with fd_fmnist.load_or_train({path!r}) "
      "(under a minute on a CPU)."
    )
  try:
    flat = npz_files.read_npz(path)
  except (OSError, ValueError) as e:
    raise ClassifierError(f"{path} is not a readable {NAME} classifier file ({e}). {fix}") from e
  shapes = expected_shapes()
  for key, shape in shapes.items():
    if key not in flat or tuple(flat[key].shape) != shape:
      got = "missing" if key not in flat else f"of shape {tuple(flat[key].shape)}"
      raise ClassifierError(
        f"{path}: {key!r} is {got}, expected shape {shape}: not an {NAME} classifier file of "
        f"this version. {fix}"
      )
  params = npz_files.unflatten({k: flat[k] for k in shapes})
  stored = str(flat.get("fingerprint", ""))
  if stored != fingerprint(params):
    raise ClassifierError(
      f"{path}: its weights do not match the fingerprint stored with them ({stored or 'none'}):"
      f" the file is damaged. {fix}"
    )
  info = {k[len("info_") :]: v.tolist() for k, v in flat.items() if k.startswith("info_")}
  info["fingerprint"] = stored
  return params, info


def load_or_train(
  path: str = DEFAULT_PATH,
  *,
  data_dir: str = DEFAULT_DATA_DIR,
  seed: int = 0,
  epochs: int = DEFAULT_EPOCHS,
) -> tuple[Any, dict[str, Any]]:
  """The classifier at `path`; where there is no file, one trained on the train split of
  `data_dir` (and its test accuracy measured), written there first."""
  if epath.Path(path).expanduser().exists():
    return load_classifier(path)
  train_images, train_labels = idx.load_idx_split(data_dir, "train")
  logging.info("%s: training the classifier (%d epochs) into %s", NAME, epochs, path)
  params = train_classifier(train_images, train_labels, seed=seed, epochs=epochs)
  test_images, test_labels = idx.load_idx_split(data_dir, "test")
  acc = accuracy(FMNISTFeatures(params), test_images, test_labels)
  logging.info("%s classifier: test accuracy %.4f", NAME, acc)
  info = dict(test_accuracy=acc, seed=seed, epochs=epochs, data_dir=data_dir)
  save_classifier(params, path, info)
  return load_classifier(path)
