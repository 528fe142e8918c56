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
import ml_collections

from arcvq_jax import api
from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax.train import state as state_lib


class WorkdirError(ValueError):
  """The workdir cannot take a converted checkpoint (e.g. it already holds a run)."""


def abstract_state(config: ml_collections.ConfigDict, image_shape: tuple[int, int, int]) -> Any:
  """Shapes and dtypes (jax.ShapeDtypeStruct) of the state `main` builds for this config:
  what a checkpoint must match to be restored. Traces the initialiser, computes nothing."""
  return jax.eval_shape(state_lib.init_fn(config, image_shape), jax.random.PRNGKey(config.seed))


def build_state(
  config: ml_collections.ConfigDict,
  image_shape: tuple[int, int, int],
  params: Any,
  *,
  step: int,
  disc_params: Any = None,
  disc_batch_stats: Any = None,
) -> Any:
  """state.state_from_params, checked leaf by leaf against the state `main` builds for the
  config (WorkdirError naming every leaf that differs)."""
  state = state_lib.state_from_params(
    config,
    image_shape,
    params,
    step=step,
    disc_params=disc_params,
    disc_batch_stats=disc_batch_stats,
  )
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

  The state of `build_state` (the converted discriminator, if given, in place of a fresh
  one), written as `api.write_workdir` writes: no data position, so `main` starts the data
  stream afresh; a workdir that already holds checkpoints is refused.
  """
  try:
    api.refuse_nonempty(workdir)
  except api.TokenizerLoadError as e:
    raise WorkdirError(str(e)) from e
  state = build_state(
    config,
    image_shape,
    params,
    step=step,
    disc_params=disc_params,
    disc_batch_stats=disc_batch_stats,
  )
  return api.save_state(workdir, config, state, step)


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
