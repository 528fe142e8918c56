"""A fake ILSVRC2012 manual download, prepared for real by TFDS's `imagenet2012`.

The layout is the one `tensorflow_datasets/datasets/imagenet2012/
imagenet2012_dataset_builder.py` (TFDS 4.9.x) reads from its manual_dir:

    ILSVRC2012_img_train.tar   a tar of per-synset tars `nXXXXXXXX.tar`, each
                               holding `nXXXXXXXX_<k>.JPEG`; the label is the
                               inner tar's name without '.tar'.
    ILSVRC2012_img_val.tar     flat `ILSVRC2012_val_000000NN.JPEG` files; TFDS
                               zips its bundled validation_labels.txt with the
                               *sorted* member names, so file NN gets line NN.
    ILSVRC2012_img_test.tar    optional; absent here (TFDS warns, no test split).

Two special cases of the real archive are reproduced: TFDS re-encodes the 22
train files in its CMYK_IMAGES list (CMYK JPEGs) and the one in PNG_IMAGES (a
PNG named .JPEG) as RGB JPEGs while preparing; the fake train tar holds one of
each (`n01739381_1309.JPEG`, `n02105855_2933.JPEG`) plus a grayscale JPEG.

The pixels are scikit-image's sample photos, cropped and resized to
non-square sizes (landscape and portrait), saved as JPEG. Everything is a
deterministic pure function of the arguments, so tests can wrap these in
module- or session-scoped pytest fixtures.
"""

from __future__ import annotations

import dataclasses
import io
import os
import tarfile

import numpy as np
from PIL import Image

TRAIN_TAR = "ILSVRC2012_img_train.tar"
VAL_TAR = "ILSVRC2012_img_val.tar"
# File names TFDS special-cases (CMYK_IMAGES[0] and PNG_IMAGES[0] of the builder).
CMYK_FILE = "n01739381_1309.JPEG"
PNG_FILE = "n02105855_2933.JPEG"
_PHOTOS = ("astronaut", "coffee", "chelsea", "rocket", "immunohistochemistry", "hubble_deep_field")


@dataclasses.dataclass(frozen=True)
class FakeImage:
  """One file of the fake manual download."""

  file_name: str  # as TFDS stores it in the 'file_name' feature
  label: int  # index in TFDS's imagenet2012 labels.txt
  data: bytes  # the file's bytes, as written into the tar
  kind: str  # 'rgb', 'gray', 'cmyk' or 'png'


def _tfds_text(relative: str) -> list[str]:
  import tensorflow_datasets as tfds  # noqa: PLC0415 (optional: the tests importorskip it)

  path = tfds.core.tfds_path(f"datasets/imagenet2012/{relative}")
  return path.read_text().strip().splitlines()


def synsets() -> list[str]:
  """The 1000 synset ids in label order (TFDS's labels.txt)."""
  return _tfds_text("labels.txt")


def validation_synsets() -> list[str]:
  """Synset of validation image k + 1 (TFDS's validation_labels.txt)."""
  return _tfds_text("validation_labels.txt")


def _photo(index: int) -> np.ndarray:
  import skimage.data  # noqa: PLC0415 (optional: the tests importorskip it)

  return getattr(skimage.data, _PHOTOS[index % len(_PHOTOS)])()


def _make_pixels(rng: np.random.Generator, index: int, side_range: tuple[int, int]) -> np.ndarray:
  """A random crop of a sample photo, resized to a random (H, W); (H, W, 3) uint8.

  Even indices are landscape, odd ones portrait, so both orientations of the
  shorter-side resize are exercised.
  """
  photo = _photo(index)
  long_side, short_side = sorted(rng.integers(side_range[0], side_range[1] + 1, 2))[::-1]
  if long_side == short_side:
    long_side += 1
  h, w = (short_side, long_side) if index % 2 == 0 else (long_side, short_side)
  # The largest box of aspect w / h that fits the photo, at 60-100 % of it.
  ph, pw = photo.shape[:2]
  scale = min(ph / h, pw / w) * rng.uniform(0.6, 1.0)
  bh, bw = int(h * scale), int(w * scale)
  top, left = rng.integers(0, ph - bh + 1), rng.integers(0, pw - bw + 1)
  box = Image.fromarray(photo[top : top + bh, left : left + bw])
  return np.asarray(box.resize((w, h), Image.Resampling.LANCZOS))


