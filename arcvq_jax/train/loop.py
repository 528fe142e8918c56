"""The training loop every stage uses (tokenizer, LDM, PixelCNN).

A stage builds its state, its jitted step and its periodic actions; `run` does the rest:
stepping, the metric history and its writing, honest throughput (from completed steps, not
dispatched ones), the non-finite-loss stop, periodic checkpoints, SIGTERM / preemption, the
periodic actions (reconstruction or sample grids, evaluation) and the final flush. Resuming is
`restore`; the same command in the same workdir continues bit-exactly where a run stopped.

Why the loop waits for step t-1 after dispatching step t: JAX returns from a jitted call
before the computation ends, so a clock read after the call measures dispatch. Waiting on
the previous step's loss (a scalar) keeps exactly one step queued ahead, so the device is
never idle, and every progress figure counts finished steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax import distributed, metric_writer, sharding

Metrics = dict[str, jax.Array]
# (state, global batch, t) -> (state, metrics); t is the 0-based index of the step taken
# (the state's step before it), a Python int for stages that pick a program by it (the GAN).
StepFn = Callable[[Any, dict[str, jax.Array], int], tuple[Any, Metrics]]


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; nothing after the last good checkpoint was saved."""


@dataclasses.dataclass(frozen=True)
class Periodic:
  """`fn(step, state)` after every `every`-th step (0: never); with `at_end`, also after
  the last step of the run (e.g. the reconstruction grid, not the evaluation, which the
  stage runs after the loop)."""

  every: int
  fn: Callable[[int, Any], None]
  at_end: bool = True

  def due(self, step: int, is_last: bool) -> bool:
    return bool(self.every) and (step % self.every == 0 or (is_last and self.at_end))


@dataclasses.dataclass
class Outcome:
  """What `run` ends with: the state after the last step taken, the mean metrics of the last
  logged interval, the step at which SIGTERM stopped the run (None if it ran to the end),
  and the throughput of this run's steps after the first (None if it took fewer than two)."""

  state: Any
  metrics: dict[str, float]
  preempted_at: int | None
  steps_per_sec: float | None
  first_step_sec: float | None


def create_writer(workdir: str) -> metric_writer.MetricWriter:
  """TensorBoard events in workdir and log lines (process 0); log lines only elsewhere."""
  return metric_writer.create_writer(workdir, just_logging=jax.process_index() != 0)


def open_checkpointer(config: ml_collections.ConfigDict, workdir: str) -> ckpt_lib.Checkpointer:
  """The stage's checkpointer on workdir/checkpoints; CheckpointError where that path is a
  file (orbax would fail in its background thread at the first save and wait out a 300 s
  timeout)."""
  directory = ckpt_lib.checkpoint_dir(workdir)
  if "://" not in directory and os.path.exists(directory) and not os.path.isdir(directory):
    raise ckpt_lib.CheckpointError(
      f"{directory} is a file, but checkpoints are written into a directory of that name. "
      "Move or delete the file, or give another --workdir."
    )
  return ckpt_lib.Checkpointer(
    ckpt_lib.checkpoint_dir(workdir),
    config.keep_checkpoints,
    async_save=config.get("checkpoint_async", False),
  )


def restore(checkpointer: ckpt_lib.Checkpointer, state: Any, data_iter: Any) -> Any:
  """The newest readable checkpoint restored into the layout of the fresh `state` (and
  `data_iter` moved to its position), or `state` itself when the run is new. Damaged steps
  are set aside with a warning (Checkpointer.restore_latest)."""
  restored = checkpointer.restore_latest(ckpt_lib.abstract_like(state), data_iter)
  if restored is None:
    return state
  logging.info(
    "Resuming from checkpoint step %d in %s",
    int(jax.device_get(restored.step)),
    checkpointer.directory,
  )
  return restored


def mean_metrics(history: Sequence[Metrics]) -> dict[str, float]:
  """Per key, the mean over the steps that logged it (GAN terms start part-way)."""
  stacked = jax.device_get(list(history))
  keys = dict.fromkeys(k for m in stacked for k in m)
  return {k: float(np.mean([m[k] for m in stacked if k in m])) for k in keys}


