"""Shared config pieces: the VQ-VAE defaults, the paper's ablation variants, validation.

The experiment files under configs/ build on `vqvae_config()` and stay plain
`get_config()` functions; `validate()` runs once, before anything is compiled, and every
error names the offending key and what to set instead.
"""

from __future__ import annotations

import math

import ml_collections

from arcvq_jax import quantization
from arcvq_jax.models.layers import CONV_LIBRARIES, CONV_TRANSPOSE_4X4S2_IMPLS
from arcvq_jax.models.vqvae import RESIDUAL_SKIPS
from arcvq_jax.quantizers import registry

CONV_TRANSPOSE_IMPLS = ("auto", *sorted(CONV_TRANSPOSE_4X4S2_IMPLS))

# Named settings of the quantizer: the paper's ablations (Tables 6, 11, 12), the common
# baselines, and the quantizer zoo (config.quantizer.name; arcvq_jax/quantizers).
_VQ = dict(name="vq", distance="euclidean", bbnr="off", arc=False)
VARIANTS = {
  # The full method.
  "arcvq": dict(name="arcvq", distance="cosine", init="spherical", bbnr="growing", arc=True),
  # Euclidean nearest neighbour, normal init, no BBNR, no ArcLoss.
  "vanilla": dict(_VQ, init="normal"),
  # Cosine matching only (Table 11).
  "cosine": dict(name="arcvq", distance="cosine", init="normal", bbnr="off", arc=False),
  # Spherical init + BBNR without ArcLoss (Table 6, "+ BBNR").
  "bbnr": dict(name="arcvq", distance="cosine", init="spherical", bbnr="growing", arc=False),
  # BBNR with M(t) = 1 for all t, plus ArcLoss (Table 12).
  "bbnr_arc_fixed": dict(name="arcvq", distance="cosine", init="spherical", bbnr="fixed", arc=True),
  # Baselines users expect: EMA k-means codebook, and vanilla VQ with dead-code restart.
  "ema": dict(_VQ, init="normal", codebook_update="ema"),
  "restart": dict(_VQ, init="normal", restart_threshold=1.0),
  # taming-transformers' VectorQuantizer2: uniform(-1/K, 1/K) init.
  "vq": dict(_VQ, init="uniform"),
  # The rotation trick (Fifty et al. 2025) as the gradient path of vq and of ArcVQ.
  "vq_rotation": dict(_VQ, init="uniform", gradient="rotation"),
  "arcvq_rotation": dict(
    name="arcvq",
    distance="cosine",
    init="spherical",
    bbnr="growing",
    arc=True,
    gradient="rotation",
  ),
  # SimVQ (Zhu et al. 2024): a frozen N(0, 1/D) codebook C through a learned linear map W,
  # codes C W; Euclidean search, VQ loss (eq. 46). The paper's straight-through estimator, or
  # vector-quantize-pytorch's default, the rotation trick.
  "simvq": dict(
    name="simvq", distance="euclidean", gradient="ste", legacy_beta=False, bbnr="off", arc=False
  ),
  "simvq_rotation": dict(
    name="simvq",
    distance="euclidean",
    gradient="rotation",
    legacy_beta=False,
    bbnr="off",
    arc=False,
  ),
  # FSQ (Mentzer et al. 2023): one latent channel per level, prod(levels) codes, no codebook
  # and no loss; the paper's recommended levels for about 2^10 and 2^16 codes: (8, 5, 5, 5) =
  # 1000 and (8, 8, 8, 5, 5, 5) = 64000 codes.
  "fsq": dict(name="fsq", levels=(8, 5, 5, 5), embed_dim=4, bbnr="off", arc=False),
  "fsq_64k": dict(name="fsq", levels=(8, 8, 8, 5, 5, 5), embed_dim=6, bbnr="off", arc=False),
  # Lookup-free quantization (MAGVIT-v2): 9 sign bits, 2^9 = 512 codes as the paper's K.
  "lfq": dict(name="lfq", embed_dim=9, num_codes=512, arc=False, bbnr="off", legacy_beta=False),
}


