"""The tokenizer stage (VQ-VAE or VQGAN): train with the shared loop, then evaluate.

Read top to bottom: validate -> data -> mesh -> model, state and step (a VQ-VAE takes
train/tokenizer_steps.py's step, a VQGAN train/gan_steps.py's two) -> restore -> the loop
(train/loop.py) with reconstruction grids and optional periodic evaluation -> the final
evaluation on the test split and the paper's codebook plots (docs/math.md, "Metrics").
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Callable
from typing import Any

import flax.linen as nn
import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

from arcvq_jax import config as config_lib
from arcvq_jax import metric_writer, resources, sharding
from arcvq_jax import workdir as workdir_lib
from arcvq_jax.data import pipeline
from arcvq_jax.evaluation import diagnostics
from arcvq_jax.evaluation import images as image_lib
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.models import discriminator
from arcvq_jax.train import gan_steps, loop, tokenizer_steps
from arcvq_jax.train import state as state_lib


def num_train_steps(config: ml_collections.ConfigDict, num_train_images: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * (num_train_images // config.batch_size))


def make_state_and_step(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  mesh: jax.sharding.Mesh,
  image_shape: tuple[int, int, int],
  lpips_params: Any,
) -> tuple[Any, Any, loop.StepFn]:
  """A fresh state laid out by its shardings, the shardings, and the loop's step function:
  the VQ-VAE's one jitted step, or the VQGAN's generator and discriminator steps."""
  tx = state_lib.make_optimizer(config)
  if config.model.name == "vqgan":
    return gan_steps.create_state_and_steps(
      config,
      model,
      discriminator.from_config(config),
      tx,
      state_lib.make_disc_optimizer(config),
      mesh,
      image_shape,
      lpips_params,
    )
  data_variance = pipeline.train_image_variance(config.data)
  logging.info("Training image variance in [-1, 1]: %.5f", data_variance)
  state, state_sharding, step = tokenizer_steps.create_state_and_step(
    config, model, tx, mesh, image_shape, data_variance
  )
  return state, state_sharding, lambda state, batch, t: step(state, batch)


class Evaluation:
  """The run's evaluation on config.data.eval_split: MSE, PSNR, SSIM, codebook usage and
  perplexity over the split (and LPIPS with its weights), written to workdir/eval/step_N.json,
  workdir/eval_results.json and the TensorBoard scalars eval/*."""

  def __init__(
    self,
    config: ml_collections.ConfigDict,
    workdir: str,
    model: nn.Module,
    mesh: jax.sharding.Mesh,
    params_sharding: Any,
    lpips_params: Any,
    writer: metric_writer.MetricWriter,
  ):
    self.config, self.workdir, self.writer, self.lpips_params = (
      config,
      workdir,
      writer,
      lpips_params,
    )
    self.batch_sharding = sharding.batch_sharding(mesh)
    replicated = sharding.replicated(mesh)
    self.eval_fn = jax.jit(
      functools.partial(tokenizer_steps.eval_step, model=model),
      in_shardings=(params_sharding, self.batch_sharding, replicated),
      out_shardings=replicated,
      compiler_options=tokenizer_steps.compiler_options(model),
    )

  def batches(self):
    return pipeline.create_eval_iterator(
      self.config.data,
      global_batch_size=self.config.eval_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

  def __call__(self, step: int, params: Any) -> dict[str, float]:
    results = tokenizer_steps.evaluate(
      self.eval_fn, params, self.batches(), self.batch_sharding, self.lpips_params
    )
    self.writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    if jax.process_index() == 0:
      os.makedirs(os.path.join(self.workdir, "eval"), exist_ok=True)
      for name in (f"eval/step_{step}.json", "eval_results.json"):
        with open(os.path.join(self.workdir, name), "w") as f:
          json.dump(dict(step=step, split=self.config.data.eval_split, **results), f, indent=2)
    return results


def reconstruction_grid(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  evaluation: Evaluation,
  writer: metric_writer.MetricWriter,
) -> Callable[[int, Any], None]:
  """A periodic action: 8 fixed test images beside their reconstructions, as an image."""
  # Process 0's images, on every process: the jitted call takes host arrays as the same
  # value everywhere.
  preview = next(iter(evaluation.batches()))["image"][:8]
  if jax.process_count() > 1:
    preview = multihost_utils.broadcast_one_to_all(preview)
  recon_fn = jax.jit(
    functools.partial(tokenizer_steps.reconstruct, model=model),
    compiler_options=tokenizer_steps.compiler_options(model),
  )

  def write(step: int, state: Any) -> None:
    x_hat, _ = recon_fn(state.params, preview)
    grid = image_lib.side_by_side(np.asarray(preview), np.asarray(x_hat), value_range=(-1, 1))
    writer.write_images(step, {"reconstructions": grid[None]})

  return write


def periodic_actions(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  evaluation: Evaluation,
  writer: metric_writer.MetricWriter,
) -> list[loop.Periodic]:
  """What the loop does besides stepping: the training-time usage (with the metrics), the
  reconstruction grid, and evaluations during training (the final one follows the loop)."""
  used = lambda state: float(np.mean(jax.device_get(state.usage) > diagnostics.EMA_USED_THRESHOLD))
  actions = [
    loop.Periodic(
      config.log_every_steps,
      lambda step, state: writer.write_scalars(step, {"train/ema_usage": used(state)}),
    ),
    loop.Periodic(
      config.eval_every_steps, lambda step, state: evaluation(step, state.params), at_end=False
    ),
  ]
  if config.image_every_steps:
    grid = reconstruction_grid(config, model, evaluation, writer)
    actions.append(loop.Periodic(config.image_every_steps, grid))
  return actions


def log_evaluation_plan(config: ml_collections.ConfigDict, lpips_params: Any) -> None:
  """Says at start-up what the final evaluation will report, LPIPS included or skipped (and
  how to get it), so that nothing is found missing only after training."""
  path = config.get("lpips_path") or ""
  if lpips_params is not None:
    lpips = f" and LPIPS (weights {path})"
  elif not path:
    lpips = "; LPIPS skipped: config.lpips_path is empty (see docs/evaluation.md for its weights)"
  else:
    lpips = f"; LPIPS skipped: no weights at config.lpips_path={path}"
  logging.info(
    "Final evaluation on the %r split: MSE, PSNR, SSIM, codebook usage, perplexity%s",
    config.data.eval_split,
    lpips,
  )


def write_codebook_diagnostics(
  workdir: str, quantizer: Any, state: Any, step: int, writer: metric_writer.MetricWriter
) -> None:
  """The paper's Fig. 2-3 from the training-time (EMA) usage of the rows, for quantizers
  with a codebook. Every process takes part in gathering a codebook that the 'fsdp' axis
  may have split across hosts."""
  rows = quantizer.codebook(state.params)
  if rows is None:
    return
  codebook, usage = multihost_utils.process_allgather((rows, state.usage), tiled=True)
  if jax.process_index() == 0:
    diagnostics.write_codebook_diagnostics(
      os.path.join(workdir, "diagnostics"),
      np.asarray(codebook),
      np.asarray(usage),
      prefix=f"step_{step}_",
      writer=writer,
      step=step,
      source=diagnostics.training_source(step),
      used_above=diagnostics.EMA_USED_THRESHOLD,
    )


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) in `workdir`, then evaluates; returns the final eval metrics.

  Holds the workdir's lock throughout, and writes nothing into it before the config, the
  data's image shape and the newest checkpoint have been checked against what it holds
  (arcvq_jax/workdir.py). On SIGTERM (any process of a multi-process run) every process
  saves the current step, waits for the write and returns {'preempted_at_step': step}
  without evaluating.
  """
  with workdir_lib.hold(workdir):
    return _train_and_evaluate(config, workdir)


def _train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  config_lib.validate(config, jax.device_count(), jax.process_count())
  info = pipeline.dataset_info(config.data)
  image_shape = tuple(info["image_shape"])
  config_lib.validate_against_data(config, image_shape)
  pipeline.check_splits(config.data)  # a damaged file fails now, not after training
  changes = workdir_lib.check_config(config, workdir, image_shape)
  lpips_params = lpips_lib.params_for_training(config)
  log_evaluation_plan(config, lpips_params)
  total_steps = num_train_steps(config, info["num_train"])

  mesh = sharding.make_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes)
  if lpips_params is not None:
    lpips_params = jax.device_put(lpips_params, sharding.replicated(mesh))
  model = state_lib.build_model(config, channels=image_shape[-1])
  resources.check_tokenizer_fits(config, model, image_shape)  # before anything is allocated
  state, state_sharding, step_fn = make_state_and_step(
    config, model, mesh, image_shape, lpips_params
  )
  logging.info(
    "Training images: %d, steps: %d, learning rate %.3g",
    info["num_train"],
    total_steps,
    state_lib.learning_rate(config),
  )
  train_iter = pipeline.create_train_iterator(
    config.data,
    global_batch_size=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  checkpointer = loop.open_checkpointer(config, workdir)
  state = loop.restore(checkpointer, state, train_iter)
  workdir_lib.commit(config, workdir, changes, int(jax.device_get(state.step)), image_shape)

  writer = loop.create_writer(workdir)
  evaluation = Evaluation(config, workdir, model, mesh, state_sharding.params, lpips_params, writer)
  # Whatever fails from here on (the final evaluation included), the last checkpoint is
  # committed before the error leaves.
  with loop.committing(checkpointer, writer):
    outcome = loop.run(
      state,
      step_fn,
      config=config,
      train_iter=train_iter,
      batch_sharding=sharding.batch_sharding(mesh),
      total_steps=total_steps,
      checkpointer=checkpointer,
      writer=writer,
      actions=periodic_actions(config, model, evaluation, writer),
      name="tokenizer",
    )
    if outcome.preempted_at is not None:
      loop.finish(checkpointer, writer)
      return dict(preempted_at_step=outcome.preempted_at)

    results = evaluation(total_steps, outcome.state.params)
    write_codebook_diagnostics(workdir, model.quantizer, outcome.state, total_steps, writer)
    loop.finish(checkpointer, writer)
  return results
