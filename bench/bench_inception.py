"""Throughput of the FID Inception and the end-to-end time of rFID (issue 4).

  python bench/bench_inception.py --batch 25 50               # images/s at 299x299
  python bench/bench_inception.py --batch 50 --impl xla auto  # conv implementations
  python bench/bench_inception.py --library eigen ynn         # XLA:CPU's conv libraries
  python bench/bench_inception.py --torch --batch 50          # pytorch-fid's network, same CPU
  python bench/bench_inception.py --rfid                      # rFID, 10k Fashion-MNIST test images

Random weights of the right shapes (the time does not depend on their values). Throughput:
299x299x3 uint8 inputs (the resize is then the identity, as for ImageNet samples already at
299; 28x28 and 256x256 inputs cost the same network), InceptionFeatures (jitted, sharded over
all devices, outputs copied to the host), median of --steps calls after --warmup calls.
--rfid: trains the tiny tokenizer (configs/tiny.py, 6 steps) unless --workdir names a run, then
times `arcvq_jax.evaluate.evaluate_checkpoint` over the whole test split: reconstruction,
PSNR/SSIM/usage, and the Inception on the originals and the reconstructions (20k images),
statistics and the Frechet distance; LPIPS off (its time is issue 3's).
"""

from __future__ import annotations

import argparse
import atexit
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
# torch's CUDA wheel imports triton, which segfaults beside TensorFlow (see tests/conftest.py).
sys.modules.setdefault("triton", None)

import jax  # noqa: E402
import numpy as np  # noqa: E402
from bench_train_step import timeit  # noqa: E402

from arcvq_jax.evaluation import inception as inception_lib  # noqa: E402


def bench_jax(batch: int, impl: str, library: str, warmup: int, steps: int) -> float:
  extractor = inception_lib.InceptionFeatures(
    inception_lib.random_params(0), batch_size=batch, conv_impl=impl, conv_library=library
  )
  x = np.random.default_rng(0).integers(0, 256, (batch, 299, 299, 3), dtype=np.uint8)
  times = timeit(lambda: extractor(x), warmup, steps)
  return batch / float(np.median(times))


def bench_torch(batch: int, warmup: int, steps: int) -> float:
  import torch  # noqa: PLC0415
  from pytorch_fid import inception as pfid  # noqa: PLC0415

  sys.path.insert(
    0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
  )
  from test_inception import fid_inception_random  # noqa: PLC0415

  net = fid_inception_random()
  pfid.fid_inception_v3 = lambda: net
  model = pfid.InceptionV3([3]).eval()
  x = torch.rand(batch, 3, 299, 299)

  def run():
    with torch.no_grad():
      return model(x)[0].numpy()

  return batch / float(np.median(timeit(run, warmup, steps)))


def bench_rfid(workdir: str | None, batch: int, inception_batch: int) -> dict:
  from arcvq_jax import api, evaluate  # noqa: PLC0415
  from arcvq_jax.train import tokenizer  # noqa: PLC0415

  if workdir is None:
    from configs import tiny  # noqa: PLC0415

    workdir = tempfile.mkdtemp(prefix="bench_rfid_")
    atexit.register(shutil.rmtree, workdir, ignore_errors=True)
    config = tiny.get_config()
    t0 = time.perf_counter()
    tokenizer.train_and_evaluate(config, workdir)
    print(f"trained the tiny tokenizer in {time.perf_counter() - t0:.1f} s ({workdir})")
  params, _step = api.restore_params(workdir)
  t0 = time.perf_counter()
  results, _ = evaluate.evaluate_checkpoint(
    api.load_config(workdir),
    params,
    split="test",
    batch_size=batch,
    inception_params=inception_lib.random_params(0),
    inception_batch_size=inception_batch,
  )
  seconds = time.perf_counter() - t0
  return dict(
    seconds=seconds,
    images=results["num_images"],
    rfid=results["rfid"],
    inception_images_per_s=2 * results["num_images"] / seconds,
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--batch", type=int, nargs="+", default=[25, 50])
  parser.add_argument(
    "--impl", nargs="+", default=["xla", "gemm"], choices=["xla", "auto", "gemm", "onednn"]
  )
  parser.add_argument(
    "--library",
    nargs="+",
    default=["eigen", "ynn"],
    choices=["eigen", "ynn"],
    help="XLA:CPU's convolution library (the default: eigen)",
  )
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--steps", type=int, default=3)
  parser.add_argument("--torch", action="store_true", help="time pytorch-fid's network too")
  parser.add_argument("--rfid", action="store_true", help="time rFID on 10k test images")
  parser.add_argument("--workdir", default=None, help="--rfid: a trained run (default: train)")
  parser.add_argument("--eval-batch", type=int, default=1000)
  args = parser.parse_args()
  print(f"jax {jax.__version__}, devices: {jax.devices()}, CPUs: {os.cpu_count()}")
  if args.rfid:
    r = bench_rfid(args.workdir, args.eval_batch, args.batch[0])
    print(
      f"rFID on {r['images']} test images end to end: {r['seconds']:.1f} s "
      f"({r['inception_images_per_s']:.1f} Inception images/s, rFID {r['rfid']:.2f} with "
      "random weights)"
    )
    return
  print("| network | conv impl | library | batch | images/s |\n|---|---|---|---|---|")
  for batch in args.batch:
    for impl in args.impl:
      for library in args.library:
        print(
          f"| arcvq-jax (XLA) | {impl} | {library} | {batch} | "
          f"{bench_jax(batch, impl, library, args.warmup, args.steps):.1f} |",
          flush=True,
        )
    if args.torch:
      print(
        f"| pytorch-fid (PyTorch {__import__('torch').__version__}) | - | oneDNN | {batch} | "
        f"{bench_torch(batch, args.warmup, args.steps):.1f} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
