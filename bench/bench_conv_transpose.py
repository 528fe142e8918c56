"""Forward+backward time of the VQ-VAE decoder's ConvTranspose2d(k=4, s=2, p=1) layers.

Times jax.jit(jax.value_and_grad(loss, (params, x))) for each implementation of
`layers.ConvTranspose4x4S2` ('auto' is what the decoder gets) and for flax.linen.ConvTranspose
('flax'), at the decoder's shapes:
  up1: (B, 7, 7, 128) -> (B, 14, 14, 64)
  up2: (B, 14, 14, 64) -> (B, 28, 28, 1)
  both: up1 -> relu -> up2

  PYTHONPATH=. python bench/bench_conv_transpose.py --batch 128 1024 --runs 20
(or `pip install -e .` first)
"""

import argparse
import statistics
import time

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from arcvq_jax.models import layers

SHAPES = {"up1": (7, 128, 64), "up2": (14, 64, 1)}  # name: (H=W, Cin, Cout)


def make_layer(impl, features, name):
  if impl == "flax":
    # Same semantics as ConvTranspose2d(4, 2, 1); its kernel is the spatial flip of ours.
    return nn.ConvTranspose(features, (4, 4), strides=(2, 2), padding=((2, 2), (2, 2)), name=name)
  return layers.ConvTranspose4x4S2(features, impl=impl, name=name)


class Stack(nn.Module):
  """The named layer(s) of the decoder's upsampling path."""

  impl: str
  which: str

  @nn.compact
  def __call__(self, x):
    if self.which in ("up1", "both"):
      x = make_layer(self.impl, SHAPES["up1"][2], "up1")(x)
    if self.which == "both":
      x = nn.relu(x)
    if self.which in ("up2", "both"):
      x = make_layer(self.impl, SHAPES["up2"][2], "up2")(x)
    return x


def _to_flax_params(params):
  """Our (kernel, bias) tree -> flax.linen.ConvTranspose's: same layout, spatially flipped."""
  return jax.tree_util.tree_map_with_path(
    lambda path, v: jnp.flip(v, (0, 1)) if path[-1].key == "kernel" else v, params
  )


def time_fn(fn, args, runs, warmup):
  for _ in range(warmup):
    jax.block_until_ready(fn(*args))
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - t0)
  return 1e3 * statistics.median(times)


def main():
  parser = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  parser.add_argument("--batch", type=int, nargs="+", default=[128, 1024])
  parser.add_argument(
    "--impls", nargs="+", default=["xla", "flax", "subpixel", "phase", "matmul", "auto"]
  )
  parser.add_argument("--layers", nargs="+", default=["up1", "up2", "both"])
  parser.add_argument("--runs", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=3)
  args = parser.parse_args()

  print(f"jax {jax.__version__}, backend {jax.default_backend()}, devices {jax.devices()}")
  header = f"{'layer':<6}{'B':>6}" + "".join(f"{i:>11}" for i in args.impls)
  if "xla" in args.impls:
    header += "".join(f"{'xla/' + i:>14}" for i in args.impls if i != "xla")
  print("fwd+bwd median ms over", args.runs, "runs\n" + header)

  for which in args.layers:
    size, cin = SHAPES["up1" if which == "both" else which][:2]
    for batch in args.batch:
      x = jax.random.normal(jax.random.key(1), (batch, size, size, cin))
      ref_params = Stack("xla", which).init(jax.random.key(0), x)["params"]
      ref_out = None
      ms = {}
      for impl in args.impls:
        model = Stack(impl, which)
        params = _to_flax_params(ref_params) if impl == "flax" else ref_params

        def loss(params, x, model=model):
          y = model.apply({"params": params}, x)
          return 0.5 * jnp.mean(y**2), y

        step = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))
        (_, out), _ = step(params, x)
        if ref_out is None:
          ref_out = out
        else:  # same params, same semantics: outputs must agree
          np.testing.assert_allclose(out, ref_out, atol=1e-4, rtol=1e-4, err_msg=impl)
        ms[impl] = time_fn(step, (params, x), args.runs, args.warmup)
      row = f"{which:<6}{batch:>6}" + "".join(f"{ms[i]:>11.2f}" for i in args.impls)
      if "xla" in ms:
        row += "".join(f"{ms['xla'] / ms[i]:>14.2f}" for i in args.impls if i != "xla")
      print(row, flush=True)


if __name__ == "__main__":
  main()
