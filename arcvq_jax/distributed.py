"""Many processes, one run: JAX's distributed runtime, and stopping cleanly when preempted.

Each host runs the same command. `initialize` joins them through
`jax.distributed.initialize` (the coordination service of process 0), after which
`jax.devices()` lists every device of the job and one Mesh spans them; each process loads
only its own rows of every batch (`data/pipeline.py`) and `sharding.global_batch` assembles
the global arrays. Orbax writes each checkpoint from all processes together (each its own
shards), clu's writer and config.json are written by process 0 only.

Preemption: Cloud TPU maintenance, spot VMs and SLURM's `--signal` all send SIGTERM before
they kill a job. `PreemptionWatcher` turns that into a flag that the train loop reads each
step; with several processes they agree on it by one all-gather, so every process stops at
the same step and writes the same final checkpoint.
"""

from __future__ import annotations

import os
import signal
import threading
from collections.abc import Callable

import jax
import numpy as np
from absl import logging


class DistributedSetupError(RuntimeError):
  """Flags or environment that cannot start a multi-process run."""


def detected_cluster() -> str | None:
  """The multi-process launcher this process runs under, if any, from its environment.

  'tpu' on a multi-host Cloud TPU slice (TPU_WORKER_HOSTNAMES lists several hosts), 'slurm'
  inside an `srun` step of more than one task, 'ompi' under mpirun with more than one rank;
  jax.distributed.initialize() finds the coordinator of each by itself.
  """
  env = os.environ
  if "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    return "tpu"
  if int(env.get("SLURM_STEP_NUM_TASKS", env.get("SLURM_NTASKS", "1")) or 1) > 1 and (
    "SLURM_STEP_ID" in env or "SLURM_PROCID" in env
  ):
    return "slurm"
  if int(env.get("OMPI_COMM_WORLD_SIZE", "1")) > 1:
    return "ompi"
  return None


def initialize(
  mode: str = "auto",
  coordinator_address: str | None = None,
  num_processes: int | None = None,
  process_id: int | None = None,
) -> bool:
  """Starts JAX's distributed runtime where the run spans several processes.

  mode: 'off' never; 'on' always (the launcher's environment or the explicit flags must say
  how); 'auto' when the flags give a coordinator or a multi-process launcher is detected.
  coordinator_address ('host:port' of process 0), num_processes, process_id: for clusters
  JAX cannot detect (plain multi-GPU hosts, tests); give all three or none.
  Returns whether it initialised. Must run before anything touches a device.
  """
  explicit = (coordinator_address, num_processes, process_id)
  if any(v is not None for v in explicit) and any(v is None for v in explicit):
    raise DistributedSetupError(
      "--coordinator_address, --num_processes and --process_id go together (got "
      f"{coordinator_address!r}, {num_processes!r}, {process_id!r}): give all three, e.g. "
      "--coordinator_address=host0:1234 --num_processes=2 --process_id=0 on the first "
      "host, or none to let JAX detect the cluster (Cloud TPU, SLURM, Open MPI)."
    )
  if mode not in ("auto", "on", "off"):
    raise DistributedSetupError(f"--distributed={mode!r}: choose auto, on or off.")
  cluster = detected_cluster()
  if mode == "off" or (mode == "auto" and coordinator_address is None and cluster is None):
    return False
  # CPU devices of different processes talk through gloo (TCP); the flag only concerns the
  # CPU backend, so GPU and TPU runs are unaffected.
  jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info(
    "Starting JAX's distributed runtime (%s).",
    f"coordinator {coordinator_address}, process {process_id} of {num_processes}"
    if coordinator_address
    else f"detected: {cluster or 'from JAX'}",
  )
  try:
    jax.distributed.initialize(
      coordinator_address=coordinator_address, num_processes=num_processes, process_id=process_id
    )
  except (ValueError, RuntimeError) as e:
    raise DistributedSetupError(
      f"jax.distributed.initialize failed: {e}. On a cluster JAX cannot detect, pass "
      "--coordinator_address=HOST:PORT --num_processes=N --process_id=I (the same address "
      "and N on every process; process 0 runs on HOST), or --distributed=off for one "
      "process."
    ) from e
  return True


class PreemptionWatcher:
  """SIGTERM -> a flag that every process sees at the same step.

  Install it in the main thread before the loop; `should_stop(step)` is cheap on one
  process and one small all-gather of a flag per call on several. `restore()` puts the
  previous handler back.
  """

  def __init__(self, sync_every: int = 1):
    self._flag = threading.Event()
    self._sync_every = max(1, sync_every)
    self._previous: Callable | int | None = None

  def install(self) -> PreemptionWatcher:
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)
    else:  # Python only delivers signals to the main thread.
      logging.warning("Not in the main thread: SIGTERM will not stop the run cleanly.")
    return self

  def _on_sigterm(self, signum, frame) -> None:
    del signum, frame
    self._flag.set()

  def request_stop(self) -> None:
    """What SIGTERM does (for callers that learn of a preemption otherwise)."""
    self._flag.set()

  def should_stop(self, step: int) -> bool:
    """Whether any process was told to stop; the same answer on every process."""
    if jax.process_count() == 1:
      return self._flag.is_set()
    if step % self._sync_every:
      return False
    from jax.experimental import multihost_utils  # noqa: PLC0415

    flags = multihost_utils.process_allgather(np.int32(self._flag.is_set()))
    return bool(np.any(flags))

  def restore(self) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)
      self._previous = None