def check_finite(
  history: Sequence[Metrics], first_step: int, checkpointer: ckpt_lib.Checkpointer, name: str
) -> None:
  """Raises NonFiniteLossError if a 'loss' in history (steps first_step, ...) is NaN or Inf.

  Called before every save, so a diverged state is never written."""
  losses = np.asarray(jax.device_get([m["loss"] for m in history]))
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    checkpointer.wait()  # an asynchronous save of an earlier, good step finishes first
    raise NonFiniteLossError(
      nonfinite_message(
        name,
        float(losses[bad[0]]),
        first_step + int(bad[0]),
        checkpointer.latest_step(),
        str(checkpointer.directory),
      )
    )


def nonfinite_message(
  name: str, loss: float, step: int, last_good: int | None, directory: str
) -> str:
  """What the non-finite-loss stop says: where the run can go on from (the last good
  checkpoint in `directory`, or none yet), and what to change."""
  fix = "Lower config.optimizer.lr or set config.optimizer.grad_clip_norm"
  if last_good is None:
    return (
      f"the {name} loss became {loss} by step {step}, before the first checkpoint was "
      f"written: {directory} holds none, so there is nothing to resume from. {fix}, then run "
      "the same command again: it starts from step 0."
    )
  # A resumed run may change the learning rate and an active clipping threshold, not switch
  # clipping on: that changes the optimizer state's structure (workdir.RESUMABLE).
  return (
    f"the {name} loss became {loss} by step {step}; the last good checkpoint is step "
    f"{last_good} (in {directory}) and nothing after it was saved. Lower config.optimizer.lr "
    "(or config.optimizer.grad_clip_norm where clipping is on), then run the same command "
    "again to resume from it; to switch clipping on, start a new --workdir with "
    "config.optimizer.grad_clip_norm set."
  )


def _format_duration(seconds: float) -> str:
  seconds = round(seconds)
  h, rest = divmod(seconds, 3600)
  m, s = divmod(rest, 60)
  return f"{h}h{m:02d}m" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


class _Progress:
  """Throughput and ETA from completed steps; a tqdm bar on an interactive terminal."""

  def __init__(self, start: int, total: int, name: str):
    self.start, self.total, self.name = start, total, name
    self.t0 = time.perf_counter()
    self.first_done: float | None = None  # when the run's first step (and compile) finished
    self.mark = (start, self.t0)  # (step, time) of the last throughput reading
    self.bar = None
    if jax.process_index() == 0 and sys.stderr.isatty():
      from tqdm.auto import tqdm  # noqa: PLC0415 (only for a terminal)

      self.bar = tqdm(
        total=total, initial=start, desc=name, unit="step", dynamic_ncols=True, leave=False
      )

  def completed(self, step: int) -> None:
    """Step `step` has finished computing."""
    now = time.perf_counter()
    if self.first_done is None:
      self.first_done = now
      self.mark = (step, now)
      logging.info(
        "%s: first step (with compilation) took %.1f s", self.name, self.first_done - self.t0
      )
    if self.bar is not None:
      self.bar.update(step - self.bar.n)

  def rate(self, step: int) -> float | None:
    """Steps per second since the last reading (or since the first step); None before."""
    last_step, last_time = self.mark
    now = time.perf_counter()
    if step <= last_step:
      return None
    self.mark = (step, now)
    return (step - last_step) / (now - last_time)

  def overall(self, step: int) -> float | None:
    """Steps per second over the run's steps after the first."""
    if self.first_done is None or step <= self.start + 1:
      return None
    return (step - self.start - 1) / (time.perf_counter() - self.first_done)

  def log(self, step: int, metrics: dict[str, float], rate: float | None) -> None:
    """One progress line (the metrics themselves go through the writer)."""
    line = f"{self.name}: step {step}/{self.total} ({100 * step / max(self.total, 1):.0f} %)"
    if rate:
      eta = _format_duration((self.total - step) / rate)
      line += f", {rate:.2f} steps/s, ETA {eta}"
    if self.bar is not None:
      self.bar.set_postfix_str(f"loss {metrics.get('loss', float('nan')):.4g}", refresh=False)
    logging.info("%s", line)

  def close(self) -> None:
    if self.bar is not None:
      self.bar.close()


