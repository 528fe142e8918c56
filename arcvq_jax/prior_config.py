"""Config pieces of the generative priors (docs/math.md, section 11): the defaults of the
latent-diffusion model, the PixelCNN and the two transformer token priors (MaskGIT and the
autoregressive transformer), and their validation.

A prior trains on a frozen tokenizer: `config.tokenizer_workdir` is the --workdir of a
tokenizer run (python -m arcvq_jax.main with a tokenizer config). Its images come from the
tokenizer's own `config.data` unless a key of the prior's `config.data` is set (not None).
`config.tokenizer_expect` states the codebook size and latent shape the prior was built for;
a tokenizer that differs is refused before anything is compiled (0 / () skips a check).
"""

from __future__ import annotations

from collections.abc import Callable

import ml_collections

from arcvq_jax import diffusion
from arcvq_jax.config import _check_choice, _check_finite, _check_positive_int, _fail
from arcvq_jax.models import ar as ar_model
from arcvq_jax.models import transformer
from arcvq_jax.models.layers import XLA_CONV_LIBRARIES

STAGES = ("ldm", "pixelcnn", "maskgit", "ar")
# The transformer priors over token grids (train/prior_transformer.py).
TRANSFORMER_STAGES = ("maskgit", "ar")
# The sampling settings each transformer prior reads (config.sampling keys, sample.py's flags).
SAMPLING_KEYS = {
  "maskgit": ("decode_steps", "temperature", "choice_temperature", "guidance_scale"),
  "ar": ("temperature", "top_k", "top_p", "guidance_scale"),
}


def _data_overrides() -> ml_collections.ConfigDict:
  """config.data: every key left None takes the tokenizer run's value."""
  ref = ml_collections.FieldReference
  return ml_collections.ConfigDict(
    dict(
      source=ref(None, field_type=str),
      path=ref(None, field_type=str),
      name=ref(None, field_type=str),
      data_dir=ref(None, field_type=str),
      train_split=ref(None, field_type=str),
      image_size=ref(None, field_type=int),
    )
  )


def _common(stage: str) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.stage = stage
  c.seed = 0
  c.tokenizer_workdir = ""  # required: the tokenizer run's --workdir
  # Checkpoint step of the tokenizer (-1: its latest when the prior starts; the step is then
  # recorded in the prior's workdir, tokenizer.json, and resumed runs and sampling keep it).
  c.tokenizer_step = -1
  c.tokenizer_expect = ml_collections.ConfigDict(dict(num_codes=0, latent_shape=()))
  c.data = _data_overrides()
  c.num_classes = 0  # > 0: class-conditional on labels 0..num_classes-1
  # The tokenizer runs once over the training split and its outputs are stored here
  # ('' = WORKDIR/latents, a local path); later runs reuse them.
  c.latents = ml_collections.ConfigDict(dict(dir="", encode_batch_size=64))
  c.optimizer = ml_collections.ConfigDict(
    dict(name="adam", lr=1e-4, b1=0.9, b2=0.999, weight_decay=0.0, grad_clip_norm=0.0)
  )
  c.ema = ml_collections.ConfigDict(
    dict(
      decay=0.0,  # 0 turns the EMA of the weights off
      warmup=True,  # LDM's LitEma: decay_t = min(decay, (1 + t) / (10 + t))
    )
  )
  c.batch_size = 64
  c.num_train_steps = 1000
  c.log_every_steps = 100
  c.checkpoint_every_steps = 5000
  c.keep_checkpoints = 3
  c.sample_every_steps = 0  # > 0: log a grid of samples every so many steps
  # As the tokenizer's (config.py): the batch is split over 'data' (and 'fsdp'); with an
  # 'fsdp' axis, parameters of at least fsdp_min_size elements and their Adam moments and
  # EMA are split over it; param_rules shard parameters by name.
  c.sharding = ml_collections.ConfigDict(
    dict(mesh_shape=(-1,), mesh_axes=("data",), param_rules=(), fsdp_min_size=2**14)
  )
  c.checkpoint_async = True  # orbax writes checkpoints in a background thread
  return c


