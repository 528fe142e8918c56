"""Importing PyTorch checkpoints (arcvq_jax/convert/torch_checkpoint.py) against the PyTorch
networks they come from.

Each parity test builds the reference network with random weights, saves it as the official
code does (ArcVQ-VAE: `torch.save(model.state_dict())` as best.pt; taming: a Lightning-style
.ckpt dict), converts it, restores the converted checkpoint as `main` does, and compares on
real images (Fashion-MNIST test images, skimage's sample photos): code indices identical;
reconstructions, losses, LPIPS and discriminator logits to 1e-4 relative.

The taming reference is the real `taming` package (pip install --no-deps
taming-transformers-rom1504==0.0.6; CompVis/taming-transformers master's modules); the
ArcVQ-VAE reference is tests/torch_reference.py, checked here against the parameter list of
the official code.
"""

from __future__ import annotations

import functools
import json
import os
import pickle
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch_reference as ref
from run_helpers import read_scalars
from skimage import data as skdata
from skimage.transform import resize

from arcvq_jax import api
from arcvq_jax import quantization as vq
from arcvq_jax.convert import torch_checkpoint as tc
from arcvq_jax.convert import torch_load
from arcvq_jax.convert import workdir as workdir_lib
from arcvq_jax.data import idx, pipeline
from arcvq_jax.losses import gan
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.models import discriminator
from arcvq_jax.models.discriminator import NLayerDiscriminator
from arcvq_jax.train import state as state_lib
from arcvq_jax.train import tokenizer, tokenizer_steps

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)

try:
  import taming.modules.diffusionmodules.model

  HAVE_TAMING = True
except ImportError:
  HAVE_TAMING = False
needs_taming = pytest.mark.skipif(
  not HAVE_TAMING,
  reason="needs the taming package as the reference: "
  "pip install --no-deps taming-transformers-rom1504==0.0.6",
)
RTOL = 1e-4

# The official ArcVQ-VAE Model's state_dict (goals4292/ArcVQ-VAE, ArcVQ-VAE/modules.py and
# quantise.py) with main.py's defaults: 1 channel, hidden 128, 2 residual layers of 32,
# K 512, D 64. Transcribed from that code: the reference network must produce exactly these.
_RES = [
  (f"{side}._residual_stack._layers.{i}._block.{j}.{p}", shape)
  for side in ("_encoder", "_decoder")
  for i in range(2)
  for j, p, shape in (
    (1, "weight", (32, 128, 3, 3)),
    (1, "bias", (32,)),
    (3, "weight", (128, 32, 1, 1)),
    (3, "bias", (128,)),
  )
]
OFFICIAL_VQVAE_KEYS = dict(
  [
    ("_encoder._conv_1.weight", (64, 1, 4, 4)),
    ("_encoder._conv_1.bias", (64,)),
    ("_encoder._conv_2.weight", (128, 64, 4, 4)),
    ("_encoder._conv_2.bias", (128,)),
    ("_encoder._conv_3.weight", (128, 128, 3, 3)),
    ("_encoder._conv_3.bias", (128,)),
    ("_pre_vq_conv.weight", (64, 128, 1, 1)),
    ("_pre_vq_conv.bias", (64,)),
    ("_vq_vae.embedding.weight", (512, 64)),
    ("_decoder._conv_1.weight", (128, 64, 3, 3)),
    ("_decoder._conv_1.bias", (128,)),
    ("_decoder._conv_trans_1.weight", (128, 64, 4, 4)),
    ("_decoder._conv_trans_1.bias", (64,)),
    ("_decoder._conv_trans_2.weight", (64, 1, 4, 4)),
    ("_decoder._conv_trans_2.bias", (1,)),
    *_RES,
  ]
)


def relative_error(got, want) -> float:
  got, want = np.asarray(got, np.float64), np.asarray(want, np.float64)
  return float(np.max(np.abs(got - want)) / max(np.max(np.abs(want)), 1e-30))


def to_nchw(x: np.ndarray) -> torch.Tensor:
  return torch.tensor(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))


