"""GPU/TPU benchmark (issue 19.4): the VQGAN f8 train step, the LDM train step, the tokenizer's
encode throughput, and taming-transformers' PyTorch VQGAN step on the same card.

  python bench/bench_accelerator.py --peak-tflops 989          # H100 SXM (dense bf16 peak)
  python bench/bench_accelerator.py --parts vqgan taming --batch 8 --dtypes bfloat16
  python bench/bench_accelerator.py --tiny --steps 2           # CPU smoke test: small models

Parts (--parts, default all):
  vqgan   the full VQGAN generator step (L1 + LPIPS + adaptive-weight GAN term + VQ + ArcLoss +
          BBNR, Adam) plus the discriminator step of configs/imagenet.py (f8, 256x256), for each
          --dtypes entry (config.model.dtype); bench_vqgan_step.bench_config does the work.
  ldm     the LDM UNet's jitted train step (configs/imagenet_ldm.py, 32x32x16 latents, EMA,
          Adam), float32 and bfloat16 (config.unet.dtype); bench_ldm.bench_full.
  encode  the tokenizer's encode: VQGAN f8 encoder + nearest-code search, images -> tokens.
  taming  taming-transformers' VQGAN (Encoder / Decoder / VectorQuantizer2 /
          VQLPIPSWithDiscriminator) generator + discriminator step, same architecture, batch
          and image size, on torch's device (CUDA when present; skipped on a CPU-only machine
          unless --tiny). Its LPIPS VGG16 and LPIPS heads have RANDOM weights (no download on
          the GPU machine; timing does not depend on the values). Differences: taming's plain
          VQ (no ArcLoss / BBNR), and its discriminator step reuses the generator's
          reconstruction (as ours does; taming's Lightning loop runs a second forward).
          bfloat16: torch.autocast. MFU uses our step's FLOPs (same networks).

Columns: step seconds (median of --steps after --warmup), images/s, GFLOP per step from XLA's
cost analysis of the compiled step(s) (`compiled.cost_analysis()['flops']`), MFU = FLOPs /
seconds / (--peak-tflops 1e12), the device's peak memory in use after the part
(`device.memory_stats()['peak_bytes_in_use']`; a process-wide high-water mark, so a later row
shows the largest so far: run one part per process for per-part figures; n/a where the
backend does not report it, e.g. the CPU) and XLA's own memory figure of the compiled step
(arguments + outputs + temporaries - aliased). taming: torch.cuda.max_memory_allocated.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import jax
import jax.numpy as jnp
import numpy as np

PARTS = ("vqgan", "ldm", "encode", "taming")


def peak_device_mib() -> float | None:
  stats = jax.devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return None
  return stats["peak_bytes_in_use"] / 2**20


def vqgan_config(dtype: str, batch: int, tiny: bool):
  from configs import imagenet  # noqa: PLC0415

  c = imagenet.get_config()
  c.model.dtype = dtype
  c.batch_size = batch
  c.gan.disc_start = 0
  if tiny:  # taming's blocks at width 32, f2, 32x32 images
    c.model.update(
      dict(ch=32, ch_mult=(1, 2), num_res_blocks=1, attn_resolutions=(16,), resolution=32)
    )
    c.data.image_size = 32
    c.gan.update(dict(ndf=16, n_layers=2))
  return c


def ldm_setup(dtype: str, tiny: bool):
  import bench_ldm  # noqa: PLC0415

  if tiny:
    from configs import tiny_ldm  # noqa: PLC0415

    c = tiny_ldm.get_config()
    bench_ldm.LATENT = (7, 7, 16)
  else:
    from configs import imagenet_ldm  # noqa: PLC0415

    c = imagenet_ldm.get_config()
    bench_ldm.LATENT = (32, 32, 16)
  c.unet.dtype = dtype
  return bench_ldm, c


def bench_vqgan(dtype: str, batch: int, tiny: bool, warmup: int, steps: int) -> dict:
  import bench_vqgan_step  # noqa: PLC0415

  c = vqgan_config(dtype, batch, tiny)
  r = bench_vqgan_step.bench_config(c, warmup, steps)["default"]
  seconds = r["gen_s"] + r["disc_s"]
  return dict(
    seconds=seconds,
    images_per_s=batch / seconds,
    flops=r["gen_flops"] + r["disc_flops"],
    xla_mib=r["gen_mib"] + r["disc_mib"],
    note=f"gen {r['gen_s']:.3f} s + disc {r['disc_s']:.3f} s",
  )


def bench_ldm_step(dtype: str, batch: int, tiny: bool, warmup: int, steps: int) -> dict:
  from arcvq_jax.models import unet  # noqa: PLC0415
  from arcvq_jax.train import prior_common  # noqa: PLC0415

  bl, c = ldm_setup(dtype, tiny)
  model = unet.from_config(c, latent_channels=bl.LATENT[-1])
  tx = prior_common.make_optimizer(c)
  flops, mib = bl.full_step_analysis(c, model, tx, batch)
  seconds = bl.bench_full(c, model, tx, batch, warmup, steps)
  return dict(seconds=seconds, images_per_s=batch / seconds, flops=flops, xla_mib=mib, note="")


def _tokens_fn(model):
  """images -> tokens through the model's encoder and its quantizer's search."""
  from arcvq_jax import quantization as vq  # noqa: PLC0415

  def tokens(params, x):
    z = model.apply({"params": params}, x, method="encode")
    z = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
    quantizer = getattr(model, "quantizer", None)
    if quantizer is not None and hasattr(quantizer, "tokens"):
      return quantizer.tokens(params, z)
    return vq.nearest_code(z, params["codebook"].astype(jnp.float32), "cosine")

  return tokens


def bench_encode(dtype: str, batch: int, tiny: bool, warmup: int, steps: int) -> dict:
  from bench_ldm import cost, timeit  # noqa: PLC0415

  from arcvq_jax.train import state as state_lib  # noqa: PLC0415

  c = vqgan_config(dtype, batch, tiny)
  size = c.data.image_size
  model = state_lib.build_model(c, channels=3)
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (batch, size, size, 3)), jnp.float32)
  params = jax.jit(model.init)(jax.random.PRNGKey(0), x[:1])["params"]
  compiled = jax.jit(_tokens_fn(model)).lower(params, x).compile()
  seconds = timeit(lambda: compiled(params, x), warmup, steps)
  flops, mib = cost(compiled)
  return dict(seconds=seconds, images_per_s=batch / seconds, flops=flops, xla_mib=mib, note="")


def taming_step(c, dtype: str):
  """taming-transformers' VQGAN generator + discriminator step (random LPIPS weights)."""
  import torch  # noqa: PLC0415
  import torchvision  # noqa: PLC0415
  from taming.modules.diffusionmodules.model import Decoder, Encoder  # noqa: PLC0415
  from taming.modules.losses import lpips as taming_lpips  # noqa: PLC0415
  from taming.modules.losses.vqperceptual import VQLPIPSWithDiscriminator  # noqa: PLC0415
  from taming.modules.vqvae.quantize import VectorQuantizer2  # noqa: PLC0415

  class RandomVGG:  # taming's lpips.vgg16 calls models.vgg16(pretrained=True): no download
    @staticmethod
    def vgg16(pretrained=False, **kwargs):
      return torchvision.models.vgg16(weights=None)

  taming_lpips.models = RandomVGG
  taming_lpips.LPIPS.load_from_pretrained = lambda self, name="vgg_lpips": None

  device = "cuda" if torch.cuda.is_available() else "cpu"
  m, q, size = c.model, c.quantizer, c.data.image_size
  dd = dict(
    double_z=False,
    z_channels=m.z_channels,
    resolution=m.resolution,
    in_channels=3,
    out_ch=3,
    ch=m.ch,
    ch_mult=list(m.ch_mult),
    num_res_blocks=m.num_res_blocks,
    attn_resolutions=list(m.attn_resolutions),
    dropout=0.0,
  )

  class VQModel(torch.nn.Module):
    def __init__(self):
      super().__init__()
      self.encoder, self.decoder = Encoder(**dd), Decoder(**dd)
      self.quantize = VectorQuantizer2(q.num_codes, q.embed_dim, beta=0.25, legacy=True)
      self.quant_conv = torch.nn.Conv2d(m.z_channels, q.embed_dim, 1)
      self.post_quant_conv = torch.nn.Conv2d(q.embed_dim, m.z_channels, 1)

    def forward(self, x):
      quant, qloss, _ = self.quantize(self.quant_conv(self.encoder(x)))
      return self.decoder(self.post_quant_conv(quant)), qloss

  model = VQModel().to(device)
  loss = VQLPIPSWithDiscriminator(
    disc_start=0,
    disc_num_layers=c.gan.n_layers,
    disc_ndf=c.gan.ndf,
    disc_weight=c.gan.disc_weight,
    perceptual_weight=c.loss.perceptual_weight,
  ).to(device)
  opt_ae = torch.optim.Adam(model.parameters(), lr=c.optimizer.lr, betas=(0.5, 0.9))
  opt_disc = torch.optim.Adam(loss.discriminator.parameters(), lr=c.optimizer.lr, betas=(0.5, 0.9))
  x = torch.from_numpy(
    np.random.default_rng(0).uniform(-1, 1, (c.batch_size, 3, size, size)).astype(np.float32)
  ).to(device)
  last_layer = model.decoder.conv_out.weight
  autocast = torch.autocast(device, dtype=torch.bfloat16, enabled=dtype == "bfloat16")
  counter = {"step": 0}

  def step():
    with autocast:
      xrec, qloss = model(x)
      aeloss, _ = loss(qloss, x, xrec, 0, counter["step"], last_layer=last_layer)
    opt_ae.zero_grad(set_to_none=True)
    aeloss.backward()
    opt_ae.step()
    with autocast:
      dloss, _ = loss(qloss, x, xrec.detach(), 1, counter["step"], last_layer=last_layer)
    opt_disc.zero_grad(set_to_none=True)
    dloss.backward()
    opt_disc.step()
    counter["step"] += 1
    if device == "cuda":
      torch.cuda.synchronize()

  return step, device


