"""PyTorch reference networks for the checkpoint-import and training parity tests.

* `ArcVQVAEModel`: the VQ-VAE of the official ArcVQ-VAE code (goals4292/ArcVQ-VAE,
  ArcVQ-VAE/modules.py + quantise.py), written here from docs/architecture.md (Networks) with
  the official module attribute names, so its `state_dict()` has the keys and shapes of the
  official `best.pt` (tests/test_convert_torch.py checks them against the list
  OFFICIAL_VQVAE_KEYS transcribed from that code). Forward: encoder -> _pre_vq_conv ->
  cosine quantiser (argmin of the distance between unit vectors) -> decoder; losses as the
  official `Model.forward` / `main.train`: vq = mse(zq, sg z) + beta mse(sg zq, z), ArcLoss
  on the pre-quantisation latents, reconstruction mse / data variance.
  `relu_skip=True` (the default) gives the official residual layer's value relu(x) + block(x):
  its block starts with an in-place `nn.ReLU(True)` that rewrites x before the sum reads it, as
  our VQ-VAE's `model.residual_skip='relu'` (models/vqvae.py); False gives x + block(x),
  `model.residual_skip='identity'`.
* `official_train_step`: one step of the official `main.train` on that model (BBNR inside the
  forward pass at step t, the loss, backward, `torch.optim.Adam`), with its logged values.
  bench/trajectory_parity.py checks the model and this step against the official code itself.
* `taming_vqmodel`: taming-transformers' `VQModel` parameter layout (encoder, decoder,
  quantize, quant_conv, post_quant_conv, loss.discriminator, loss.perceptual_loss) built from
  the real `taming` package's modules (pip install --no-deps taming-transformers-rom1504),
  without Lightning and without downloading the LPIPS weights (random ones instead).

Everything is NCHW, float32, on the CPU.
"""

from __future__ import annotations

import math
import warnings

import torch
import torch.nn.functional as F
from torch import nn

# --------------------------------------------------------------------------- ArcVQ-VAE


class _Residual(nn.Module):
  """x + conv1x1(relu(conv3x3(relu(x)))), the convs at `_block.1` and `_block.3`;
  relu_skip: relu(x) + ..., the value of the official layer (its in-place first ReLU)."""

  def __init__(self, hidden: int, res_hidden: int, relu_skip: bool = True):
    super().__init__()
    self.relu_skip = relu_skip
    self._block = nn.Sequential(
      nn.ReLU(),
      nn.Conv2d(hidden, res_hidden, 3, padding=1),
      nn.ReLU(),
      nn.Conv2d(res_hidden, hidden, 1),
    )

  def forward(self, x):
    return (F.relu(x) if self.relu_skip else x) + self._block(x)


class _ResidualStack(nn.Module):
  def __init__(self, hidden: int, res_hidden: int, num_layers: int, relu_skip: bool = True):
    super().__init__()
    self._layers = nn.ModuleList(
      [_Residual(hidden, res_hidden, relu_skip) for _ in range(num_layers)]
    )

  def forward(self, x):
    for layer in self._layers:
      x = layer(x)
    return F.relu(x)


