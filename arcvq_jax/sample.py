"""Samples from a trained prior: `python -m arcvq_jax.sample --workdir=DIR --num_samples=N`.

Works for every prior (the run's config.stage): the latent diffusion model (DDIM with
classifier-free guidance, then the frozen tokenizer quantises and decodes the latents), the
PixelCNN (ancestral sampling of the token grid), MaskGIT (parallel decoding in
--decode_steps steps) and the AR transformer (raster order with a KV cache, top-k / top-p);
the tokenizer decodes the token grids. Each prior takes its own flags (STAGE_FLAGS); a flag
of another prior is refused.

Writes to --out (default DIR/samples/step<S>_seed<seed>[_settings]):
  samples.npz   'images' uint8 (N, H, W, C), 'labels' int32 (N,) (the classes sampled; -1 for
                an unconditional prior): what arcvq_jax/evaluate_samples.py scores
  grid_<i>.png  the first --num_grids x 64 samples, 8 per row
  sample_info.json  the settings and the checkpoint step

Sample i depends only on (--seed, i) and the settings, not on the batch it is drawn in; its
class is i mod num_classes (--labels=balanced, default), drawn at random (random), or given
(--labels=3 or --labels=1,5,7, repeated to N).
"""

from __future__ import annotations

import json
import math
import os
import time
import zipfile
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import app, flags, logging
from ml_collections import config_flags
from PIL import Image