def run(
  state: Any,
  step_fn: StepFn,
  *,
  config: ml_collections.ConfigDict,
  train_iter: Iterator[dict[str, np.ndarray]],
  batch_sharding: jax.sharding.Sharding,
  total_steps: int,
  checkpointer: ckpt_lib.Checkpointer,
  writer: metric_writer.MetricWriter,
  actions: Sequence[Periodic] = (),
  name: str = "train",
) -> Outcome:
  """Steps from the state's step to `total_steps`; see the module docstring.

  config: the run's, for log_every_steps and checkpoint_every_steps (steps between metric
  writes / checkpoints; the last step always does both); train_iter: this process's rows of
  each batch (checkpointed with the state); actions run after the step's metrics and before
  its checkpoint. On SIGTERM (any
  process) every process saves the current step, waits for the write, and returns with
  `preempted_at` set. A non-finite loss raises NonFiniteLossError before anything is saved.
  """
  log_every, checkpoint_every = config.log_every_steps, config.checkpoint_every_steps
  start = int(jax.device_get(state.step))
  progress = _Progress(start, total_steps, name)
  history: list[Metrics] = []
  history_start = start + 1
  last: dict[str, float] = {}
  previous: Metrics | None = None

  def save(step: int) -> None:
    check_finite(history, history_start, checkpointer, name)
    checkpointer.save(step, state, train_iter)

  preemption = distributed.PreemptionWatcher().install()
  try:
    for step in range(start + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation(name, step_num=step):
        batch = sharding.global_batch(next(train_iter), batch_sharding)
        state, metrics = step_fn(state, batch, step - 1)
      if previous is not None:  # one step stays queued; the one before it has finished
        jax.block_until_ready(previous["loss"])
        progress.completed(step - 1)
      previous = metrics
      history.append(metrics)
      is_last = step == total_steps

      if step % log_every == 0 or is_last:
        check_finite(history, history_start, checkpointer, name)  # waits for this step
        progress.completed(step)
        last = mean_metrics(history)
        rate = progress.rate(step)
        scalars = {f"train/{k}": v for k, v in last.items()}
        if rate is not None:
          scalars["train/steps_per_sec"] = rate
        writer.write_scalars(step, scalars)
        progress.log(step, last, rate)
        history, history_start = [], step + 1
      for action in actions:
        if action.due(step, is_last):
          action.fn(step, state)
      saved = (checkpoint_every and step % checkpoint_every == 0) or is_last
      if saved:
        save(step)
      if not is_last and preemption.should_stop(step):
        # SIGTERM (preemption, scancel, maintenance): save this step, wait for the write,
        # and leave; the same command resumes here.
        if not saved:
          save(step)
        checkpointer.wait()
        writer.flush()
        progress.close()
        logging.warning(
          "Preempted (SIGTERM) at step %d of %d: checkpoint saved in %s; run the same "
          "command to resume.",
          step,
          total_steps,
          checkpointer.directory,
        )
        return Outcome(state, last, step, progress.overall(step), _first(progress))
  except BaseException:
    wait_quietly(checkpointer)  # the last save committed before the error leaves
    raise
  finally:
    preemption.restore()
  writer.flush()
  progress.close()
  return Outcome(state, last, None, progress.overall(total_steps), _first(progress))


def _first(progress: _Progress) -> float | None:
  return None if progress.first_done is None else progress.first_done - progress.t0


def finish(checkpointer: ckpt_lib.Checkpointer, writer: metric_writer.MetricWriter) -> None:
  """Waits for the last checkpoint write, then closes the checkpointer and the writer."""
  checkpointer.wait()
  checkpointer.close()
  writer.close()


def wait_quietly(checkpointer: ckpt_lib.Checkpointer) -> None:
  """Waits for a checkpoint still being written (orbax's background save), on the way out of
  an error: the save commits (no `*.orbax-checkpoint-tmp` left behind) and orbax's threads
  are done before the interpreter closes their event loop. A failing save is logged, never
  raised over the error that is leaving."""
  try:
    checkpointer.wait()
  except Exception as e:  # the error on its way out matters more
    logging.warning("The last checkpoint could not be written: %s", e)


@contextlib.contextmanager
def committing(
  checkpointer: ckpt_lib.Checkpointer, writer: metric_writer.MetricWriter
) -> Iterator[None]:
  """Wraps a stage from its loop to its end (the final evaluation included): where anything
  raises, the pending checkpoint save is waited for and the checkpointer and writer closed
  before the error leaves, so the last checkpoint is committed. The stage calls `finish`
  itself on success."""
  try:
    yield
  except BaseException:
    wait_quietly(checkpointer)
    for close in (checkpointer.close, writer.close):
      try:
        close()
      except Exception as e:  # as in wait_quietly
        logging.warning("Closing after the error failed: %s", e)
    raise
