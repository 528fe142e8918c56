"""Time and FLOPs of the transformer token priors (train/prior_transformer.py): each prior's
train step, the AR transformer's sampling with and without its KV cache, and MaskGIT's
parallel decoding at 8 and 16 steps.

  python bench/bench_priors.py                       # demo sizes, then the ImageNet ones
  python bench/bench_priors.py --sizes demo          # only configs/demo_{maskgit,ar}.py
  python bench/bench_priors.py --short               # tiny shapes: checks that it runs

Sizes: 'demo' is configs/demo_maskgit.py and configs/demo_ar.py (7x7 tokens, K 512) at
--demo-batch; 'imagenet' is configs/imagenet_maskgit.py, imagenet_ar.py:b and :l (16x16
tokens, K 1024) at --imagenet-batch (1 and 2 by default: a CPU holds LlamaGen-L's state,
5.5 GB, and its activations there). --dtype sets the compute dtype of every network
(float32 by default: bf16 matmuls are slow on a CPU; the configs use bfloat16 for ImageNet).

Train step: the jitted step of `prior_transformer.create_state_and_step` on one device (the
state donated), ms per step (median of --steps after --warmup, compile excluded), and the
FLOPs of the compiled step (XLA's cost analysis).

AR sampling: tokens/s of `ar.sample_tokens` with the cache (prefill, then one token per
step into a (B, N) cache) and without (the whole (B, N) sequence through the network at each
of the N positions), at the config's guidance scale (2.0 for ImageNet: the doubled batch),
and the FLOP ratio the cache should give, from the shapes: without the cache each of the N
steps runs N positions of every matmul and head and N x N attention scores; with it one
position and its N cache slots (the cache is read whole, masked, so each step costs the
same), i.e. a ratio of N. MaskGIT: images/s of `maskgit.sample_tokens` at 8 and 16 steps
(each step one forward pass over the N positions).

Figures belong in docs/performance.md ("Priors"), with the machine they came from.
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from arcvq_jax import sharding, token_sampling
from arcvq_jax.models import transformer
from arcvq_jax.train import prior_common, prior_transformer
from configs import (
  demo_ar,
  demo_maskgit,
  imagenet_ar,
  imagenet_maskgit,
  tiny_ar,
  tiny_maskgit,
)


def timeit(fn, warmup: int, steps: int) -> float:
  """Median seconds of `steps` calls of fn after `warmup` (each waited for)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def flops_of(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis.get("flops", float("nan")))


def priors(sizes: list[str], short: bool) -> list[tuple[str, str, object, int, tuple[int, int]]]:
  """(size, name, config, vocabulary, grid) of each prior to measure."""
  out = []
  for size in sizes:
    if short:  # the tiny configs, on the size's grid and vocabulary
      grid, vocab = ((7, 7), 512) if size == "demo" else ((16, 16), 1024)
      out += [(size, "maskgit", tiny_maskgit.get_config(), vocab, grid)]
      out += [(size, "ar", tiny_ar.get_config(), vocab, grid)]
    elif size == "demo":
      out += [(size, "maskgit", demo_maskgit.get_config(), 512, (7, 7))]
      out += [(size, "ar", demo_ar.get_config(), 512, (7, 7))]
    else:
      out += [(size, "maskgit", imagenet_maskgit.get_config(), 1024, (16, 16))]
      out += [(size, "ar:b", imagenet_ar.get_config("b"), 1024, (16, 16))]
      out += [(size, "ar:l", imagenet_ar.get_config("l"), 1024, (16, 16))]
  return out


def make_batch(batch: int, vocab: int, grid: tuple[int, int], classes: int) -> dict:
  rng = np.random.default_rng(0)
  return {
    "tokens": rng.integers(0, vocab, (batch, *grid)).astype(np.int32),
    "label": rng.integers(0, max(classes, 1), batch).astype(np.int32),
  }


def bench_train(c, model, batch: int, warmup: int, steps: int) -> tuple[float, float, float]:
  """(seconds per step, compile seconds, FLOPs per step) of the real jitted step."""
  mesh = sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1])
  c.batch_size = batch
  state, _, step_fn = prior_transformer.create_state_and_step(
    c, model, prior_common.make_optimizer(c), mesh
  )
  grid = model.grid
  data = sharding.global_batch(
    make_batch(batch, model.vocab_size, grid, c.num_classes), sharding.batch_sharding(mesh)
  )
  t0 = time.perf_counter()
  compiled = step_fn.lower(state, data).compile()
  compile_s = time.perf_counter() - t0
  holder = {"state": state}

  def run():
    holder["state"], metrics = compiled(holder["state"], data)
    return metrics["loss"]

  return timeit(run, warmup, steps), compile_s, flops_of(compiled)


def sampler(model, c, settings: dict, use_cache: bool = True):
  return jax.jit(
    functools.partial(
      prior_transformer.sample_tokens,
      model,
      c,
      settings=settings,
      use_cache=use_cache,
    )
  )


def bench_sampling(model, c, params, fn, batch: int, warmup: int, steps: int) -> float:
  """Seconds of one call of a sampler (params, labels, keys) -> tokens on `batch` samples."""
  labels = jnp.arange(batch, dtype=jnp.int32) % max(c.num_classes, 1)
  keys = token_sampling.sample_keys(jax.random.PRNGKey(0), jnp.arange(batch))
  compiled = fn.lower(params, labels, keys).compile()
  return timeit(lambda: compiled(params, labels, keys), warmup, steps)