from arcvq_jax import api, cli, prior_config, sharding, token_sampling
from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax import config as config_lib
from arcvq_jax.evaluation import images as image_lib
from arcvq_jax.models import pixelcnn, unet
from arcvq_jax.train import prior_common as common
from arcvq_jax.train import prior_ldm, prior_pixelcnn, prior_transformer

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs as a program: absl flags are global,
  and other modules (main, evaluate_samples) define some of the same names."""
  config_flags.DEFINE_config_file(
    "config", None, "The prior's config file; default: the run's DIR/config.json.", lock_config=True
  )
  flags.DEFINE_string("workdir", None, "The prior run's --workdir.")
  flags.DEFINE_integer(
    "num_samples", None, "How many samples (default config.sampling.num_samples).", lower_bound=1
  )
  flags.DEFINE_integer(
    "batch_size",
    None,
    "Samples per call, split over the devices (default config.sampling.batch_size).",
    lower_bound=1,
  )
  flags.DEFINE_integer("seed", 0, "Sample i depends only on (seed, i).")
  flags.DEFINE_string(
    "labels",
    "balanced",
    "'balanced' (i mod num_classes), 'random', or class ids '3' / '1,5,7' (repeated).",
  )
  flags.DEFINE_integer(
    "step", None, "Checkpoint step of the prior (default: the latest).", lower_bound=0
  )
  flags.DEFINE_float(
    "guidance_scale",
    None,
    "LDM, MaskGIT, AR: classifier-free guidance scale (1 = none).",
    lower_bound=0.0,
  )
  flags.DEFINE_integer("ddim_steps", None, "LDM: DDIM steps.", lower_bound=1)
  flags.DEFINE_float("eta", None, "LDM: DDIM eta (0 = deterministic).", lower_bound=0.0)
  flags.DEFINE_float("temperature", None, "PixelCNN, MaskGIT, AR: softmax temperature.")
  flags.DEFINE_integer("top_k", None, "AR: keep the k likeliest codes (0 = all).", lower_bound=0)
  flags.DEFINE_float(
    "top_p", None, "AR: keep the likeliest codes up to this probability mass (1 = all)."
  )
  flags.DEFINE_integer("decode_steps", None, "MaskGIT: parallel decoding steps.", lower_bound=1)
  flags.DEFINE_float(
    "choice_temperature",
    None,
    "MaskGIT: temperature of the Gumbel noise on the confidences (annealed to 0).",
    lower_bound=0.0,
  )
  flags.DEFINE_bool(
    "use_ema", None, "Sample with the EMA weights (default config.sampling.use_ema)."
  )
  flags.DEFINE_string("out", None, "Output folder (default DIR/samples/...).")
  flags.DEFINE_integer("num_grids", 4, "PNG grids of 64 samples to write.", lower_bound=0)
  flags.mark_flags_as_required(["workdir"])
  for name, fix in (
    ("guidance_scale", "a finite scale >= 0 (1 = no guidance)"),
    ("eta", "a finite eta >= 0 (0 = deterministic)"),
    ("temperature", "a finite temperature > 0 (1 samples the model's distribution)"),
    ("choice_temperature", "a finite temperature >= 0 (MaskGIT uses 4.5)"),
  ):
    flags.register_validator(
      name,
      lambda v, name=name: v is None or (math.isfinite(v) and (v > 0 or name != "temperature")),
      message=f"give --{name} {fix}",
    )
  flags.register_validator(
    "top_p", lambda v: v is None or 0.0 < v <= 1.0, message="give --top_p in (0, 1] (1: all)"
  )


# The sampling flags each prior takes (besides --num_samples, --batch_size, --seed, --labels,
# --step, --use_ema, --out, --num_grids).
STAGE_FLAGS = {
  "ldm": ("guidance_scale", "ddim_steps", "eta"),
  "pixelcnn": ("temperature",),
  **prior_config.SAMPLING_KEYS,
}


class SampleError(RuntimeError):
  """The workdir or the settings cannot give samples."""


def sample_labels(spec: str, num_samples: int, num_classes: int, seed: int) -> np.ndarray:
  """(N,) int32 classes by --labels; -1 for an unconditional prior."""
  if num_classes == 0:
    if spec not in ("balanced", "random"):
      raise SampleError(f"--labels={spec}: the prior is unconditional (num_classes = 0).")
    return np.full((num_samples,), -1, np.int32)
  if spec == "balanced":
    return (np.arange(num_samples) % num_classes).astype(np.int32)
  if spec == "random":
    return np.random.default_rng([seed, 7]).integers(0, num_classes, num_samples).astype(np.int32)
  try:
    ids = [int(v) for v in spec.split(",")]
  except ValueError as e:
    raise SampleError(
      f"--labels={spec!r}: give 'balanced', 'random' or class ids like 1,5,7."
    ) from e
  if min(ids) < 0 or max(ids) >= num_classes:
    raise SampleError(f"--labels={spec}: classes must lie in [0, {num_classes}).")
  return np.resize(np.asarray(ids, np.int32), num_samples)


def _has_checkpoints(workdir: str) -> bool:
  directory = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    return False
  checkpointer = ckpt_lib.Checkpointer(directory)
  steps = checkpointer.all_steps()
  checkpointer.close()
  return bool(steps)


def restore_state(
  config: ml_collections.ConfigDict, workdir: str, abstract: Any, step: int | None
) -> Any:
  """The prior's train state at `step` (default: latest), on the first device."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  if not os.path.isdir(directory):
    raise SampleError(
      f"no checkpoints in {workdir}: train the prior first (python -m "
      f"arcvq_jax.main --config=... --workdir={workdir})."
    )
  checkpointer = ckpt_lib.Checkpointer(directory, config.keep_checkpoints)
  steps = checkpointer.all_steps()
  if not steps:
    raise SampleError(f"no checkpoint in {directory}: train the prior first.")
  step = steps[-1] if step is None else step
  if step not in steps:
    raise SampleError(f"no checkpoint of step {step} in {directory}; it has {steps}.")
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=device), abstract
  )
  state = checkpointer.restore(step, abstract, None)
  checkpointer.close()
  return state


def _write_npz(path: str, images: np.ndarray, labels: np.ndarray) -> None:
  """An uncompressed .npz (what np.savez writes) built from .npy members."""
  tmp = path + ".tmp"
  with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
    for name, array in (("images", images), ("labels", labels)):
      with zf.open(name + ".npy", "w", force_zip64=True) as f:
        np.lib.format.write_array(f, np.ascontiguousarray(array), allow_pickle=False)
  os.replace(tmp, path)