def to_nhwc(t: torch.Tensor) -> np.ndarray:
  return t.detach().numpy().transpose(0, 2, 3, 1)


def photos(size: int) -> np.ndarray:
  """Four of skimage's sample photos resized to size x size: (4, size, size, 3) in [-1, 1]."""
  imgs = (skdata.astronaut(), skdata.coffee(), skdata.chelsea(), skdata.rocket())
  return np.stack(
    [resize(i, (size, size), anti_aliasing=True).astype(np.float32) * 2 - 1 for i in imgs]
  )


def fashion_test_images(n: int) -> np.ndarray:
  images, _ = idx.load_idx_split(FASHION, "test")
  return images[:n].astype(np.float32) / 127.5 - 1.0


def convert_cli(*args) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "arcvq_jax.convert.torch_checkpoint", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def run_config(workdir: str):
  """OUT/config.py's get_config(), as `main --config=OUT/config.py` loads it."""
  return tc.load_config_file(os.path.join(workdir, "config.py"))


# --------------------------------------------------------------------------- ArcVQ-VAE


def test_reference_vqvae_has_the_official_parameter_names_and_shapes():
  got = {k: tuple(v.shape) for k, v in ref.ArcVQVAEModel().state_dict().items()}
  assert got == OFFICIAL_VQVAE_KEYS


