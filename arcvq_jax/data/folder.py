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
`image_size` (bicubic, antialiased) and centre-cropped to a square.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

from arcvq_jax.data.idx import DataError

IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png', '.bmp', '.gif', '.webp', '.tif', '.tiff')
_SPLIT_NAMES = ('train', 'test', 'val', 'validation')


def resize_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Resizes the shorter side to `size`, then crops the central square.

  Args:
    image: (H, W, C) uint8.
    size: output side length.

  Returns:
    (size, size, C) uint8.
  """
  h, w = image.shape[:2]
  if (h, w) == (size, size):
    return image
  scale = size / min(h, w)
  # round() keeps the shorter side exactly `size`; max() guards extreme ratios.
  new_w, new_h = max(size, round(w * scale)), max(size, round(h * scale))
  squeeze = image.shape[2] == 1
  pil = Image.fromarray(image[..., 0] if squeeze else image)
  # Pillow's resize filters widen their support when downscaling (antialias).
  pil = pil.resize((new_w, new_h), Image.Resampling.BICUBIC)
  out = np.asarray(pil)
  if squeeze:
    out = out[..., None]
  top, left = (new_h - size) // 2, (new_w - size) // 2
  return out[top:top + size, left:left + size]


def _split_root(root: str, split: str) -> str:
  if not root or not os.path.isdir(root):
    raise DataError(
        f'Image folder {root!r} (config.data.path) does not exist. Point '
        'config.data.path at a folder of images (optionally with split '
        'subfolders such as train/ and test/, and class subfolders below).'
    )
  split_dir = os.path.join(root, split)
  if os.path.isdir(split_dir):
    return split_dir
  present = [s for s in _SPLIT_NAMES if os.path.isdir(os.path.join(root, s))]
  if present:
    raise DataError(
        f'Image folder {root!r} has split folders {present} but no {split!r}. '
        'Set config.data.train_split / config.data.eval_split to one of '
        f'{present}, or create {split_dir!r}.'
    )
  return root


def _is_image(name: str) -> bool:
  return name.lower().endswith(IMAGE_EXTENSIONS)


def _class_names(root: str, split_root: str) -> list[str]:
  """Sorted class folder names, the union over the split folders if any."""
  parents = [split_root]
  if split_root != root:
    parents = [
        os.path.join(root, s) for s in _SPLIT_NAMES
        if os.path.isdir(os.path.join(root, s))
    ]
  names = set()
  for parent in parents:
    names.update(
        e.name for e in os.scandir(parent) if e.is_dir() and not e.name.startswith('.')
    )
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
  loose = sorted(
      e.path for e in os.scandir(split_root) if e.is_file() and _is_image(e.name)
  )
  if classes and loose:
    raise DataError(
        f'Image folder {split_root!r} mixes image files (e.g. {loose[0]!r}) with '
        f'class folders {classes[:5]}: move the loose images into a class folder '
        'or the class folders away, so each image has one label.'
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
        f'Image folder {split_root!r} (from config.data.path={root!r}, split '
        f'{split!r}) holds no images with suffix {IMAGE_EXTENSIONS}. Check '
        'config.data.path and that the images were copied there.'
    )
  return paths, np.asarray(labels, np.int64), classes


def load_image(path: str, image_size: int | None) -> np.ndarray:
  """Decodes one image to RGB, resized and centre-cropped when asked.

  Args:
    path: an image file.
    image_size: output side, or None to keep the stored size.

  Returns:
    (H, W, 3) uint8; (image_size, image_size, 3) when image_size is set.
  """
  try:
    with Image.open(path) as pil:
      image = np.asarray(pil.convert('RGB'))
  except (OSError, ValueError, Image.DecompressionBombError) as e:
    raise DataError(
        f'Image file {path!r} could not be decoded ({type(e).__name__}: {e}). '
        'Delete or replace the file.'
    ) from e
  if image_size is not None:
    image = resize_and_center_crop(image, image_size)
  return image


class ImageFolderSource:
  """Random access to one split of an image folder (a grain data source).

  `source[i]` is {'image': (H, W, 3) uint8, 'label': int64}; `read(indices)`
  returns a stacked batch. Without `image_size` every image must have the size
  of the first one.
  """

  def __init__(self, root: str, split: str, image_size: int | None):
    self.paths, self.labels, self.class_names = list_image_folder(root, split)
    self.image_size = image_size
    if image_size is None:
      h, w, c = load_image(self.paths[0], None).shape
      self.image_shape = (h, w, c)
    else:
      self.image_shape = (image_size, image_size, 3)

  def __len__(self) -> int:
    return len(self.paths)

  def _load(self, index: int) -> np.ndarray:
    image = load_image(self.paths[index], self.image_size)
    if image.shape != self.image_shape:
      raise DataError(
          f'Image file {self.paths[index]!r} is {image.shape}, but the first '
          f'image {self.paths[0]!r} is {self.image_shape}: set '
          'config.data.image_size to resize and centre-crop all images to one '
          'size.'
      )
    return image

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    return {'image': self._load(index), 'label': self.labels[index]}

  def read(self, indices: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
    """Returns images (B, H, W, 3) uint8 and labels (B,) int64."""
    images = np.empty((len(indices), *self.image_shape), np.uint8)
    for row, index in enumerate(indices):
      images[row] = self._load(int(index))
    return images, self.labels[np.asarray(indices, np.int64)]