def apply_variant(config: ml_collections.ConfigDict, variant: str) -> ml_collections.ConfigDict:
  """Sets the quantiser / ArcLoss switches of a named variant (see VARIANTS)."""
  if variant not in VARIANTS:
    raise ValueError(
      f"unknown variant {variant!r}: choose one of {sorted(VARIANTS)} "
      "(e.g. --config=configs/fashion_mnist.py:vanilla)"
    )
  v = dict(VARIANTS[variant])
  config.variant = variant
  config.arc.enabled = v.pop("arc")
  for key, value in v.items():
    config.quantizer[key] = value
  return config


def vqvae_config() -> ml_collections.ConfigDict:
  """Defaults of the VQ-VAE runs (docs/math.md, section 13; paper Table 7 for MNIST/CIFAR-10)."""
  c = ml_collections.ConfigDict()
  c.stage = "tokenizer"
  c.variant = "arcvq"
  c.seed = 0

  c.model = ml_collections.ConfigDict(
    dict(
      name="vqvae",
      hidden=128,
      res_hidden=32,
      num_res_layers=2,
      # The residual layers' skip path: 'relu' as the official code computes it (its first
      # ReLU is in place, so the skip adds relu(x)); 'identity' adds x, the form of
      # arcvq-jax's earlier runs (workdirs without this key). models/vqvae.py.
      residual_skip="relu",
      # Transposed convs as forward convs / GEMM + col2im ('auto' picks per layer):
      # XLA's CPU kernel gradient of lax.conv_transpose is several times slower
      # (bench/bench_conv_transpose.py).
      deconv_impl="auto",
      # On the CPU, which library runs the VQ-VAE's convolutions: 'onednn' (oneDNN's
      # convolution through XLA:CPU's custom call, kernel gradients on Eigen; Eigen where
      # the jaxlib has no oneDNN or JAX's persistent compilation cache is on) made its train
      # step 1.03-1.16x (batch 128) and 1.08-1.16x (1024) faster than 'eigen'
      # (bench/bench_train_step.py --library), which was 1.3x faster than XLA's default
      # YNNPACK ('ynn'; bench/bench_vs_pytorch.py). The conv forms are chosen for it and the
      # steps compiled with it; no effect on GPU / TPU.
      cpu_conv_library="onednn",
    )
  )
  c.quantizer = ml_collections.ConfigDict(
    dict(
      name="arcvq",  # the quantizer (arcvq_jax/quantizers/registry.py)
      num_codes=512,
      embed_dim=64,
      distance="cosine",
      init="spherical",
      beta=0.25,
      legacy_beta=False,
      codebook_update="loss",  # or 'ema'
      ema_decay=0.99,
      ema_eps=1e-5,
      bbnr="growing",
      bbnr_alpha=3e-4,
      restart_threshold=0.0,  # > 0 turns dead-code restart on (EMA usage per step)
      usage_decay=0.99,
      # How the encoder's gradient passes the quantizer: 'ste' (straight-through) or
      # 'rotation' (the rotation trick, Fifty et al. 2025); vq and arcvq.
      gradient="ste",
      search_impl="auto",  # nearest-code search: 'naive' | 'blocked' | 'auto', as arc.impl
      # A mesh axis (e.g. 'data', 'fsdp', 'model') to split the codebook's K rows over in the
      # blocked ArcLoss and search (each device its slice, then a global combine); '' keeps
      # it whole on every device (the ArcLoss rows are split over the devices either way).
      # Where the codebook is stored is sharding.param_rules' business, e.g.
      # ('codebook$', ('model', None)); a different layout is resharded, not wrong.
      codebook_axis="",
      # lfq (docs/math.md, eq. 51-55): 2^embed_dim codes of +-codebook_scale; the loss is
      # entropy_weight * (per-token entropy - diversity_gamma * batch entropy) of the softmax
      # over the codes at entropy_temperature, + beta * commitment.
      codebook_scale=1.0,
      entropy_weight=0.1,
      diversity_gamma=1.0,
      entropy_temperature=0.01,
      # fsq (docs/math.md, eq. 47-50): levels per latent channel, prod(levels) codes;
      # embed_dim must be len(levels). num_codes is not used by fsq.
      levels=(8, 5, 5, 5),
    )
  )
  c.arc = ml_collections.ConfigDict(
    dict(
      enabled=True,
      s=10.0,
      m=0.1,
      top_k=3,
      gamma0=1.0,
      decay=5e-4,
      # 'naive' holds the K x N logits; 'blocked' goes through blocks and never does
      # (same value and gradient; on a mesh of several devices each takes a share of the
      # rows, blockwise.arc_loss_sharded); 'auto' takes the blocked form once K x N exceeds
      # one block.
      impl="auto",
    )
  )
  c.optimizer = ml_collections.ConfigDict(
    dict(
      name="adam",
      lr=3e-4,
      b1=0.9,
      b2=0.999,
      grad_clip_norm=0.0,
      scale_lr=False,  # True: the learning rate is lr x batch_size (taming's scaling)
    )
  )
  c.data = ml_collections.ConfigDict(
    dict(
      source="idx",
      path="/usr/share/datasets/fashion-mnist",
      name="",
      data_dir=ml_collections.FieldReference(None, field_type=str),
      train_split="train",
      eval_split="test",
      image_size=ml_collections.FieldReference(None, field_type=int),
      # Train split only (evaluation always centre-crops): random crop instead of the centre
      # crop after resizing the shorter side, and horizontal flips (taming's ImageNet).
      random_crop=False,
      random_flip=False,
      num_workers=0,
    )
  )
  # LPIPS (VGG16) weights converted by `python -m arcvq_jax.convert.lpips_weights`; where
  # set, evaluation also reports LPIPS. A VQGAN's perceptual loss needs them.
  c.lpips_path = ""

  c.batch_size = 1024
  c.num_epochs = 500
  c.num_train_steps = -1  # > 0 overrides num_epochs
  c.eval_batch_size = 1000

  c.log_every_steps = 50
  c.image_every_steps = 1000
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3
  c.eval_every_steps = 0  # 0: evaluate once, at the end

  c.sharding = ml_collections.ConfigDict(
    dict(
      # Mesh axis sizes; -1 takes the remaining devices. The batch is split over 'data'.
      mesh_shape=(-1,),
      mesh_axes=("data",),
      # (regex over the '/'-joined parameter path, PartitionSpec as a tuple) pairs; the
      # first match wins, unmatched parameters are replicated.
      param_rules=(),
      # With a mesh axis named 'fsdp' (e.g. mesh_shape=(-1, 4), mesh_axes=('data', 'fsdp')),
      # unmatched parameters of at least this many elements, and their optimizer moments,
      # are split over it (sharding.py); smaller ones stay replicated.
      fsdp_min_size=2**14,
    )
  )
  # Checkpoints are written in a background thread while training goes on (orbax async).
  c.checkpoint_async = True
  return c


