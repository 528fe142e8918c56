"""The data package against raw bytes, numpy and scikit-image.

Needs Debian's dataset-fashion-mnist files in /usr/share/datasets/fashion-mnist
(apt-get install dataset-fashion-mnist); the tests skip without them.
"""

import gzip
import hashlib
import itertools
import json
import os
import struct

import data_fixtures as fx
import numpy as np
import pytest
from PIL import Image

from arcvq_jax.data import folder as folder_lib
from arcvq_jax.data import idx as idx_lib
from arcvq_jax.data import pipeline
from arcvq_jax.data.pipeline import DataError

needs_fashion_mnist = pytest.mark.skipif(
  not os.path.exists(f"{fx.FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz"),
  reason="apt-get install dataset-fashion-mnist",
)

NUM_SMALL_TRAIN, NUM_SMALL_TEST = 512, 256


@pytest.fixture(scope="module")
def small_idx(tmp_path_factory):
  """A 512 / 256 image Fashion-MNIST IDX folder: (directory, raw arrays)."""
  if not os.path.exists(f"{fx.FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz"):
    pytest.skip("apt-get install dataset-fashion-mnist")
  directory = str(tmp_path_factory.mktemp("small_idx"))
  return directory, fx.write_small_idx_dir(directory, NUM_SMALL_TRAIN, NUM_SMALL_TEST)


def _index_of_images(raw_images: np.ndarray) -> dict[bytes, int]:
  table = {image.tobytes(): i for i, image in enumerate(raw_images)}
  assert len(table) == len(raw_images), "fixture images must be distinct"
  return table


def _batch_indices(batch: dict, table: dict[bytes, int]) -> list[int]:
  """Recovers the raw index of every image in a pipeline batch."""
  return [table[c] for c in fx.checksums(fx.to_uint8(batch["image"])[..., 0])]


# ----------------------------------------------------------------------------
# IDX.


@pytest.mark.parametrize("suffix", ["", ".gz"])
def test_read_idx_handwritten(tmp_path, suffix):
  ints = np.arange(-3, 3, dtype=np.int16).reshape(3, 2) * 1000
  # Header bytes spelled out by hand: 0x0000, int16 code 0x0B, 2 dims, 3, 2.
  data = bytes([0, 0, 0x0B, 2, 0, 0, 0, 3, 0, 0, 0, 2]) + struct.pack(">6h", *ints.ravel())
  path = str(tmp_path / f"ints-idx2{suffix}")
  with (gzip.open if suffix else open)(path, "wb") as f:
    f.write(data)
  out = idx_lib.read_idx(path)
  np.testing.assert_array_equal(out, ints)
  assert out.dtype.isnative

  pixels = np.array([[[0, 255], [7, 128]]], np.uint8)
  path = fx.write_idx(str(tmp_path / f"px-idx3{suffix}"), pixels)
  np.testing.assert_array_equal(idx_lib.read_idx(path), pixels)
  assert idx_lib.read_idx_header(path) == (np.dtype(np.uint8), (1, 2, 2))


@needs_fashion_mnist
def test_read_idx_fashion_mnist():
  path = f"{fx.FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz"
  images = idx_lib.read_idx(path)
  assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
  with gzip.open(path, "rb") as f:
    raw = f.read()
  assert (
    hashlib.sha256(images[0].tobytes()).hexdigest()
    == hashlib.sha256(raw[16 : 16 + 784]).hexdigest()
  )
  assert hashlib.sha256(images[-1].tobytes()).hexdigest() == hashlib.sha256(raw[-784:]).hexdigest()

  train_x, train_y = idx_lib.load_idx_split(fx.FASHION_MNIST_DIR, "train")
  assert train_x.shape == (60000, 28, 28, 1) and train_y.dtype == np.int64
  assert set(np.unique(train_y)) == set(range(10))
  np.testing.assert_array_equal(
    train_y, fx.raw_idx_labels(f"{fx.FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz")
  )
  test_x, test_y = idx_lib.load_idx_split(fx.FASHION_MNIST_DIR, "test")
  assert test_x.shape == (10000, 28, 28, 1) and test_y.shape == (10000,)


