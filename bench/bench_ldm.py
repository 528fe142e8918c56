"""Time, memory and FLOPs of the Table 8 latent-diffusion UNet (configs/imagenet_ldm.py):
training step, DDIM sampling, and the frozen VQGAN f8 encoder a precompute pass runs once.

  python bench/bench_ldm.py                      # CPU-friendly split measurement, batch 1 and 2
  python bench/bench_ldm.py --full --batch 64    # the real jitted train step (needs ~10 GB+)

The 395M-parameter UNet's full train step holds params, grads, two Adam moments and the EMA
(5 x 1.6 GB) plus activations. Default (split) mode, for machines that must stay under
~8 GB: it times the forward + backward (value_and_grad of the eps loss: params, grads and
activations in memory) at each batch size, and the Adam + EMA update on a slice of the
parameters, scaled to all of them (element-wise work, linear in the parameter count); the
step time is their sum. --full times `prior_ldm.create_state_and_step`'s step itself.
In both modes the FLOPs and XLA's memory figure are those of the compiled full step, from
lowering it on abstract shapes (nothing allocated).

DDIM: `ddim_sample` with --ddim-probe steps (a lax.scan, guidance 1.4: the UNet runs on the
doubled batch), per image, times 250 / probe: the 250-step time per image (the step cost
does not depend on t). Times are medians of --steps calls after --warmup.
"""

from __future__ import annotations

import argparse
import functools
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np
import optax

from arcvq_jax import diffusion, sharding
from arcvq_jax.models import unet
from arcvq_jax.train import prior_common, prior_ldm
from arcvq_jax.train import state as state_lib
from configs import imagenet, imagenet_ldm

LATENT = (32, 32, 16)


def timeit(fn, warmup: int, steps: int) -> float:
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return float(np.median(times))