def vqgan_config() -> ml_collections.ConfigDict:
  """Defaults of the VQGAN tokenizer on ImageNet (docs/math.md, sections 10.2, 13; paper Table 7).

  taming-transformers' architecture (f8 here: ch_mult (1, 2, 2, 4), 32x32 tokens), K 1024,
  D 16, L1 + LPIPS + PatchGAN hinge loss with the adaptive weight, taming's quantiser loss
  ("legacy" beta), Adam (0.5, 0.9) at 4.5e-6 x batch size, batch 30, 15 epochs.
  """
  c = vqvae_config()
  c.model = ml_collections.ConfigDict(
    dict(
      name="vqgan",
      ch=128,
      ch_mult=(1, 2, 2, 4),
      num_res_blocks=2,
      attn_resolutions=(32,),  # taming: attention at these nominal resolutions (and mid)
      resolution=256,  # taming's nominal image size that places the attention blocks
      z_channels=16,
      dropout=0.0,
      dtype="float32",  # compute dtype: 'bfloat16' keeps float32 params, quantiser and losses
    )
  )
  q = c.quantizer
  q.num_codes, q.embed_dim = 1024, 16
  q.legacy_beta = True  # taming's placement of beta, as the official VQGAN runs
  q.bbnr_alpha = 1e-5  # paper Table 7 (the public VQGAN config uses 5e-5)
  c.arc.decay = 1e-4
  c.optimizer.update(dict(lr=4.5e-6, scale_lr=True, b1=0.5, b2=0.9))
  c.loss = ml_collections.ConfigDict(dict(perceptual_weight=1.0))
  c.lpips_path = "~/.cache/arcvq_jax/lpips_vgg16.npz"
  c.gan = ml_collections.ConfigDict(
    dict(
      disc_start=250001,  # f(t) = 1 from this step on: the generator feels the GAN term
      # D learns from this step on (-1: from disc_start); earlier than disc_start lets D
      # catch up before its gradient reaches the autoencoder.
      disc_train_start=-1,
      disc_weight=0.8,  # taming's discriminator_weight in the adaptive weight
      ndf=64,
      n_layers=3,
    )
  )
  c.data.update(
    dict(
      source="tfds",
      name="imagenet2012",
      path="",
      train_split="train",
      eval_split="validation",
      image_size=256,
      random_crop=True,
      random_flip=True,
    )
  )
  c.batch_size = 30
  c.num_epochs = 15
  c.eval_batch_size = 50
  c.log_every_steps = 100
  c.image_every_steps = 2000
  c.checkpoint_every_steps = 5000
  return c