def ar_flop_ratio(model) -> tuple[float, float, float]:
  """(FLOPs per sampled token without the cache, with it, their ratio) from the shapes, for
  one sequence: matmuls 2 x (4 D^2 + 3 D H) per layer and position plus the head's 2 D V;
  attention 4 D per (query, key) pair and layer."""
  n, d, v = model.num_tokens, model.dim, model.vocab_size
  hidden = transformer.swiglu_hidden(d, model.mlp_ratio, model.multiple_of)
  per_position = model.depth * 2 * (4 * d * d + 3 * d * hidden) + 2 * d * v
  pair = model.depth * 4 * d
  uncached = n * per_position + n * n * pair  # the whole sequence, every step
  cached = per_position + n * pair  # one position, every cache slot
  return float(uncached), float(cached), uncached / cached


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--sizes", nargs="+", default=["demo", "imagenet"])
  parser.add_argument("--demo-batch", type=int, nargs="+", default=[128])
  parser.add_argument("--imagenet-batch", type=int, nargs="+", default=[1, 2])
  parser.add_argument("--sample-batch", type=int, default=8, help="samples per sampler call")
  parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--warmup", type=int, default=1)
  parser.add_argument("--no-uncached", action="store_true", help="skip the AR no-cache runs")
  parser.add_argument("--short", action="store_true", help="tiny shapes, one step: a check")
  args = parser.parse_args()
  if args.short:
    args.steps, args.warmup, args.sample_batch = 1, 0, 2
    args.demo_batch, args.imagenet_batch = [4], [1]

  print(f"JAX {jax.__version__} on {jax.devices()[0].device_kind}; compute dtype {args.dtype}")
  train_rows, ar_rows, maskgit_rows = [], [], []
  for size, name, c, vocab, grid in priors(args.sizes, args.short):
    stage = c.stage
    c[stage].dtype = args.dtype
    c.tokenizer_workdir = "bench"
    model = prior_transformer.model_from_config(c, vocab, grid)
    batches = args.demo_batch if size == "demo" else args.imagenet_batch
    params_count = None
    for batch in batches:
      seconds, compile_s, flops = bench_train(c, model, batch, args.warmup, args.steps)
      init = functools.partial(
        prior_transformer.init_state, model=model, tx=prior_common.make_optimizer(c), config=c
      )
      params_count = params_count or sum(
        x.size for x in jax.tree.leaves(jax.eval_shape(init, jax.random.PRNGKey(0)).params)
      )
      train_rows.append(
        (size, name, f"{params_count / 1e6:.1f}M", batch, seconds * 1e3, compile_s, flops / 1e9)
      )
      print(f"train {size} {name} batch {batch}: {seconds * 1e3:.1f} ms", flush=True)
    params = model.init(
      jax.random.PRNGKey(0),
      jnp.zeros((1, model.num_tokens), jnp.int32),
      jnp.zeros((1,), jnp.int32) if c.num_classes else None,
    )["params"]
    settings = prior_transformer.sampling_settings(c)
    b = args.sample_batch
    if stage == "ar":
      cached = bench_sampling(model, c, params, sampler(model, c, settings), b, args.warmup, 1)
      uncached = None
      if not args.no_uncached:
        fn = sampler(model, c, settings, use_cache=False)
        uncached = bench_sampling(model, c, params, fn, b, args.warmup, 1)
      n = model.num_tokens
      _, _, ratio = ar_flop_ratio(model)
      ar_rows.append((size, name, n, settings["guidance_scale"], b * n / cached, uncached, ratio))
      print(f"AR sampling {size} {name}: {b * n / cached:.1f} tokens/s cached", flush=True)
    else:
      for num_steps in (8, 16):
        fn = sampler(model, c, dict(settings, decode_steps=num_steps))
        seconds = bench_sampling(model, c, params, fn, b, args.warmup, 1)
        maskgit_rows.append((size, name, num_steps, settings["guidance_scale"], b / seconds))
        print(f"MaskGIT {size} {num_steps} steps: {b / seconds:.2f} images/s", flush=True)

  print("\n| size | prior | params | batch | ms / step | compile s | GFLOP / step |")
  print("|---|---|---|---|---|---|---|")
  for size, name, count, batch, ms, compile_s, gflop in train_rows:
    print(f"| {size} | {name} | {count} | {batch} | {ms:.1f} | {compile_s:.1f} | {gflop:.2f} |")
  if ar_rows:
    print(
      f"\nAR sampling, {args.sample_batch} samples per call:\n"
      "| size | prior | tokens | guidance | tokens/s cached | tokens/s uncached | measured "
      "ratio | FLOP ratio (shapes) |\n|---|---|---|---|---|---|---|---|"
    )
    for size, name, n, scale, rate, uncached, ratio in ar_rows:
      b = args.sample_batch
      slow = "skipped" if uncached is None else f"{b * n / uncached:.1f}"
      measured = "n/a" if uncached is None else f"{rate / (b * n / uncached):.1f}"
      print(f"| {size} | {name} | {n} | {scale} | {rate:.1f} | {slow} | {measured} | {ratio:.0f} |")
  if maskgit_rows:
    print(
      f"\nMaskGIT decoding, {args.sample_batch} samples per call:\n"
      "| size | prior | steps | guidance | images/s |\n|---|---|---|---|---|"
    )
    for size, name, num_steps, scale, rate in maskgit_rows:
      print(f"| {size} | {name} | {num_steps} | {scale} | {rate:.2f} |")


if __name__ == "__main__":
  main()