def cost(compiled) -> tuple[float, float]:
  """(FLOPs, XLA MiB = arguments + outputs + temporaries - aliased) of a compiled function."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  m = compiled.memory_analysis()
  mib = (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  ) / 2**20
  return float(analysis["flops"]), mib


def rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def get_config(dtype: str):
  c = imagenet_ldm.get_config()
  c.unet.dtype = dtype
  return c


def make_batch(batch: int):
  rng = np.random.default_rng(0)
  return {
    "latent": jnp.asarray(rng.normal(size=(batch, *LATENT)).astype(np.float32)),
    "label": jnp.asarray(rng.integers(0, 1000, batch).astype(np.int32)),
  }


def full_step_analysis(c, model, tx, batch: int) -> tuple[float, float]:
  """FLOPs and XLA MiB of the real train step, compiled on abstract shapes."""
  init = functools.partial(
    prior_ldm.init_state, model=model, tx=tx, config=c, latent_shape=LATENT, scale_factor=1.0
  )
  abstract_state = jax.eval_shape(init, jax.random.PRNGKey(0))
  abstract_batch = {
    "latent": jax.ShapeDtypeStruct((batch, *LATENT), jnp.float32),
    "label": jax.ShapeDtypeStruct((batch,), jnp.int32),
  }
  step = jax.jit(
    functools.partial(
      prior_ldm.train_step, model=model, tx=tx, schedule=prior_ldm.schedule_from_config(c), config=c
    ),
    donate_argnums=(0,),
  )
  return cost(step.lower(abstract_state, abstract_batch).compile())


def bench_train_split(c, model, params, batch: int, warmup: int, steps: int) -> dict:
  schedule = prior_ldm.schedule_from_config(c)
  data = make_batch(batch)

  def loss_fn(p, key):
    eps_fn = lambda x, t, y: model.apply({"params": p}, x, t, y)
    return diffusion.eps_loss(
      key,
      eps_fn,
      data["latent"],
      data["label"],
      schedule,
      c.diffusion.cond_drop_prob,
      c.num_classes,
    )[0]

  grad_fn = jax.jit(jax.value_and_grad(loss_fn))
  t0 = time.perf_counter()
  compiled = grad_fn.lower(params, jax.random.PRNGKey(0)).compile()
  compile_s = time.perf_counter() - t0
  fwd_bwd_s = timeit(lambda: compiled(params, jax.random.PRNGKey(1))[0], warmup, steps)
  return dict(fwd_bwd_s=fwd_bwd_s, compile_s=compile_s, fwd_bwd_mib=cost(compiled)[1])


def bench_update_slice(
  params, tx, ema_decay: float, target: int, warmup: int, steps: int
) -> tuple[float, int]:
  """Seconds of Adam + EMA over all params, measured on a slice of about `target` params."""
  leaves = sorted(jax.tree.leaves(params), key=lambda x: -x.size)
  chosen, count = [], 0
  for leaf in leaves:
    if count >= target:
      break
    chosen.append(jnp.array(leaf))
    count += leaf.size
  grads = [jnp.ones_like(x) * 1e-3 for x in chosen]
  opt_state = tx.init(chosen)
  ema = [jnp.array(x) for x in chosen]

  @functools.partial(jax.jit, donate_argnums=(0, 1, 3))
  def update(p, opt, g, e):
    u, opt = tx.update(g, opt, p)
    p = optax.apply_updates(p, u)
    return p, opt, prior_common.ema_update(e, p, jnp.float32(ema_decay))

  holder = {"p": chosen, "o": opt_state, "e": ema}

  def run():
    holder["p"], holder["o"], holder["e"] = update(holder["p"], holder["o"], grads, holder["e"])
    return holder["e"][0]

  seconds = timeit(run, warmup, steps)
  total = sum(x.size for x in jax.tree.leaves(params))
  return seconds * total / count, count


def bench_full(c, model, tx, batch: int, warmup: int, steps: int) -> float:
  mesh = sharding.make_mesh((-1,), ("data",))
  state, _, step_fn = prior_ldm.create_state_and_step(c, model, tx, mesh, LATENT, 1.0)
  data = sharding.global_batch(
    {k: np.asarray(v) for k, v in make_batch(batch).items()}, sharding.batch_sharding(mesh)
  )
  holder = {"state": state}

  def run():
    holder["state"], m = step_fn(holder["state"], data)
    return m["loss"]

  return timeit(run, warmup, steps)


def bench_ddim(
  c, model, params, images: int, probe: int, warmup: int, steps: int
) -> tuple[float, float]:
  """(seconds per image for 250 guided DDIM steps, FLOPs of one guided eps evaluation per
  image). XLA's cost analysis counts a loop body once, so the FLOPs are those of one
  guided evaluation (the UNet on the doubled batch), compiled on its own."""
  fn = prior_ldm.make_sample_fn(model, c, num_steps=probe, guidance_scale=1.4)
  x_T = prior_ldm.initial_noise(jax.random.PRNGKey(0), jnp.arange(images), LATENT)
  labels = jnp.arange(images, dtype=jnp.int32)
  compiled = fn.lower(params, x_T, labels, jax.random.PRNGKey(0)).compile()
  seconds = timeit(lambda: compiled(params, x_T, labels, jax.random.PRNGKey(0)), warmup, steps)
  guided = jax.jit(
    lambda p, x, t, y: diffusion.guided_eps(
      lambda x, t, y: model.apply({"params": p}, x, t, y), x, t, y, 1.4, c.num_classes
    )
  )
  t = jnp.full((images,), 500, jnp.int32)
  flops, _ = cost(guided.lower(params, x_T, t, labels).compile())
  return seconds / probe * c.sampling.ddim_steps / images, flops / images


def bench_encoder(batch: int, warmup: int, steps: int) -> tuple[float, float]:
  """(seconds, FLOPs) per image of the frozen VQGAN f8 encoder (configs/imagenet.py)."""
  tc = imagenet.get_config()
  model = state_lib.build_model(tc, channels=3)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, 256, 256, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])["params"]
  enc = jax.jit(lambda p, x: model.apply({"params": p}, x, method="encode"))
  compiled = enc.lower(params, x).compile()
  seconds = timeit(lambda: compiled(params, x), warmup, steps)
  return seconds / batch, cost(compiled)[0] / batch


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", type=int, nargs="*", default=[1, 2], help="none: skip training")
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--full", action="store_true", help="time the real train step")
  p.add_argument(
    "--update-slice",
    type=int,
    default=40_000_000,
    help="params in the slice the split mode times Adam + EMA on",
  )
  p.add_argument("--ddim-images", type=int, nargs="*", default=[1], help="none: skip DDIM")
  p.add_argument("--ddim-probe", type=int, default=3, help="DDIM steps actually run")
  p.add_argument("--encoder-batch", type=int, default=2, help="0 skips the encoder")
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--peak-tflops", type=float, default=0.0, help="for MFU, e.g. 989 (H100 bf16)")
  args = p.parse_args()

  print(f"jax {jax.__version__}, devices: {jax.devices()}, cpus: {os.cpu_count()}")
  c = get_config(args.dtype)
  model = unet.from_config(c, latent_channels=LATENT[-1])
  tx = prior_common.make_optimizer(c)
  params = jax.jit(model.init)(
    jax.random.PRNGKey(0),
    jnp.zeros((1, *LATENT)),
    jnp.zeros((1,), jnp.int32),
    jnp.zeros((1,), jnp.int32),
  )["params"]
  n_params = sum(x.size for x in jax.tree.leaves(params))
  print(f"UNet params: {n_params:,} ({n_params * 4 / 2**30:.2f} GiB float32)")
  fwd = jax.jit(lambda p, x, t, y: model.apply({"params": p}, x, t, y))
  fwd_flops, _ = cost(
    fwd.lower(
      params, jnp.zeros((1, *LATENT)), jnp.zeros((1,), jnp.int32), jnp.zeros((1,), jnp.int32)
    ).compile()
  )
  print(f"eps-network forward: {fwd_flops / 1e9:.1f} GFLOP per image (XLA cost analysis)")

  update_s = None
  if not args.full and args.batch:
    update_s, sliced = bench_update_slice(
      params, tx, c.ema.decay, args.update_slice, args.warmup, args.steps
    )
    print(f"Adam + EMA update: {update_s:.3f} s for all params (timed on {sliced:,}, scaled)")

  print(
    "| batch | dtype | train step s | images/s | step GFLOP/image | XLA MiB (full step) | "
    "fwd+bwd s | peak RSS GiB | MFU |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  for b in args.batch:
    step_flops, step_mib = full_step_analysis(c, model, tx, b)
    if args.full:
      step_s, fwd_bwd = bench_full(c, model, tx, b, args.warmup, args.steps), float("nan")
    else:
      r = bench_train_split(c, model, params, b, args.warmup, args.steps)
      fwd_bwd = r["fwd_bwd_s"]
      step_s = fwd_bwd + update_s
    mfu = f"{step_flops / step_s / (args.peak_tflops * 1e12):.1%}" if args.peak_tflops else "n/a"
    print(
      f"| {b} | {args.dtype} | {step_s:.2f} | {b / step_s:.3f} | "
      f"{step_flops / b / 1e9:.1f} | {step_mib:.0f} | {fwd_bwd:.2f} | {rss_gib():.1f} | "
      f"{mfu} |",
      flush=True,
    )

  for n in args.ddim_images:
    per_image, eps_flops = bench_ddim(c, model, params, n, args.ddim_probe, args.warmup, args.steps)
    print(
      f"DDIM 250 steps, guidance 1.4, {n} image(s) per call: {per_image:.1f} s per image "
      f"(timed {args.ddim_probe} steps, x {250 / args.ddim_probe:.1f}); "
      f"{eps_flops * 250 / 1e12:.2f} TFLOP per image",
      flush=True,
    )

  if args.encoder_batch:
    enc_s, enc_flops = bench_encoder(args.encoder_batch, args.warmup, args.steps)
    print(
      f"VQGAN f8 encoder (the frozen tokenizer, 256x256): {enc_s:.2f} s and "
      f"{enc_flops / 1e9:.1f} GFLOP per image at batch {args.encoder_batch}",
      flush=True,
    )
  print(f"peak RSS of this process: {rss_gib():.1f} GiB")


if __name__ == "__main__":
  main()