@pytest.fixture(scope="module")
def vqvae(tmp_path_factory):
  """An official-layout VQ-VAE with trained-like codebook norms, saved as best.pt and
  converted by the CLI; (torch model, workdir, conversion report)."""
  folder = tmp_path_factory.mktemp("vqvae")
  torch.manual_seed(0)
  model = ref.ArcVQVAEModel().eval()
  with torch.no_grad():  # rows of norm 0.5 .. 3, as BBNR lets them grow during training
    model._vq_vae.embedding.weight.mul_(torch.empty(512, 1).uniform_(0.5, 3.0))
  ckpt = str(folder / "best.pt")
  with open(ckpt, "wb") as f:
    torch.save(model.state_dict(), f)
  workdir = str(folder / "out")
  proc = convert_cli(
    "--kind=arcvq_vqvae",
    f"--ckpt={ckpt}",
    "--config=configs/fashion_mnist.py",
    f"--workdir={workdir}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "conversion.json")) as f:
    return model, workdir, json.load(f)


@pytest.mark.slow
def test_vqvae_conversion_report_and_step(vqvae):
  model, workdir, report = vqvae
  assert report["kind"] == "arcvq_vqvae" and report["source_format"] == "state_dict"
  assert report["tensors_converted"] == len(OFFICIAL_VQVAE_KEYS) and not report["skipped"]
  max_norm = model._vq_vae.embedding.weight.norm(dim=1).max().item()
  # No global_step in best.pt: the first step whose BBNR radius exp(3e-4 t) holds the rows.
  assert report["step"] == int(np.ceil(np.log(max_norm / (1 + 1e-6)) / 3e-4))
  assert np.exp(3e-4 * report["step"]) >= max_norm > np.exp(3e-4 * (report["step"] - 1))
  config = run_config(workdir)
  assert (config.quantizer.distance, config.quantizer.legacy_beta) == ("cosine", False)


def test_step_flag_overrides_and_warns_when_bbnr_would_shrink_the_codebook(tmp_path):
  torch.manual_seed(0)
  model = ref.ArcVQVAEModel()
  with torch.no_grad():
    model._vq_vae.embedding.weight.mul_(2.0)
  path = str(tmp_path / "best.pt")
  torch.save(model.state_dict(), path)
  ckpt = torch_load.read_checkpoint(path)
  result = tc.convert(ckpt, "arcvq_vqvae", tc.load_config_file("configs/fashion_mnist.py"), step=0)
  assert result.step == 0
  assert any("projects them into the ball" in n for n in result.notes)
  auto = tc.convert(ckpt, "arcvq_vqvae", tc.load_config_file("configs/fashion_mnist.py"))
  assert auto.step == int(np.ceil(np.log(2.0 / (1 + 1e-6)) / 3e-4))
  vanilla = tc.convert(ckpt, "arcvq_vqvae", tc.load_config_file("configs/fashion_mnist.py:vanilla"))
  assert vanilla.step == 0 and not vanilla.notes  # no BBNR: nothing to keep


@pytest.mark.slow
@needs_fashion
def test_vqvae_matches_the_reference_on_fashion_mnist(vqvae):
  model, workdir, report = vqvae
  config = run_config(workdir)
  step = report["step"]
  x = fashion_test_images(256)
  state = workdir_lib.restore_state(workdir, config, x.shape[1:])
  assert int(state.step) == step
  net = state_lib.build_model(config, channels=1)
  variance = pipeline.train_image_variance(config.data)

  with torch.no_grad():
    x_hat_ref, vq_ref, arc_ref, weight_ref, idx_ref = model(
      to_nchw(x), step=step, gamma0=config.arc.gamma0, decay=config.arc.decay
    )
  rec_ref = torch.mean((x_hat_ref - to_nchw(x)) ** 2).item() / variance

  x_hat, tokens = api.Tokenizer.from_workdir(workdir).reconstruct(x)
  np.testing.assert_array_equal(np.asarray(tokens).reshape(-1), idx_ref.numpy())
  assert relative_error(x_hat, to_nhwc(x_hat_ref)) < RTOL

  params, _ = net.quantizer.before_step(state.params, state.step)  # BBNR at `step`: a no-op
  loss, aux = jax.jit(
    functools.partial(tokenizer_steps.tokenizer_loss, model=net, data_variance=variance)
  )(params, x, state.step)
  for ours, theirs in (
    (aux["loss_vq"], vq_ref.item()),
    (aux["loss_arc"], arc_ref.item()),
    (aux["arc_weight"], weight_ref),
    (aux["loss_rec"], rec_ref),
    (loss, rec_ref + vq_ref.item() + weight_ref * arc_ref.item()),
  ):
    assert relative_error(ours, theirs) < RTOL


@pytest.mark.slow
@needs_fashion
def test_main_continues_training_the_converted_vqvae(vqvae, tmp_path):
  _, workdir, report = vqvae
  step = report["step"]
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "arcvq_jax.main",
      f"--config={workdir}/config.py",
      f"--workdir={workdir}",
      f"--config.num_train_steps={step + 2}",
      "--config.batch_size=64",
      "--config.eval_batch_size=2000",
      "--config.log_every_steps=1",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"Resuming from checkpoint step {step}" in proc.stderr
  assert sorted(read_scalars(workdir, "train/loss")) == [step + 1, step + 2]
  with open(os.path.join(workdir, "eval_results.json")) as f:
    results = json.load(f)
  assert results["step"] == step + 2 and results["num_images"] == 10000


# --------------------------------------------------------------------------- taming VQGAN

# A small taming VQGAN with the f16 layout (5 levels, attention at 16 and in the middle) at
# resolution 64, and its PatchGAN; the full f16-1024 shapes are checked separately below.
SMALL_DDCONFIG = dict(
  double_z=False,
  z_channels=16,
  resolution=64,
  in_channels=3,
  out_ch=3,
  ch=32,
  ch_mult=[1, 1, 2, 2, 4],
  num_res_blocks=2,
  attn_resolutions=[16],
  dropout=0.0,
)
# vqgan_imagenet_f16_1024's model config (taming-transformers README / model.yaml).
F16_1024_DDCONFIG = dict(
  double_z=False,
  z_channels=256,
  resolution=256,
  in_channels=3,
  out_ch=3,
  ch=128,
  ch_mult=[1, 1, 2, 2, 4],
  num_res_blocks=2,
  attn_resolutions=[16],
  dropout=0.0,
)


def lightning_ckpt(model: torch.nn.Module, global_step: int) -> dict:
  """A Lightning-style checkpoint around a state_dict (what taming's main.py writes)."""
  return {
    "epoch": 3,
    "global_step": global_step,
    "pytorch-lightning_version": "1.0.8",
    "state_dict": model.state_dict(),
    "optimizer_states": [],
    "lr_schedulers": [],
  }


def with_real_lpips_lin(model: torch.nn.Module) -> None:
  """The real LPIPS v0.1 linear weights from the lpips package, where it is installed."""
  try:
    import lpips  # noqa: PLC0415
  except ImportError:
    return
  path = os.path.join(os.path.dirname(lpips.__file__), "weights", "v0.1", "vgg.pth")
  lin = torch.load(path, map_location="cpu", weights_only=True)
  model.loss.perceptual_loss.load_state_dict(lin, strict=False)


@pytest.fixture(scope="module", params=["taming_vqgan", "arcvq_vqgan"])
def taming(request, tmp_path_factory):
  """(kind, torch model, its forward, workdir, report) for a converted small taming ckpt."""
  kind = request.param
  folder = tmp_path_factory.mktemp(kind)
  model = ref.taming_vqmodel(SMALL_DDCONFIG, n_embed=128, embed_dim=8, disc_ndf=16, seed=1)
  with_real_lpips_lin(model)
  ckpt = str(folder / "last.ckpt")
  torch.save(lightning_ckpt(model, global_step=4321), ckpt)
  workdir = str(folder / "out")
  proc = convert_cli(
    f"--kind={kind}",
    f"--ckpt={ckpt}",
    "--config=configs/imagenet_f16.py",
    "--config.model.resolution=64",
    f"--workdir={workdir}",
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(workdir, "conversion.json")) as f:
    report = json.load(f)
  forward = ref.taming_forward if kind == "taming_vqgan" else ref.arcvq_fork_forward
  return kind, model, forward, workdir, report


@pytest.mark.slow
@needs_taming
def test_taming_conversion_config_and_report(taming):
  kind, model, _, workdir, report = taming
  config = run_config(workdir)
  assert report["step"] == 4321 and report["source_format"] == "lightning"
  assert report["discriminator"] and report["lpips"]
  assert len(model.state_dict()) == report["tensors_converted"] + len(report["skipped"])
  assert all(k.endswith("num_batches_tracked") for k in report["skipped"])
  m, q = config.model, config.quantizer
  assert (
    m.ch,
    tuple(m.ch_mult),
    m.num_res_blocks,
    tuple(m.attn_resolutions),
    m.z_channels,
    m.resolution,
  ) == (32, (1, 1, 2, 2, 4), 2, (16,), 16, 64)
  assert (q.num_codes, q.embed_dim, q.legacy_beta) == (128, 8, True)
  assert (config.gan.ndf, config.gan.n_layers) == (16, 3)
  assert config.lpips_path == os.path.join(workdir, "lpips_vgg16.npz")
  if kind == "taming_vqgan":
    assert (q.distance, q.bbnr, config.arc.enabled) == ("euclidean", "off", False)
  else:
    assert (q.distance, q.bbnr, config.arc.enabled) == ("cosine", "growing", True)


@pytest.mark.slow
@needs_taming
def test_taming_matches_the_reference_on_photos(taming):
  _, model, forward, workdir, _ = taming
  config = run_config(workdir)
  x = photos(64)
  state = workdir_lib.restore_state(workdir, config, x.shape[1:])
  net = state_lib.build_model(config, channels=3)

  with torch.no_grad():
    x_hat_ref, qloss_ref, idx_ref, z_ref = forward(model, to_nchw(x))
    lpips_ref = model.loss.perceptual_loss(to_nchw(x), x_hat_ref).reshape(-1).numpy()
    disc = model.loss.discriminator
    real_ref, fake_ref = to_nhwc(disc(to_nchw(x))), to_nhwc(disc(x_hat_ref))
    disc.train()
    fake_train_ref = to_nhwc(disc(x_hat_ref))  # batch statistics
    disc.eval()

  params = state.gen.params
  # jitted: op by op, every op of the networks would compile a program of its own
  z = jax.jit(functools.partial(net.apply, method="encode"))({"params": params}, x)
  assert relative_error(z, to_nhwc(z_ref)) < RTOL
  x_hat, indices = api.Tokenizer.from_workdir(workdir).reconstruct(x)
  np.testing.assert_array_equal(np.asarray(indices).reshape(-1), idx_ref.numpy())
  assert relative_error(x_hat, to_nhwc(x_hat_ref)) < RTOL

  z_flat = jnp.asarray(z).reshape(-1, z.shape[-1])
  quant = vq.quantize_with_indices(z_flat, params["codebook"], jnp.asarray(indices).reshape(-1))
  qloss = vq.vq_loss(z_flat, quant.z_q, config.quantizer.beta, legacy=config.quantizer.legacy_beta)
  assert relative_error(qloss, qloss_ref.item()) < RTOL
  x_hat_t = x_hat_ref.numpy().transpose(0, 2, 3, 1)
  assert relative_error(jnp.mean(jnp.abs(x - x_hat)), np.mean(np.abs(x - x_hat_t))) < RTOL

  lpips_params = lpips_lib.load_params(config.lpips_path)
  lpips = jax.jit(lpips_lib.lpips_distance)(lpips_params, x, x_hat)
  assert relative_error(lpips, lpips_ref) < RTOL

  d = discriminator.from_config(config)
  variables = {"params": state.disc.params, "batch_stats": state.disc.batch_stats}
  d_eval = jax.jit(functools.partial(d.apply, train=False))
  real, fake = d_eval(variables, x), d_eval(variables, x_hat)
  assert relative_error(real, real_ref) < RTOL and relative_error(fake, fake_ref) < RTOL
  d_train = jax.jit(functools.partial(d.apply, train=True, mutable=["batch_stats"]))
  fake_train, _ = d_train(variables, x_hat)
  assert relative_error(fake_train, fake_train_ref) < RTOL
  hinge_ref = 0.5 * (np.mean(np.maximum(0, 1 - real_ref)) + np.mean(np.maximum(0, 1 + fake_ref)))
  assert relative_error(gan.hinge_d_loss(real, fake), hinge_ref) < RTOL
  assert isinstance(d, NLayerDiscriminator)


@pytest.mark.slow
@needs_taming
def test_full_size_f16_1024_maps_every_tensor():
  """The real taming modules at vqgan_imagenet_f16_1024's size (with its PatchGAN and LPIPS)
  map name for name and shape for shape onto configs/imagenet_f16.py's networks."""
  model = ref.taming_vqmodel(F16_1024_DDCONFIG, n_embed=1024, embed_dim=256)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  ckpt = torch_load.TorchCheckpoint(state=state, global_step=None, format="lightning", metadata=[])
  result = tc.convert(ckpt, "taming_vqgan", tc.load_config_file("configs/imagenet_f16.py"))
  m, q = result.config.model, result.config.quantizer
  assert (
    m.ch,
    tuple(m.ch_mult),
    m.num_res_blocks,
    tuple(m.attn_resolutions),
    m.z_channels,
    q.num_codes,
    q.embed_dim,
  ) == (128, (1, 1, 2, 2, 4), 2, (16,), 256, 1024, 256)
  n_ae = sum(v.numel() for k, v in model.state_dict().items() if not k.startswith("loss."))
  assert sum(np.size(x) for x in jax.tree.leaves(result.params)) == n_ae
  n_disc = sum(
    v.numel()
    for k, v in model.loss.discriminator.state_dict().items()
    if "running" not in k and "num_batches" not in k
  )
  assert sum(np.size(x) for x in jax.tree.leaves(result.disc_params)) == n_disc
  assert result.num_tensors == len(state)


@needs_taming
def test_unsupported_taming_variants_are_named():
  from taming.modules.discriminator.model import NLayerDiscriminator as TamingD  # noqa: PLC0415

  model = ref.taming_vqmodel(SMALL_DDCONFIG, n_embed=16, embed_dim=8, with_loss=False)
  model.loss = torch.nn.Module()
  model.loss.discriminator = TamingD(input_nc=3, ndf=16, use_actnorm=True)
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  ckpt = torch_load.TorchCheckpoint(state=state, global_step=1, format="lightning", metadata=[])
  config = tc.load_config_file("configs/imagenet_f16.py")
  config.model.resolution = 64
  with pytest.raises(tc.ConversionError, match=r"ActNorm \(loss.discriminator.main.3.initialized"):
    tc.convert(ckpt, "taming_vqgan", config)
  del model.loss
  model.quantize.register_buffer("cluster_size", torch.zeros(16))  # an EMA quantiser
  state = {k: v.numpy() for k, v in model.state_dict().items()}
  ckpt = torch_load.TorchCheckpoint(state=state, global_step=1, format="lightning", metadata=[])
  with pytest.raises(tc.ConversionError, match=r"unexpected quantize.cluster_size \(16,\)"):
    tc.convert(ckpt, "taming_vqgan", config)


# --------------------------------------------------------------------------- main on a GAN


def photo_folder(root, size: int = 32) -> str:
  """root/{train,test}/photos/*.png: size x size tiles of skimage's photos (24 and 8)."""
  from PIL import Image  # noqa: PLC0415

  tiles = [
    np.asarray(resize(img, (4 * size, 4 * size), anti_aliasing=True) * 255, np.uint8)[
      i * size : (i + 1) * size, j * size : (j + 1) * size
    ]
    for img in (skdata.astronaut(), skdata.coffee())
    for i in range(4)
    for j in range(4)
  ]
  for split, chosen in (("train", tiles[:24]), ("test", tiles[24:])):
    os.makedirs(os.path.join(root, split, "photos"))
    for n, tile in enumerate(chosen):
      Image.fromarray(tile).save(os.path.join(root, split, "photos", f"{n}.png"))
  return str(root)


@pytest.mark.slow
@needs_taming
def test_main_continues_a_converted_taming_gan(tmp_path):
  """A small taming VQGAN (f4, with PatchGAN and LPIPS) converted onto configs/tiny_vqgan.py:
  main resumes it at its global_step with both networks and the converted LPIPS, trains 2
  steps on a folder of photos and evaluates."""
  dd = dict(
    double_z=False,
    z_channels=8,
    resolution=32,
    in_channels=3,
    out_ch=3,
    ch=32,
    ch_mult=[1, 1, 2],
    num_res_blocks=1,
    attn_resolutions=[8],
    dropout=0.0,
  )
  model = ref.taming_vqmodel(dd, n_embed=64, embed_dim=8, disc_layers=2, disc_ndf=16)
  ckpt = str(tmp_path / "last.ckpt")
  torch.save(lightning_ckpt(model, global_step=5), ckpt)
  workdir = str(tmp_path / "out")
  base = tc.load_config_file("configs/tiny_vqgan.py")
  base.model.resolution = 32  # as --config.model.resolution=32
  tc.run(ckpt, "arcvq_vqgan", base, "configs/tiny_vqgan.py", workdir)
  config = run_config(workdir)
  assert tuple(config.model.attn_resolutions) == (8,) and config.model.resolution == 32
  config.data.update(dict(source="folder", path=photo_folder(tmp_path / "photos"), image_size=32))
  config.update(dict(num_train_steps=7, batch_size=4, eval_batch_size=8))
  before = workdir_lib.restore_state(workdir, config, (32, 32, 3))
  results = tokenizer.train_and_evaluate(config, workdir)
  assert sorted(read_scalars(workdir, "train/loss")) == [6, 7]
  assert np.isfinite(read_scalars(workdir, "train/d_loss")[7])
  assert results["num_images"] == 8 and np.isfinite(results["lpips"])
  after = workdir_lib.restore_state(workdir, config, (32, 32, 3))
  assert int(after.step) == 7
  moved = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), after.disc.params, before.disc.params
  )
  assert max(jax.tree.leaves(moved)) > 0  # the converted discriminator was trained on
  kept = jax.tree.map(
    lambda a, b: float(jnp.max(jnp.abs(a - b))), after.disc.batch_stats, before.disc.batch_stats
  )
  assert max(jax.tree.leaves(kept)) > 0  # and its BatchNorm statistics updated from them