def ldm_config() -> ml_collections.ConfigDict:
  """The class-conditional latent diffusion model of paper Table 8 (LDM's cin-ldm-vq-f8).

  UNet: 256 channels, mult (1, 2, 4), 2 res blocks per level, spatial transformers (depth 1,
  32 channels per head) at 32, 16, 8 with cross-attention to a 512-d learned class embedding
  (plus a null class); 1000 steps of LDM's linear schedule 0.0015 -> 0.0195; Adam 1e-5,
  batch 64, 1.2M steps, EMA; DDIM 250 steps, eta 0, guidance 1.4.
  """
  c = _common("ldm")
  c.tokenizer_expect.num_codes = 1024
  c.tokenizer_expect.latent_shape = (32, 32, 16)
  c.num_classes = 1000
  c.unet = ml_collections.ConfigDict(
    dict(
      model_channels=256,
      channel_mult=(1, 2, 4),
      num_res_blocks=2,
      attention_resolutions=(32, 16, 8),  # latent sides (LDM's yaml: factors 4, 2, 1)
      num_head_channels=32,
      use_spatial_transformer=True,  # False: AttentionBlock + label embedding on the time emb
      transformer_depth=1,
      context_dim=512,
      dropout=0.0,
      use_scale_shift_norm=False,
      dtype="float32",  # 'bfloat16': convs/matmuls in bf16, params and losses float32
    )
  )
  c.diffusion = ml_collections.ConfigDict(
    dict(
      beta_schedule="linear",
      num_timesteps=1000,
      linear_start=0.0015,
      linear_end=0.0195,
      cond_drop_prob=0.1,  # labels replaced by the null class for classifier-free guidance
      # Latents are multiplied by this before diffusion and divided after sampling. LDM's
      # VQ models use 1.0; 0 sets it to 1 / std of the precomputed training latents.
      scale_factor=1.0,
    )
  )
  c.sampling = ml_collections.ConfigDict(
    dict(
      ddim_steps=250,
      eta=0.0,
      guidance_scale=1.4,
      # The last DDIM step goes to abar = 1 (returns the x0 prediction); False stops at
      # abar_0 as LDM's DDIMSampler.
      final_alpha_one=True,
      use_ema=True,
      batch_size=16,
      num_samples=50000,
    )
  )
  c.optimizer.lr = 1e-5
  c.ema.decay = 0.9999
  c.batch_size = 64
  c.num_train_steps = 1_200_000
  c.checkpoint_every_steps = 5000
  return c


def pixelcnn_config() -> ml_collections.ConfigDict:
  """A gated PixelCNN over token grids (paper App. D.5; van den Oord et al. 2016 as in the
  VQ-VAE prior scripts): 15 gated layers of width 64 (7x7 first, 3x3 after), class
  embedding per layer, a 512-wide 1x1 output head over the K codes; Adam 3e-4.
  """
  c = _common("pixelcnn")
  c.tokenizer_expect.num_codes = 512
  c.tokenizer_expect.latent_shape = (8, 8, 64)
  c.num_classes = 10
  # A directory of token shards (`python -m arcvq_jax.tokenize --out=DIR`): the prior trains
  # on them instead of encoding the training split itself (no precompute pass; the other
  # config.data keys are then not read). They must be config.tokenizer_workdir's tokens.
  c.data.token_shards = ml_collections.FieldReference(None, field_type=str)
  c.pixelcnn = ml_collections.ConfigDict(
    dict(
      dim=64,
      n_layers=15,
      first_kernel=7,
      kernel=3,
      head_dim=512,
      # On the CPU, which XLA library runs its convolutions (as model.cpu_conv_library for
      # the VQ-VAE): 'eigen' ran the train step 1.7x faster than XLA's default YNNPACK
      # (configs/demo_pixelcnn.py at batch 128: 483 -> 288 ms); 'ynn' keeps the default.
      # No effect on GPU / TPU.
      cpu_conv_library="eigen",
    )
  )
  c.sampling = ml_collections.ConfigDict(
    dict(temperature=1.0, use_ema=False, batch_size=500, num_samples=50000)
  )
  c.optimizer.lr = 3e-4
  c.batch_size = 128
  c.num_train_steps = 100_000
  return c


