"""Running a sweep's runs: status files, resume, failures, and each run's final evaluation.

Every run trains in its own workdir DIR/runs/<setting>/seed_<s> through the normal trainer
(train/tokenizer.train_and_evaluate), which resumes from the run's checkpoint by itself. Beside
the trainer's files the run keeps DIR/runs/<setting>/seed_<s>/ablate/:

  run.json      the setting, the seed and the resolved config (flat), with its fingerprint
  status.json   pending | done | failed, the error, attempts, wall time, steps/s, the machine
  eval.json     the final test-split metrics: the trainer's eval_results.json, plus LPIPS and
                rFID from evaluate.evaluate_checkpoint where their weights are present (else
                null, and why under 'not_computed')
  counts.npy    the (V,) token counts of that split (the usage histograms)
  recon.npz     the first RECON_IMAGES images of the split and their reconstructions
  error.txt     the traceback of a failed run

Every file is written atomically (a temporary file, then a rename). A run is done only once
all of them are written; a killed run stays pending and the same command resumes it.
"""

from __future__ import annotations

import dataclasses
import json
import os
import platform
import shutil
import socket
import time
import traceback
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging

from arcvq_jax import api, evaluate
from arcvq_jax.ablate import events
from arcvq_jax.ablate import sweep as sweep_lib
from arcvq_jax.data import pipeline
from arcvq_jax.train import tokenizer

PENDING, DONE, FAILED = "pending", "done", "failed"
RECON_IMAGES = 8
SWEEP_FILE = "sweep.json"


def ablate_dir(workdir: str, run: sweep_lib.Run) -> str:
  return os.path.join(workdir, run.relpath, "ablate")


def tmp_name(path: str) -> str:
  """A temporary file beside `path`, unique across the machines sharing the folder."""
  return f"{path}.tmp.{socket.gethostname()}.{os.getpid()}"