# --------------------------------------------------------------------------- refusals


def test_mismatches_are_listed_by_name_and_nothing_is_written(tmp_path):
  state = {k: v.numpy() for k, v in ref.ArcVQVAEModel().state_dict().items()}
  del state["_decoder._conv_1.bias"]
  state["_decoder._conv_trans_2.weight"] = state["_decoder._conv_trans_2.weight"][:, :, :3]
  state["_vq_vae.ema_cluster_size"] = np.ones(512, np.float32)
  path = str(tmp_path / "bad.pt")
  torch.save({k: torch.tensor(v) for k, v in state.items()}, path)
  workdir = tmp_path / "out"
  with pytest.raises(tc.ConversionError) as e:
    tc.run(
      path,
      "arcvq_vqvae",
      tc.load_config_file("configs/fashion_mnist.py"),
      "configs/fashion_mnist.py",
      str(workdir),
    )
  msg = str(e.value)
  assert "missing _decoder._conv_1.bias (for decoder/conv_1/bias" in msg
  assert "_decoder._conv_trans_2.weight: shape (64, 1, 3, 4)" in msg
  assert "unexpected _vq_vae.ema_cluster_size (512,)" in msg
  assert not workdir.exists()


def test_wrong_kind_and_wrong_config_are_named(tmp_path):
  path = str(tmp_path / "best.pt")
  torch.save(ref.ArcVQVAEModel().state_dict(), path)
  ckpt = torch_load.read_checkpoint(path)
  with pytest.raises(tc.ConversionError, match=r"no 'encoder\.conv_in\.weight'.*Check --kind"):
    tc.convert(ckpt, "taming_vqgan", tc.load_config_file("configs/imagenet_f16.py"))
  with pytest.raises(tc.ConversionError, match="builds a vqgan"):
    tc.convert(ckpt, "arcvq_vqvae", tc.load_config_file("configs/imagenet_f16.py"))


