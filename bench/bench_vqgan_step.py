"""Time, memory and FLOPs of the VQGAN's generator and discriminator steps (issue 3).

  python bench/bench_vqgan_step.py                    # f8 (configs/imagenet.py), batch 1 and 2
  python bench/bench_vqgan_step.py --config f16 --batch 2
  python bench/bench_vqgan_step.py --batch 1 --forms default before   # conv forms, one run
  python bench/bench_vqgan_step.py --batch 30 --dtype bfloat16 --peak-tflops 989   # H100: MFU

The generator step is the full one (L1 + LPIPS + GAN term with the adaptive weight + VQ +
ArcLoss, Adam update); the discriminator step is the hinge update on real and fake images.
LPIPS and the networks have random weights (timing does not depend on their values).
Times: median of --steps calls after --warmup calls, each waited for; with --forms default
before, both convolution forms are built and timed in alternating rounds (before/after
figures of one run). Memory: XLA's own
accounting of the compiled step (arguments + outputs + temporaries - aliased) and the peak
resident set size of the process. FLOPs: XLA's cost analysis of the compiled functions;
"model FLOPs per image" is the autoencoder forward (encode + quantise + decode) per image,
and the step's fwd+bwd FLOPs per image are reported too. MFU = step FLOPs / time / peak.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import os
import resource
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(
  0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
)

import jax
import numpy as np
from bench_vs_pytorch import conv_forms
from model_fixtures import random_lpips_params

from arcvq_jax import sharding
from arcvq_jax.models import discriminator
from arcvq_jax.train import gan_steps, tokenizer_steps
from arcvq_jax.train import state as state_lib
from arcvq_jax.train.state import make_disc_optimizer, make_optimizer


def flops(compiled) -> float:
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0]
  return float(analysis["flops"])


def xla_mib(compiled) -> float:
  m = compiled.memory_analysis()
  return (
    m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes - m.alias_size_in_bytes
  ) / 2**20


def get_config(name: str, dtype: str, batch: int, image_size: int = 0):
  from configs import imagenet, imagenet_f16  # noqa: PLC0415

  c = (imagenet if name == "f8" else imagenet_f16).get_config()
  c.model.dtype = dtype
  c.batch_size = batch
  c.gan.disc_start = 0
  if image_size:  # the same networks (attention placed by the nominal resolution) on smaller images
    c.data.image_size = image_size
  return c


def _reconstruct_fn(model, config):
  """tokenizer_steps.reconstruct bound to the model (and the config, where it still takes one)."""
  if "config" in inspect.signature(tokenizer_steps.reconstruct).parameters:
    return functools.partial(tokenizer_steps.reconstruct, model=model, config=config)
  return functools.partial(tokenizer_steps.reconstruct, model=model)


# The VQGAN's convolutions run on XLA's default library (YNNPACK): under Eigen its step was
# slower (5.93 s against 4.91 s, f8 at 128 px, one run), so it has no 'ynn' / 'eigen' switch.
FORMS = ("default", "before")


def build(c, forms: str = "default") -> dict:
  """Compiled generator and discriminator steps of the VQGAN that config `c` describes.

  forms: the convolution forms, as bench_vs_pytorch.conv_forms ('default', or 'before': the
  forms 'auto' chose before the hybrid forms).
  Returns the two step runners (the state carried along), the compiled steps and the
  autoencoder forward's FLOPs.
  """
  batch = c.batch_size
  shape = (c.data.image_size, c.data.image_size, 3)
  mesh = sharding.make_mesh((-1,), ("data",))
  model = state_lib.build_model(c, channels=3)
  disc_model = discriminator.from_config(c)
  lpips_params = jax.device_put(random_lpips_params(), sharding.replicated(mesh))
  x = np.random.default_rng(0).uniform(-1, 1, (batch, *shape)).astype(np.float32)
  with conv_forms(forms):
    state, _, steps_fn = gan_steps.create_state_and_steps(
      c, model, disc_model, make_optimizer(c), make_disc_optimizer(c), mesh, shape, lpips_params
    )
    batch_arr = sharding.global_batch({"image": x}, sharding.batch_sharding(mesh))
    gen_fn, disc_fn = steps_fn.generator[True], steps_fn.discriminator
    options = None
    gen_c = gen_fn.lower(state.gen, state.disc, batch_arr, lpips_params).compile(options)
    disc_c = disc_fn.lower(state.disc, batch_arr, batch_arr["image"]).compile(options)
    recon = jax.jit(_reconstruct_fn(model, c))
    forward_flops = flops(recon.lower(state.params, batch_arr["image"]).compile(options))

  holder = {"gen": state.gen, "disc": state.disc, "x_hat": batch_arr["image"]}

  def run_gen():
    holder["gen"], m, holder["x_hat"] = gen_c(
      holder["gen"], holder["disc"], batch_arr, lpips_params
    )
    return m["loss"]

  def run_disc():
    holder["disc"], m = disc_c(holder["disc"], batch_arr, holder["x_hat"])
    return m["d_loss"]

  return dict(
    run_gen=run_gen, run_disc=run_disc, gen_c=gen_c, disc_c=disc_c, forward_flops=forward_flops
  )


def bench_config(c, warmup: int, steps: int, forms=("default",)) -> dict[str, dict]:
  """Per form: median generator / discriminator step seconds, XLA MiB and FLOPs.

  With several forms the steps are timed in rounds (one generator and one discriminator
  step of each form per round), so that load from other processes falls on all alike.
  """
  built = {f: build(c, f) for f in forms}
  for b in built.values():
    for _ in range(warmup):
      jax.block_until_ready(b["run_gen"]())
      jax.block_until_ready(b["run_disc"]())
  times = {f: ([], []) for f in forms}
  for _ in range(steps):
    for f, b in built.items():
      for run, out in zip((b["run_gen"], b["run_disc"]), times[f], strict=True):
        t0 = time.perf_counter()
        jax.block_until_ready(run())
        out.append(time.perf_counter() - t0)
  return {
    f: dict(
      config=c.model.get("ch_mult"),
      dtype=c.model.dtype,
      batch=c.batch_size,
      forms=f,
      gen_s=float(np.median(times[f][0])),
      disc_s=float(np.median(times[f][1])),
      gen_mib=xla_mib(b["gen_c"]),
      disc_mib=xla_mib(b["disc_c"]),
      gen_flops=flops(b["gen_c"]),
      disc_flops=flops(b["disc_c"]),
      forward_flops=b["forward_flops"],
    )
    for f, b in built.items()
  }


def bench(
  name: str, dtype: str, batch: int, warmup: int, steps: int, forms=("default",), image_size=0
) -> list[dict]:
  results = bench_config(get_config(name, dtype, batch, image_size), warmup, steps, forms)
  for r in results.values():
    r["config"] = name
  return list(results.values())


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--config", default="f8", choices=["f8", "f16"])
  p.add_argument("--batch", type=int, nargs="*", default=[1, 2])
  p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
  p.add_argument("--warmup", type=int, default=1)
  p.add_argument("--steps", type=int, default=3)
  p.add_argument("--image-size", type=int, default=0, help="0: the config's (256)")
  p.add_argument(
    "--forms",
    nargs="*",
    default=["default"],
    choices=FORMS,
    help="convolution forms (bench_vs_pytorch.py); several are timed in alternating rounds",
  )
  p.add_argument(
    "--peak-tflops",
    type=float,
    default=0.0,
    help="the device's peak (dense) TFLOP/s for MFU, e.g. 989 for an H100 in bf16",
  )
  args = p.parse_args()

  print(
    f"jax {jax.__version__}, devices: {jax.devices()}, "
    f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}"
  )
  print(
    "| config | conv forms | dtype | batch | generator step s | discriminator step s "
    "| images/s (both) | XLA MiB gen / disc | GFLOP/image: AE forward, gen step, disc step "
    "| MFU |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for b in args.batch:
    for r in bench(
      args.config, args.dtype, b, args.warmup, args.steps, args.forms, args.image_size
    ):
      total_s = r["gen_s"] + r["disc_s"]
      mfu = (
        (r["gen_flops"] + r["disc_flops"]) / total_s / (args.peak_tflops * 1e12)
        if args.peak_tflops
        else float("nan")
      )
      print(
        f"| {r['config']} | {r['forms']} | {r['dtype']} | {b} | {r['gen_s']:.3f} | "
        f"{r['disc_s']:.3f} | {b / total_s:.2f} | {r['gen_mib']:.0f} / {r['disc_mib']:.0f} | "
        f"{r['forward_flops'] / b / 1e9:.1f}, {r['gen_flops'] / b / 1e9:.1f}, "
        f"{r['disc_flops'] / b / 1e9:.1f} | {mfu:.1%} |",
        flush=True,
      )
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  print(f"peak RSS of this process: {peak:.0f} MiB")


if __name__ == "__main__":
  main()