def write_json(path: str, value: Any) -> None:
  """Atomically: a temporary file beside `path`, then a rename."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = tmp_name(path)
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2, allow_nan=True)
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  try:
    with open(path) as f:
      return json.load(f)
  except FileNotFoundError:
    return None


def _save_npy(path: str, write) -> None:
  tmp = tmp_name(path)
  with open(tmp, "wb") as f:
    write(f)
  os.replace(tmp, path)


def machine() -> dict[str, Any]:
  """Where a run ran (the report's 'machine' line)."""
  devices = jax.devices()
  return dict(
    platform=platform.platform(),
    processor=platform.processor() or platform.machine(),
    cpu_count=os.cpu_count(),
    device=f"{len(devices)} x {devices[0].device_kind}",
    jax=jax.__version__,
  )


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


# ------------------------------------------------------------------------------ planning


@dataclasses.dataclass
class Planned:
  run: sweep_lib.Run
  config: ml_collections.ConfigDict
  record: dict[str, Any]  # the flat config (sweep.config_record)
  status: dict[str, Any]


def plan(
  workdir: str,
  source: sweep_lib.ConfigSource,
  sweep: sweep_lib.Sweep,
  runs: Sequence[sweep_lib.Run],
  where: str,
  rerun_changed: bool = False,
  write: bool = True,
) -> list[Planned]:
  """Resolves every run's config and checks it against the run's earlier run.json.

  A run whose stored config differs from the sweep's (a changed sweep file or --config
  override) is refused with the keys that changed, before anything trains; with
  rerun_changed its folder is moved to DIR/stale/ and it trains again. New runs get their
  run.json and a pending status (unless not `write`: nothing is written or moved).
  """
  out, changed = [], []
  for run in runs:
    config = sweep_lib.resolve(source, sweep, run.setting, run.seed, where)
    record = sweep_lib.config_record(config)
    directory = ablate_dir(workdir, run)
    stored = read_json(os.path.join(directory, "run.json"))
    if stored is not None and stored.get("fingerprint") != sweep_lib.fingerprint(record):
      changed.append((run, sweep_lib.differences(stored.get("config", {}), record)))
    out.append(Planned(run, config, record, {}))
  if changed and not rerun_changed:
    lines = [f"{r.relpath}: {'; '.join(d[:4])}{' ...' if len(d) > 4 else ''}" for r, d in changed]
    raise sweep_lib.SweepError(
      f"{len(changed)} run(s) in {workdir} were made with other settings than this sweep gives "
      "them (a changed sweep file, config file or --config override): "
      + " | ".join(lines[:5])
      + (f" | ... ({len(lines) - 5} more)" if len(lines) > 5 else "")
      + ". Their results would not be comparable. Use another --workdir, undo the change, or "
      "pass --rerun_changed to move them to DIR/stale/ and train them again."
    )
  if not write:
    for p in out:
      status = read_json(os.path.join(ablate_dir(workdir, p.run), "status.json"))
      p.status = status or dict(state=PENDING, attempts=0)
    return out
  stamp = time.strftime("%Y%m%d-%H%M%S")
  for run, diff in changed:
    target = os.path.join(workdir, "stale", run.setting.id, f"seed_{run.seed}.{stamp}")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    shutil.move(os.path.join(workdir, run.relpath), target)
    logging.warning("%s: settings changed (%s); moved to %s", run.relpath, "; ".join(diff), target)
  for p in out:
    directory = ablate_dir(workdir, p.run)
    if read_json(os.path.join(directory, "run.json")) is None:
      write_json(
        os.path.join(directory, "run.json"),
        dict(
          setting=p.run.setting.describe(),
          seed=p.run.seed,
          index=p.run.index,
          fingerprint=sweep_lib.fingerprint(p.record),
          config=p.record,
        ),
      )
    p.status = read_json(os.path.join(directory, "status.json")) or dict(state=PENDING, attempts=0)
    if not os.path.exists(os.path.join(directory, "status.json")):
      write_json(os.path.join(directory, "status.json"), p.status)
  return out


def write_plan(workdir: str, sweep_record: Mapping[str, Any]) -> None:
  """DIR/sweep.json: the sweep and all its runs (every shard writes the same file)."""
  path = os.path.join(workdir, SWEEP_FILE)
  old = read_json(path)
  if old is not None and old.get("runs") != sweep_record.get("runs"):
    logging.warning("%s described other runs; replaced by this sweep's.", path)
  write_json(path, sweep_record)


# ------------------------------------------------------------------------------ running


@dataclasses.dataclass
class Weights:
  """The evaluation's optional weights, loaded once per sweep process, and why a metric is
  not computed: {'lpips' | 'rfid': reason}."""

  lpips: Any = None
  inception: Any = None
  not_computed: dict[str, str] = dataclasses.field(default_factory=dict)


def load_weights(skip: Sequence[str], lpips_path: str, inception_path: str) -> Weights:
  w = Weights()
  for kind, path in (("lpips", lpips_path), ("rfid", inception_path)):
    if kind in skip:
      w.not_computed[kind] = "skipped by the sweep file (skip_metrics)"
      continue
    params, why = evaluate.load_weights(kind, path, [])
    if why is not None:
      w.not_computed[kind] = f"{why['reason']} (make it with: {why['fix']})"
    elif kind == "lpips":
      w.lpips = params
    else:
      w.inception = params
  return w


def steps_per_sec(run_dir: str) -> float | None:
  """The run's training throughput: the harmonic mean of its logged train/steps_per_sec
  (steps after the first of each session: compilation is not counted)."""
  rates = events.read_scalars(run_dir, {"train/steps_per_sec"}).get("train/steps_per_sec", {})
  values = np.asarray([v for v in rates.values() if v > 0], np.float64)
  return float(len(values) / np.sum(1.0 / values)) if values.size else None


def split_counts(
  tok: api.Tokenizer, data: ml_collections.ConfigDict, batch_size: int
) -> np.ndarray:
  """The (V,) token counts of the images of data.eval_split (the encoder and quantizer only)."""
  counts = np.zeros(tok.num_codes, np.int64)
  for batch in pipeline.create_eval_iterator(data, global_batch_size=batch_size):
    tokens = np.asarray(jax.device_get(tok.encode(batch["image"])))
    counts += np.bincount(tokens[np.asarray(batch["mask"])].ravel(), minlength=tok.num_codes)
  return counts


def final_evaluation(
  config: ml_collections.ConfigDict, run_dir: str, trained: Mapping[str, Any], weights: Weights
) -> dict[str, Any]:
  """eval.json, counts.npy and recon.npz of a trained run (module docstring). The metrics are
  the trainer's; LPIPS and rFID, where their weights are loaded, come from
  evaluate.evaluate_checkpoint (which also counts the tokens), the counts otherwise from one
  encoder-only pass over the split."""
  directory = os.path.join(run_dir, "ablate")
  params, step = api.restore_params(run_dir)
  tok = api.Tokenizer(config, params)
  record = dict(trained)
  if weights.lpips is not None or weights.inception is not None:
    metrics, counts = evaluate.evaluate_checkpoint(
      config,
      params,
      split=config.data.eval_split,
      inception_params=weights.inception,
      lpips_params=weights.lpips,
    )
    record["evaluate_checkpoint"] = metrics
    for kind in ("lpips", "rfid"):
      if record.get(kind) is None:
        record[kind] = metrics.get(kind)
  else:
    counts = split_counts(tok, config.data, config.eval_batch_size)
  not_computed = {}
  for kind in ("lpips", "rfid"):
    if record.get(kind) is None:
      record[kind] = None
      not_computed[kind] = weights.not_computed.get(kind, "not computed")
  record.update(
    step=step, split=config.data.eval_split, num_codes=len(counts), not_computed=not_computed
  )
  _save_npy(os.path.join(directory, "counts.npy"), lambda f: np.save(f, counts))
  batch = next(iter(pipeline.create_eval_iterator(config.data, global_batch_size=RECON_IMAGES)))
  images = np.asarray(batch["image"][:RECON_IMAGES])
  x_hat, _ = tok.reconstruct(images)
  _save_npy(
    os.path.join(directory, "recon.npz"),
    lambda f: np.savez(f, images=images, reconstructions=np.asarray(x_hat, np.float32)),
  )
  write_json(os.path.join(directory, "eval.json"), record)
  return record


def _failed(status: dict[str, Any], error: BaseException, directory: str) -> dict[str, Any]:
  with open(os.path.join(directory, "error.txt"), "w") as f:
    f.write("".join(traceback.format_exception(error)))
  return dict(status, state=FAILED, error=f"{type(error).__name__}: {error}")


def execute(workdir: str, p: Planned, weights: Weights) -> dict[str, Any]:
  """Trains (or resumes) one run, evaluates it, and returns its final status. A failure
  (NaN loss, invalid config, any other error) is recorded and returned, not raised."""
  run_dir = os.path.join(workdir, p.run.relpath)
  directory = os.path.join(run_dir, "ablate")
  status = dict(
    p.status,
    state=PENDING,
    attempts=int(p.status.get("attempts", 0)) + 1,
    host=socket.gethostname(),
    pid=os.getpid(),
    started=time.strftime("%Y-%m-%dT%H:%M:%S"),
    error=None,
    preempted_at_step=None,
  )
  write_json(os.path.join(directory, "status.json"), status)
  t0 = time.perf_counter()
  load0 = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
  try:
    trained = tokenizer.train_and_evaluate(p.config, run_dir)
    if "preempted_at_step" in trained:
      status.update(preempted_at_step=trained["preempted_at_step"])
      write_json(os.path.join(directory, "status.json"), status)
      return status
    record = final_evaluation(p.config, run_dir, trained, weights)
  except Exception as e:  # recorded; the sweep goes on
    status = _failed(status, e, directory)
    # One line: the traceback is in error.txt (and status.json has the error).
    logging.error(
      "%s failed: %s (traceback: %s)",
      p.run.relpath,
      status["error"].strip().splitlines()[0] if status["error"].strip() else type(e).__name__,
      os.path.join(directory, "error.txt"),
    )
  else:
    status.update(
      state=DONE,
      steps=int(record["step"]),
      psnr=record.get("psnr"),
      codebook_usage=record.get("codebook_usage"),
    )
  finally:
    jax.clear_caches()  # this run's programs (the persistent cache keeps them on disk)
  sps = steps_per_sec(run_dir)
  wall = time.perf_counter() - t0
  status.update(
    wall_time_s=wall,
    steps_per_sec=sps,
    train_time_s=(p.config.num_train_steps / sps) if sps and p.config.num_train_steps > 0 else None,
    finished=time.strftime("%Y-%m-%dT%H:%M:%S"),
    load_average=[load0, os.getloadavg()[0] if hasattr(os, "getloadavg") else None],
    machine=machine(),
  )
  write_json(os.path.join(directory, "status.json"), status)
  return status


def run_all(
  workdir: str,
  planned: Sequence[Planned],
  weights: Weights,
  retry_failed: bool = False,
  total: int | None = None,
) -> dict[str, int]:
  """Runs the planned runs in order: done ones are skipped, failed ones too (unless
  retry_failed), pending ones (new or interrupted) are trained or resumed. Returns the
  count of each final state; stops early (returning 'preempted': 1) on SIGTERM."""
  counts = {DONE: 0, FAILED: 0, PENDING: 0, "skipped": 0}
  total = total or len(planned)
  for p in planned:
    label = f"[run {p.run.index + 1}/{total}] {p.run.setting.id} seed {p.run.seed}"
    state = p.status.get("state", PENDING)
    if state == DONE:
      logging.info("%s: done earlier, skipped", label)
      counts[DONE] += 1
      continue
    if state == FAILED and not retry_failed:
      logging.info(
        "%s: failed earlier (%s), skipped (--retry_failed)", label, p.status.get("error")
      )
      counts[FAILED] += 1
      continue
    pid, host = p.status.get("pid"), p.status.get("host")
    if (
      pid
      and pid != os.getpid()
      and host == socket.gethostname()
      and state == PENDING
      and _pid_alive(int(pid))
    ):
      logging.warning("%s: process %s on this machine is running it; skipped", label, pid)
      counts["skipped"] += 1
      continue
    logging.info(
      "%s: %s in %s", label, "resuming" if p.status.get("attempts") else "training", p.run.relpath
    )
    status = execute(workdir, p, weights)
    if status.get("preempted_at_step") is not None and status["state"] == PENDING:
      logging.warning(
        "%s: preempted (SIGTERM) at step %d; run the same command to resume.",
        label,
        status["preempted_at_step"],
      )
      counts[PENDING] += 1
      counts["preempted"] = 1
      return counts
    counts[status["state"]] += 1
    if status["state"] == FAILED:
      logging.warning("%s: FAILED: %s", label, status["error"])
    else:
      logging.info(
        "%s: done: PSNR %.2f, usage %.1f %%, %.1f s",
        label,
        status["psnr"],
        100 * status["codebook_usage"],
        status["wall_time_s"],
      )
  return counts
