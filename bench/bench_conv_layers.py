"""The VQ-VAE's convolutions one by one, forward + the gradients the train step needs, against
PyTorch's on the same CPU: where the train step's time goes and what bounds it.

  python bench/bench_conv_layers.py --batch 128 1024 --steps 10 [--library onednn eigen]

For every layer of configs/fashion_mnist.py's network (the residual layers' convolutions count
four times, once per residual layer) it times jax.jit(jax.grad(loss)) of that layer alone, as
`models.layers` computes it for each --library ('auto': `choose_conv_impl` /
`choose_conv_transpose_impl` for that `cpu_conv_library`, compiled with
`layers.compiler_options(library)`; default the shipped 'onednn' and 'eigen'), and torch's
conv2d / conv_transpose2d with autograd
(default intra-op threads). loss = sum(y * r) for a fixed random r, so the backward pass is the
layer's own; the input gradient is left out for the first layer (the image needs none, in
both). The JAX side returns the loss with the gradients, so its forward convolution runs as
torch's does (jax.grad alone lets XLA drop it). Each round runs every contender in turn, each
for one untimed call and then --block timed calls in a row (their mean is the round's time): a
JAX call right after a torch call ran up to 1.6x slower while torch's worker threads still
spun, and a sleep before each call made both sides slower still (cold caches and clocks), so
calls are timed back to back, as a training loop runs them. Medians over the rounds. The last
line sums the layers: the step cannot be faster than its convolutions.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import jax.numpy as jnp
import numpy as np

from arcvq_jax.models import layers

# name: (kind, input H=W, Cin, Cout, kernel, stride, padding, times in the network, input grad)
LAYERS = {
  "encoder conv_1": ("conv", 28, 1, 64, 4, 2, 1, 1, False),
  "encoder conv_2": ("conv", 14, 64, 128, 4, 2, 1, 1, True),
  "encoder conv_3": ("conv", 7, 128, 128, 3, 1, 1, 1, True),
  "residual conv3x3": ("conv", 7, 128, 32, 3, 1, 1, 4, True),
  "residual conv1x1": ("conv", 7, 32, 128, 1, 1, 0, 4, True),
  "quant_conv": ("conv", 7, 128, 64, 1, 1, 0, 1, True),
  "decoder conv_1": ("conv", 7, 64, 128, 3, 1, 1, 1, True),
  "decoder conv_trans_1": ("deconv", 7, 128, 64, 4, 2, 1, 1, True),
  "decoder conv_trans_2": ("deconv", 14, 64, 1, 4, 2, 1, 1, True),
}


def jax_layer(kind, h, cin, cout, k, s, p, batch, input_grad, rng, library="onednn"):
  """A function running the layer's jitted gradient once (blocking), and the form 'auto' took."""
  x = jnp.asarray(rng.normal(size=(batch, h, h, cin)), jnp.float32)
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)) * 0.05, jnp.float32)
  if kind == "conv":
    form = layers.choose_conv_impl(
      (k, k, cin, cout), backend="cpu", library=library, strides=(s, s), padding=(p, p)
    )
    apply = lambda x, w: layers.CONV_FORMS[form](x, w, (s, s), (p, p))
  else:
    form = layers.choose_conv_transpose_impl(cout, backend="cpu", library=library)
    apply = lambda x, w: layers.CONV_TRANSPOSE_4X4S2_IMPLS[form](x, w)
  r = jnp.asarray(rng.normal(size=jax.eval_shape(apply, x, w).shape), jnp.float32)
  loss = lambda w, x: jnp.sum(apply(x, w) * r)
  # value_and_grad: with jax.grad alone the forward convolution is dead code that XLA drops,
  # while torch's autograd always runs it; the loss keeps both sides doing the same work.
  grad = jax.jit(
    jax.value_and_grad(loss, argnums=(0, 1) if input_grad else 0),
    compiler_options=layers.compiler_options(library),
  )
  return (lambda: jax.block_until_ready(grad(w, x))), form


