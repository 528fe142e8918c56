"""A random-access source over a folder of image files.

Layout (`root` is config.data.path):

    root/<split>/<class>/**/*.jpg     if root/<split> exists (split layout)
    root/<class>/**/*.jpg             otherwise: every split reads all of root
    root/*.jpg                        flat folder: every label is 0

Images are found recursively. The label is the index of the image's first-level
folder name among the sorted class names; with a split layout the class names
are the union over all split folders, so that a class missing from one split
does not shift the labels of the others. If `root/<split>` is missing but root
has other split folders (train, test, val, validation), that is an error rather
than silently mixing the splits.

Every image is decoded with PIL and converted to RGB (so grayscale and RGBA
files mix), then, when `image_size` is set, resized so that its shorter side is
`image_size` (bicubic, antialiased) and cropped to a square: centrally, or at
the offsets the train pipeline draws for random crops (`crop_square`). The
TFDS source decodes and resizes its images with the same functions.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from arcvq_jax.data.idx import DataError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_SPLIT_NAMES = ("train", "test", "val", "validation")


def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
  """Resizes a PIL image so that its shorter side is `size` (bicubic).

  Pillow's resize filters widen their support when downscaling, so big photos
  are antialiased rather than aliased.

  Args:
    image: a PIL image (W, H).
    size: the shorter side of the result.

  Returns:
    A PIL image whose shorter side is `size`; the input when it already is.
  """
  w, h = image.size
  short = min(w, h)
  if short == size:
    return image
  # The longer side scales by size / short, rounded half up in exact integer
  # arithmetic (no float ties); the shorter side is exactly `size`.
  new_w, new_h = ((w * size + short // 2) // short, (h * size + short // 2) // short)
  return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def crop_square(
  image: np.ndarray, size: int, fraction: tuple[float, float] | np.ndarray | None = None
) -> np.ndarray:
  """Crops a (size, size) window: central, or at a given relative offset.

  Args:
    image: (H, W, C) with H, W >= size.
    size: output side length.
    fraction: None for the central window, else (f_top, f_left) in [0, 1):
      the offset along each axis is floor(f * (slack + 1)), slack = H - size
      (or W - size), so uniform fractions give uniform offsets.

  Returns:
    (size, size, C), a view of `image`.
  """
  h, w = image.shape[:2]
  if fraction is None:
    top, left = (h - size) // 2, (w - size) // 2
  else:
    # min() guards f == 1.0 from rounding in callers.
    top = min(int(fraction[0] * (h - size + 1)), h - size)
    left = min(int(fraction[1] * (w - size + 1)), w - size)
  return image[top : top + size, left : left + size]


def _to_array(image: Image.Image) -> np.ndarray:
  """PIL image -> (H, W, C) uint8 (C = 1 for mode 'L')."""
  out = np.asarray(image)
  return out[..., None] if out.ndim == 2 else out


def resize_and_crop(
  image: np.ndarray, size: int, fraction: tuple[float, float] | np.ndarray | None = None
) -> np.ndarray:
  """Resizes the shorter side to `size`, then crops a square (see `crop_square`).

  Args:
    image: (H, W, C) uint8, C in {1, 3}.
    size: output side length.
    fraction: None for the central square, else (f_top, f_left) in [0, 1).

  Returns:
    (size, size, C) uint8.
  """
  if image.shape[:2] != (size, size):
    pil = Image.fromarray(image[..., 0] if image.shape[2] == 1 else image)
    image = _to_array(resize_shorter_side(pil, size))
  return crop_square(image, size, fraction)


def decode_image(
  file: str | io.BytesIO,
  image_size: int | None,
  *,
  channels: int = 3,
  fraction: tuple[float, float] | np.ndarray | None = None,
  name: str | None = None,
) -> np.ndarray:
  """Decodes one image file with PIL, resized and cropped when asked.

  Every image is converted to RGB (or L for channels=1) first, so grayscale,
  CMYK, palette and RGBA files mix.

  Args:
    file: a path, or a file object over the encoded bytes.
    image_size: output side, or None to keep the stored size.
    channels: 3 (RGB) or 1 (grayscale).
    fraction: where to crop after resizing (see `crop_square`); None = centre.
    name: what to call the image in errors (default: `file`).

  Returns:
    (H, W, channels) uint8; (image_size, image_size, channels) when
    image_size is set.
  """
  try:
    with Image.open(file) as pil:
      pil = pil.convert("L" if channels == 1 else "RGB")
      if image_size is not None:
        # Resizing the PIL image directly saves a copy to numpy and back.
        pil = resize_shorter_side(pil, image_size)
      image = _to_array(pil)
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(
      f"Image file {name or file!r} could not be decoded ({type(e).__name__}: {e}). "
      "Delete or replace the file."
    ) from e
  if image_size is not None:
    image = crop_square(image, image_size, fraction)
  return image


def _split_root(root: str, split: str) -> str:
  if not root or not os.path.isdir(root):
    raise DataError(
      f"Image folder {root!r} (config.data.path) does not exist. Point "
      "config.data.path at a folder of images (optionally with split "
      "subfolders such as train/ and test/, and class subfolders below)."
    )
  split_dir = os.path.join(root, split)
  if os.path.isdir(split_dir):
    return split_dir
  present = [s for s in _SPLIT_NAMES if os.path.isdir(os.path.join(root, s))]
  if present:
    raise DataError(
      f"Image folder {root!r} has split folders {present} but no {split!r}. "
      "Set config.data.train_split / config.data.eval_split to one of "
      f"{present}, or create {split_dir!r}."
    )
  return root


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_names(root: str, split_root: str) -> list[str]:
  """Sorted class folder names, the union over the split folders if any."""
  parents = [split_root]
  if split_root != root:
    parents = [os.path.join(root, s) for s in _SPLIT_NAMES if os.path.isdir(os.path.join(root, s))]
  names = set()
  for parent in parents:
    names.update(e.name for e in os.scandir(parent) if e.is_dir() and not e.name.startswith("."))
  return sorted(names)


def list_image_folder(root: str, split: str) -> tuple[list[str], np.ndarray, list[str]]:
  """Finds the images of a split and their labels.

  Args:
    root: config.data.path.
    split: split name, used when root/<split> exists.

  Returns:
    paths: sorted image paths.
    labels: (N,) int64 class indices.
    class_names: the sorted class folder names ([] for a flat folder).
  """
  split_root = _split_root(root, split)
  classes = _class_names(root, split_root)
  paths, labels = [], []
  loose = sorted(e.path for e in os.scandir(split_root) if e.is_file() and _is_image(e.name))
  if classes and loose:
    raise DataError(
      f"Image folder {split_root!r} mixes image files (e.g. {loose[0]!r}) with "
      f"class folders {classes[:5]}: move the loose images into a class folder "
      "or the class folders away, so each image has one label."
    )
  if not classes:
    for dirpath, dirnames, filenames in os.walk(split_root):
      dirnames.sort()
      paths += [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
    labels = [0] * len(paths)
  for label, name in enumerate(classes):
    class_dir = os.path.join(split_root, name)
    for dirpath, dirnames, filenames in os.walk(class_dir):
      dirnames.sort()
      found = [os.path.join(dirpath, f) for f in sorted(filenames) if _is_image(f)]
      paths += found
      labels += [label] * len(found)
  if not paths:
    raise DataError(
      f"Image folder {split_root!r} (from config.data.path={root!r}, split "
      f"{split!r}) holds no images with suffix {IMAGE_EXTENSIONS}. Check "
      "config.data.path and that the images were copied there."
    )
  return paths, np.asarray(labels, np.int64), classes


def load_image(
  path: str, image_size: int | None, fraction: tuple[float, float] | np.ndarray | None = None
) -> np.ndarray:
  """Decodes one image file to RGB, resized and cropped when asked.

  Args:
    path: an image file.
    image_size: output side, or None to keep the stored size.
    fraction: where to crop after resizing (see `crop_square`); None = centre.

  Returns:
    (H, W, 3) uint8; (image_size, image_size, 3) when image_size is set.
  """
  return decode_image(path, image_size, fraction=fraction)


class ImageFolderSource:
  """Random access to one split of an image folder (a grain data source).

  `source[i]` is {'image': (H, W, 3) uint8, 'label': int64}; `read(indices)`
  returns a stacked batch. Without `image_size` every image must have the size
  of the first one.
  """

  def __init__(self, root: str, split: str, image_size: int | None):
    self.paths, self.labels, self.class_names = list_image_folder(root, split)
    self.image_size = image_size
    # With image_size set every image is resized, so random crops are possible.
    self.resizes = image_size is not None
    if image_size is None:
      h, w, c = load_image(self.paths[0], None).shape
      self.image_shape = (h, w, c)
    else:
      self.image_shape = (image_size, image_size, 3)

  def __len__(self) -> int:
    return len(self.paths)

  def _load(self, index: int, fraction: np.ndarray | None = None) -> np.ndarray:
    image = load_image(self.paths[index], self.image_size, fraction)
    if image.shape != self.image_shape:
      raise DataError(
        f"Image file {self.paths[index]!r} is {image.shape}, but the first "
        f"image {self.paths[0]!r} is {self.image_shape}: set "
        "config.data.image_size to resize and centre-crop all images to one "
        "size."
      )
    return image

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {"image": self._load(index), "label": self.labels[index]}

  def read(
    self, indices: Sequence[int], crop_fractions: np.ndarray | None = None
  ) -> tuple[np.ndarray, np.ndarray]:
    """Returns images (B, H, W, 3) uint8 and labels (B,) int64.

    Args:
      indices: (B,) image indices.
      crop_fractions: None for centre crops, else (B, 2) in [0, 1): where each
        image's square is cropped after resizing (see `crop_square`).
    """
    images = np.empty((len(indices), *self.image_shape), np.uint8)
    for row, index in enumerate(indices):
      fraction = None if crop_fractions is None else crop_fractions[row]
      images[row] = self._load(int(index), fraction)
    return images, self.labels[np.asarray(indices, np.int64)]