def test_read_idx_malformed(tmp_path):
  bad_magic = tmp_path / "bad-magic-idx3-ubyte"
  bad_magic.write_bytes(b"\x1f\x8b\x08\x00" + bytes(20))
  with pytest.raises(DataError, match="malformed header") as e:
    idx_lib.read_idx(str(bad_magic))
  assert "bad-magic-idx3-ubyte" in str(e.value)

  truncated = tmp_path / "short-idx3-ubyte"
  truncated.write_bytes(fx.idx_bytes(np.zeros((4, 28, 28), np.uint8))[:-100])
  with pytest.raises(DataError, match="truncated") as e:
    idx_lib.read_idx(str(truncated))
  assert "short-idx3-ubyte" in str(e.value)

  cut_gz = tmp_path / "cut-idx3-ubyte.gz"
  full = gzip.compress(fx.idx_bytes(np.arange(5000, dtype=np.uint8).reshape(5, 1000)))
  cut_gz.write_bytes(full[: len(full) // 2])
  with pytest.raises(DataError, match=r"cut-idx3-ubyte\.gz"):
    idx_lib.read_idx(str(cut_gz))

  with pytest.raises(DataError, match="truncated inside its header"):
    (tmp_path / "hdr-idx3").write_bytes(bytes([0, 0, 8, 3, 0, 0]))
    idx_lib.read_idx(str(tmp_path / "hdr-idx3"))


def test_load_idx_missing(tmp_path):
  with pytest.raises(DataError) as e:
    idx_lib.load_idx_split(str(tmp_path / "nowhere"), "train")
  message = str(e.value)
  assert "nowhere" in message and "config.data.path" in message
  assert "apt-get install dataset-fashion-mnist" in message
  assert "/usr/share/datasets/fashion-mnist" in message

  fx.write_idx(str(tmp_path / "train-images-idx3-ubyte"), np.zeros((2, 3, 3), np.uint8))
  with pytest.raises(DataError, match="train-labels-idx1-ubyte"):
    idx_lib.load_idx_split(str(tmp_path), "train")
  fx.write_idx(str(tmp_path / "train-labels-idx1-ubyte"), np.zeros((3,), np.uint8))
  with pytest.raises(DataError, match="different data sets"):
    idx_lib.load_idx_split(str(tmp_path), "train")
  with pytest.raises(DataError, match="eval_split"):
    idx_lib.load_idx_split(str(tmp_path), "validation")


# ----------------------------------------------------------------------------
# Train iterator (IDX source).


def test_dataset_info_idx(small_idx):
  directory, _ = small_idx
  assert pipeline.dataset_info(fx.data_config(path=directory)) == {
    "image_shape": (28, 28, 1),
    "num_train": NUM_SMALL_TRAIN,
    "num_eval": NUM_SMALL_TEST,
  }
  with pytest.raises(DataError, match=r"config\.data\.image_size"):
    pipeline.dataset_info(fx.data_config(path=directory, image_size=32))
  with pytest.raises(DataError, match=r"config\.data\.source"):
    pipeline.dataset_info(fx.data_config(source="csv"))


@needs_fashion_mnist
def test_train_iterator_fashion_mnist_batch():
  it = pipeline.create_train_iterator(
    fx.data_config(), global_batch_size=1024, seed=0, process_index=0, process_count=1
  )
  batch = next(it)
  assert batch["image"].shape == (1024, 28, 28, 1) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (1024,) and batch["label"].dtype == np.int32
  assert batch["image"].min() == -1.0 and batch["image"].max() == 1.0
  # Every image is a training image with its own label.
  raw = fx.raw_idx_images(f"{fx.FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz")
  labels = fx.raw_idx_labels(f"{fx.FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz")
  # Fashion-MNIST has a few duplicate images; any index of the same bytes is fine.
  lookup = {raw[i].tobytes(): i for i in range(len(raw))}
  found = [lookup[image.tobytes()] for image in fx.to_uint8(batch["image"][..., 0])]
  assert np.mean(labels[found] == batch["label"]) > 0.99  # Duplicates may differ in label.
  # x / 127.5 - 1 exactly (float32).
  i = lookup[fx.to_uint8(batch["image"][0, ..., 0]).tobytes()]
  np.testing.assert_array_equal(
    batch["image"][0, ..., 0], raw[i].astype(np.float32) / np.float32(127.5) - np.float32(1)
  )


def _epoch_indices(it, steps: int, table) -> list[list[int]]:
  return [_batch_indices(next(it), table) for _ in range(steps)]


def test_train_shards_are_disjoint_and_cover_an_epoch(small_idx):
  directory, raw = small_idx
  table = _index_of_images(raw["train_images"])
  cfg = fx.data_config(path=directory)
  global_batch = 96  # 512 = 5 * 96 + 32: five steps, 32 images dropped per epoch.
  iterators = [
    pipeline.create_train_iterator(
      cfg, global_batch_size=global_batch, seed=3, process_index=p, process_count=2
    )
    for p in range(2)
  ]
  epochs = []
  for _ in range(2):
    shards = [_epoch_indices(it, 5, table) for it in iterators]
    for shard in shards:
      assert all(len(b) == 48 for b in shard)
    flat = [set(itertools.chain.from_iterable(shard)) for shard in shards]
    assert len(flat[0]) == len(flat[1]) == 240
    assert not flat[0] & flat[1]
    epochs.append(list(itertools.chain(*shards[0], *shards[1])))
    assert len(set(epochs[-1])) == 5 * global_batch
  assert epochs[0] != epochs[1]


def test_train_single_process_epoch_and_labels(small_idx):
  directory, raw = small_idx
  table = _index_of_images(raw["train_images"])
  it = pipeline.create_train_iterator(
    fx.data_config(path=directory), global_batch_size=128, seed=0, process_index=0, process_count=1
  )
  seen = []
  for _ in range(4):  # 512 / 128: the epoch covers every image.
    batch = next(it)
    indices = _batch_indices(batch, table)
    np.testing.assert_array_equal(batch["label"], raw["train_labels"][indices])
    seen += indices
  assert sorted(seen) == list(range(NUM_SMALL_TRAIN))
  assert seen != sorted(seen)


def test_train_determinism_and_seed(small_idx):
  directory, _ = small_idx
  cfg = fx.data_config(path=directory)
  make = lambda seed: pipeline.create_train_iterator(
    cfg, global_batch_size=64, seed=seed, process_index=0, process_count=1
  )
  a, b, c = make(7), make(7), make(8)
  for _ in range(3):
    x, y, z = next(a), next(b), next(c)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(x["image"], z["image"])


def test_train_checkpoint_resume(small_idx):
  directory, _ = small_idx
  cfg = fx.data_config(path=directory)
  kwargs = dict(global_batch_size=96, seed=11, process_index=1, process_count=2)
  it = pipeline.create_train_iterator(cfg, **kwargs)
  for _ in range(4):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  expected = [next(it) for _ in range(4)]  # Crosses the epoch boundary at 5.
  resumed = pipeline.create_train_iterator(cfg, **kwargs)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])