def bench_taming(dtype: str, batch: int, tiny: bool, warmup: int, steps: int) -> dict | None:
  import torch  # noqa: PLC0415

  if not torch.cuda.is_available() and not tiny:
    return None
  c = vqgan_config(dtype, batch, tiny)
  step, device = taming_step(c, dtype)
  if device == "cuda":
    torch.cuda.reset_peak_memory_stats()
  for _ in range(warmup):
    step()
  times = []
  for _ in range(steps):
    t0 = time.perf_counter()
    step()
    times.append(time.perf_counter() - t0)
  seconds = float(np.median(times))
  peak = torch.cuda.max_memory_allocated() / 2**20 if device == "cuda" else None
  return dict(
    seconds=seconds,
    images_per_s=batch / seconds,
    flops=None,
    xla_mib=None,
    peak_mib=peak,
    note=f"torch {torch.__version__} on {device}, random LPIPS weights",
  )


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--parts", nargs="*", default=list(PARTS), choices=PARTS)
  p.add_argument("--dtypes", nargs="*", default=["float32", "bfloat16"])
  p.add_argument("--batch", type=int, default=0, help="0: 8 for vqgan/taming/encode, 64 ldm")
  p.add_argument("--tiny", action="store_true", help="small models and images (CPU check)")
  p.add_argument("--warmup", type=int, default=2)
  p.add_argument("--steps", type=int, default=10)
  p.add_argument("--peak-tflops", type=float, default=0.0, help="device peak for MFU")
  args = p.parse_args()

  dev = jax.devices()[0]
  print(
    f"jax {jax.__version__}, {jax.device_count()} x {dev.device_kind} ({dev.platform}), "
    f"tiny={args.tiny}, peak {args.peak_tflops or 'n/a'} TFLOP/s"
  )
  print(
    "| part | dtype | batch | step s | images/s | GFLOP/step | MFU | peak device MiB | "
    "XLA MiB | note |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  runners = dict(vqgan=bench_vqgan, ldm=bench_ldm_step, encode=bench_encode, taming=bench_taming)
  step_flops = {}  # our VQGAN step's FLOPs per dtype, for taming's MFU
  for part in args.parts:
    default_batch = (2 if part == "ldm" else 1) if args.tiny else (64 if part == "ldm" else 8)
    batch = args.batch or default_batch
    for dtype in args.dtypes:
      r = runners[part](dtype, batch, args.tiny, args.warmup, args.steps)
      if r is None:
        print(f"| {part} | {dtype} | {batch} | skipped: no CUDA device for torch | | | | | | |")
        continue
      if part == "vqgan":
        step_flops[dtype] = r["flops"]
      flops = r["flops"] if r["flops"] is not None else step_flops.get(dtype)
      mfu = (
        f"{flops / r['seconds'] / (args.peak_tflops * 1e12):.1%}"
        if args.peak_tflops and flops
        else "n/a"
      )
      peak = r.get("peak_mib", peak_device_mib())
      gflop = f"{flops / 1e9:.1f}" if flops else "n/a"
      peak_s = "n/a" if peak is None else f"{peak:.0f}"
      xla_s = "n/a" if r["xla_mib"] is None else f"{r['xla_mib']:.0f}"
      print(
        f"| {part} | {dtype} | {batch} | {r['seconds']:.4f} | {r['images_per_s']:.2f} | "
        f"{gflop} | {mfu} | {peak_s} | {xla_s} | {r['note']} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
