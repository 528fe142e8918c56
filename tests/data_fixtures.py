"""Helpers for the data tests: write IDX files, build data configs."""

from __future__ import annotations

import gzip
import os
import struct

import ml_collections
import numpy as np

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"

_IDX_CODES = {
  np.dtype(np.uint8): 0x08,
  np.dtype(np.int8): 0x09,
  np.dtype(">i2"): 0x0B,
  np.dtype(">i4"): 0x0C,
  np.dtype(">f4"): 0x0D,
  np.dtype(">f8"): 0x0E,
}


def idx_bytes(array: np.ndarray) -> bytes:
  """Serialises `array` as IDX, written independently of arcvq_jax.data.idx."""
  big_endian = array.astype(array.dtype.newbyteorder(">"))
  code = _IDX_CODES[big_endian.dtype]
  header = struct.pack(">HBB", 0, code, array.ndim)
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + big_endian.tobytes()


def write_idx(path: str, array: np.ndarray) -> str:
  """Writes `array` as an IDX file, gzipped when `path` ends with .gz."""
  data = idx_bytes(array)
  if path.endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(data)
  else:
    with open(path, "wb") as f:
      f.write(data)
  return path


def raw_idx_images(path: str) -> np.ndarray:
  """(N, H, W) uint8 from an MNIST-style image file, parsed by fixed offsets."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  n, h, w = struct.unpack(">III", data[4:16])
  return np.frombuffer(data, np.uint8, offset=16).reshape(n, h, w)


def raw_idx_labels(path: str) -> np.ndarray:
  """(N,) uint8 labels from an MNIST-style label file."""
  with gzip.open(path, "rb") as f:
    data = f.read()
  return np.frombuffer(data, np.uint8, offset=8)


def write_small_idx_dir(directory: str, num_train: int, num_test: int) -> dict[str, np.ndarray]:
  """Writes the first Fashion-MNIST images as a small IDX folder.

  The train files are gzipped and the test files are not, so both code paths
  are exercised.

  Returns:
    {'train_images': (num_train, 28, 28), 'train_labels', 'test_images',
    'test_labels'} as written.
  """
  os.makedirs(directory, exist_ok=True)
  arrays = {
    "train_images": raw_idx_images(f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz")[:num_train],
    "train_labels": raw_idx_labels(f"{FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz")[:num_train],
    "test_images": raw_idx_images(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz")[:num_test],
    "test_labels": raw_idx_labels(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz")[:num_test],
  }
  write_idx(os.path.join(directory, "train-images-idx3-ubyte.gz"), arrays["train_images"])
  write_idx(os.path.join(directory, "train-labels-idx1-ubyte.gz"), arrays["train_labels"])
  write_idx(os.path.join(directory, "t10k-images-idx3-ubyte"), arrays["test_images"])
  write_idx(os.path.join(directory, "t10k-labels-idx1-ubyte"), arrays["test_labels"])
  return arrays


def data_config(**overrides) -> ml_collections.ConfigDict:
  """A config.data with every field the pipeline reads."""
  cfg = dict(
    source="idx",
    path=FASHION_MNIST_DIR,
    name=None,
    data_dir=None,
    train_split="train",
    eval_split="test",
    image_size=None,
    num_workers=0,
  )
  cfg.update(overrides)
  return ml_collections.ConfigDict(cfg)


def to_uint8(images: np.ndarray) -> np.ndarray:
  """Inverts x / 127.5 - 1 exactly for float32 batches from the pipeline."""
  return np.round((images + 1.0) * 127.5).astype(np.uint8)


def checksums(images: np.ndarray) -> list[bytes]:
  """One byte string per image, for order-independent comparisons."""
  return [image.tobytes() for image in np.ascontiguousarray(images)]
