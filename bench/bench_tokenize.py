"""Throughput of `python -m arcvq_jax.tokenize` against its bound, the encoder's own step.

  python bench/bench_tokenize.py                          # the demo VQ-VAE and the f8 VQGAN
  python bench/bench_tokenize.py --only=demo --demo_images=2000
  python bench/bench_tokenize.py --only=vqgan --vqgan_images=4 --vqgan_image_size=64  # a smoke run

Two tokenizers with fresh (random) weights, or a trained one with --demo_workdir:
- demo: configs/demo.py's VQ-VAE on Fashion-MNIST's 10k test images (Debian's IDX files;
  random 28x28 images where they are missing), 7x7 tokens, K 512;
- vqgan: configs/imagenet.py's f8 VQGAN on a folder of random JPEGs (smooth noise, 320x256),
  which the command decodes, resizes to --vqgan_image_size and centre-crops as it would
  ImageNet's; 32x32 tokens at 256, K 1024.

For each: the command's pass (`tokenize.tokenize_split`, in this process: reading, encoding
over this host's devices, writing the shards) in images/s after its first batch (which
compiles); the bound, the same jitted encoder and search on a batch already on the devices
(median of --rounds calls); and the bytes per image of the shards on disk against the bytes
of a record (ArrayRecord compresses each record and pads each file to 64 KiB blocks).
Timings depend on the machine and what else runs on it: report them with its description.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from PIL import Image

from arcvq_jax import api, tokenize
from arcvq_jax.data import idx as idx_lib
from arcvq_jax.train import state as state_lib
from configs import demo, imagenet

FASHION = "/usr/share/datasets/fashion-mnist"


def fresh_tokenizer(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]):
  """An api.Tokenizer of `config`'s network with random weights (the time does not depend on
  their values; the bytes on disk do, a little, through compression)."""
  model = state_lib.build_model(config, channels=image_shape[-1])
  init = jax.jit(lambda key: model.init(key, jnp.zeros((1, *image_shape)))["params"])
  return api.Tokenizer(config, init(jax.random.key(0)))


def write_idx(path: str, array: np.ndarray) -> None:
  """An uncompressed IDX file (uint8), for the random demo images."""
  header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
    int(s).to_bytes(4, "big") for s in array.shape
  )
  with open(path, "wb") as f:
    f.write(header + array.tobytes())


def demo_data(root: str, num_images: int) -> ml_collections.ConfigDict:
  """Fashion-MNIST's IDX files where installed (num_images <= 10000 of the test split: a
  copy of its first images), else random 28x28 images."""
  rng = np.random.default_rng(0)
  if os.path.exists(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")):
    images, labels = idx_lib.load_idx_split(FASHION, "test")
    images = images.reshape(images.shape[:3])  # (N, 28, 28, 1) -> (N, 28, 28)
  else:
    images = rng.integers(0, 256, (num_images, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, num_images, dtype=np.uint8)
  images, labels = images[:num_images], labels[:num_images].astype(np.uint8)
  directory = os.path.join(root, "demo_data")
  os.makedirs(directory, exist_ok=True)
  write_idx(os.path.join(directory, "t10k-images-idx3-ubyte"), np.asarray(images, np.uint8))
  write_idx(os.path.join(directory, "t10k-labels-idx1-ubyte"), labels)
  return ml_collections.ConfigDict(dict(source="idx", path=directory, image_size=None))


def jpeg_folder(root: str, num_images: int, image_size: int) -> ml_collections.ConfigDict:
  """num_images random JPEGs (smooth noise, 320x256, quality 90) in a flat folder."""
  directory = os.path.join(root, "vqgan_data", "test")
  os.makedirs(directory, exist_ok=True)
  rng = np.random.default_rng(0)
  for i in range(num_images):
    coarse = rng.integers(0, 256, (32, 40, 3), dtype=np.uint8)
    image = Image.fromarray(coarse).resize((320, 256), Image.BICUBIC)
    image.save(os.path.join(directory, f"{i:06d}.jpg"), quality=90)
  return ml_collections.ConfigDict(
    dict(source="folder", path=os.path.dirname(directory), image_size=image_size)
  )


def encoder_bound(tok: api.Tokenizer, image_shape, batch: int, rounds: int, views: int) -> float:
  """Images/s of the command's own jitted encoder and search on a batch already on the
  devices (views encodes per image with --flip)."""
  encode = tokenize.make_encoder(tok, jax.local_devices(), batch)
  x = np.random.default_rng(1).uniform(-1, 1, (batch, *image_shape)).astype(np.float32)
  jax.block_until_ready(encode(x))  # compile
  jax.block_until_ready(encode(x))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    jax.block_until_ready(encode(x))
    times.append(time.perf_counter() - t0)
  return batch / (views * float(np.median(times)))


def run_case(
  name: str, tok: api.Tokenizer, workdir: str, data, batch: int, args, root: str
) -> dict:
  """The command's pass over `data`'s test split, then the bound, for one tokenizer."""
  out = os.path.join(root, f"{name}_shards")
  t0 = time.perf_counter()
  result = tokenize.tokenize_split(
    workdir,
    out,
    config=ml_collections.ConfigDict(dict(data=data)),
    split="test",
    flip=args.flip,
    batch_size=batch,
    images_per_shard=args.images_per_shard,
    tokenizer=(tok, 0),
  )
  wall = time.perf_counter() - t0
  index = result["index"]
  image_shape = tuple(index["image_shape"])
  bound = encoder_bound(tok, image_shape, batch, args.rounds, index["views"])
  size = sum(e["bytes"] for e in index["shards"])
  return dict(
    name=name,
    images=index["num_images"],
    batch=batch,
    shape=image_shape,
    grid=tuple(index["grid"]),
    views=index["views"],
    rate=result["images_per_sec"],
    wall=wall,
    bound=bound,
    disk=size / index["num_images"],
    record=index["record"]["bytes"],
  )


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--only", choices=("demo", "vqgan"), default=None)
  p.add_argument("--demo_images", type=int, default=10000)
  p.add_argument("--demo_batch", type=int, default=500)
  p.add_argument("--demo_workdir", default=None, help="a trained demo run (its latest step)")
  p.add_argument("--vqgan_images", type=int, default=8)
  p.add_argument("--vqgan_batch", type=int, default=2)
  p.add_argument("--vqgan_image_size", type=int, default=256)
  p.add_argument("--images_per_shard", type=int, default=10000)
  p.add_argument("--flip", action="store_true", help="also encode the mirrors (2 views)")
  p.add_argument("--rounds", type=int, default=5)
  p.add_argument("--out", default=None, help="where to write (default: a temporary folder)")
  args = p.parse_args()

  root = args.out or tempfile.mkdtemp(prefix="bench_tokenize_")
  rows = []
  if args.only in (None, "demo"):
    data = demo_data(root, args.demo_images)
    if args.demo_workdir:
      tok, _ = tokenize.load_tokenizer(args.demo_workdir, None)
    else:
      tok = fresh_tokenizer(demo.get_config(), (28, 28, 1))
    workdir = args.demo_workdir or "(demo, random weights)"
    rows.append(run_case("demo", tok, workdir, data, args.demo_batch, args, root))
  if args.only in (None, "vqgan"):
    size = args.vqgan_image_size
    data = jpeg_folder(root, args.vqgan_images, size)
    tok = fresh_tokenizer(imagenet.get_config(), (size, size, 3))
    workdir = "(vqgan f8, random weights)"
    rows.append(run_case("vqgan_f8", tok, workdir, data, args.vqgan_batch, args, root))

  if args.out is None:
    shutil.rmtree(root)
  print(
    f"jax {jax.__version__}, {jax.device_count()} x {jax.devices()[0].device_kind}, "
    f"{os.cpu_count()} CPUs" + (f"; shards in {root}" if args.out else "")
  )
  print(
    "| tokenizer | images | image | tokens | batch | command images/s | encoder bound "
    "images/s | command / bound | wall s (with compile) | bytes/image on disk | record bytes |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    # The command's rate needs two batches or more (the first one compiles).
    rate = f"{r['rate']:.1f}" if r["rate"] else "n/a (one batch)"
    ratio = f"{r['rate'] / r['bound']:.2f}" if r["rate"] else "n/a"
    print(
      f"| {r['name']} | {r['images']} | {'x'.join(map(str, r['shape']))} | "
      f"{r['views']}x{r['grid'][0]}x{r['grid'][1]} | {r['batch']} | {rate} | "
      f"{r['bound']:.1f} | {ratio} | {r['wall']:.1f} | {r['disk']:.0f} | {r['record']} |"
    )


if __name__ == "__main__":
  main()