def _transformer_prior(stage: str) -> ml_collections.ConfigDict:
  """What the MaskGIT and the autoregressive transformer share: ImageNet 256 on 16x16 token
  grids of an f16 tokenizer (K 1024), class-conditional with label dropout, bf16 compute."""
  c = _common(stage)
  c.tokenizer_expect.num_codes = 1024
  c.tokenizer_expect.latent_shape = (16, 16, 16)  # configs/imagenet_f16.py's latents
  c.num_classes = 1000
  # As the PixelCNN's: token shards made by `python -m arcvq_jax.tokenize` (else a pass of
  # the prior's own over the training split).
  c.data.token_shards = ml_collections.FieldReference(None, field_type=str)
  # Classifier-free guidance: the label is replaced by the null class (num_classes) with this
  # probability during training; 0 trains no unconditional model (then guidance_scale 1).
  c.guidance = ml_collections.ConfigDict(dict(cond_drop_prob=0.1))
  # Linear warm-up of the learning rate over optimizer.warmup_steps (0: none); weight decay
  # (adamw) on matrices and embeddings only (decay_vectors False: no decay of biases and norm
  # scales, as LlamaGen's and nanoGPT's optimizer groups).
  c.optimizer.update(
    dict(name="adamw", lr=1e-4, b1=0.9, b2=0.95, weight_decay=0.05, grad_clip_norm=1.0)
  )
  c.optimizer.warmup_steps = 0
  c.optimizer.decay_vectors = False
  c.ema.decay = 0.9999
  c.batch_size = 256
  # 300 epochs of ImageNet's 1,281,167 training images at batch 256 (5004 steps an epoch).
  c.num_train_steps = 300 * 5004
  c.checkpoint_every_steps = 5000
  c.sampling = ml_collections.ConfigDict(
    dict(
      temperature=1.0,
      guidance_scale=1.0,  # 1: the conditional model alone
      use_ema=True,
      batch_size=64,
      num_samples=50000,
    )
  )
  return c


def _network(dim: int, depth: int, num_heads: int, **extra) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(
    dict(
      dim=dim,
      depth=depth,
      num_heads=num_heads,
      mlp_ratio=4.0,  # SwiGLU width: 2/3 of mlp_ratio * dim, rounded up to multiple_of
      multiple_of=256,
      dropout=0.1,  # token / embedding, residual and feed-forward dropout
      dtype="float32",  # 'bfloat16': matmuls in bf16; params, logits and loss float32
      **extra,
    )
  )


def maskgit_config() -> ml_collections.ConfigDict:
  """MaskGIT's class-conditional transformer (google-research/maskgit,
  maskgit_class_cond_config): 24 layers, 768 wide, 16 heads, dropout 0.1, label smoothing
  0.1; AdamW lr 1e-4 (5000 warm-up steps), betas (0.9, 0.96), weight decay 0.045, batch
  256; decoding in 8 steps with choice temperature 4.5 (docs/math.md, section 11.3)."""
  c = _transformer_prior("maskgit")
  c.maskgit = _network(768, 24, 16, label_smoothing=0.1)
  c.optimizer.update(dict(b2=0.96, weight_decay=0.045, grad_clip_norm=0.0, warmup_steps=5000))
  c.ema.decay = 0.999  # maskgit's base_config polyak_decay
  c.sampling.update(dict(decode_steps=8, choice_temperature=4.5))
  return c


def ar_config() -> ml_collections.ConfigDict:
  """LlamaGen-B's class-conditional GPT (FoundationVision/LlamaGen, train_c2i.py): 12 layers,
  768 wide, 12 heads, 2D RoPE, RMSNorm, SwiGLU, dropout 0.1, class dropout 0.1; AdamW lr 1e-4,
  betas (0.9, 0.95), weight decay 0.05, gradient clipping 1.0, batch 256; sampling with
  top-k 0, top-p 1 (docs/math.md, section 11.4)."""
  c = _transformer_prior("ar")
  c.ar = _network(768, 12, 12, positions="rope2d", rope_base=10000.0)
  c.sampling.update(dict(top_k=0, top_p=1.0, guidance_scale=2.0))
  return c


