"""Prepares TFDS `imagenet2012` as ArrayRecord from the ILSVRC2012 tars, once.

ImageNet is behind a registration, so TFDS builds it from a manual download:
a folder holding ILSVRC2012_img_train.tar (148 GB, a tar of 1000 per-synset
tars) and ILSVRC2012_img_val.tar (6.7 GB); ILSVRC2012_img_test.tar is optional.
Grain needs random access, hence file_format='array_record' (TFDS's default is
TFRecord). The TFDS command line of TFDS 4.9.x imports apache_beam; this
module does the same from Python without it:

    python -m arcvq_jax.data.imagenet --manual_dir=/data/ilsvrc2012 \\
        --data_dir=gs://my-bucket/tensorflow_datasets

then train with config.data.source='tfds', name='imagenet2012' and the same
data_dir (configs/imagenet.py). Preparing reads every image once (hours for
the full set); run it on one machine, before training on many. data_dir and
manual_dir may be gs:// paths (etils epath / TFDS file access, never os.path).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from etils import epath

from arcvq_jax.data.idx import DataError

NAME = "imagenet2012"
MANUAL_FILES = ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar")


def check_manual_dir(manual_dir: str) -> None:
  """Raises DataError naming what is missing from an ILSVRC2012 manual dir."""
  root = epath.Path(manual_dir)
  missing = [f for f in MANUAL_FILES if not (root / f).exists()]
  if missing:
    raise DataError(
      f"The ImageNet manual_dir {manual_dir!r} lacks {missing}: it must hold "
      f"{' and '.join(MANUAL_FILES)} as downloaded (after registering) from "
      "https://image-net.org/download-images, not extracted."
    )


def prepare(manual_dir: str, data_dir: str | None, file_format: str = "array_record") -> Any:
  """Prepares imagenet2012 as ArrayRecord in data_dir (a no-op when prepared).

  Args:
    manual_dir: folder with the ILSVRC2012 tars.
    data_dir: TFDS data dir (config.data.data_dir; None = ~/tensorflow_datasets).
    file_format: 'array_record' (what grain reads) or 'tfrecord' (TFDS's default).

  Returns:
    The prepared tfds builder.
  """
  # Imported here: only preparing pays for TensorFlow Datasets.
  import tensorflow_datasets as tfds  # noqa: PLC0415 (optional: only preparing needs it)

  builder = tfds.builder(NAME, data_dir=data_dir, file_format=file_format)
  if builder.is_prepared():
    return builder
  check_manual_dir(manual_dir)
  builder.download_and_prepare(
    file_format=file_format,
    download_config=tfds.download.DownloadConfig(
      manual_dir=manual_dir,
      # Everything comes from manual_dir: no copy on TFDS's public bucket.
      try_download_gcs=False,
      # The statistics pass would read all 1.3M images a second time.
      compute_stats=tfds.download.ComputeStatsMode.SKIP,
    ),
  )
  return builder


def main(argv: Sequence[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument(
    "--manual_dir",
    required=True,
    help="folder with ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar",
  )
  parser.add_argument(
    "--data_dir", default=None, help="TFDS data dir to write (default ~/tensorflow_datasets)"
  )
  args = parser.parse_args(argv)
  builder = prepare(args.manual_dir, args.data_dir)
  print(f"{NAME} is prepared in {builder.data_dir}: {builder.info.splits}")


if __name__ == "__main__":
  main()
