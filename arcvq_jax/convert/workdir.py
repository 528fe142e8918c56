"""A run directory around converted weights: what `python -m arcvq_jax.main` resumes from.

`api.write_workdir` wraps an autoencoder's params in the train state a fresh run of the config
creates (fresh optimizer state, EMA codebook statistics starting at the codebook, zero usage,
a fresh discriminator for a VQGAN). A converted VQGAN checkpoint also carries its PatchGAN
(params and BatchNorm statistics); `write_workdir` here puts those in too, and checks the
state against the one `main` builds for the config (`abstract_state`), leaf by leaf.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from etils import epath

from arcvq_jax import api, quantization
from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax.train import gan_steps, tokenizer
from arcvq_jax.train.state import (
  DiscState,
  GANTrainState,
  TrainState,
  init_disc_state,
  init_train_state,
  make_disc_optimizer,
  make_optimizer,
)


class WorkdirError(ValueError):
  """The workdir cannot take a converted checkpoint (e.g. it already holds a run)."""


def _init_fn(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]):
  """main's state initialiser: a function of the seed's key."""
  model = tokenizer.build_model(config, channels=image_shape[-1])
  tx = make_optimizer(config)
  if config.model.name != "vqgan":
    return lambda key: init_train_state(key, model=model, tx=tx, image_shape=image_shape)
  disc_model = gan_steps.discriminator_from_config(config)
  disc_tx = make_disc_optimizer(config)

  def init_fn(key):  # as gan_steps.create_state_and_steps
    gen_key, disc_key = jax.random.split(key)
    return GANTrainState(
      gen=init_train_state(gen_key, model=model, tx=tx, image_shape=image_shape),
      disc=init_disc_state(disc_key, model=disc_model, tx=disc_tx, image_shape=image_shape),
    )

  return init_fn


def abstract_state(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> Any:
  """Shapes and dtypes (jax.ShapeDtypeStruct) of the state `main` builds for this config:
  what a checkpoint must match to be restored. Traces the initialiser, computes nothing."""
  return jax.eval_shape(_init_fn(config, image_shape), jax.random.PRNGKey(config.seed))


def build_state(
  config: ml_collections.ConfigDict,
  image_shape: tuple[int, int, int],
  params: Any,
  *,
  step: int,
  disc_params: Any = None,
  disc_batch_stats: Any = None,
) -> Any:
  """The train state of `config` with these weights, structured exactly as `main`'s own.

  params: the autoencoder's 'params' tree (numpy or jax arrays); disc_params /
  disc_batch_stats: the PatchGAN's (a VQGAN only; None: a fresh discriminator, initialised
  as a new run's). Optimizer states are fresh (zeros); the EMA codebook statistics start at
  the codebook (counts of one), the usage at zero, as a new run's.
  """
  to_jax = lambda tree: jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  key = jax.random.PRNGKey(config.seed)
  is_gan = config.model.name == "vqgan"
  gen_key, disc_key = jax.random.split(key) if is_gan else (key, None)
  _, rng = jax.random.split(gen_key)  # as init_train_state
  params = to_jax(params)
  codebook = params["codebook"]
  gen = TrainState(
    step=jnp.asarray(step, jnp.int32),
    params=params,
    opt_state=make_optimizer(config).init(params),
    ema=quantization.EMAState(
      cluster_size=jnp.ones((codebook.shape[0],), jnp.float32), embed_sum=codebook
    ),
    usage=jnp.zeros((codebook.shape[0],), jnp.float32),
    rng=rng,
  )
  if not is_gan:
    state = gen
  else:
    if disc_params is None:
      disc_model = gan_steps.discriminator_from_config(config)
      disc = init_disc_state(
        disc_key, model=disc_model, tx=make_disc_optimizer(config), image_shape=image_shape
      )
    else:
      disc_params = to_jax(disc_params)
      disc = DiscState(
        params=disc_params,
        batch_stats=to_jax(disc_batch_stats),
        opt_state=make_disc_optimizer(config).init(disc_params),
      )
    state = GANTrainState(gen=gen, disc=disc)
  check_matches(state, abstract_state(config, image_shape))
  return state


def _flat_shapes(tree: Any) -> dict[str, tuple[tuple[int, ...], str]]:
  flat = jax.tree_util.tree_flatten_with_path(tree)[0]
  return {jax.tree_util.keystr(p): (tuple(x.shape), str(x.dtype)) for p, x in flat}


def check_matches(state: Any, abstract: Any) -> None:
  """Raises WorkdirError naming every leaf where `state` and `abstract` differ."""
  got, want = _flat_shapes(state), _flat_shapes(abstract)
  problems = [f"missing {k} {want[k]}" for k in want if k not in got]
  problems += [f"unexpected {k} {got[k]}" for k in got if k not in want]
  problems += [f"{k}: {got[k]} != {want[k]}" for k in want if k in got and got[k] != want[k]]
  if problems:
    raise WorkdirError(
      "the converted state does not match the state this config trains:\n  " + "\n  ".join(problems)
    )


def write_workdir(
  workdir: str,
  config: ml_collections.ConfigDict,
  image_shape: tuple[int, int, int],
  params: Any,
  *,
  step: int,
  disc_params: Any = None,
  disc_batch_stats: Any = None,
) -> str:
  """Writes workdir/config.json and workdir/checkpoints/<step>; returns the checkpoint dir.

  Without a discriminator this is `api.write_workdir`. With one (a VQGAN checkpoint that
  carries its PatchGAN), the same state with the converted discriminator in place of a fresh
  one: api.write_workdir has no argument for it. Either way the checkpoint has no data
  position, so `main` starts the data stream afresh, and a workdir that already holds
  checkpoints is refused.
  """
  if disc_params is None:
    return api.write_workdir(workdir, config, params, image_shape, step=step)
  directory = ckpt_lib.checkpoint_dir(workdir)
  checkpointer = ckpt_lib.Checkpointer(directory)
  try:
    if checkpointer.latest_step() is not None:
      raise WorkdirError(
        f"{directory} already has checkpoints ({checkpointer.all_steps()}); "
        "write into an empty --workdir so no run is overwritten."
      )
    state = build_state(
      config,
      image_shape,
      params,
      step=step,
      disc_params=disc_params,
      disc_batch_stats=disc_batch_stats,
    )
    root = epath.Path(workdir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (api.CONFIG_FILE + ".tmp")
    tmp.write_text(config.to_json_best_effort(indent=2))
    tmp.rename(root / api.CONFIG_FILE)
    checkpointer.save(step, state, None)
    checkpointer.wait()
  finally:
    checkpointer.close()
  return directory


def restore_state(
  workdir: str,
  config: ml_collections.ConfigDict,
  image_shape: tuple[int, int, int],
  step: int | None = None,
) -> Any:
  """The train state saved in workdir (its latest step by default), as `main` restores it,
  on the default device. For tests and tools; training goes through `main`."""
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir))
  step = checkpointer.latest_step() if step is None else step
  if step is None:
    raise WorkdirError(f"no checkpoint in {workdir}")
  abstract = abstract_state(config, image_shape)
  device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  abstract = jax.tree.map(
    lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=device), abstract
  )
  state = checkpointer.restore(step, abstract, None)
  checkpointer.close()
  return state
