"""The tokenizer API's encode and decode throughput, as shipped and compiled without the
steps' XLA options (how it was compiled before), alternating in one process.

  python bench/bench_api.py                       # configs/fashion_mnist.py, batch 1000
  python bench/bench_api.py --config tiny_vqgan --batch 16

The tokenizer is the config's model with fresh parameters (the time does not depend on
their values). Each round runs every contender once; the table gives the median per batch
and images/s. "without options": the same jitted functions compiled with plain `jax.jit`
(for a VQ-VAE on the CPU, its Eigen convolution forms then run under XLA's default YNNPACK).
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np

from arcvq_jax import api
from arcvq_jax.train import state as state_lib


def fresh_tokenizer(config_name: str) -> tuple[api.Tokenizer, tuple[int, int, int]]:
  config = importlib.import_module(f"configs.{config_name}").get_config()
  size = config.data.get("image_size") or 28
  channels = 1 if config.data.source == "idx" else 3
  image_shape = (size, size, channels)
  state = jax.jit(state_lib.init_fn(config, image_shape))(jax.random.key(0))
  params = state.gen.params if hasattr(state, "gen") else state.params
  return api.Tokenizer(config, params), image_shape


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--config", default="fashion_mnist", help="a tokenizer config in configs/")
  p.add_argument("--batch", type=int, default=1000)
  p.add_argument("--rounds", type=int, default=10)
  args = p.parse_args()

  tok, image_shape = fresh_tokenizer(args.config)
  rng = np.random.default_rng(0)
  x = jax.device_put(rng.uniform(-1, 1, (args.batch, *image_shape)).astype(np.float32))
  z = tok.encode_latents(x)
  plain_encode = jax.jit(functools.partial(tok._encode_latents_fn, model=tok.model))
  plain_decode = jax.jit(functools.partial(tok._decode_fn, model=tok.model))
  contenders = {
    "encode (API)": lambda: tok._encode(tok.params, x),
    "encode, without options": lambda: plain_encode(tok.params, x),
    "decode (API)": lambda: tok._decode_z(tok.params, z),
    "decode, without options": lambda: plain_decode(tok.params, z),
  }
  for fn in contenders.values():  # compile and warm up
    jax.block_until_ready(fn())
    jax.block_until_ready(fn())
  times = {name: [] for name in contenders}
  for _ in range(args.rounds):
    for name, fn in contenders.items():
      t0 = time.perf_counter()
      jax.block_until_ready(fn())
      times[name].append(time.perf_counter() - t0)

  print(
    f"jax {jax.__version__}, {jax.devices()[0].device_kind}; configs/{args.config}.py, "
    f"batch {args.batch} of {image_shape}, median of {args.rounds} rounds"
  )
  print("| call | ms / batch | images/s |")
  print("|---|---|---|")
  for name, ts in times.items():
    ms = 1e3 * float(np.median(ts))
    print(f"| {name} | {ms:.1f} | {1e3 * args.batch / ms:.0f} |")


if __name__ == "__main__":
  main()