@pytest.mark.slow
def test_train_worker_processes_match_in_process(small_idx):
  directory, _ = small_idx
  kwargs = dict(global_batch_size=64, seed=5, process_index=0, process_count=1)
  reference = pipeline.create_train_iterator(fx.data_config(path=directory), **kwargs)
  expected = [next(reference) for _ in range(6)]
  it = pipeline.create_train_iterator(fx.data_config(path=directory, num_workers=1), **kwargs)
  try:
    for want in expected[:3]:
      np.testing.assert_array_equal(next(it)["image"], want["image"])
    state = json.loads(json.dumps(it.get_state()))
  finally:
    it.close()
  resumed = pipeline.create_train_iterator(fx.data_config(path=directory, num_workers=1), **kwargs)
  try:
    resumed.set_state(state)
    for want in expected[3:]:
      np.testing.assert_array_equal(next(resumed)["label"], want["label"])
  finally:
    resumed.close()


def test_train_iterator_config_errors(small_idx):
  directory, _ = small_idx
  cfg = fx.data_config(path=directory)
  with pytest.raises(DataError, match="multiple of the number of processes"):
    pipeline.create_train_iterator(
      cfg, global_batch_size=99, seed=0, process_index=0, process_count=2
    )
  with pytest.raises(DataError, match="fewer than one global batch"):
    pipeline.create_train_iterator(
      cfg, global_batch_size=1024, seed=0, process_index=0, process_count=1
    )


# ----------------------------------------------------------------------------
# Eval iterator and variance.