# The groups and keys each stage, and each tokenizer model, reads besides the common ones
# (seed, optimizer, batch_size, ...). A config file written for another stage lacks them, and
# an override (--config.stage=ldm) cannot add them; config files that have them:
# EXAMPLE_CONFIGS (a test keeps both true).
STAGE_KEYS = {
  "tokenizer": ("model.name", "quantizer", "arc", "data.source", "eval_batch_size"),
  "ldm": ("tokenizer_workdir", "unet", "diffusion", "sampling", "ema"),
  "pixelcnn": ("tokenizer_workdir", "pixelcnn", "sampling", "ema"),
  "maskgit": ("tokenizer_workdir", "maskgit", "guidance", "sampling", "ema"),
  "ar": ("tokenizer_workdir", "ar", "guidance", "sampling", "ema"),
}
MODEL_KEYS = {
  "vqvae": ("model.hidden", "model.res_hidden", "model.num_res_layers"),
  "vqgan": (
    "model.ch",
    "model.ch_mult",
    "model.num_res_blocks",
    "model.attn_resolutions",
    "model.resolution",
    "model.z_channels",
    "model.dropout",
    "model.dtype",
    "loss.perceptual_weight",
    "gan",
  ),
}
EXAMPLE_CONFIGS = {
  "tokenizer": ("configs/tiny.py", "configs/fashion_mnist.py"),
  "ldm": ("configs/tiny_ldm.py", "configs/imagenet_ldm.py"),
  "pixelcnn": ("configs/tiny_pixelcnn.py", "configs/cifar10_pixelcnn.py"),
  "maskgit": ("configs/tiny_maskgit.py", "configs/imagenet_maskgit.py"),
  "ar": ("configs/tiny_ar.py", "configs/imagenet_ar.py"),
  "vqvae": ("configs/tiny.py", "configs/fashion_mnist.py"),
  "vqgan": ("configs/tiny_vqgan.py", "configs/imagenet.py"),
}


def _has(c: ml_collections.ConfigDict, key: str) -> bool:
  """Whether the dotted `key` leads through groups of `c` to a value or group."""
  value = c
  for part in key.split("."):
    if not isinstance(value, ml_collections.ConfigDict) or part not in value:
      return False
    value = value[part]
  return True


