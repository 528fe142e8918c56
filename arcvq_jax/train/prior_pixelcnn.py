"""The PixelCNN prior over the token grids of a frozen tokenizer (paper App. D.5).

Read top to bottom: validate -> frozen tokenizer (checked against the config) -> token grids
of the training split (token shards made by `python -m arcvq_jax.tokenize` where
config.data.token_shards names them, else a precompute pass, train/prior_common.py) -> mesh
-> gated PixelCNN, optimizer -> state (fresh or restored) -> jitted sharded step
(cross-entropy of every token given those before it) -> the shared loop (train/loop.py) with
sample grids as its periodic action. Ancestral sampling in raster order is `make_sample_fn`,
used here and by `python -m arcvq_jax.sample`.
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

from arcvq_jax import prior_config, resources, sharding
from arcvq_jax import workdir as workdir_lib
from arcvq_jax.evaluation import images as image_lib
from arcvq_jax.models import layers, pixelcnn
from arcvq_jax.train import loop
from arcvq_jax.train import prior_common as common


@flax.struct.dataclass
class PixelCNNTrainState:
  """step () int32; params / ema_params (None when config.ema.decay = 0); opt_state; rng."""

  step: jax.Array
  params: Any
  ema_params: Any
  opt_state: Any
  rng: jax.Array


def init_state(
  key: jax.Array,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  grid: tuple[int, int],
) -> PixelCNNTrainState:
  init_key, rng = jax.random.split(key)
  labels = jnp.zeros((1,), jnp.int32) if config.num_classes else None
  params = model.init(init_key, jnp.zeros((1, *grid), jnp.int32), labels)["params"]
  return PixelCNNTrainState(
    step=jnp.zeros((), jnp.int32),
    params=params,
    ema_params=params if config.ema.decay > 0 else None,
    opt_state=tx.init(params),
    rng=rng,
  )


def nll(logits: jax.Array, tokens: jax.Array) -> jax.Array:
  """Mean negative log-likelihood in nats per token. logits (B, H, W, K), tokens (B, H, W)."""
  return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens))


def train_step(
  state: PixelCNNTrainState,
  batch: dict[str, jax.Array],
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  replicated: Any = None,
) -> tuple[PixelCNNTrainState, dict[str, jax.Array]]:
  """One step on batch 'tokens' (B, H, W) int32, 'label' (B,) int32, split along the batch
  axes. replicated: as in prior_ldm.train_step."""
  labels = batch["label"] if config.num_classes else None

  def loss_fn(params):
    return nll(model.apply({"params": params}, batch["tokens"], labels), batch["tokens"])

  loss, grads = jax.value_and_grad(loss_fn)(sharding.gather_params(state.params, replicated))
  updates, opt_state = tx.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = dict(loss=loss, bits_per_token=loss / math.log(2.0), grad_norm=optax.tree.norm(grads))
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
  grid: tuple[int, int],
) -> tuple[PixelCNNTrainState, Any, Callable]:
  """A fresh state laid out by its shardings, the shardings, and the jitted step."""
  init_fn = functools.partial(init_state, model=model, tx=tx, config=config, grid=grid)
  resources.check_state_fits(init_fn, config, "config.pixelcnn.dim")
  state, state_sharding = sharding.fresh_state(init_fn, config.seed, mesh, config.sharding)
  step_fn = jax.jit(
    functools.partial(
      train_step, model=model, tx=tx, config=config, replicated=sharding.replicated(mesh)
    ),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,),
    compiler_options=compiler_options(config),
  )
  return state, state_sharding, step_fn


def compiler_options(config: ml_collections.ConfigDict) -> dict[str, str] | None:
  """XLA options for the PixelCNN's programs: config.pixelcnn.cpu_conv_library's (a config
  written before the key existed, or without it: XLA's default)."""
  return layers.compiler_options(config.get("pixelcnn", {}).get("cpu_conv_library"))


# --------------------------------------------------------------------------- sampling


def sample_keys(key: jax.Array, indices: jax.Array) -> jax.Array:
  """(B, 2) keys fold_in(key, i): sample i is the same whatever batch it is drawn in."""
  return jax.vmap(lambda i: jax.random.fold_in(key, i))(indices)


def sample_tokens(
  apply_fn: Callable,
  labels: jax.Array | None,
  keys: jax.Array,
  grid: tuple[int, int],
  temperature: float = 1.0,
) -> jax.Array:
  """Ancestral sampling in raster order: (B,) keys -> tokens (B, H, W) int32.

  apply_fn(tokens (B, H, W), labels) -> logits (B, H, W, K). One forward pass per position
  (a `fori_loop` over the H*W positions); position p of sample b draws with
  fold_in(keys[b], p).
  """
  h, w = grid
  b = keys.shape[0]

  def body(p, tokens):
    i, j = p // w, p % w
    logits = apply_fn(tokens, labels)[:, i, j] / temperature
    pos_keys = jax.vmap(lambda k: jax.random.fold_in(k, p))(keys)
    drawn = jax.vmap(jax.random.categorical)(pos_keys, logits).astype(jnp.int32)
    return tokens.at[:, i, j].set(drawn)

  return jax.lax.fori_loop(0, h * w, body, jnp.zeros((b, h, w), jnp.int32))


def make_sample_fn(
  model: nn.Module,
  config: ml_collections.ConfigDict,
  grid: tuple[int, int],
  *,
  temperature: float | None = None,
  mesh: jax.sharding.Mesh | None = None,
) -> Callable:
  """jitted (params, labels (B,) int32, keys (B, 2)) -> tokens (B, H, W) int32."""
  temperature = config.sampling.temperature if temperature is None else temperature

  def sample(params, labels, keys):
    apply_fn = lambda t, y: model.apply({"params": params}, t, y)
    return sample_tokens(
      apply_fn, labels if config.num_classes else None, keys, grid, float(temperature)
    )

  jit = functools.partial(jax.jit, compiler_options=compiler_options(config))
  if mesh is None:
    return jit(sample)
  batch, rep = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  return jit(sample, in_shardings=(rep, batch, batch), out_shardings=batch)


def sample_params(state: PixelCNNTrainState, use_ema: bool) -> Any:
  return state.ema_params if use_ema and state.ema_params is not None else state.params


# --------------------------------------------------------------------------- the stage


def sample_grid(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tok: Any,
  mesh: jax.sharding.Mesh,
  grid: tuple[int, int],
  writer: Any,
) -> Callable[[int, PixelCNNTrainState], None]:
  """A periodic action: 8 samples (one per class, fixed keys), decoded, as an image."""
  sample_fn = make_sample_fn(model, config, grid)
  n = 8
  # Replicated on the mesh like the params, so the jitted sampler sees one device set.
  labels, keys = jax.device_put(
    (
      jnp.arange(n, dtype=jnp.int32) % max(config.num_classes, 1),
      sample_keys(jax.random.PRNGKey(config.seed + 1), jnp.arange(n)),
    ),
    sharding.replicated(mesh),
  )

  def write(step: int, state: PixelCNNTrainState) -> None:
    tokens = sample_fn(sample_params(state, config.sampling.use_ema), labels, keys)
    images = tok.decode(np.asarray(tokens.addressable_data(0)))  # replicated
    image = image_lib.image_grid(np.asarray(images), ncols=n, value_range=(-1, 1))
    writer.write_images(step, {"samples": image[None]})

  return write


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) the PixelCNN in `workdir`; returns the last logged train metrics.

  Holds the workdir's lock throughout, and writes nothing into it before the config, the
  pinned tokenizer and the newest checkpoint have been checked against what it holds
  (arcvq_jax/workdir.py; train/prior_common.load_tokenizer)."""
  with workdir_lib.hold(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  prior_config.validate_pixelcnn(config, jax.device_count(), jax.process_count())
  changes = workdir_lib.check_config(config, workdir)
  # Token shards (config.data.token_shards) or this run's own pass over the training split.
  tok, record, train_iter, num_examples = common.token_grids(config, workdir)
  grid = tuple(record["latent_shape"][:2])

  mesh = sharding.make_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes)
  model = pixelcnn.from_config(config, num_codes=record["num_codes"])
  tx = common.make_optimizer(config)
  state, _, step = create_state_and_step(config, model, tx, mesh, grid)
  checkpointer = loop.open_checkpointer(config, workdir)
  state = loop.restore(checkpointer, state, train_iter)
  workdir_lib.commit(config, workdir, changes, int(jax.device_get(state.step)))
  logging.info(
    "PixelCNN: %d params, %d training grids of %s, steps %d -> %d",
    sum(x.size for x in jax.tree.leaves(state.params)),
    num_examples,
    grid,
    int(jax.device_get(state.step)),
    config.num_train_steps,
  )

  writer = loop.create_writer(workdir)
  actions = []
  if config.sample_every_steps:
    preview = sample_grid(config, model, tok, mesh, grid, writer)
    actions.append(loop.Periodic(config.sample_every_steps, preview))
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
    name="PixelCNN",
  )
  loop.finish(checkpointer, writer)
  if outcome.preempted_at is not None:
    return dict(preempted_at_step=outcome.preempted_at)
  return outcome.metrics
