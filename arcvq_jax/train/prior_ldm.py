"""The latent diffusion prior (docs/math.md, section 11.1; paper Table 8): a second training
stage on the pre-quantisation latents of a frozen tokenizer.

Read top to bottom: validate -> frozen tokenizer (checked against the config) -> latents of
the training split (precompute pass, train/prior_common.py) -> mesh -> UNet, optimizer,
schedule -> state (fresh or restored) -> jitted sharded step -> the shared loop
(train/loop.py) with sample grids as its periodic action. Sampling (DDIM + classifier-free
guidance) is `make_sample_fn`, used here for the grids and by `python -m arcvq_jax.sample`.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging

from arcvq_jax import diffusion, prior_config, resources, sharding
from arcvq_jax import workdir as workdir_lib
from arcvq_jax.evaluation import images as image_lib
from arcvq_jax.models import unet
from arcvq_jax.train import loop
from arcvq_jax.train import prior_common as common


@flax.struct.dataclass
class LDMTrainState:
  """step () int32; params / ema_params of the LatentDiffusionUNet (ema_params None when
  config.ema.decay = 0); opt_state; rng (2,) uint32, folded with the step for each step's
  draws (t, noise, label dropout, dropout); scale_factor () float32, the latents' scale."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array
  scale_factor: jax.Array


def schedule_from_config(config: ml_collections.ConfigDict) -> diffusion.Schedule:
  d = config.diffusion
  return diffusion.make_schedule(d.beta_schedule, d.num_timesteps, d.linear_start, d.linear_end)


def _dummy_labels(config: ml_collections.ConfigDict, batch: int) -> jax.Array | None:
  return jnp.zeros((batch,), jnp.int32) if config.num_classes else None


def init_state(
  key: jax.Array,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  latent_shape: tuple[int, int, int],
  scale_factor: float,
) -> LDMTrainState:
  """A fresh state; pure, so `jax.jit(..., out_shardings=...)` builds it in place."""
  init_key, rng = jax.random.split(key)
  params = model.init(
    init_key,
    jnp.zeros((1, *latent_shape), jnp.float32),
    jnp.zeros((1,), jnp.int32),
    _dummy_labels(config, 1),
  )["params"]
  return LDMTrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=params if config.ema.decay > 0 else None,
    opt_state=tx.init(params),
    rng=rng,
    scale_factor=jnp.asarray(scale_factor, jnp.float32),
  )


def train_step(
  state: LDMTrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  schedule: diffusion.Schedule,
  config: ml_collections.ConfigDict,
  replicated: Any = None,
) -> tuple[LDMTrainState, dict[str, jax.Array]]:
  """One Adam step on LDM's eps loss. batch: 'latent' (B, h, w, D) float32 (unscaled,
  pre-quantisation), 'label' (B,) int32, both split along the batch axes. replicated: the
  mesh's replicated sharding (FSDP gathers the parameters whole for the passes), or None."""
  key = jax.random.fold_in(state.rng, state.step)
  loss_key, dropout_key = jax.random.split(key)
  x0 = batch["latent"].astype(jnp.float32) * state.scale_factor
  labels = batch["label"] if config.num_classes else None

  def loss_fn(params):
    eps_fn = lambda x, t, y: model.apply(
      {"params": params}, x, t, y, train=True, rngs={"dropout": dropout_key}
    )
    return diffusion.eps_loss(
      loss_key,
      eps_fn,
      x0,
      labels,
      schedule,
      config.diffusion.cond_drop_prob,
      null_class=config.num_classes,
    )

  (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    sharding.gather_params(state.params, replicated)
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=loss, grad_norm=optax.tree.norm(grads))
  ema_params = state.ema_params
  if ema_params is not None:
    decay = common.ema_decay(state.step, config.ema.decay, config.ema.warmup)
    ema_params = common.ema_update(ema_params, params, decay)
    metrics["ema_decay"] = decay
  new_state = state.replace(
    step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
  )
  return new_state, metrics


def create_state_and_step(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  latent_shape: tuple[int, int, int],
  scale_factor: float,
) -> tuple[LDMTrainState, Any, Callable]:
  """A fresh state laid out by its shardings, the shardings, and the jitted train step
  (state donated, batch split along 'data', metrics replicated)."""
  init_fn = functools.partial(
    init_state,
    model=model,
    tx=tx,
    config=config,
    latent_shape=latent_shape,
    scale_factor=scale_factor,
  )
  resources.check_state_fits(init_fn, config, "config.unet.model_channels")
  state, state_sharding = sharding.fresh_state(init_fn, config.seed, mesh, config.sharding)
  step_fn = jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      schedule=schedule_from_config(config),
      config=config,
      replicated=sharding.replicated(mesh),
    ),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return state, state_sharding, step_fn


# --------------------------------------------------------------------------- sampling


def initial_noise(key: jax.Array, indices: jax.Array, latent_shape: tuple[int, ...]) -> jax.Array:
  """x_T of samples `indices` (B,): N(0, I) from fold_in(key, index), so sample i is the same
  whatever the batch it is drawn in."""
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(key, i), latent_shape))(indices)