def check_sections(c: ml_collections.ConfigDict, source: str = "the config") -> None:
  """Raises ValueError ('config.stage: ...' or 'config.model.name: ...') where `c` lacks the
  keys its stage (and a tokenizer's model) reads, e.g. --config.stage=ldm on a tokenizer's
  config file; `source` names the file in the message. Call before anything reads them."""
  stage = c.get("stage", "tokenizer")
  if stage not in STAGE_KEYS:
    _fail(
      "stage",
      f"{stage!r} is not one of {list(STAGE_KEYS)}",
      "Give a config file of the stage you mean, e.g. "
      + ", ".join(f"--config={EXAMPLE_CONFIGS[s][0]} ({s})" for s in STAGE_KEYS)
      + ".",
    )
  checks = [("stage", stage, STAGE_KEYS[stage])]
  model = c.model.get("name") if stage == "tokenizer" and _has(c, "model.name") else None
  if model is not None and model not in MODEL_KEYS:
    _fail("model.name", f"{model!r} is not supported", f"Use one of {list(MODEL_KEYS)}.")
  if model is not None:
    checks.append(("model.name", model, MODEL_KEYS[model]))
  for key, value, needed in checks:
    missing = [k for k in needed if not _has(c, k)]
    if missing:
      what = {
        "ldm": "an LDM",
        "pixelcnn": "a PixelCNN",
        "maskgit": "a MaskGIT",
        "ar": "an autoregressive transformer",
        "vqgan": "a VQGAN",
        "vqvae": "a VQ-VAE",
      }
      _fail(
        key,
        f"is {value!r}, but {source} has no {', '.join(missing)} (what "
        f"{what.get(value, 'a tokenizer')} run reads; "
        "an override cannot add them)",
        f"Give a config file written for it, e.g. --config={EXAMPLE_CONFIGS[value][0]} or "
        f"--config={EXAMPLE_CONFIGS[value][1]}.",
      )


def downsample_factor(c: ml_collections.ConfigDict) -> int:
  """Image side / token grid side of the configured autoencoder."""
  if c.model.name == "vqgan":
    return 2 ** (len(c.model.ch_mult) - 1)
  return 4


def _fail(key: str, problem: str, fix: str) -> None:
  raise ValueError(f"config.{key}: {problem}. {fix}")


def _get(c: ml_collections.ConfigDict, key: str):
  value = c
  for part in key.split("."):
    value = value[part]
  return value


def _check_choice(c: ml_collections.ConfigDict, key: str, choices) -> None:
  value = _get(c, key)
  if value not in choices:
    _fail(key, f"{value!r} is not supported", f"Use one of {list(choices)}.")


def _check_positive_int(c: ml_collections.ConfigDict, key: str) -> None:
  value = _get(c, key)
  if not isinstance(value, int) or value < 1:
    _fail(key, f"must be a positive integer, got {value!r}", "Set it to 1 or more.")


def _check_finite(c: ml_collections.ConfigDict, prefix: str = "") -> None:
  """Every float of the config (nested groups and tuples included) is finite: NaN or Inf in
  a rate, a weight or a schedule never trains, and would pass most range checks."""
  for key, value in c.items():
    name = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict):
      _check_finite(value, f"{name}.")
      continue
    items = value if isinstance(value, list | tuple) else (value,)
    for item in items:
      if isinstance(item, float) and not math.isfinite(item):
        _fail(
          name,
          f"must be a finite number, got {value!r}",
          f"Set --config.{name} to a finite value (see the config file for the default).",
        )


