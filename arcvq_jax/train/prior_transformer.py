"""The transformer priors over the token grids of a frozen tokenizer: MaskGIT's bidirectional
transformer (config.stage 'maskgit', docs/math.md, section 11.3) and LlamaGen's
autoregressive one ('ar', section 11.4). One file for both: they differ only in the network,
its loss and its sampler (`model_from_config`, `loss`, `make_sample_fn`), all else is shared.

Read top to bottom: validate -> frozen tokenizer (checked against the config) -> token grids
of the training split (token shards where config.data.token_shards names them, else a
precompute pass, train/prior_common.py) -> mesh -> transformer, optimizer -> state (fresh or
restored) -> jitted sharded step (MaskGIT: cross-entropy on the masked positions; AR: of
every token given those before it; labels dropped to the null class with probability
config.guidance.cond_drop_prob) -> the shared loop (train/loop.py) with sample grids as its
periodic action. `make_sample_fn` is used here and by `python -m arcvq_jax.sample`.

Precision: the parameters, the EMA, the optimizer state, the logits and the loss are float32;
config.<stage>.dtype = 'bfloat16' runs the matmuls in bf16 (models/transformer.py).
"""

from __future__ import annotations

import functools
import math
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

from arcvq_jax import prior_config, resources, sharding, token_sampling
from arcvq_jax import workdir as workdir_lib
from arcvq_jax.evaluation import images as image_lib
from arcvq_jax.models import ar, maskgit
from arcvq_jax.train import loop
from arcvq_jax.train import prior_common as common

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
NAMES = {"maskgit": "MaskGIT", "ar": "AR transformer"}


@flax.struct.dataclass
class TokenPriorTrainState:
  """step () int32; params / ema_params (None when config.ema.decay = 0); opt_state; rng (2,)
  uint32, folded with the step for each step's draws (mask, label dropout, dropout)."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


def model_from_config(
  config: ml_collections.ConfigDict, num_codes: int, grid: tuple[int, int]
) -> nn.Module:
  """The network config.stage names, over `grid` (h, w) token grids of `num_codes` codes."""
  n = config[config.stage]
  common_args = dict(
    vocab_size=num_codes,
    grid=tuple(grid),
    num_classes=config.num_classes,
    dim=n.dim,
    depth=n.depth,
    num_heads=n.num_heads,
    mlp_ratio=n.mlp_ratio,
    multiple_of=n.multiple_of,
    dropout=n.dropout,
    dtype=DTYPES[n.dtype],
  )
  if config.stage == "maskgit":
    return maskgit.MaskGITTransformer(**common_args)
  return ar.ARTransformer(positions=n.positions, rope_base=n.rope_base, **common_args)


def init_state(
  key: jax.Array,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
) -> TokenPriorTrainState:
  init_key, rng = jax.random.split(key)
  labels = jnp.zeros((1,), jnp.int32) if config.num_classes else None
  params = model.init(init_key, jnp.zeros((1, model.num_tokens), jnp.int32), labels)["params"]
  return TokenPriorTrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=params if config.ema.decay > 0 else None,
    opt_state=tx.init(params),
    rng=rng,
  )


def loss(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  params: Any,
  key: jax.Array,
  tokens: jax.Array,
  labels: jax.Array | None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The stage's loss of tokens (B, h, w) int32 and labels (B,) (or None): (loss () float32,
  aux). key: the mask (MaskGIT), the label dropout and the dropout."""
  drop = config.guidance.cond_drop_prob
  if config.stage == "maskgit":
    return maskgit.train_loss(
      model,
      params,
      key,
      tokens,
      labels,
      cond_drop_prob=drop,
      label_smoothing=config.maskgit.label_smoothing,
    )
  return ar.train_loss(model, params, key, tokens, labels, cond_drop_prob=drop)


def train_step(
  state: TokenPriorTrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  replicated: Any = None,
) -> tuple[TokenPriorTrainState, dict[str, jax.Array]]:
  """One step on batch 'tokens' (B, h, w) int32, 'label' (B,) int32, split along the batch
  axes. replicated: the mesh's replicated sharding (FSDP gathers the parameters whole for the
  passes), or None. Metrics: loss, accuracy, grad_norm; MaskGIT also the masked fraction,
  AR bits per token (its loss is the likelihood, comparable with the PixelCNN's)."""
  key = jax.random.fold_in(state.rng, state.step)
  labels = batch["label"] if config.num_classes else None

  def loss_fn(params):
    return loss(model, config, params, key, batch["tokens"], labels)

  (value, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(
    sharding.gather_params(state.params, replicated)
  )
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=value, grad_norm=optax.tree.norm(grads), **aux)
  if config.stage == "ar":
    metrics["bits_per_token"] = value / math.log(2.0)
  ema_params = state.ema_params
  if ema_params is not None:
    decay = common.ema_decay(state.step, config.ema.decay, config.ema.warmup)
    ema_params = common.ema_update(ema_params, params, decay)
  return state.replace(
    step=state.step + 1, params=params, ema_params=ema_params, opt_state=opt_state
  ), metrics


