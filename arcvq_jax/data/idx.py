"""Readers for IDX files, the format of MNIST, Fashion-MNIST, KMNIST and EMNIST.

An IDX file is a big-endian header followed by the raw array:

    bytes 0-1   zero
    byte  2     dtype code (0x08 uint8, 0x09 int8, 0x0B int16, 0x0C int32,
                0x0D float32, 0x0E float64)
    byte  3     number of dimensions d
    4*d bytes   the dimensions, each a big-endian uint32
    ...         prod(dims) items of that dtype, big-endian, row-major

Files may be gzip-compressed (`*.gz`), as they are distributed.
"""

from __future__ import annotations

import gzip
import os
import struct
import zlib

import numpy as np


class DataError(ValueError):
  """Missing, malformed or misconfigured data; the message says how to fix it.

  Defined here, in the package's lowest module, so that every source can raise
  it without import cycles; `arcvq_jax.data.pipeline.DataError` is this class.
  """


# IDX dtype code -> big-endian numpy dtype.
_IDX_DTYPES: dict[int, np.dtype] = {
  0x08: np.dtype(np.uint8),
  0x09: np.dtype(np.int8),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}

# Split name -> file name prefix of the four MNIST-style files.
_SPLIT_PREFIX = {"train": "train", "test": "t10k"}

INSTALL_HINT = (
  "On Debian/Ubuntu: apt-get install dataset-fashion-mnist (files land in "
  "/usr/share/datasets/fashion-mnist), or download the four IDX files of "
  "MNIST (https://yann.lecun.com/exdb/mnist/ or a mirror) or Fashion-MNIST "
  "(https://github.com/zalandoresearch/fashion-mnist), and set "
  "--config.data.path=DIR (gzipped or not)."
)


def _read_bytes(path: str) -> bytes:
  """Returns the (decompressed) content of `path`, DataError when unreadable."""
  try:
    if path.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        return f.read()
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError as e:
    raise DataError(f"IDX file {path!r} does not exist. {INSTALL_HINT}") from e
  except (OSError, EOFError, zlib.error) as e:
    # gzip raises EOFError on a truncated archive, BadGzipFile (an OSError) on
    # a file that is not gzip at all.
    raise DataError(
      f"IDX file {path!r} could not be read ({type(e).__name__}: {e}); it is "
      "probably truncated or not gzip despite its name. Download it again. "
      f"{INSTALL_HINT}"
    ) from e


def _parse_header(data: bytes, path: str) -> tuple[np.dtype, tuple[int, ...], int]:
  """Parses an IDX header.

  Args:
    data: the file content (at least the header).
    path: the file name, for error messages.

  Returns:
    (dtype, shape, offset of the first data byte).
  """
  if len(data) < 4:
    raise DataError(
      f"IDX file {path!r} is {len(data)} bytes long, shorter than the 4-byte "
      f"IDX magic number: it is truncated or not an IDX file. {INSTALL_HINT}"
    )
  zero, code, ndim = struct.unpack(">HBB", data[:4])
  if zero != 0 or code not in _IDX_DTYPES or ndim == 0:
    raise DataError(
      f"IDX file {path!r} has a malformed header (magic bytes "
      f"{data[:4].hex()}; expected 0000, a dtype code in "
      f"{[hex(c) for c in _IDX_DTYPES]} and >= 1 dimensions): it is not an "
      f"IDX file (a gzip file without the .gz suffix?). {INSTALL_HINT}"
    )
  offset = 4 + 4 * ndim
  if len(data) < offset:
    raise DataError(
      f"IDX file {path!r} is truncated inside its header ({len(data)} bytes, "
      f"header needs {offset}). Download it again. {INSTALL_HINT}"
    )
  shape = struct.unpack(f">{ndim}I", data[4:offset])
  return _IDX_DTYPES[code], tuple(int(d) for d in shape), offset


def read_idx_header(path: str) -> tuple[np.dtype, tuple[int, ...]]:
  """Reads only the header of an IDX file (cheap: no full decompression).

  Args:
    path: an IDX file, optionally `.gz`.

  Returns:
    (dtype, shape) of the stored array.
  """
  try:
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
      head = f.read(4)
      if len(head) == 4:
        head += f.read(4 * head[3])
  except FileNotFoundError as e:
    raise DataError(f"IDX file {path!r} does not exist. {INSTALL_HINT}") from e
  except (OSError, EOFError, zlib.error) as e:
    raise DataError(
      f"IDX file {path!r} could not be read ({type(e).__name__}: {e}). "
      f"Download it again. {INSTALL_HINT}"
    ) from e
  dtype, shape, _ = _parse_header(head, path)
  return dtype, shape


def _size_error(path: str, got: int, expected: int, shape: tuple[int, ...], dtype) -> DataError:
  """The error of a file whose data bytes (`got`) differ from what its header needs."""
  return DataError(
    f"IDX file {path!r} holds {got} data bytes but its "
    f"header {shape} of {dtype} needs {expected}: the file is "
    f"{'truncated' if got < expected else 'corrupt'}. "
    f"Download it again. {INSTALL_HINT}"
  )


