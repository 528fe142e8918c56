"""Compile time and per-device memory of the f8 VQGAN generator step (or the LDM's train
step), with and without the 'fsdp' axis, on 8 simulated CPU devices (issue 6).

  python bench/bench_fsdp_memory.py                    # f8, global batch 8
  python bench/bench_fsdp_memory.py --config f16 --meshes 8x1 4x2 1x8
  python bench/bench_fsdp_memory.py --config ldm --meshes 8x1 2x4 1x8   # Table 8 UNet

Per-step time on simulated devices means nothing (they share the same cores); what the
'fsdp' axis changes is where the state lives. Nothing is allocated: the step is lowered on
ShapeDtypeStructs carrying the shardings and compiled. Reported per device: the train
state's bytes (params + Adam moments + D, by their shardings), and XLA's accounting of the
compiled program (arguments, temporaries, total = args + outputs + temps - aliased).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
)
os.environ.setdefault("JAX_PLATFORMS", "cpu")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import jax
import numpy as np
from model_fixtures import random_lpips_params

from arcvq_jax import sharding
from arcvq_jax.models import discriminator, unet
from arcvq_jax.train import gan_steps, prior_common, prior_ldm
from arcvq_jax.train import state as state_lib
from arcvq_jax.train.state import make_disc_optimizer, make_optimizer

MIB = 2**20


def per_device_bytes(abstract, shardings) -> float:
  """Bytes of a pytree on one device: each leaf's size over its number of shards."""
  total = 0.0
  for leaf, s in zip(jax.tree.leaves(abstract), jax.tree.leaves(shardings), strict=True):
    shard = s.shard_shape(leaf.shape)
    total += int(np.prod(shard)) * leaf.dtype.itemsize
  return total


def make_mesh(data: int, fsdp: int) -> jax.sharding.Mesh:
  if fsdp > 1:
    return sharding.make_mesh((data, fsdp), ("data", "fsdp"))
  return sharding.make_mesh((data,), ("data",))


def memory(compiled) -> dict:
  m = compiled.memory_analysis()
  return dict(
    args_mib=m.argument_size_in_bytes / MIB,
    temp_mib=m.temp_size_in_bytes / MIB,
    total_mib=(
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      + m.temp_size_in_bytes
      - m.alias_size_in_bytes
    )
    / MIB,
  )


def bench_ldm(data: int, fsdp: int, batch: int) -> dict:
  """The LDM train step of configs/imagenet_ldm.py (32x32x16 latents of the f8 tokenizer)."""
  from configs import imagenet_ldm  # noqa: PLC0415

  c = imagenet_ldm.get_config()
  latent = (32, 32, 16)
  mesh = make_mesh(data, fsdp)
  model = unet.from_config(c, latent_channels=latent[-1])
  tx = prior_common.make_optimizer(c)
  init = functools.partial(
    prior_ldm.init_state, model=model, tx=tx, config=c, latent_shape=latent, scale_factor=1.0
  )
  _, abstract, state_sharding = sharding.abstract_state(init, c.seed, mesh, c.sharding)
  state = jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sharding
  )
  batch_sharding = sharding.batch_sharding(mesh)
  abstract_batch = {
    "latent": jax.ShapeDtypeStruct((batch, *latent), np.float32, sharding=batch_sharding),
    "label": jax.ShapeDtypeStruct((batch,), np.int32, sharding=batch_sharding),
  }
  step = jax.jit(
    functools.partial(
      prior_ldm.train_step,
      model=model,
      tx=tx,
      schedule=prior_ldm.schedule_from_config(c),
      config=c,
      replicated=sharding.replicated(mesh),
    ),
    in_shardings=(state_sharding, batch_sharding),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  start = time.perf_counter()
  compiled = step.lower(state, abstract_batch).compile()
  compile_s = time.perf_counter() - start
  return dict(
    mesh=f"data {data} x fsdp {fsdp}",
    compile_s=compile_s,
    state_mib=per_device_bytes(abstract, state_sharding) / MIB,
    params_mib=per_device_bytes(abstract.params, state_sharding.params) / MIB,
    **memory(compiled),
  )


def bench(name: str, data: int, fsdp: int, batch: int) -> dict:
  if name == "ldm":
    return bench_ldm(data, fsdp, batch)
  from configs import imagenet, imagenet_f16  # noqa: PLC0415

  c = (imagenet if name == "f8" else imagenet_f16).get_config()
  c.batch_size = batch
  mesh = make_mesh(data, fsdp)
  shape = (c.data.image_size, c.data.image_size, 3)
  model = state_lib.build_model(c, channels=3)
  disc_model = discriminator.from_config(c)
  tx, disc_tx = make_optimizer(c), make_disc_optimizer(c)
  _, abstract, state_sharding = sharding.abstract_state(
    gan_steps.init_fn(model, disc_model, tx, disc_tx, shape), c.seed, mesh, c.sharding
  )
  with_sharding = lambda tree, sh: jax.tree.map(
    lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), tree, sh
  )
  state = with_sharding(abstract, state_sharding)
  lpips = jax.eval_shape(random_lpips_params)
  lpips = with_sharding(lpips, jax.tree.map(lambda _: sharding.replicated(mesh), lpips))
  images = jax.ShapeDtypeStruct((batch, *shape), np.float32, sharding=sharding.batch_sharding(mesh))
  steps = gan_steps.make_steps(c, model, disc_model, tx, disc_tx, mesh, state_sharding, lpips)
  start = time.perf_counter()
  compiled = steps.generator[True].lower(state.gen, state.disc, {"image": images}, lpips).compile()
  compile_s = time.perf_counter() - start
  params_gen = per_device_bytes(abstract.gen.params, state_sharding.gen.params)
  return dict(
    mesh=f"data {data} x fsdp {fsdp}",
    compile_s=compile_s,
    state_mib=per_device_bytes(abstract, state_sharding) / MIB,
    params_mib=params_gen / MIB,
    **memory(compiled),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", choices=("f8", "f16", "ldm"), default="f8")
  parser.add_argument("--batch", type=int, default=8, help="global batch")
  parser.add_argument(
    "--meshes", nargs="+", default=["8x1", "1x8"], help="data x fsdp sizes, product 8"
  )
  args = parser.parse_args()
  what = "LDM train step" if args.config == "ldm" else f"{args.config} VQGAN generator step"
  print(f"{what}, global batch {args.batch}, 8 CPU devices")
  print(
    "| mesh | compile s | state / device | network params / device | XLA args | "
    "XLA temps | XLA total |"
  )
  print("|---|---|---|---|---|---|---|")
  for spec in args.meshes:
    data, fsdp = (int(v) for v in spec.split("x"))
    r = bench(args.config, data, fsdp, args.batch)
    print(
      f"| {r['mesh']} | {r['compile_s']:.0f} | {r['state_mib']:.0f} MiB | "
      f"{r['params_mib']:.0f} MiB | {r['args_mib']:.0f} MiB | {r['temp_mib']:.0f} MiB | "
      f"{r['total_mib']:.0f} MiB |",
      flush=True,
    )


if __name__ == "__main__":
  main()