class _Encoder(nn.Module):
  def __init__(
    self, channels: int, hidden: int, num_layers: int, res_hidden: int, relu_skip: bool = True
  ):
    super().__init__()
    self._conv_1 = nn.Conv2d(channels, hidden // 2, 4, stride=2, padding=1)
    self._conv_2 = nn.Conv2d(hidden // 2, hidden, 4, stride=2, padding=1)
    self._conv_3 = nn.Conv2d(hidden, hidden, 3, padding=1)
    self._residual_stack = _ResidualStack(hidden, res_hidden, num_layers, relu_skip)

  def forward(self, x):
    x = F.relu(self._conv_1(x))
    x = F.relu(self._conv_2(x))
    return self._residual_stack(self._conv_3(x))


class _Decoder(nn.Module):
  def __init__(
    self,
    embed_dim: int,
    hidden: int,
    num_layers: int,
    res_hidden: int,
    channels: int,
    relu_skip: bool = True,
  ):
    super().__init__()
    self._conv_1 = nn.Conv2d(embed_dim, hidden, 3, padding=1)
    self._residual_stack = _ResidualStack(hidden, res_hidden, num_layers, relu_skip)
    self._conv_trans_1 = nn.ConvTranspose2d(hidden, hidden // 2, 4, stride=2, padding=1)
    self._conv_trans_2 = nn.ConvTranspose2d(hidden // 2, channels, 4, stride=2, padding=1)

  def forward(self, z):
    x = self._residual_stack(self._conv_1(z))
    return self._conv_trans_2(F.relu(self._conv_trans_1(x)))


class _CosineQuantiser(nn.Module):
  """Nearest code by the squared distance of unit vectors; the raw row is the output."""

  def __init__(self, num_codes: int, embed_dim: int, beta: float):
    super().__init__()
    self.beta = beta
    self.embedding = nn.Embedding(num_codes, embed_dim)
    with torch.no_grad():  # spherical init (docs/math.md eq. 2; official U(-1/K, 1/K) + normalise)
      w = torch.empty(num_codes, embed_dim).uniform_(-1.0 / num_codes, 1.0 / num_codes)
      self.embedding.weight.copy_(F.normalize(w, dim=1))

  def forward(self, z):
    """z (B, D, h, w) -> (z_ste (B, D, h, w), vq loss, indices (B*h*w,))."""
    z = z.permute(0, 2, 3, 1).contiguous()
    flat = z.reshape(-1, z.shape[-1])
    zn, en = F.normalize(flat, dim=1), F.normalize(self.embedding.weight, dim=1)
    dist = (zn**2).sum(1, keepdim=True) + (en**2).sum(1) - 2 * zn @ en.t()
    indices = dist.argmin(1)
    zq = self.embedding.weight[indices].view(z.shape)
    loss = F.mse_loss(zq, z.detach()) + self.beta * F.mse_loss(zq.detach(), z)
    z_ste = z + (zq - z).detach()
    return z_ste.permute(0, 3, 1, 2).contiguous(), loss, indices


def arc_loss(z, codebook, s: float, m: float, top_k: int):
  """ArcLoss of docs/math.md eq. 8-10 over all B*h*w latents of z (B, D, h, w) (official form:
  exp then divide, fine at s <= 10)."""
  flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=1)
  cos = F.normalize(codebook.detach(), dim=1) @ flat.t()  # (K, N)
  top, idx = cos.topk(top_k, dim=1)
  margin = torch.cos(torch.acos(top.clamp(-1 + 1e-7, 1 - 1e-7)) + m)
  logits = cos.clone()
  rows = torch.arange(cos.shape[0])[:, None].expand(-1, top_k)
  logits[rows, idx] = margin
  logits = s * logits
  return -torch.log(logits[rows, idx].exp().sum(1) / logits.exp().sum(1)).mean()


class ArcVQVAEModel(nn.Module):
  """The official `Model` (attribute names _encoder, _pre_vq_conv, _vq_vae, _decoder)."""

  def __init__(
    self,
    channels=1,
    hidden=128,
    num_res_layers=2,
    res_hidden=32,
    num_codes=512,
    embed_dim=64,
    beta=0.25,
    arc_s=10.0,
    arc_m=0.1,
    top_k=3,
    bbnr_alpha=3e-4,
    relu_skip=True,
  ):
    super().__init__()
    self._encoder = _Encoder(channels, hidden, num_res_layers, res_hidden, relu_skip)
    self._pre_vq_conv = nn.Conv2d(hidden, embed_dim, 1)
    self._vq_vae = _CosineQuantiser(num_codes, embed_dim, beta)
    self._decoder = _Decoder(embed_dim, hidden, num_res_layers, res_hidden, channels, relu_skip)
    self.arc = dict(s=arc_s, m=arc_m, top_k=top_k)
    self.bbnr_alpha = bbnr_alpha

  def clip_codebook_norms(self, step: int) -> None:
    """BBNR (docs/math.md, eq. 3-4): rows outside the ball of radius exp(alpha t) scaled onto
    it, in the official arithmetic (the radius a float32 exp; rows inside kept bit for bit)."""
    with torch.no_grad():
      w = self._vq_vae.embedding.weight
      norms = w.norm(p=2, dim=1, keepdim=True)
      radius = torch.exp(torch.tensor(self.bbnr_alpha * step))
      outside = (norms > radius).float()
      w.copy_(outside * (w * (radius / norms)) + (1 - outside) * w)

  def forward(self, x, step=None, gamma0=1.0, decay=5e-4):
    """x (B, C, H, W) -> (x_hat, vq loss, arc loss, arc weight, indices (B*h*w,))."""
    z = self._pre_vq_conv(self._encoder(x))
    if step is not None:
      self.clip_codebook_norms(step)
    z_ste, vq, indices = self._vq_vae(z)
    arc = arc_loss(z, self._vq_vae.embedding.weight, **self.arc)
    weight = gamma0 * math.exp(-decay * step) if step is not None else 0.0
    return self._decoder(z_ste), vq, arc, weight, indices


def official_optimizer(model: nn.Module, lr: float = 3e-4) -> torch.optim.Optimizer:
  """The official `main.py`'s optimizer: Adam at `lr`, PyTorch's defaults otherwise
  (betas (0.9, 0.999), eps 1e-8, no weight decay)."""
  return torch.optim.Adam(model.parameters(), lr=lr)


def official_train_step(
  model: ArcVQVAEModel,
  optimizer: torch.optim.Optimizer,
  x: torch.Tensor,
  step: int,
  data_variance: float,
  gamma0: float = 1.0,
  decay: float = 5e-4,
) -> dict[str, float | torch.Tensor]:
  """One iteration of the official `main.train` at step t = `step`.

  x: (B, C, H, W) float32 in [-1, 1]. The forward pass projects the codebook into the ball
  of radius exp(alpha t) after the encoder and before the search (BBNR), so Adam then updates
  the projected rows and keeps its moments; the loss is mse(x_hat, x) / data_variance + vq +
  gamma0 exp(-decay t) ArcLoss. Returns the loss terms, the gradient norm (global, before the
  optimizer) and the tokens (B*h*w,).
  """
  model.train()
  optimizer.zero_grad(set_to_none=True)
  x_hat, vq, arc, weight, indices = model(x, step=step, gamma0=gamma0, decay=decay)
  rec = F.mse_loss(x_hat, x) / data_variance
  loss = rec + (vq + weight * arc)
  loss.backward()
  grads = [p.grad.detach().double().pow(2).sum() for p in model.parameters() if p.grad is not None]
  grad_norm = float(torch.stack(grads).sum().sqrt())
  optimizer.step()
  return dict(
    loss=loss.item(),
    loss_rec=rec.item(),
    loss_vq=vq.item(),
    loss_arc=arc.item(),
    arc_weight=weight,
    grad_norm=grad_norm,
    indices=indices.detach(),
  )


# --------------------------------------------------------------------------- taming


def random_taming_lpips(seed: int = 0) -> nn.Module:
  """taming's LPIPS module with random weights (its __init__ would download VGG16 and the
  linear layers): VGG kernels He-normal, biases small, linear weights in [0, 0.1)."""
  from taming.modules.losses import lpips as tl  # noqa: PLC0415

  lp = tl.LPIPS.__new__(tl.LPIPS)
  nn.Module.__init__(lp)
  lp.scaling_layer = tl.ScalingLayer()
  lp.chns = [64, 128, 256, 512, 512]
  with warnings.catch_warnings():  # torchvision's note on the `pretrained` argument
    warnings.simplefilter("ignore", UserWarning)
    lp.net = tl.vgg16(pretrained=False, requires_grad=False)
  for i, c in enumerate(lp.chns):
    setattr(lp, f"lin{i}", tl.NetLinLayer(c, use_dropout=True))
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in lp.named_parameters():
      if name.startswith("lin"):
        p.copy_(torch.rand(p.shape, generator=g) * 0.1)
      elif p.ndim == 4:
        p.copy_(torch.randn(p.shape, generator=g) * math.sqrt(2.0 / p[0].numel()))
      else:
        p.copy_(torch.randn(p.shape, generator=g) * 0.01)
  return lp.eval()


def taming_vqmodel(
  ddconfig: dict,
  n_embed: int,
  embed_dim: int,
  *,
  disc_layers: int = 3,
  disc_ndf: int = 64,
  with_loss: bool = True,
  seed: int = 0,
) -> nn.Module:
  """taming.models.vqgan.VQModel's modules (same state_dict keys), random weights.

  The discriminator's BatchNorm running statistics are set to random values, as after
  training, so that converting them is tested.
  """
  from taming.modules.diffusionmodules.model import Decoder, Encoder  # noqa: PLC0415
  from taming.modules.discriminator.model import NLayerDiscriminator, weights_init  # noqa: PLC0415
  from taming.modules.vqvae.quantize import VectorQuantizer2  # noqa: PLC0415

  torch.manual_seed(seed)
  m = nn.Module()
  m.encoder = Encoder(**ddconfig)
  m.decoder = Decoder(**ddconfig)
  if with_loss:
    m.loss = nn.Module()
    m.loss.perceptual_loss = random_taming_lpips(seed)
    m.loss.discriminator = NLayerDiscriminator(
      input_nc=ddconfig["in_channels"], n_layers=disc_layers, ndf=disc_ndf
    ).apply(weights_init)
    with torch.no_grad():
      for mod in m.loss.discriminator.modules():
        if isinstance(mod, nn.BatchNorm2d):
          mod.running_mean.normal_(0.0, 0.1)
          mod.running_var.uniform_(0.5, 2.0)
          mod.num_batches_tracked.fill_(1234)
  m.quantize = VectorQuantizer2(n_embed, embed_dim, beta=0.25)  # legacy=True, taming's default
  m.quant_conv = nn.Conv2d(ddconfig["z_channels"], embed_dim, 1)
  m.post_quant_conv = nn.Conv2d(embed_dim, ddconfig["z_channels"], 1)
  return m.eval()


def taming_forward(m: nn.Module, x):
  """VQModel.forward: x (B, C, H, W) -> (x_hat, quantizer loss, indices (B*h*w,), z)."""
  z = m.quant_conv(m.encoder(x))
  zq, qloss, (_, _, indices) = m.quantize(z)
  return m.decoder(m.post_quant_conv(zq)), qloss, indices.reshape(-1), z


def arcvq_fork_forward(m: nn.Module, x):
  """The official ArcVQ VQGAN (the taming fork) on taming's modules: its VectorQuantizer2
  matches by cosine (argmax over unit vectors) and keeps taming's legacy loss.
  x (B, C, H, W) -> (x_hat, quantizer loss, indices (B*h*w,), z)."""
  z = m.quant_conv(m.encoder(x))
  zf = z.permute(0, 2, 3, 1).contiguous()
  flat = zf.reshape(-1, zf.shape[-1])
  weight = m.quantize.embedding.weight
  indices = (F.normalize(flat, dim=1) @ F.normalize(weight, dim=1).t()).argmax(1)
  zq = weight[indices].view(zf.shape)
  beta = m.quantize.beta
  loss = torch.mean((zq.detach() - zf) ** 2) + beta * torch.mean((zq - zf.detach()) ** 2)
  zq = (zf + (zq - zf).detach()).permute(0, 3, 1, 2).contiguous()
  return m.decoder(m.post_quant_conv(zq)), loss, indices, z