def test_eval_iterator_covers_each_image_once(small_idx):
  directory, raw = small_idx
  cfg = fx.data_config(path=directory)
  per_process = [
    list(pipeline.create_eval_iterator(cfg, global_batch_size=96, process_index=p, process_count=2))
    for p in range(2)
  ]
  assert len(per_process[0]) == len(per_process[1]) == 3  # ceil(256 / 96)
  images, labels, masks = [], [], []
  for step in range(3):  # Global batch = process 0's rows, then process 1's.
    for p in range(2):
      batch = per_process[p][step]
      assert batch["image"].shape == (48, 28, 28, 1) and batch["mask"].dtype == bool
      images.append(batch["image"])
      labels.append(batch["label"])
      masks.append(batch["mask"])
  mask = np.concatenate(masks)
  assert mask.sum() == NUM_SMALL_TEST
  np.testing.assert_array_equal(np.concatenate(labels)[mask], raw["test_labels"])
  np.testing.assert_array_equal(
    fx.to_uint8(np.concatenate(images)[mask])[..., 0], raw["test_images"]
  )
  assert np.all(np.concatenate(images)[~mask] == 0)


@needs_fashion_mnist
def test_eval_iterator_fashion_mnist():
  batches = list(
    pipeline.create_eval_iterator(
      fx.data_config(), global_batch_size=1024, process_index=0, process_count=1
    )
  )
  assert len(batches) == 10
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])[mask]
  assert mask.sum() == 10000
  np.testing.assert_array_equal(
    labels, fx.raw_idx_labels(f"{fx.FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz")
  )


@needs_fashion_mnist
def test_train_image_variance():
  raw = fx.raw_idx_images(f"{fx.FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz")
  expected = np.var(raw.astype(np.float64) / 127.5 - 1.0)
  got = pipeline.train_image_variance(fx.data_config())
  assert isinstance(got, float)
  np.testing.assert_allclose(got, expected, rtol=1e-9)


# ----------------------------------------------------------------------------
# Image folder.


@pytest.fixture(scope="module")
def photo_folder(tmp_path_factory):
  """root/{train,test}/{animals,people,things}/ with scikit-image photos."""
  skimage_data = pytest.importorskip("skimage.data")
  root = tmp_path_factory.mktemp("photos")
  photos = {
    "train/animals/chelsea.jpg": skimage_data.chelsea(),
    "train/people/astronaut.png": skimage_data.astronaut(),
    "train/people/sub/camera.png": skimage_data.camera(),  # grayscale, nested
    "train/things/coffee.png": skimage_data.coffee(),
    "train/things/rocket.jpg": skimage_data.rocket(),
    "test/people/astronaut.jpg": skimage_data.astronaut(),
    "test/things/coffee.jpg": skimage_data.coffee(),
  }
  for name, pixels in photos.items():
    path = root / name
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels).save(path, quality=95)
  (root / "train" / "things" / "notes.txt").write_text("not an image")
  return str(root), photos


def _reference_resize_crop(pixels: np.ndarray, size: int) -> np.ndarray:
  """Centre square crop then an antialiased skimage resize, in [0, 255]."""
  from skimage import transform  # noqa: PLC0415 (optional: the photos fixture importorskips it)

  if pixels.ndim == 2:
    pixels = np.stack([pixels] * 3, axis=-1)
  h, w = pixels.shape[:2]
  side = min(h, w)
  top, left = (h - side) // 2, (w - side) // 2
  square = pixels[top : top + side, left : left + side]
  return transform.resize(square, (size, size), anti_aliasing=True, order=3) * 255


def test_image_folder_source(photo_folder):
  root, photos = photo_folder
  cfg = fx.data_config(source="folder", path=root, image_size=64)
  assert pipeline.dataset_info(cfg) == {"image_shape": (64, 64, 3), "num_train": 5, "num_eval": 2}

  source = folder_lib.ImageFolderSource(root, "train", 64)
  assert source.class_names == ["animals", "people", "things"]
  names = [os.path.relpath(p, root) for p in source.paths]
  expected_labels = {"animals": 0, "people": 1, "things": 2}
  assert sorted(names) == sorted(n for n in photos if n.startswith("train/"))
  for name, label in zip(names, source.labels, strict=True):
    assert label == expected_labels[name.split("/")[1]]
  for name in names:
    image = source[names.index(name)]["image"]
    assert image.shape == (64, 64, 3) and image.dtype == np.uint8
    error = np.abs(image.astype(np.float64) - _reference_resize_crop(photos[name], 64))
    assert error.mean() < 6, (name, error.mean())  # Resampling kernels differ slightly.

  batches = list(
    pipeline.create_eval_iterator(cfg, global_batch_size=4, process_index=0, process_count=1)
  )
  assert len(batches) == 1 and batches[0]["mask"].tolist() == [True, True, False, False]
  assert batches[0]["label"][:2].tolist() == [1, 2]  # test/people, test/things
  batch = next(
    pipeline.create_train_iterator(
      cfg, global_batch_size=4, seed=0, process_index=0, process_count=1
    )
  )
  assert batch["image"].shape == (4, 64, 64, 3) and batch["image"].dtype == np.float32
  assert batch["image"].min() >= -1 and batch["image"].max() <= 1
  assert set(batch["label"].tolist()) <= {0, 1, 2}