def check_idx_file(path: str, chunk_bytes: int = 1 << 20) -> tuple[np.dtype, tuple[int, ...]]:
  """Checks a whole IDX file without keeping it in memory: a gzip file is decompressed to
  its end (the stream complete, its CRC and length as gzip's trailer says), and the data
  bytes must be exactly what the header's shape and dtype need. A plain file's size is
  compared with the header, nothing more read. ~0.2 s for Fashion-MNIST's 30 MB of gzip.

  Returns:
    (dtype, shape) of the stored array.

  Raises:
    DataError: the file is missing, truncated, too long, not gzip or not IDX.
  """
  dtype, shape = read_idx_header(path)
  offset = 4 + 4 * len(shape)
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if not path.endswith(".gz"):
    got = os.path.getsize(path) - offset
  else:
    got = -offset
    try:
      with gzip.open(path, "rb") as f:
        while chunk := f.read(chunk_bytes):
          got += len(chunk)
    except (OSError, EOFError, zlib.error) as e:
      raise DataError(
        f"IDX file {path!r} could not be read ({type(e).__name__}: {e}); it is "
        "probably truncated or not gzip despite its name. Download it again. "
        f"{INSTALL_HINT}"
      ) from e
  if got != expected:
    raise _size_error(path, got, expected, shape, dtype)
  return dtype, shape


def read_idx(path: str) -> np.ndarray:
  """Reads a whole IDX file.

  Args:
    path: an IDX file, optionally gzip-compressed (`.gz` suffix).

  Returns:
    The array with the header's shape, in native byte order (uint8 for the
    MNIST family).

  Raises:
    DataError: the file is missing, truncated, too long or not IDX.
  """
  data = _read_bytes(path)
  dtype, shape, offset = _parse_header(data, path)
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(data) - offset != expected:
    raise _size_error(path, len(data) - offset, expected, shape, dtype)
  array = np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)
  return array.astype(dtype.newbyteorder("="), copy=False)


def idx_split_files(directory: str, split: str) -> tuple[str, str]:
  """Finds the image and label files of a split.

  Args:
    directory: folder with the IDX files.
    split: 'train' or 'test'.

  Returns:
    (images path, labels path), each with or without `.gz`.
  """
  if split not in _SPLIT_PREFIX:
    raise DataError(
      f"IDX data has the splits {sorted(_SPLIT_PREFIX)}, not {split!r}. Set "
      "config.data.train_split='train' and config.data.eval_split='test'."
    )
  if not directory or not os.path.isdir(directory):
    raise DataError(
      f"IDX data directory {directory!r} (config.data.path) does not exist. {INSTALL_HINT}"
    )
  prefix = _SPLIT_PREFIX[split]
  found = []
  for kind, ndim in (("images", 3), ("labels", 1)):
    # Some MNIST mirrors write 'train-images.idx3-ubyte'.
    names = [f"{prefix}-{kind}{sep}idx{ndim}-ubyte{gz}" for sep in ("-", ".") for gz in ("", ".gz")]
    paths = [os.path.join(directory, n) for n in names]
    existing = [p for p in paths if os.path.isfile(p)]
    if not existing:
      raise DataError(
        f"IDX data directory {directory!r} (config.data.path) has no "
        f"{names[0]} (nor {names[1]}, {names[2]}, ...). {INSTALL_HINT}"
      )
    found.append(existing[0])
  return found[0], found[1]


def load_idx_split(directory: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """Loads one split of an MNIST-style IDX folder into memory.

  Args:
    directory: folder holding train-images-idx3-ubyte, train-labels-idx1-ubyte,
      t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte (each may be `.gz`).
    split: 'train' or 'test' (read from the t10k-* files).

  Returns:
    images: (N, H, W, 1) uint8.
    labels: (N,) int64.
  """
  images_path, labels_path = idx_split_files(directory, split)
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.ndim != 3 or images.dtype != np.uint8:
    raise DataError(
      f"IDX file {images_path!r} holds a {images.dtype} array of shape "
      f"{images.shape}; expected uint8 (N, H, W) images. Check that "
      "config.data.path points at MNIST-style image files."
    )
  if labels.ndim != 1 or len(labels) != len(images):
    raise DataError(
      f"IDX label file {labels_path!r} has shape {labels.shape} but "
      f"{images_path!r} holds {len(images)} images; the two files belong to "
      "different data sets or one is corrupt. Download them again."
    )
  return images[..., None], labels.astype(np.int64)


def idx_split_info(
  directory: str, split: str, whole: bool = False
) -> tuple[int, tuple[int, int, int]]:
  """Returns (number of images, (H, W, 1)) of a split from the headers only, or with
  `whole` after checking both files to their end (`check_idx_file`)."""
  images_path, labels_path = idx_split_files(directory, split)
  check = check_idx_file if whole else read_idx_header
  _, shape = check(images_path)
  _, label_shape = check(labels_path)
  if len(shape) != 3 or label_shape != shape[:1]:
    raise DataError(
      f"IDX files {images_path!r} {shape} and {labels_path!r} {label_shape} "
      "do not form an (N, H, W) image set with N labels. Check "
      "config.data.path."
    )
  return shape[0], (shape[1], shape[2], 1)