def create_state_and_step(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
) -> tuple[TokenPriorTrainState, Any, Callable]:
  """A fresh state laid out by its shardings (config.sharding: param_rules by name, FSDP),
  the shardings, and the jitted step."""
  init_fn = functools.partial(init_state, model=model, tx=tx, config=config)
  resources.check_state_fits(init_fn, config, f"config.{config.stage}.dim")
  state, state_sharding = sharding.fresh_state(init_fn, config.seed, mesh, config.sharding)
  step_fn = jax.jit(
    functools.partial(
      train_step, model=model, tx=tx, config=config, replicated=sharding.replicated(mesh)
    ),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return state, state_sharding, step_fn


# --------------------------------------------------------------------------- sampling


def sampling_settings(config: ml_collections.ConfigDict, **overrides: Any) -> dict[str, Any]:
  """The stage's sampling settings (prior_config.SAMPLING_KEYS): config.sampling's, with the
  non-None `overrides` on top."""
  settings = {k: config.sampling[k] for k in prior_config.SAMPLING_KEYS[config.stage]}
  settings.update({k: v for k, v in overrides.items() if v is not None and k in settings})
  return settings


def sample_tokens(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  params: Any,
  labels: jax.Array,
  keys: jax.Array,
  settings: dict[str, Any],
  use_cache: bool = True,
) -> jax.Array:
  """Token grids (B, h, w) int32 for labels (B,) (ignored by an unconditional prior) and
  per-sample keys (B, 2): MaskGIT's parallel decoding, or the AR transformer's raster-order
  sampling (with the KV cache unless use_cache is False). Jit the caller."""
  labels = labels if config.num_classes else None
  s = settings
  if config.stage == "maskgit":
    return maskgit.sample_tokens(
      model,
      params,
      labels,
      keys,
      num_steps=int(s["decode_steps"]),
      temperature=float(s["temperature"]),
      choice_temperature=float(s["choice_temperature"]),
      guidance_scale=float(s["guidance_scale"]),
    )
  return ar.sample_tokens(
    model,
    params,
    labels,
    keys,
    use_cache=use_cache,
    temperature=float(s["temperature"]),
    top_k=int(s["top_k"]),
    top_p=float(s["top_p"]),
    guidance_scale=float(s["guidance_scale"]),
  )


def make_sample_fn(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  settings: dict[str, Any] | None = None,
  *,
  mesh: jax.sharding.Mesh | None = None,
  use_cache: bool = True,
) -> Callable:
  """jitted (params, labels (B,) int32, keys (B, 2)) -> tokens (B, h, w) int32, with
  `settings` (default: `sampling_settings(config)`); on `mesh`, the batch split over it."""
  settings = sampling_settings(config) if settings is None else settings

  def sample(params, labels, keys):
    return sample_tokens(model, config, params, labels, keys, settings, use_cache)

  if mesh is None:
    return jax.jit(sample)
  batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jax.jit(sample, in_shardings=(rep, batch, batch), out_shardings=batch)


def sample_params(state: TokenPriorTrainState, use_ema: bool) -> Any:
  return state.ema_params if use_ema and state.ema_params is not None else state.params


def sample_grid(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tok: Any,
  mesh: jax.sharding.Mesh,
  writer: Any,
) -> Callable[[int, TokenPriorTrainState], None]:
  """A periodic action: 8 samples (one per class, fixed keys) with the configured sampling
  settings, decoded, as an image."""
  sample_fn = make_sample_fn(model, config)
  n = 8
  # Replicated on the mesh like the params, so the jitted sampler sees one device set.
  labels, keys = jax.device_put(
    (
      jnp.arange(n, dtype=jnp.int32) % max(config.num_classes, 1),
      token_sampling.sample_keys(jax.random.PRNGKey(config.seed + 1), jnp.arange(n)),
    ),
    sharding.replicated(mesh),
  )

  def write(step: int, state: TokenPriorTrainState) -> None:
    tokens = sample_fn(sample_params(state, config.sampling.use_ema), labels, keys)
    images = tok.decode(np.asarray(tokens.addressable_data(0)))  # replicated
    image = image_lib.image_grid(np.asarray(images), ncols=n, value_range=(-1, 1))
    writer.write_images(step, {"samples": image[None]})

  return write


# --------------------------------------------------------------------------- the stage


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the MaskGIT or AR prior (config.stage) in `workdir`; returns the
  last logged train metrics ({'preempted_at_step': step} after SIGTERM).

  Holds the workdir's lock throughout, and writes nothing into it before the config, the
  pinned tokenizer and the newest checkpoint have been checked against what it holds
  (arcvq_jax/workdir.py; train/prior_common.load_tokenizer)."""
  with workdir_lib.hold(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  prior_config.validate_transformer(config, jax.device_count(), jax.process_count())
  changes = workdir_lib.check_config(config, workdir)
  tok, record, train_iter, num_examples = common.token_grids(config, workdir)
  grid = tuple(record["latent_shape"][:2])

  mesh = sharding.make_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes)
  model = model_from_config(config, record["num_codes"], grid)
  tx = common.make_optimizer(config)
  state, _, step = create_state_and_step(config, model, tx, mesh)
  checkpointer = loop.open_checkpointer(config, workdir)
  state = loop.restore(checkpointer, state, train_iter)
  workdir_lib.commit(config, workdir, changes, int(jax.device_get(state.step)))
  name = NAMES[config.stage]
  logging.info(
    "%s: %d params, %d training grids of %s, steps %d -> %d",
    name,
    sum(x.size for x in jax.tree.leaves(state.params)),
    num_examples,
    grid,
    int(jax.device_get(state.step)),
    config.num_train_steps,
  )

  writer = loop.create_writer(workdir)
  actions = []
  if config.sample_every_steps:
    preview = sample_grid(config, model, tok, mesh, writer)
    actions.append(loop.Periodic(config.sample_every_steps, preview))
  # Whatever fails from here on, the last checkpoint is committed before the error leaves.
  with loop.committing(checkpointer, writer):
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
      name=name,
    )
    loop.finish(checkpointer, writer)
  if outcome.preempted_at is not None:
    return dict(preempted_at_step=outcome.preempted_at)
  return outcome.metrics