# --------------------------------------------------------------------------- validation


def _validate_common(c: ml_collections.ConfigDict, num_devices: int, process_count: int) -> None:
  _check_finite(c)
  _check_choice(c, "stage", STAGES)
  if not c.tokenizer_workdir:
    _fail(
      "tokenizer_workdir",
      "is empty; a prior trains on the latents of a frozen tokenizer",
      "Set --config.tokenizer_workdir=DIR, the --workdir of a finished tokenizer run "
      "(python -m arcvq_jax.main --config=configs/tiny.py --workdir=DIR).",
    )
  if not isinstance(c.tokenizer_step, int) or c.tokenizer_step < -1:
    _fail(
      "tokenizer_step",
      f"must be an integer >= -1, got {c.tokenizer_step!r}",
      "-1 takes the tokenizer's latest checkpoint.",
    )
  if c.num_classes < 0:
    _fail("num_classes", f"must be >= 0, got {c.num_classes}", "0 trains an unconditional prior.")
  _check_choice(c, "optimizer.name", ("adam", "adamw"))
  if not c.optimizer.lr > 0:
    _fail("optimizer.lr", f"must be > 0, got {c.optimizer.lr}", "Table 8 uses 1e-5 for the LDM.")
  if c.optimizer.grad_clip_norm < 0:
    _fail(
      "optimizer.grad_clip_norm",
      f"must be >= 0, got {c.optimizer.grad_clip_norm}",
      "0 turns clipping off.",
    )
  if not 0.0 <= c.ema.decay < 1.0:
    _fail("ema.decay", f"must be in [0, 1), got {c.ema.decay}", "LDM uses 0.9999; 0 turns it off.")
  if c.sampling.use_ema and c.ema.decay == 0:
    _fail(
      "sampling.use_ema",
      "is True but the EMA is off (ema.decay = 0)",
      "Set --config.sampling.use_ema=False or an ema.decay such as 0.9999.",
    )
  for key in (
    "batch_size",
    "num_train_steps",
    "log_every_steps",
    "keep_checkpoints",
    "latents.encode_batch_size",
    "sampling.batch_size",
    "sampling.num_samples",
  ):
    _check_positive_int(c, key)
  for key in ("checkpoint_every_steps", "sample_every_steps"):
    if c[key] < 0:
      _fail(key, f"must be >= 0, got {c[key]}", "Use 0 to turn it off.")
  for key in ("batch_size", "sampling.batch_size"):
    value = c.batch_size if key == "batch_size" else c.sampling.batch_size
    if value % num_devices or value % process_count:
      _fail(
        key,
        f"{value} is not divisible by the {num_devices} devices / {process_count} processes",
        f"Use a multiple of {num_devices * process_count}.",
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


def validate_ldm(
  c: ml_collections.ConfigDict, num_devices: int = 1, process_count: int = 1
) -> None:
  """Raises ValueError naming the key for any invalid LDM value; call before compiling."""
  _validate_common(c, num_devices, process_count)
  u, d, s = c.unet, c.diffusion, c.sampling
  for key in (
    "unet.model_channels",
    "unet.num_res_blocks",
    "unet.num_head_channels",
    "unet.transformer_depth",
    "unet.context_dim",
    "diffusion.num_timesteps",
    "sampling.ddim_steps",
  ):
    _check_positive_int(c, key)
  if u.model_channels % 32:
    _fail(
      "unet.model_channels",
      f"must be a multiple of 32 (GroupNorm32), got {u.model_channels}",
      "Table 8 uses 256.",
    )
  if not u.channel_mult or not all(isinstance(m, int) and m >= 1 for m in u.channel_mult):
    _fail(
      "unet.channel_mult",
      f"must be a non-empty list of positive integers, got {u.channel_mult!r}",
      "Table 8 uses (1, 2, 4).",
    )
  _check_choice(c, "unet.dtype", ("float32", "bfloat16"))
  if not 0.0 <= u.dropout < 1.0:
    _fail("unet.dropout", f"must be in [0, 1), got {u.dropout}", "LDM uses 0.")
  _check_choice(c, "diffusion.beta_schedule", diffusion.BETA_SCHEDULES)
  if not 0 < d.linear_start < d.linear_end < 1:
    _fail(
      "diffusion.linear_start",
      f"need 0 < linear_start ({d.linear_start}) < linear_end ({d.linear_end}) < 1",
      "LDM uses 0.0015 and 0.0195.",
    )
  if not 0.0 <= d.cond_drop_prob < 1.0:
    _fail(
      "diffusion.cond_drop_prob",
      f"must be in [0, 1), got {d.cond_drop_prob}",
      "0.1 is usual; 0 trains no unconditional model (guidance then needs scale 1).",
    )
  if d.scale_factor < 0:
    _fail(
      "diffusion.scale_factor",
      f"must be >= 0, got {d.scale_factor}",
      "LDM's VQ models use 1.0; 0 sets 1 / std of the training latents.",
    )
  if s.ddim_steps > d.num_timesteps:
    _fail(
      "sampling.ddim_steps",
      f"{s.ddim_steps} is more than diffusion.num_timesteps ({d.num_timesteps})",
      "Table 8 uses 250 of 1000.",
    )
  if s.eta < 0:
    _fail("sampling.eta", f"must be >= 0, got {s.eta}", "Table 8's DDIM uses 0.")
  if not s.guidance_scale >= 0:
    _fail(
      "sampling.guidance_scale",
      f"must be >= 0, got {s.guidance_scale}",
      "1.0 is no guidance; the paper samples with 1.4.",
    )
  if s.guidance_scale != 1.0 and c.num_classes == 0:
    _fail(
      "sampling.guidance_scale",
      f"is {s.guidance_scale} but the model is unconditional (num_classes = 0)",
      "Set it to 1.0.",
    )


def validate_pixelcnn(
  c: ml_collections.ConfigDict, num_devices: int = 1, process_count: int = 1
) -> None:
  """Raises ValueError naming the key for any invalid PixelCNN value."""
  _validate_common(c, num_devices, process_count)
  p = c.pixelcnn
  for key in (
    "pixelcnn.dim",
    "pixelcnn.n_layers",
    "pixelcnn.first_kernel",
    "pixelcnn.kernel",
    "pixelcnn.head_dim",
  ):
    _check_positive_int(c, key)
  if p.get("cpu_conv_library"):
    _check_choice(c, "pixelcnn.cpu_conv_library", XLA_CONV_LIBRARIES)
  for key in ("pixelcnn.first_kernel", "pixelcnn.kernel"):
    value = p.first_kernel if key.endswith("first_kernel") else p.kernel
    if value % 2 == 0:
      _fail(key, f"must be odd, got {value}", "The PixelCNN uses 7 for the first layer, 3 after.")
  if not c.sampling.temperature > 0:
    _fail(
      "sampling.temperature",
      f"must be > 0, got {c.sampling.temperature}",
      "1.0 samples the model's distribution.",
    )


def validate_transformer(
  c: ml_collections.ConfigDict, num_devices: int = 1, process_count: int = 1
) -> None:
  """Raises ValueError naming the key for any invalid MaskGIT or AR value (c.stage picks
  which); the vocabulary bound (2^16) where config.tokenizer_expect.num_codes states it."""
  _validate_common(c, num_devices, process_count)
  stage = c.stage
  n = c[stage]
  for key in ("dim", "depth", "num_heads", "multiple_of"):
    _check_positive_int(c, f"{stage}.{key}")
  if not n.mlp_ratio > 0:
    _fail(f"{stage}.mlp_ratio", f"must be > 0, got {n.mlp_ratio}", "LlamaGen and MaskGIT use 4.")
  if n.dim % n.num_heads:
    _fail(
      f"{stage}.dim",
      f"{n.dim} is not divisible by {stage}.num_heads ({n.num_heads})",
      "Use a width that is a multiple of the number of heads.",
    )
  if stage == "ar":
    _check_choice(c, "ar.positions", ar_model.POSITIONS)
    quarter = {"rope2d": 4, "rope1d": 2}.get(n.positions, 1)
    if (n.dim // n.num_heads) % quarter:
      _fail(
        "ar.num_heads",
        f"gives heads of {n.dim // n.num_heads} channels, but {n.positions} rotates pairs of "
        f"channels{' per grid axis' if quarter == 4 else ''}: the head width must divide by "
        f"{quarter}",
        "Choose dim / num_heads divisible by 4 (LlamaGen-B: 768 / 12 = 64).",
      )
  else:
    if not 0.0 <= n.label_smoothing < 1.0:
      _fail(
        "maskgit.label_smoothing",
        f"must be in [0, 1), got {n.label_smoothing}",
        "MaskGIT uses 0.1.",
      )
  if not 0.0 <= n.dropout < 1.0:
    _fail(f"{stage}.dropout", f"must be in [0, 1), got {n.dropout}", "LlamaGen uses 0.1.")
  _check_choice(c, f"{stage}.dtype", ("float32", "bfloat16"))
  if not 0.0 <= c.guidance.cond_drop_prob < 1.0:
    _fail(
      "guidance.cond_drop_prob",
      f"must be in [0, 1), got {c.guidance.cond_drop_prob}",
      "0.1 is usual; 0 trains no unconditional model (guidance then needs scale 1).",
    )
  warmup = c.optimizer.get("warmup_steps", 0)
  if not isinstance(warmup, int) or warmup < 0:
    _fail("optimizer.warmup_steps", f"must be an integer >= 0, got {warmup!r}", "0: no warm-up.")
  if c.tokenizer_expect.num_codes:
    check_vocabulary(c.tokenizer_expect.num_codes, "tokenizer_expect.num_codes", "")
  check_sampling(
    c, {k: c.sampling[k] for k in SAMPLING_KEYS[stage]}, lambda k: f"config.sampling.{k}"
  )


def check_vocabulary(num_codes: int, key: str, where: str) -> None:
  """A transformer prior's one output head takes up to 2^16 codes (docs/math.md, section 11.5):
  raises ValueError naming `key` (and `where` the codes come from, if given) otherwise."""
  try:
    transformer.check_vocab(num_codes)
  except ValueError as e:
    raise ValueError(f"config.{key}: {where + ': ' if where else ''}{e}") from None


def check_sampling(
  c: ml_collections.ConfigDict, settings: dict, name: Callable[[str], str]
) -> None:
  """The sampling settings of a transformer prior (config.sampling's, or sample.py's flags):
  raises ValueError naming each bad one by `name(key)` (e.g. 'config.sampling.top_p', or
  '--top_p'). Guidance needs a class-conditional model that was trained with label dropout."""

  def fail(key: str, problem: str, fix: str) -> None:
    raise ValueError(f"{name(key)}: {problem}. {fix}")

  s = settings
  if "temperature" in s and not s["temperature"] > 0:
    fail(
      "temperature", f"must be > 0, got {s['temperature']}", "1.0 samples the model's distribution."
    )
  if "top_k" in s and (not isinstance(s["top_k"], int) or s["top_k"] < 0):
    fail(
      "top_k",
      f"must be an integer >= 0, got {s['top_k']!r}",
      "0 keeps every code (LlamaGen's FID runs).",
    )
  if "top_p" in s and not 0.0 < s["top_p"] <= 1.0:
    fail("top_p", f"must be in (0, 1], got {s['top_p']}", "1.0 keeps every code.")
  if "decode_steps" in s and (not isinstance(s["decode_steps"], int) or s["decode_steps"] < 1):
    fail("decode_steps", f"must be an integer >= 1, got {s['decode_steps']!r}", "MaskGIT uses 8.")
  if "choice_temperature" in s and not s["choice_temperature"] >= 0:
    fail("choice_temperature", f"must be >= 0, got {s['choice_temperature']}", "MaskGIT uses 4.5.")
  scale = s.get("guidance_scale", 1.0)
  if not scale >= 0:
    fail("guidance_scale", f"must be >= 0, got {scale}", "1.0 is no guidance.")
  if scale != 1.0 and c.num_classes == 0:
    fail(
      "guidance_scale",
      f"is {scale} but the model is unconditional (num_classes = 0)",
      "Set it to 1.0.",
    )
  if scale != 1.0 and c.guidance.cond_drop_prob == 0:
    fail(
      "guidance_scale",
      f"is {scale} but the model was trained without label dropout "
      "(guidance.cond_drop_prob = 0): its null class means nothing",
      "Set it to 1.0, or train with --config.guidance.cond_drop_prob=0.1.",
    )


def validate(c: ml_collections.ConfigDict, num_devices: int = 1, process_count: int = 1) -> None:
  """validate_ldm, validate_pixelcnn or validate_transformer by config.stage."""
  _check_choice(c, "stage", STAGES)
  if c.stage == "ldm":
    validate_ldm(c, num_devices, process_count)
  elif c.stage == "pixelcnn":
    validate_pixelcnn(c, num_devices, process_count)
  else:
    validate_transformer(c, num_devices, process_count)


def unet_levels(c: ml_collections.ConfigDict, latent_side: int) -> list[int]:
  """The feature-map sides of the UNet's levels for a latent of side `latent_side`."""
  return [latent_side // 2**i for i in range(len(c.unet.channel_mult))]


def validate_against_tokenizer(
  c: ml_collections.ConfigDict, num_codes: int, latent_shape: tuple[int, int, int], where: str
) -> None:
  """Checks that need the tokenizer: a transformer prior's vocabulary bound,
  config.tokenizer_expect, and the UNet against the latent shape. `where` names the tokenizer
  (its workdir and step) in the message."""
  if c.stage in TRANSFORMER_STAGES:  # before the expectations: no setting makes it fit
    check_vocabulary(num_codes, "tokenizer_workdir", f"the tokenizer at {where}")
  e = c.tokenizer_expect
  if e.num_codes and e.num_codes != num_codes:
    _fail(
      "tokenizer_expect.num_codes",
      f"is {e.num_codes}, but the tokenizer at {where} has a vocabulary of {num_codes} tokens "
      "(its quantizer's: codebook rows, FSQ level products or LFQ's 2^bits)",
      "Point --config.tokenizer_workdir at a tokenizer with "
      f"{e.num_codes} tokens, or set --config.tokenizer_expect.num_codes={num_codes} if this "
      "tokenizer is the one you mean (0 skips the check).",
    )
  if e.latent_shape and tuple(e.latent_shape) != tuple(latent_shape):
    _fail(
      "tokenizer_expect.latent_shape",
      f"is {tuple(e.latent_shape)}, but the tokenizer at "
      f"{where} makes latents of shape {tuple(latent_shape)} (h, w, D)",
      "Point "
      "--config.tokenizer_workdir at the tokenizer this prior was configured for, or set "
      f"--config.tokenizer_expect.latent_shape='{tuple(latent_shape)}' (() skips the check).",
    )
  if c.stage == "ldm":
    h, w, _ = latent_shape
    f = 2 ** (len(c.unet.channel_mult) - 1)
    if h % f or w % f:
      _fail(
        "unet.channel_mult",
        f"{tuple(c.unet.channel_mult)} divides the latent side by {f}, "
        f"but the latents of {where} are {h}x{w}",
        f"Use a channel_mult with "
        "fewer levels (each level after the first halves the side) or a tokenizer whose "
        f"latent sides divide by {f}.",
      )
    levels = unet_levels(c, h)
    missing = [r for r in c.unet.attention_resolutions if r not in levels]
    if missing:
      _fail(
        "unet.attention_resolutions",
        f"{missing} never occur: the UNet's feature maps are "
        f"{levels} on a side for {h}x{w} latents",
        f"Choose among {levels} (latent sides, not LDM's downsampling factors).",
      )