def _validate_vqgan(c: ml_collections.ConfigDict) -> None:
  """The VQGAN's model, loss and GAN keys."""
  m, g = c.model, c.gan
  for key in (
    "model.ch",
    "model.num_res_blocks",
    "model.z_channels",
    "model.resolution",
    "gan.ndf",
    "gan.n_layers",
  ):
    _check_positive_int(c, key)
  if m.ch % 32:
    _fail(
      "model.ch",
      f"must be a multiple of 32 (GroupNorm with 32 groups), got {m.ch}",
      "taming uses 128.",
    )
  if not m.ch_mult or not all(isinstance(v, int) and v >= 1 for v in m.ch_mult):
    _fail(
      "model.ch_mult",
      f"must be a non-empty list of positive integers, got {m.ch_mult!r}",
      "Use (1, 2, 2, 4) for f8 or (1, 1, 2, 2, 4) for f16.",
    )
  if not 0.0 <= m.dropout < 1.0:
    _fail("model.dropout", f"must be in [0, 1), got {m.dropout}", "taming uses 0.")
  _check_choice(c, "model.dtype", ("float32", "bfloat16"))
  if not c.loss.perceptual_weight >= 0:
    _fail(
      "loss.perceptual_weight",
      f"must be >= 0, got {c.loss.perceptual_weight}",
      "taming uses 1.0; 0 trains without LPIPS.",
    )
  if c.loss.perceptual_weight > 0 and not c.lpips_path:
    _fail(
      "lpips_path",
      "is empty, but the perceptual loss (loss.perceptual_weight > 0) needs "
      "the LPIPS VGG16 weights; a random LPIPS would silently ruin the run",
      "Convert them once with `python -m arcvq_jax.convert.lpips_weights "
      "--vgg16=vgg16-397923af.pth --out=PATH` and set --config.lpips_path=PATH (or "
      "--config.loss.perceptual_weight=0 to train without LPIPS).",
    )
  if not (isinstance(g.disc_start, int) and g.disc_start >= 0):
    _fail(
      "gan.disc_start",
      f"must be an integer >= 0, got {g.disc_start!r}",
      "taming's ImageNet config uses 250001; 0 turns the GAN term on from the start.",
    )
  if not (isinstance(g.disc_train_start, int) and g.disc_train_start >= -1):
    _fail(
      "gan.disc_train_start",
      f"must be an integer >= -1, got {g.disc_train_start!r}",
      "-1 starts the discriminator's training at gan.disc_start.",
    )
  if not g.disc_weight >= 0:
    _fail("gan.disc_weight", f"must be >= 0, got {g.disc_weight}", "taming uses 0.8.")