def make_sample_fn(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  *,
  num_steps: int | None = None,
  guidance_scale: float | None = None,
  eta: float | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> Callable:
  """jitted (params, x_T (B, h, w, D), labels (B,) int32, key) -> latents (B, h, w, D),
  unscaled (divide by the state's scale_factor before decoding). Defaults: config.sampling.
  With `mesh`, the batch is split along 'data' and the params replicated."""
  s = config.sampling
  num_steps = s.ddim_steps if num_steps is None else num_steps
  guidance_scale = s.guidance_scale if guidance_scale is None else guidance_scale
  eta = s.eta if eta is None else eta
  schedule = schedule_from_config(config)

  def sample(params, x_T, labels, key):
    eps_fn = lambda x, t, y: model.apply({"params": params}, x, t, y)
    return diffusion.ddim_sample(
      eps_fn,
      x_T,
      labels if config.num_classes else None,
      schedule,
      num_steps=num_steps,
      guidance_scale=float(guidance_scale),
      null_class=config.num_classes,
      eta=float(eta),
      final_alpha_one=s.final_alpha_one,
      key=key,
    )

  if mesh is None:
    return jax.jit(sample)
  batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(sample, in_shardings=(rep, batch, batch, rep), out_shardings=batch)


def sample_params(state: LDMTrainState, use_ema: bool) -> Any:
  return state.ema_params if use_ema and state.ema_params is not None else state.params


# --------------------------------------------------------------------------- the loop


def sample_grid(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tok: Any,
  mesh: jax.sharding.Mesh,
  latent_shape: tuple[int, int, int],
  writer: Any,
) -> Callable[[int, LDMTrainState], None]:
  """A periodic action: 8 DDIM samples (one per class, fixed noise), decoded, as an image."""
  sample_fn = make_sample_fn(model, config)
  n = 8
  # Replicated on the mesh like the params, so the jitted sampler sees one device set.
  labels, noise, key = jax.device_put(
    (
      jnp.arange(n, dtype=jnp.int32) % max(config.num_classes, 1),
      initial_noise(jax.random.PRNGKey(config.seed + 1), jnp.arange(n), latent_shape),
      jax.random.PRNGKey(0),
    ),
    sharding.replicated(mesh),
  )

  def write(step: int, state: LDMTrainState) -> None:
    z = sample_fn(sample_params(state, config.sampling.use_ema), noise, labels, key)
    z = np.asarray(z.addressable_data(0))  # replicated: every process has all of it
    images = tok.decode_latents(z / float(state.scale_factor.addressable_data(0)))
    grid = image_lib.image_grid(np.asarray(images), ncols=n, value_range=(-1, 1))
    writer.write_images(step, {"samples": grid[None]})

  return write


def training_latents(
  config: ml_collections.ConfigDict, workdir: str, tok: Any, record: dict[str, Any]
) -> tuple[dict[str, np.ndarray], float]:
  """The stored latents of the training split (the precompute pass on the first run) and
  the scale factor a new run takes: config.diffusion.scale_factor, or 1 / their std."""
  out_dir = common.latents_dir(config, workdir)
  arrays = common.precompute(
    tok,
    common.data_config(config, tok),
    out_dir,
    "latents",
    record,
    config.latents.encode_batch_size,
    config.num_classes,
  )
  stats = common.latent_stats(out_dir)
  scale_factor = config.diffusion.scale_factor or 1.0 / max(stats["std"], 1e-8)
  logging.info(
    "Latents %s: mean %.4f, std %.4f; scale_factor %.5f for a new run",
    tuple(record["latent_shape"]),
    stats["mean"],
    stats["std"],
    scale_factor,
  )
  return arrays, scale_factor


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the LDM in `workdir`; returns the last logged train metrics.

  Holds the workdir's lock throughout, and writes nothing into it before the config, the
  pinned tokenizer and the newest checkpoint have been checked against what it holds
  (arcvq_jax/workdir.py; train/prior_common.load_tokenizer)."""
  with workdir_lib.hold(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  prior_config.validate_ldm(config, jax.device_count(), jax.process_count())
  changes = workdir_lib.check_config(config, workdir)
  tok, record = common.load_tokenizer(config, workdir)
  latent_shape = tuple(record["latent_shape"])
  arrays, scale_factor = training_latents(config, workdir, tok, record)

  mesh = sharding.make_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes)
  model = unet.from_config(config, latent_channels=latent_shape[-1])
  tx = common.make_optimizer(config)
  state, _, step = create_state_and_step(config, model, tx, mesh, latent_shape, scale_factor)
  train_iter = common.create_array_iterator(
    {"latent": arrays["x"], "label": arrays["label"]}, config.batch_size, config.seed
  )
  checkpointer = loop.open_checkpointer(config, workdir)
  state = loop.restore(checkpointer, state, train_iter)
  workdir_lib.commit(config, workdir, changes, int(jax.device_get(state.step)))
  logging.info(
    "LDM: %d params, %d training latents, steps %d -> %d",
    sum(x.size for x in jax.tree.leaves(state.params)),
    len(arrays["x"]),
    int(jax.device_get(state.step)),
    config.num_train_steps,
  )

  writer = loop.create_writer(workdir)
  actions = []
  if config.sample_every_steps:
    grid = sample_grid(config, model, tok, mesh, latent_shape, writer)
    actions.append(loop.Periodic(config.sample_every_steps, grid))
  outcome = loop.run(
    state,
    lambda state, batch, t: step(state, batch),
    config=config,
    train_iter=train_iter,
    batch_sharding=sharding.batch_sharding(mesh),
    total_steps=config.num_train_steps,
    checkpointer=checkpointer,
    writer=writer,
    actions=actions,
    name="LDM",
  )
  loop.finish(checkpointer, writer)
  if outcome.preempted_at is not None:
    return dict(preempted_at_step=outcome.preempted_at)
  return outcome.metrics