def _encode(pixels: np.ndarray, kind: str) -> bytes:
  buffer = io.BytesIO()
  image = Image.fromarray(pixels)
  if kind == "gray":
    image.convert("L").save(buffer, "JPEG", quality=90)
  elif kind == "cmyk":
    image.convert("CMYK").save(buffer, "JPEG", quality=95)
  elif kind == "png":
    image.save(buffer, "PNG")
  else:
    image.save(buffer, "JPEG", quality=90)
  return buffer.getvalue()


def fake_imagenet_files(
  num_synsets: int = 3,
  per_synset: int = 4,
  num_val: int = 6,
  side_range: tuple[int, int] = (48, 300),
) -> dict[str, list[FakeImage]]:
  """The files of the fake manual download, without writing anything.

  The train synsets are the CMYK file's, the PNG file's, then synsets spread
  over labels.txt; the first image of those two synsets is the special file,
  and the third train image overall is a grayscale JPEG.

  Args:
    num_synsets: train synsets (>= 1).
    per_synset: train images per synset.
    num_val: validation images, ILSVRC2012_val_00000001.JPEG on.
    side_range: inclusive range of image side lengths in pixels.

  Returns:
    {'train': [...], 'validation': [...]} in the order they are archived.
  """
  names = synsets()
  special = [CMYK_FILE.split("_")[0], PNG_FILE.split("_")[0]]
  spread = [names[i] for i in np.linspace(0, len(names) - 1, num_synsets + 2).astype(int)]
  chosen = list(dict.fromkeys(special + spread))[:num_synsets]
  rng = np.random.default_rng(2012)
  train, count = [], 0
  for synset in chosen:
    for k in range(1, per_synset + 1):
      file_name, kind = f"{synset}_{k}.JPEG", "rgb"
      if k == 1 and synset == special[0]:
        file_name, kind = CMYK_FILE, "cmyk"
      elif k == 1 and synset == special[1]:
        file_name, kind = PNG_FILE, "png"
      elif count == 2:
        kind = "gray"
      pixels = _make_pixels(rng, count, side_range)
      train.append(FakeImage(file_name, names.index(synset), _encode(pixels, kind), kind))
      count += 1
  val_synsets = validation_synsets()
  validation = []
  for k in range(num_val):
    pixels = _make_pixels(rng, count + k, side_range)
    validation.append(
      FakeImage(
        f"ILSVRC2012_val_{k + 1:08d}.JPEG",
        names.index(val_synsets[k]),
        _encode(pixels, "rgb"),
        "rgb",
      )
    )
  return {"train": train, "validation": validation}


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
  info = tarfile.TarInfo(name)
  info.size = len(data)
  tar.addfile(info, io.BytesIO(data))


def write_manual_dir(path: str, files: dict[str, list[FakeImage]]) -> str:
  """Writes `files` (from `fake_imagenet_files`) as the two ILSVRC2012 tars."""
  os.makedirs(path, exist_ok=True)
  by_synset: dict[str, list[FakeImage]] = {}
  for image in files["train"]:
    by_synset.setdefault(image.file_name.split("_")[0], []).append(image)
  with tarfile.open(os.path.join(path, TRAIN_TAR), "w") as train_tar:
    for synset, images in by_synset.items():
      inner = io.BytesIO()
      with tarfile.open(fileobj=inner, mode="w") as synset_tar:
        for image in images:
          _add(synset_tar, image.file_name, image.data)
      _add(train_tar, f"{synset}.tar", inner.getvalue())
  with tarfile.open(os.path.join(path, VAL_TAR), "w") as val_tar:
    # Archive order differs from sorted order on purpose: TFDS sorts the names.
    for image in reversed(files["validation"]):
      _add(val_tar, image.file_name, image.data)
  return path


def make_fake_imagenet_manual_dir(
  path: str,
  num_synsets: int = 3,
  per_synset: int = 4,
  num_val: int = 6,
  side_range: tuple[int, int] = (48, 300),
) -> str:
  """Writes ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar into `path`.

  See `fake_imagenet_files` for the arguments; call it with the same ones to
  know what was written (it is deterministic).

  Returns:
    path.
  """
  files = fake_imagenet_files(num_synsets, per_synset, num_val, side_range)
  return write_manual_dir(path, files)


def decode_rgb(data: bytes) -> np.ndarray:
  """(H, W, 3) uint8: PIL's decode of one image file's bytes."""
  with Image.open(io.BytesIO(data)) as image:
    return np.asarray(image.convert("RGB"))