def validate(c: ml_collections.ConfigDict, num_devices: int, process_count: int = 1) -> None:
  """Raises ValueError naming the key for any invalid value; call before compiling."""
  check_sections(c)
  q, a, o = c.quantizer, c.arc, c.optimizer
  _check_finite(c)
  registry.from_config(c)  # the quantizer's name and its own settings
  _check_choice(c, "stage", ("tokenizer",))
  _check_choice(c, "model.name", ("vqvae", "vqgan"))
  _check_choice(c, "quantizer.distance", quantization.DISTANCES)
  _check_choice(c, "quantizer.init", quantization.INITS)
  _check_choice(c, "quantizer.bbnr", quantization.BBNR_MODES)
  _check_choice(c, "quantizer.codebook_update", ("loss", "ema"))
  _check_choice(c, "optimizer.name", ("adam", "adamw"))
  _check_choice(c, "data.source", ("idx", "folder", "tfds"))
  # "streamed": the name of the blocked form before 0.2 (configs saved in older workdirs).
  _check_choice(c, "arc.impl", ("auto", "naive", "blocked", "streamed"))
  _check_choice(c, "quantizer.search_impl", ("auto", "naive", "blocked", "streamed"))

  for key in (
    "quantizer.num_codes",
    "quantizer.embed_dim",
    "batch_size",
    "eval_batch_size",
    "log_every_steps",
    "keep_checkpoints",
  ):
    _check_positive_int(c, key)
  if c.model.name == "vqvae":
    _check_choice(c, "model.deconv_impl", tuple(CONV_TRANSPOSE_IMPLS))
    if "residual_skip" in c.model:
      _check_choice(c, "model.residual_skip", RESIDUAL_SKIPS)
    if c.model.get("cpu_conv_library"):
      _check_choice(c, "model.cpu_conv_library", CONV_LIBRARIES)
    for key in ("model.hidden", "model.res_hidden"):
      _check_positive_int(c, key)
    if c.model.num_res_layers < 0:
      _fail("model.num_res_layers", f"must be >= 0, got {c.model.num_res_layers}", "Set 0 or more.")
    if c.model.hidden % 2:
      _fail(
        "model.hidden",
        f"must be even (the encoder's first conv has hidden/2 channels), got {c.model.hidden}",
        "Use an even width such as 128.",
      )
  else:
    _validate_vqgan(c)
  for key in ("image_every_steps", "checkpoint_every_steps", "eval_every_steps"):
    if c[key] < 0:
      _fail(key, f"must be >= 0, got {c[key]}", "Use 0 to turn it off.")

  if not q.beta >= 0:
    _fail("quantizer.beta", f"must be >= 0, got {q.beta}", "The paper uses 0.25.")
  if not 0.0 <= q.ema_decay < 1.0:
    _fail("quantizer.ema_decay", f"must be in [0, 1), got {q.ema_decay}", "Typical: 0.99.")
  if not 0.0 <= q.usage_decay < 1.0:
    _fail("quantizer.usage_decay", f"must be in [0, 1), got {q.usage_decay}", "Typical: 0.99.")
  if not q.ema_eps > 0:
    _fail("quantizer.ema_eps", f"must be > 0, got {q.ema_eps}", "Typical: 1e-5.")
  if not (q.bbnr_alpha >= 0 and math.isfinite(q.bbnr_alpha)):
    _fail(
      "quantizer.bbnr_alpha",
      f"must be a finite value >= 0, got {q.bbnr_alpha}",
      "The paper uses 3e-4 (MNIST, CIFAR-10).",
    )
  if q.restart_threshold < 0:
    _fail(
      "quantizer.restart_threshold",
      f"must be >= 0, got {q.restart_threshold}",
      "Use 0 to turn dead-code restart off.",
    )
  if q.get("codebook_axis"):
    axes, shape = tuple(c.sharding.mesh_axes), list(c.sharding.mesh_shape)
    if q.codebook_axis not in axes:
      _fail(
        "quantizer.codebook_axis",
        f"{q.codebook_axis!r} is not one of the mesh axes {axes}",
        "Name one of sharding.mesh_axes, or '' to keep the codebook whole.",
      )
    known = math.prod(v for v in shape if v != -1)
    size = shape[axes.index(q.codebook_axis)] if len(shape) == len(axes) else 1
    if size == -1 and known and num_devices % known == 0:
      size = num_devices // known
    if size > 0 and q.num_codes % size:
      _fail(
        "quantizer.codebook_axis",
        f"the {q.num_codes} codes do not split evenly over the "
        f"{size} devices of mesh axis {q.codebook_axis!r}",
        "Use a num_codes divisible by that axis' size, or another axis.",
      )

  if a.enabled:
    if not isinstance(a.top_k, int) or a.top_k < 1:
      _fail("arc.top_k", f"must be an integer >= 1, got {a.top_k!r}", "The paper uses 3.")
    if not a.s > 0:
      _fail("arc.s", f"must be > 0, got {a.s}", "The paper uses 10.")
    if not 0 <= a.m < math.pi:
      _fail("arc.m", f"must be in [0, pi), got {a.m}", "The paper uses 0.1.")
    if not a.gamma0 >= 0:
      _fail("arc.gamma0", f"must be >= 0, got {a.gamma0}", "The paper uses 1.0.")
    if not a.decay >= 0:
      _fail("arc.decay", f"must be >= 0, got {a.decay}", "The paper uses 5e-4 (MNIST, CIFAR-10).")

  if not o.lr > 0:
    _fail("optimizer.lr", f"must be > 0, got {o.lr}", "The paper uses 3e-4 for the VQ-VAE.")
  for key in ("b1", "b2"):
    if not 0.0 <= o[key] < 1.0:
      _fail(f"optimizer.{key}", f"must be in [0, 1), got {o[key]}", "Adam's defaults: 0.9, 0.999.")
  if o.grad_clip_norm < 0:
    _fail(
      "optimizer.grad_clip_norm", f"must be >= 0, got {o.grad_clip_norm}", "0 turns clipping off."
    )

  if c.num_train_steps <= 0 and c.num_epochs <= 0:
    _fail(
      "num_train_steps",
      "and config.num_epochs are both <= 0",
      "Set --config.num_train_steps=N or --config.num_epochs=E.",
    )
  for key in ("batch_size", "eval_batch_size"):
    if c[key] % num_devices:
      _fail(
        key,
        f"{c[key]} is not divisible by the {num_devices} devices",
        f"Use a multiple of {num_devices}.",
      )
    if c[key] % process_count:
      _fail(
        key,
        f"{c[key]} is not divisible by the {process_count} processes",
        f"Use a multiple of {process_count}.",
      )
  if len(c.sharding.mesh_shape) != len(c.sharding.mesh_axes):
    _fail(
      "sharding.mesh_shape",
      f"{c.sharding.mesh_shape} and sharding.mesh_axes {c.sharding.mesh_axes} differ in length",
      "Give one size per axis name.",
    )
  if "data" not in c.sharding.mesh_axes:
    _fail(
      "sharding.mesh_axes",
      f"{c.sharding.mesh_axes} has no 'data' axis",
      "The batch is split over an axis named 'data'.",
    )
  if len(set(c.sharding.mesh_axes)) != len(c.sharding.mesh_axes):
    _fail(
      "sharding.mesh_axes",
      f"{c.sharding.mesh_axes} names an axis twice",
      "Give each mesh axis its own name, e.g. ('data', 'fsdp').",
    )
  if c.sharding.get("fsdp_min_size", 0) < 0:
    _fail(
      "sharding.fsdp_min_size",
      f"must be >= 0, got {c.sharding.fsdp_min_size}",
      "It is the smallest parameter (in elements) split over the 'fsdp' axis.",
    )


