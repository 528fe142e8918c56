"""`idx_images`: a TFDS builder that turns a folder of IDX files into ArrayRecord.

It lets the TFDS + grain path (config.data.source='tfds') run offline on the
MNIST-family IDX files (e.g. Debian's dataset-fashion-mnist package) without
TFDS downloading anything. Importing this module registers the builder with
TFDS; it lives in the package (not a script) so that the registration happens
under a stable module name.

Prepare once, from Python:

    prepare_idx_tfds('/usr/share/datasets/fashion-mnist', '~/tensorflow_datasets')

or from the shell:

    tfds build idx_images --imports=arcvq_jax.data.idx_tfds \
        --manual_dir=/usr/share/datasets/fashion-mnist \
        --data_dir=DIR --file_format=array_record

Features: 'image' (28, 28, 1) uint8 stored as raw bytes (Tensor with
encoding='bytes': no PNG encode/decode, no int64 upcast; 70k images prepare in
seconds), 'label' int64. All MNIST-family IDX sets are 28x28; other sizes are
rejected while preparing.
"""

from __future__ import annotations

import os
from typing import ClassVar

import numpy as np
import tensorflow_datasets as tfds

from arcvq_jax.data import idx

IMAGE_SHAPE = (28, 28, 1)


class IdxImages(tfds.core.GeneratorBasedBuilder):
  """MNIST-style IDX image files (train + t10k) from a manual folder."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES: ClassVar[dict[str, str]] = {"1.0.0": "Initial release."}
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
    "Point manual_dir (tfds build --manual_dir=DIR, or "
    "tfds.download.DownloadConfig(manual_dir=DIR), or config.data.path for "
    "arcvq-jax) at a folder holding the four IDX files train-images-idx3-ubyte, "
    "train-labels-idx1-ubyte, t10k-images-idx3-ubyte and t10k-labels-idx1-ubyte "
    "(each may be .gz). " + idx.INSTALL_HINT
  )

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=tfds.features.FeaturesDict(
        {
          "image": tfds.features.Tensor(shape=IMAGE_SHAPE, dtype=np.uint8, encoding="bytes"),
          "label": tfds.features.Scalar(dtype=np.int64),
        }
      ),
      supervised_keys=("image", "label"),
      description="Images and labels read from MNIST-style IDX files.",
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    manual_dir = os.fspath(dl_manager.manual_dir)
    # Validate both splits before writing anything, so a missing file fails fast.
    for split in ("train", "test"):
      idx.idx_split_files(manual_dir, split)
    return {
      "train": self._generate_examples(manual_dir, "train"),
      "test": self._generate_examples(manual_dir, "test"),
    }

  def _generate_examples(self, manual_dir: str, split: str):
    images, labels = idx.load_idx_split(manual_dir, split)
    if images.shape[1:] != IMAGE_SHAPE:
      raise idx.DataError(
        f"idx_images stores {IMAGE_SHAPE} images but the {split} IDX files in "
        f"{manual_dir!r} hold {images.shape[1:]}. Read them directly with "
        "config.data.source='idx' instead."
      )
    for i in range(len(images)):
      yield i, {"image": images[i], "label": labels[i]}


def prepare_idx_tfds(
  manual_dir: str, data_dir: str | None, file_format: str = "array_record"
) -> tfds.core.DatasetBuilder:
  """Prepares `idx_images` from the IDX files in `manual_dir`, offline.

  Args:
    manual_dir: folder with the IDX files (config.data.path).
    data_dir: TFDS data dir to write into (config.data.data_dir; None = TFDS
      default, ~/tensorflow_datasets).
    file_format: 'array_record' (what grain reads); 'tfrecord' only for tests.

  Returns:
    The prepared builder (a no-op when it was prepared already).
  """
  idx.idx_split_files(manual_dir, "train")  # DataError with the fix if absent.
  builder = IdxImages(data_dir=data_dir, file_format=file_format)
  builder.download_and_prepare(
    file_format=file_format,
    download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir,
      # Nothing is downloaded; skip the statistics pass over all examples.
      compute_stats=tfds.download.ComputeStatsMode.SKIP,
    ),
  )
  return builder