@pytest.mark.slow
def test_workdir_with_checkpoints_is_refused(vqvae, tmp_path):
  _, workdir, _ = vqvae
  path = str(tmp_path / "best.pt")
  torch.save(ref.ArcVQVAEModel().state_dict(), path)
  with pytest.raises(workdir_lib.WorkdirError, match="already has checkpoints"):
    tc.run(
      path,
      "arcvq_vqvae",
      tc.load_config_file("configs/fashion_mnist.py"),
      "configs/fashion_mnist.py",
      workdir,
    )


def _fake_module(monkeypatch, name: str) -> types.ModuleType:
  """Registers an importable module `name` (and its parents) so pickle can name classes in
  it, as if pytorch_lightning were installed where the checkpoint was written."""
  parts = name.split(".")
  module = None
  for i in range(1, len(parts) + 1):
    module = types.ModuleType(".".join(parts[:i]))
    monkeypatch.setitem(sys.modules, module.__name__, module)
  return module


def _class_in(module: types.ModuleType, name: str, body: dict | None = None) -> type:
  cls = type(name, (), dict(body or {}, __module__=module.__name__))
  setattr(module, name, cls)
  return cls


@pytest.fixture
def lightning_like(monkeypatch, tmp_path):
  """A Lightning 1.x checkpoint with the usual non-tensor parts: callbacks keyed by the
  ModelCheckpoint class, numpy scalars, hyper-parameters as an AttributeDict, Adam states."""
  mc = _class_in(
    _fake_module(monkeypatch, "pytorch_lightning.callbacks.model_checkpoint"), "ModelCheckpoint"
  )
  attr_dict = _class_in(
    _fake_module(monkeypatch, "pytorch_lightning.utilities.parsing"),
    "AttributeDict",
    {"__reduce__": lambda self: (type(self), ())},
  )
  model = ref.ArcVQVAEModel(hidden=32, res_hidden=8, num_res_layers=1, num_codes=16, embed_dim=4)
  ckpt = dict(
    epoch=1,
    global_step=77,
    state_dict=model.state_dict(),
    callbacks={
      mc: {
        "best_model_score": torch.tensor(0.5),
        "current_score": np.float64(0.25),
        "best_model_path": "/logs/last.ckpt",
      }
    },
    hyper_parameters=attr_dict(),
    optimizer_states=[torch.optim.Adam(model.parameters()).state_dict()],
    lr_schedulers=[],
  )
  return ckpt, tmp_path