def write_outputs(
  out: str, images: np.ndarray, labels: np.ndarray, info: dict[str, Any], num_grids: int
) -> None:
  os.makedirs(out, exist_ok=True)
  _write_npz(os.path.join(out, "samples.npz"), images, labels)
  for g in range(min(num_grids, -(-len(images) // 64))):
    chunk = images[g * 64 : (g + 1) * 64]
    grid = image_lib.image_grid(chunk.astype(np.float32) / 255.0, ncols=8)
    grid = np.round(grid * 255).astype(np.uint8)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
      os.path.join(out, f"grid_{g}.png")
    )
  with open(os.path.join(out, "sample_info.json"), "w") as f:
    json.dump(info, f, indent=2)


def _batches(num_samples: int, batch_size: int):
  """(start, indices padded to batch_size) covering 0..N-1."""
  for start in range(0, num_samples, batch_size):
    idx = np.arange(start, start + batch_size)
    yield start, np.minimum(idx, num_samples - 1)


def sample_ldm(
  config: ml_collections.ConfigDict,
  workdir: str,
  num_samples: int,
  labels: np.ndarray,
  *,
  seed: int = 0,
  batch_size: int | None = None,
  step: int | None = None,
  guidance_scale: float | None = None,
  ddim_steps: int | None = None,
  eta: float | None = None,
  use_ema: bool | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
  """Images uint8 (N, H, W, C) from the LDM in `workdir`, and the settings used."""
  tok, record = common.load_tokenizer(config, workdir)
  latent_shape = tuple(record["latent_shape"])
  model = unet.from_config(config, latent_channels=latent_shape[-1])
  tx = common.make_optimizer(config)
  abstract = jax.eval_shape(
    lambda k: prior_ldm.init_state(
      k, model=model, tx=tx, config=config, latent_shape=latent_shape, scale_factor=1.0
    ),
    jax.random.PRNGKey(0),
  )
  state = restore_state(config, workdir, abstract, step)
  s = config.sampling
  use_ema = s.use_ema if use_ema is None else use_ema
  settings = dict(
    guidance_scale=s.guidance_scale if guidance_scale is None else guidance_scale,
    ddim_steps=s.ddim_steps if ddim_steps is None else ddim_steps,
    eta=s.eta if eta is None else eta,
  )
  if settings["guidance_scale"] != 1.0 and not config.num_classes:
    raise SampleError("--guidance_scale: the LDM is unconditional; use 1.0.")
  mesh = sharding.make_mesh((-1,), ("data",))
  batch_size = batch_size or s.batch_size
  if batch_size % mesh.size:
    raise SampleError(f"--batch_size={batch_size} is not divisible by the {mesh.size} devices.")
  sample_fn = prior_ldm.make_sample_fn(
    model,
    config,
    num_steps=settings["ddim_steps"],
    guidance_scale=settings["guidance_scale"],
    eta=settings["eta"],
    mesh=mesh,
  )
  params = jax.device_put(prior_ldm.sample_params(state, use_ema), sharding.replicated(mesh))
  scale = float(state.scale_factor)
  key = jax.random.PRNGKey(seed)
  noise_key, eta_key = jax.random.split(key)
  h, w, c = record["image_shape"]
  images = np.zeros((num_samples, h, w, c), np.uint8)
  t0 = time.time()
  for start, idx in _batches(num_samples, batch_size):
    x_T = prior_ldm.initial_noise(noise_key, jnp.asarray(idx), latent_shape)
    y = jnp.asarray(np.maximum(labels[idx], 0))
    z = sample_fn(params, x_T, y, jax.random.fold_in(eta_key, start))
    decoded = tok.decode_latents(np.asarray(z) / scale)
    n = min(batch_size, num_samples - start)
    images[start : start + n] = common.to_uint8(decoded)[:n]
    logging.info("LDM samples %d / %d (%.1f s)", start + n, num_samples, time.time() - t0)
  info = dict(
    stage="ldm",
    step=int(state.step),
    use_ema=bool(use_ema),
    scale_factor=scale,
    final_alpha_one=bool(s.final_alpha_one),
    tokenizer=record,
    **settings,
  )
  return images, info


def sample_pixelcnn(
  config: ml_collections.ConfigDict,
  workdir: str,
  num_samples: int,
  labels: np.ndarray,
  *,
  seed: int = 0,
  batch_size: int | None = None,
  step: int | None = None,
  temperature: float | None = None,
  use_ema: bool | None = None,
) -> tuple[np.ndarray, dict[str, Any]]:
  """Images uint8 (N, H, W, C) from the PixelCNN in `workdir`, and the settings used."""
  tok, record = common.load_tokenizer(config, workdir)
  grid = tuple(record["latent_shape"][:2])
  model = pixelcnn.from_config(config, num_codes=record["num_codes"])
  tx = common.make_optimizer(config)
  abstract = jax.eval_shape(
    lambda k: prior_pixelcnn.init_state(k, model=model, tx=tx, config=config, grid=grid),
    jax.random.PRNGKey(0),
  )
  state = restore_state(config, workdir, abstract, step)
  s = config.sampling
  use_ema = s.use_ema if use_ema is None else use_ema
  temperature = s.temperature if temperature is None else temperature
  mesh = sharding.make_mesh((-1,), ("data",))
  batch_size = batch_size or s.batch_size
  if batch_size % mesh.size:
    raise SampleError(f"--batch_size={batch_size} is not divisible by the {mesh.size} devices.")
  sample_fn = prior_pixelcnn.make_sample_fn(model, config, grid, temperature=temperature, mesh=mesh)
  params = jax.device_put(prior_pixelcnn.sample_params(state, use_ema), sharding.replicated(mesh))
  key = jax.random.PRNGKey(seed)
  h, w, c = record["image_shape"]
  images = np.zeros((num_samples, h, w, c), np.uint8)
  t0 = time.time()
  for start, idx in _batches(num_samples, batch_size):
    tokens = sample_fn(
      params,
      jnp.asarray(np.maximum(labels[idx], 0)),
      prior_pixelcnn.sample_keys(key, jnp.asarray(idx)),
    )
    decoded = tok.decode(np.asarray(tokens))
    n = min(batch_size, num_samples - start)
    images[start : start + n] = common.to_uint8(decoded)[:n]
    logging.info("PixelCNN samples %d / %d (%.1f s)", start + n, num_samples, time.time() - t0)
  info = dict(
    stage="pixelcnn",
    step=int(state.step),
    use_ema=bool(use_ema),
    temperature=float(temperature),
    tokenizer=record,
  )
  return images, info


def sample_transformer(
  config: ml_collections.ConfigDict,
  workdir: str,
  num_samples: int,
  labels: np.ndarray,
  *,
  seed: int = 0,
  batch_size: int | None = None,
  step: int | None = None,
  use_ema: bool | None = None,
  **overrides: Any,
) -> tuple[np.ndarray, dict[str, Any]]:
  """Images uint8 (N, H, W, C) from the MaskGIT or AR prior in `workdir`, and the settings
  used; `overrides` replace config.sampling's settings (prior_config.SAMPLING_KEYS)."""
  tok, record = common.load_tokenizer(config, workdir)
  model = prior_transformer.model_from_config(
    config, record["num_codes"], tuple(record["latent_shape"][:2])
  )
  tx = common.make_optimizer(config)
  abstract = jax.eval_shape(
    lambda k: prior_transformer.init_state(k, model=model, tx=tx, config=config),
    jax.random.PRNGKey(0),
  )
  state = restore_state(config, workdir, abstract, step)
  s = config.sampling
  use_ema = s.use_ema if use_ema is None else use_ema
  settings = prior_transformer.sampling_settings(config, **overrides)
  try:  # the flags' values against this model (e.g. guidance needs label dropout)
    prior_config.check_sampling(config, settings, lambda key: f"--{key}")
  except ValueError as e:
    raise SampleError(str(e)) from e
  mesh = sharding.make_mesh((-1,), ("data",))
  batch_size = batch_size or s.batch_size
  if batch_size % mesh.size:
    raise SampleError(f"--batch_size={batch_size} is not divisible by the {mesh.size} devices.")
  sample_fn = prior_transformer.make_sample_fn(model, config, settings, mesh=mesh)
  params = jax.device_put(
    prior_transformer.sample_params(state, use_ema), sharding.replicated(mesh)
  )
  key = jax.random.PRNGKey(seed)
  h, w, c = record["image_shape"]
  images = np.zeros((num_samples, h, w, c), np.uint8)
  name = prior_transformer.NAMES[config.stage]
  t0 = time.time()
  for start, idx in _batches(num_samples, batch_size):
    tokens = sample_fn(
      params,
      jnp.asarray(np.maximum(labels[idx], 0)),
      token_sampling.sample_keys(key, jnp.asarray(idx)),
    )
    decoded = tok.decode(np.asarray(tokens))
    n = min(batch_size, num_samples - start)
    images[start : start + n] = common.to_uint8(decoded)[:n]
    logging.info("%s samples %d / %d (%.1f s)", name, start + n, num_samples, time.time() - t0)
  info = dict(
    stage=config.stage, step=int(state.step), use_ema=bool(use_ema), tokenizer=record, **settings
  )
  return images, info


def run(
  config: ml_collections.ConfigDict,
  workdir: str,
  *,
  num_samples: int | None = None,
  seed: int = 0,
  labels: str = "balanced",
  out: str | None = None,
  num_grids: int = 4,
  **settings,
) -> str:
  """Samples and writes them (see the module docstring); returns the output folder."""
  prior_config.validate(config)
  if not _has_checkpoints(workdir):  # before anything is written into the workdir
    raise SampleError(
      f"no checkpoints in {workdir}: train the prior first (python -m "
      f"arcvq_jax.main --config=... --workdir={workdir})."
    )
  num_samples = num_samples or config.sampling.num_samples
  y = sample_labels(labels, num_samples, config.num_classes, seed)
  settings = {k: v for k, v in settings.items() if v is not None}
  t0 = time.time()
  samplers = dict(ldm=sample_ldm, pixelcnn=sample_pixelcnn)
  sampler = samplers.get(config.stage, sample_transformer)
  images, info = sampler(config, workdir, num_samples, y, seed=seed, **settings)
  info.update(num_samples=num_samples, seed=seed, labels=labels, seconds=round(time.time() - t0, 2))
  if out is None:
    tag = "_".join(f"{k}{v}" for k, v in sorted(settings.items()) if k != "batch_size")
    name = f"step{info['step']}_seed{seed}" + (f"_{tag}" if tag else "")
    out = os.path.join(workdir, "samples", name)
  write_outputs(out, images, y, info, num_grids)
  logging.info("Wrote %d samples to %s (%.1f s)", num_samples, out, info["seconds"])
  return out


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config = FLAGS.config if FLAGS.config is not None else api.load_config(FLAGS.workdir)
  source = config_flags.get_config_filename(FLAGS["config"]) if FLAGS.config else None
  if config.get("stage") not in prior_config.STAGES:
    stage = config.get("stage", "tokenizer")
    what = (
      f"--config={source} is a {stage!r} config"
      if source
      else f"{FLAGS.workdir} is a {stage!r} run"
    )
    raise cli.UserError(
      f"{what}; sampling needs a prior's --workdir "
      f"(stage {' or '.join(map(repr, prior_config.STAGES))}, trained on a tokenizer: "
      "docs/priors.md)"
      + (", and the prior's config file, e.g. configs/tiny_pixelcnn.py." if source else ".")
    )
  config_lib.check_sections(config, source or os.path.join(FLAGS.workdir, api.CONFIG_FILE))
  if FLAGS.out:  # before the sampling: a folder that cannot be written fails now
    cli.check_workdir(FLAGS.out, "--out")
  settings = dict(batch_size=FLAGS.batch_size, step=FLAGS.step, use_ema=FLAGS.use_ema)
  own = STAGE_FLAGS[config.stage]
  for name in sorted({n for names in STAGE_FLAGS.values() for n in names}):
    if FLAGS[name].value is None:
      continue
    if name not in own:
      takes = [s for s, names in STAGE_FLAGS.items() if name in names]
      raise cli.UserError(
        f"--{name} is a flag of the {' and '.join(takes)} prior(s); this {config.stage!r} "
        f"prior takes {', '.join('--' + n for n in own)}"
      )
    settings[name] = FLAGS[name].value
  # SampleError and PriorSetupError are in cli.USER_ERRORS: one "error:" line each.
  run(
    config,
    FLAGS.workdir,
    num_samples=FLAGS.num_samples,
    seed=FLAGS.seed,
    labels=FLAGS.labels,
    out=FLAGS.out,
    num_grids=FLAGS.num_grids,
    **settings,
  )


if __name__ == "__main__":
  define_flags()
  cli.run(main)
