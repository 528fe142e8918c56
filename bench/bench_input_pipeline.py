"""Throughput of the ImageNet train pipeline: TFDS ArrayRecord -> JPEG decode -> resize the
shorter side -> random crop + flip -> float batches, through grain.

  python bench/bench_input_pipeline.py                  # 256 px, batch 32, 4 read threads
  python bench/bench_input_pipeline.py --image-size 128 --no-augment

Builds a fake ILSVRC2012 manual download of real photos (scikit-image samples, 333-500 px
JPEGs, as ImageNet's typical sizes) in a temporary folder, lets TFDS's imagenet2012 builder
prepare it, then times --batches batches after --warmup batches.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))

import imagenet_fixtures  # noqa: E402
import ml_collections  # noqa: E402

from arcvq_jax.data import imagenet, pipeline  # noqa: E402


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--image-size", type=int, default=256)
  p.add_argument("--batch", type=int, default=32)
  p.add_argument("--batches", type=int, default=30)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--no-augment", action="store_true")
  args = p.parse_args()

  with tempfile.TemporaryDirectory() as tmp:
    manual = imagenet_fixtures.make_fake_imagenet_manual_dir(
      os.path.join(tmp, "manual"), num_synsets=4, per_synset=64, num_val=8, side_range=(333, 500)
    )
    imagenet.prepare(manual, os.path.join(tmp, "tfds"))
    data = ml_collections.ConfigDict(
      dict(
        source="tfds",
        name="imagenet2012",
        data_dir=os.path.join(tmp, "tfds"),
        train_split="train",
        image_size=args.image_size,
        random_crop=not args.no_augment,
        random_flip=not args.no_augment,
        num_workers=0,
      )
    )
    it = pipeline.create_train_iterator(
      data, global_batch_size=args.batch, seed=0, process_index=0, process_count=1
    )
    for _ in range(args.warmup):
      next(it)
    t0 = time.perf_counter()
    for _ in range(args.batches):
      next(it)
    dt = time.perf_counter() - t0
  print(
    f"image_size {args.image_size}, batch {args.batch}, augment {not args.no_augment}: "
    f"{args.batches * args.batch / dt:.0f} images/s"
  )


if __name__ == "__main__":
  main()