def _patchgan_side(side: int, n_layers: int) -> int:
  """Side of the PatchGAN's logit map: n_layers 4x4 stride-2 convs, then two stride-1 ones."""
  for _ in range(n_layers):
    side = (side + 2 - 4) // 2 + 1
  return side - 2


def validate_against_data(c: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> None:
  """Checks that need the data's image shape (H, W, C)."""
  h, w, channels = image_shape
  f = downsample_factor(c)
  if h % f or w % f:
    _fail(
      "data",
      f"images are {h}x{w}, but the {c.model.name} downsamples by {f}",
      f"Use images whose sides are multiples of {f} (config.data.image_size resizes "
      "TFDS and folder images).",
    )
  if c.model.name == "vqgan":
    if channels not in (1, 3) and c.loss.perceptual_weight > 0:
      _fail(
        "loss.perceptual_weight",
        f"LPIPS takes 1- or 3-channel images, these have {channels}",
        "Set it to 0 for other images.",
      )
    if _patchgan_side(min(h, w), c.gan.n_layers) < 1:
      _fail(
        "gan.n_layers",
        f"{c.gan.n_layers} stride-2 layers leave no PatchGAN output for {h}x{w} images",
        "Use fewer layers (taming: 3 for 256x256).",
      )
  if c.arc.enabled:
    tokens = c.batch_size * (h // f) * (w // f)
    if c.arc.top_k > tokens:
      _fail(
        "arc.top_k",
        f"{c.arc.top_k} is more than the {tokens} latent tokens of a batch",
        "Lower arc.top_k or raise batch_size.",
      )