def test_image_folder_crop_fractions(photo_folder):
  root, _ = photo_folder
  source = folder_lib.ImageFolderSource(root, "train", 64)
  index = [os.path.basename(p) for p in source.paths].index("rocket.jpg")  # 427 x 640
  with Image.open(source.paths[index]) as pil:
    # Shorter side 427 -> 64, longer 640 * 64 / 427 = 95.9 -> 96 (written out here).
    resized = np.asarray(pil.convert("RGB").resize((96, 64), Image.Resampling.BICUBIC))
  images, _ = source.read(
    [index] * 4, crop_fractions=np.array([[0.0, 0.0], [0.99, 0.99], [0.5, 0.25], [0.3, 0.999999]])
  )
  np.testing.assert_array_equal(images[0], resized[:, :64])
  np.testing.assert_array_equal(images[1], resized[:, 32:])  # Slack 32: offset floor(.99 * 33).
  np.testing.assert_array_equal(images[2], resized[:, 8:72])  # floor(.25 * 33) = 8.
  np.testing.assert_array_equal(images[3], resized[:, 32:])
  centre, _ = source.read([index])
  np.testing.assert_array_equal(centre[0], resized[:, 16:80])


def test_image_folder_native_size_and_flat(tmp_path):
  pixels = np.random.default_rng(0).integers(0, 256, (3, 20, 30, 3), dtype=np.uint8)
  for i, p in enumerate(pixels):
    Image.fromarray(p).save(tmp_path / f"{i}.png")
  source = folder_lib.ImageFolderSource(str(tmp_path), "train", None)
  assert source.image_shape == (20, 30, 3) and source.class_names == []
  images, labels = source.read([2, 0])
  np.testing.assert_array_equal(images, pixels[[2, 0]])
  assert labels.tolist() == [0, 0]
  Image.fromarray(pixels[0, :10]).save(tmp_path / "9.png")
  with pytest.raises(DataError, match=r"config\.data\.image_size"):
    folder_lib.ImageFolderSource(str(tmp_path), "train", None).read([3])


def test_image_folder_errors(tmp_path, photo_folder):
  empty = tmp_path / "empty"
  (empty / "train" / "cats").mkdir(parents=True)
  with pytest.raises(DataError, match="holds no images") as e:
    pipeline.create_train_iterator(
      fx.data_config(source="folder", path=str(empty)),
      global_batch_size=2,
      seed=0,
      process_index=0,
      process_count=1,
    )
  assert str(empty / "train") in str(e.value)

  root, _ = photo_folder
  with pytest.raises(DataError, match="no 'validation'"):
    folder_lib.ImageFolderSource(root, "validation", 32)
  with pytest.raises(DataError, match="does not exist"):
    folder_lib.ImageFolderSource(str(tmp_path / "missing"), "train", 32)

  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "bad.jpg").write_bytes(b"not a jpeg at all")
  with pytest.raises(DataError, match=r"bad\.jpg"):
    folder_lib.ImageFolderSource(str(broken), "train", 32).read([0])


# ----------------------------------------------------------------------------
# TFDS.


@pytest.fixture(scope="module")
def tfds_idx_images(small_idx, tmp_path_factory):
  """`idx_images` prepared as ArrayRecord from the small IDX folder."""
  pytest.importorskip("tensorflow_datasets")
  from arcvq_jax.data import idx_tfds  # noqa: PLC0415 (needs tensorflow_datasets: importorskip first)

  directory, raw = small_idx
  data_dir = str(tmp_path_factory.mktemp("tfds_array_record"))
  idx_tfds.prepare_idx_tfds(directory, data_dir)
  return data_dir, raw