def torch_layer(kind, h, cin, cout, k, s, p, batch, input_grad, rng):
  import torch  # noqa: PLC0415

  x = torch.tensor(rng.normal(size=(batch, cin, h, h)), dtype=torch.float32)
  x.requires_grad_(input_grad)
  if kind == "conv":
    w = torch.tensor(rng.normal(size=(cout, cin, k, k)) * 0.05, dtype=torch.float32)
    apply = lambda x, w: torch.nn.functional.conv2d(x, w, stride=s, padding=p)
  else:
    w = torch.tensor(rng.normal(size=(cin, cout, k, k)) * 0.05, dtype=torch.float32)
    apply = lambda x, w: torch.nn.functional.conv_transpose2d(x, w, stride=s, padding=p)
  w.requires_grad_(True)
  r = torch.tensor(rng.normal(size=apply(x, w).shape), dtype=torch.float32)

  def run():
    w.grad = x.grad = None
    (apply(x, w) * r).sum().backward()

  return run


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", type=int, nargs="*", default=[128, 1024])
  p.add_argument("--steps", type=int, default=10, help="timed rounds")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--library", nargs="*", default=["onednn", "eigen"], choices=layers.CONV_LIBRARIES)
  p.add_argument(
    "--block", type=int, default=3, help="timed calls in a row per contender and round"
  )
  args = p.parse_args()
  import torch  # noqa: PLC0415

  print(
    f"jax {jax.__version__}, torch {torch.__version__} ({torch.get_num_threads()} threads), "
    f"load average {os.getloadavg()[0]:.2f}"
  )
  if "onednn" in args.library and not layers.onednn.available():
    print(
      "oneDNN's convolution is not available here (a jaxlib without it, or JAX's persistent "
      "compilation cache on): the onednn columns run Eigen's forms"
    )
  for batch in args.batch:
    rng = np.random.default_rng(0)
    runs, forms = {}, {}
    for name, spec in LAYERS.items():
      for lib in args.library:
        runs[(name, lib)], forms[(name, lib)] = jax_layer(
          *spec[:7], batch, spec[8], np.random.default_rng(0), lib
        )
      runs[(name, "torch")] = torch_layer(*spec[:7], batch, spec[8], rng)
    for run in runs.values():
      for _ in range(args.warmup):
        run()
    times = {key: [] for key in runs}
    for _ in range(args.steps):
      for key, run in runs.items():
        run()  # untimed: the other runtime's worker threads spin down meanwhile
        t0 = time.perf_counter()
        for _ in range(args.block):
          run()
        times[key].append((time.perf_counter() - t0) / args.block)
    med = {key: 1e3 * float(np.median(t)) for key, t in times.items()}
    print(f"\nbatch {batch}, medians of {args.steps} rounds (ms per layer; x n: times in the net)")
    libs = args.library
    print(
      "| layer | "
      + " | ".join(f"{lib}: form | {lib} ms | PyTorch / {lib}" for lib in libs)
      + " | PyTorch ms |"
    )
    print("|---|" + "---|---|---|" * len(libs) + "---|")
    total = dict.fromkeys([*libs, "torch"], 0.0)
    for name, spec in LAYERS.items():
      n = spec[7]
      theirs = med[(name, "torch")]
      total["torch"] += n * theirs
      cells = []
      for lib in libs:
        ours = med[(name, lib)]
        total[lib] += n * ours
        cells.append(f"{forms[(name, lib)]} | {ours:.1f} | {theirs / ours:.2f}")
      label = f"{name} x {n}" if n > 1 else name
      print(f"| {label} | " + " | ".join(cells) + f" | {theirs:.1f} |")
    cells = [f" | {total[lib]:.1f} | {total['torch'] / total[lib]:.2f}" for lib in libs]
    print("| all convolutions | " + " | ".join(cells) + f" | {total['torch']:.1f} |")
  print(f"load average at the end: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