def test_lightning_metadata_is_read_without_its_classes(lightning_like):
  ckpt, folder = lightning_like
  path = str(folder / "plain.ckpt")
  torch.save(ckpt, path)
  with pytest.raises(pickle.UnpicklingError):  # what plain weights_only makes of it
    torch.load(path, weights_only=True)
  read = torch_load.read_checkpoint(path)
  assert read.format == "lightning" and read.global_step == 77
  assert set(read.state) == set(ckpt["state_dict"])
  np.testing.assert_array_equal(
    read.state["_pre_vq_conv.weight"], ckpt["state_dict"]["_pre_vq_conv.weight"].numpy()
  )


class _RunsCode:
  """Unpickling this calls os.system (pickle's REDUCE): it must never happen."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


class _Execs:
  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (exec, (f"open({self.marker!r}, 'w').write('ran')",))


@pytest.mark.parametrize("where", ["callbacks", "state_dict", "top"])
def test_a_checkpoint_that_would_run_code_is_refused_and_nothing_runs(lightning_like, where):
  ckpt, folder = lightning_like
  marker = str(folder / f"pwned_{where}")
  if where == "callbacks":
    ckpt["callbacks"]["evil"] = _RunsCode(marker)
  elif where == "state_dict":
    ckpt["state_dict"]["_vq_vae.embedding.weight"] = _Execs(marker)
  else:
    ckpt = _RunsCode(marker)
  path = str(folder / "evil.ckpt")
  torch.save(ckpt, path)
  with pytest.raises(torch_load.UnsafeCheckpointError) as e:
    torch_load.read_checkpoint(path)
  assert "refusing to load" in str(e.value) and "never runs code" in str(e.value)
  assert ("posix.system" if where != "state_dict" else "builtins.exec") in str(e.value)
  assert not os.path.exists(marker)


def test_an_admitted_name_is_only_an_inert_stand_in(lightning_like, monkeypatch):
  """A file that calls a class under an admitted name (a Lightning callback) gets our inert
  stand-in: the real class's code does not run."""
  ckpt, folder = lightning_like
  marker = str(folder / "pwned_admitted")

  def touch(self, *args):
    open(marker, "w").close()

  module = sys.modules["pytorch_lightning.callbacks.model_checkpoint"]
  early = _class_in(module, "EarlyStopping", {"__init__": touch, "__setstate__": touch})

  class Trojan:
    def __reduce__(self):
      return (early, ("x",), {"patience": 3})  # REDUCE: calls the class; BUILD: __setstate__

  ckpt["callbacks"]["trojan"] = Trojan()
  path = str(folder / "trojan.ckpt")
  torch.save(ckpt, path)
  read = torch_load.read_checkpoint(path)
  assert read.global_step == 77
  assert not os.path.exists(marker)


def test_a_pickled_module_is_refused(tmp_path):
  path = str(tmp_path / "model.pt")
  torch.save(
    ref.ArcVQVAEModel(hidden=32, res_hidden=8, num_res_layers=1, num_codes=16, embed_dim=4), path
  )
  with pytest.raises(torch_load.UnsafeCheckpointError, match=r"torch_reference\.ArcVQVAEModel"):
    torch_load.read_checkpoint(path)


@pytest.mark.slow
def test_cli_refuses_a_malicious_checkpoint_and_runs_nothing(tmp_path):
  marker = str(tmp_path / "pwned_cli")
  path = str(tmp_path / "evil.pt")
  torch.save(_RunsCode(marker), path)
  proc = convert_cli(
    "--kind=arcvq_vqvae",
    f"--ckpt={path}",
    "--config=configs/fashion_mnist.py",
    f"--workdir={tmp_path / 'out'}",
  )
  assert proc.returncode != 0
  assert "refusing to load" in proc.stderr and "posix.system" in proc.stderr
  assert not os.path.exists(marker) and not (tmp_path / "out").exists()