def test_tfds_idx_images_matches_idx(tfds_idx_images):
  data_dir, raw = tfds_idx_images
  cfg = fx.data_config(source="tfds", name="idx_images", path=None, data_dir=data_dir)
  assert pipeline.dataset_info(cfg) == {
    "image_shape": (28, 28, 1),
    "num_train": NUM_SMALL_TRAIN,
    "num_eval": NUM_SMALL_TEST,
  }

  it = pipeline.create_train_iterator(
    cfg, global_batch_size=128, seed=0, process_index=0, process_count=1
  )
  batches = [next(it) for _ in range(4)]  # One whole epoch.
  images = np.concatenate([b["image"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  assert images.dtype == np.float32 and images.shape == (512, 28, 28, 1)
  got = sorted(zip(fx.checksums(fx.to_uint8(images)[..., 0]), labels.tolist(), strict=True))
  want = sorted(zip(fx.checksums(raw["train_images"]), raw["train_labels"].tolist(), strict=True))
  assert got == want

  state = json.loads(json.dumps(it.get_state()))
  expected = next(it)
  resumed = pipeline.create_train_iterator(
    cfg, global_batch_size=128, seed=0, process_index=0, process_count=1
  )
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["image"], expected["image"])

  evaluation = list(
    pipeline.create_eval_iterator(cfg, global_batch_size=100, process_index=0, process_count=1)
  )
  mask = np.concatenate([b["mask"] for b in evaluation])
  eval_images = np.concatenate([b["image"] for b in evaluation])[mask]
  assert mask.sum() == NUM_SMALL_TEST
  assert sorted(fx.checksums(fx.to_uint8(eval_images)[..., 0])) == sorted(
    fx.checksums(raw["test_images"])
  )
  np.testing.assert_allclose(
    pipeline.train_image_variance(cfg),
    np.var(raw["train_images"].astype(np.float64) / 127.5 - 1),
    rtol=1e-9,
  )


def test_tfds_idx_images_prepared_automatically(small_idx, tmp_path):
  directory, _raw = small_idx
  cfg = fx.data_config(source="tfds", name="idx_images", path=directory, data_dir=str(tmp_path))
  assert pipeline.dataset_info(cfg)["num_train"] == NUM_SMALL_TRAIN
  assert (tmp_path / "idx_images" / "1.0.0").is_dir()


def test_tfds_tfrecord_gives_conversion_error(small_idx, tmp_path):
  pytest.importorskip("tensorflow_datasets")
  from arcvq_jax.data import idx_tfds  # noqa: PLC0415 (needs tensorflow_datasets: importorskip first)

  directory, _ = small_idx
  idx_tfds.prepare_idx_tfds(directory, str(tmp_path), file_format="tfrecord")
  cfg = fx.data_config(source="tfds", name="idx_images", path=None, data_dir=str(tmp_path))
  with pytest.raises(DataError) as e:
    pipeline.create_train_iterator(
      cfg, global_batch_size=64, seed=0, process_index=0, process_count=1
    )
  message = str(e.value)
  assert "tfds convert_format" in message and "--out_file_format=array_record" in message
  assert f"--dataset_version_dir={tmp_path}/idx_images/1.0.0" in message
  assert 'file_format="array_record"' in message


def test_tfds_missing_dataset_gives_prepare_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  cfg = fx.data_config(source="tfds", name="mnist", path=None, data_dir=str(tmp_path))
  with pytest.raises(DataError) as e:
    pipeline.dataset_info(cfg)
  assert f"tfds build mnist --data_dir={tmp_path} --file_format=array_record" in str(e.value)

  cfg = fx.data_config(source="tfds", name="idx_images", path=None, data_dir=str(tmp_path))
  with pytest.raises(DataError) as e:
    pipeline.create_eval_iterator(cfg, global_batch_size=8, process_index=0, process_count=1)
  assert "--manual_dir=" in str(e.value) and "config.data.path" in str(e.value)

  cfg = fx.data_config(source="tfds", name="no_such_dataset_xyz", path=None, data_dir=str(tmp_path))
  with pytest.raises(DataError, match=r"config\.data\.name"):
    pipeline.dataset_info(cfg)
