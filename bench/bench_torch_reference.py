"""The same VQ-VAE train step in PyTorch, for a same-machine ratio against bench_train_step.py.

Written from docs/architecture.md, "Networks" (not copied): the public ArcVQ-VAE network
(conv 4x4 s2, conv 4x4 s2, conv 3x3, 2 residual layers; decoder with two ConvTranspose2d(4, 2, 1)),
cosine quantisation with the raw-row straight-through estimator, VQ loss, ArcLoss with the
(K, N) logit matrix as the reference computes it, the BBNR projection, Adam.

  pip install torch==2.13.0   # CPU wheel; only this script needs it
  python bench/bench_torch_reference.py --batch 128 1024
"""

from __future__ import annotations

import argparse
import math
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class Residual(nn.Module):
  def __init__(self, hidden: int, res_hidden: int):
    super().__init__()
    self.conv3 = nn.Conv2d(hidden, res_hidden, 3, padding=1)
    self.conv1 = nn.Conv2d(res_hidden, hidden, 1)

  def forward(self, x):
    # The official layer's value: its in-place first ReLU makes the skip relu(x).
    return F.relu(x) + self.conv1(F.relu(self.conv3(F.relu(x))))


class VQVAE(nn.Module):
  def __init__(self, channels=1, hidden=128, res_hidden=32, layers=2, num_codes=512, dim=64):
    super().__init__()
    self.enc = nn.ModuleList(
      [
        nn.Conv2d(channels, hidden // 2, 4, 2, 1),
        nn.Conv2d(hidden // 2, hidden, 4, 2, 1),
        nn.Conv2d(hidden, hidden, 3, padding=1),
      ]
    )
    self.enc_res = nn.ModuleList([Residual(hidden, res_hidden) for _ in range(layers)])
    self.quant_conv = nn.Conv2d(hidden, dim, 1)
    self.dec_in = nn.Conv2d(dim, hidden, 3, padding=1)
    self.dec_res = nn.ModuleList([Residual(hidden, res_hidden) for _ in range(layers)])
    self.up1 = nn.ConvTranspose2d(hidden, hidden // 2, 4, 2, 1)
    self.up2 = nn.ConvTranspose2d(hidden // 2, channels, 4, 2, 1)
    codebook = torch.empty(num_codes, dim).uniform_(-1, 1)
    self.codebook = nn.Parameter(F.normalize(codebook, dim=1))

  def forward(self, x, step, alpha=3e-4, s=10.0, m=0.1, top_k=3, beta=0.25):
    h = F.relu(self.enc[0](x))
    h = F.relu(self.enc[1](h))
    h = self.enc[2](h)
    for r in self.enc_res:
      h = r(h)
    z = self.quant_conv(F.relu(h)).permute(0, 2, 3, 1).reshape(-1, self.codebook.shape[1])
    with torch.no_grad():  # BBNR projection
      norms = self.codebook.norm(dim=1, keepdim=True)
      self.codebook.mul_(torch.clamp(math.exp(alpha * step) / norms, max=1.0))
    zn, en = F.normalize(z, dim=1), F.normalize(self.codebook, dim=1)
    idx = torch.argmax(zn @ en.t(), dim=1)
    zq = self.codebook[idx]
    vq = F.mse_loss(zq, z.detach()) + beta * F.mse_loss(z, zq.detach())
    cos = en.detach() @ zn.t()
    top_v, top_i = torch.topk(cos, top_k, dim=1)
    pos = s * torch.cos(torch.acos(top_v.clamp(-1 + 1e-7, 1 - 1e-7)) + m)
    logits = (s * cos).scatter(1, top_i, pos)
    arc = (torch.logsumexp(logits, 1) - torch.logsumexp(pos, 1)).mean()
    zq = (
      (z + (zq - z).detach())
      .reshape(x.shape[0], x.shape[2] // 4, x.shape[3] // 4, -1)
      .permute(0, 3, 1, 2)
    )
    h = self.dec_in(zq)
    for r in self.dec_res:
      h = r(h)
    x_hat = self.up2(F.relu(self.up1(F.relu(h))))
    return F.mse_loss(x_hat, x) / 0.5 + vq + math.exp(-5e-4 * step) * arc


def bench(batch: int, warmup: int, steps: int) -> float:
  torch.manual_seed(0)
  model = VQVAE()
  opt = torch.optim.Adam(model.parameters(), lr=3e-4)
  x = torch.from_numpy(
    np.random.default_rng(0).uniform(-1, 1, (batch, 1, 28, 28)).astype(np.float32)
  )
  times = []
  for i in range(warmup + steps):
    t0 = time.perf_counter()
    opt.zero_grad(set_to_none=True)
    loss = model(x, i)
    loss.backward()
    opt.step()
    if i >= warmup:
      times.append(time.perf_counter() - t0)
  return 1e3 * float(np.median(times))


def main() -> None:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--batch", type=int, nargs="*", default=[128, 1024])
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--steps", type=int, default=20)
  args = p.parse_args()
  print(f"torch {torch.__version__}, threads {torch.get_num_threads()}")
  print("| batch | PyTorch median ms/step |")
  print("|---|---|")
  for b in args.batch:
    print(f"| {b} | {bench(b, args.warmup, args.steps):.1f} |", flush=True)


if __name__ == "__main__":
  main()
