"""Entry point: `python -m arcvq_jax.main --config=configs/demo.py --workdir=DIR`.

Flags only; the stage the config names does the work. Re-running the same command in the
same workdir resumes from its latest checkpoint. On several hosts every host runs the same
command (see launch/ and docs/scaling.md, "Several hosts").
"""

from __future__ import annotations

import sys
import time

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from arcvq_jax import cli, distributed, run_summary
from arcvq_jax import config as config_lib
from arcvq_jax.train import prior_ldm, prior_pixelcnn, prior_transformer, tokenizer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
  "config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True
)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation results.")
flags.mark_flags_as_required(["config", "workdir"])
flags.DEFINE_enum(
  "distributed",
  "auto",
  ["auto", "on", "off"],
  "Multi-process runs: 'auto' starts JAX's distributed runtime when --coordinator_address is "
  "given or a Cloud TPU slice / SLURM step / Open MPI job of several processes is detected.",
)
flags.DEFINE_string(
  "coordinator_address",
  None,
  "host:port of process 0, where JAX cannot detect the cluster (with "
  "--num_processes and --process_id).",
)
flags.DEFINE_integer("num_processes", None, "Number of processes of the job.")
flags.DEFINE_integer("process_id", None, "This process's index, 0 .. num_processes - 1.")

STAGES = {
  "tokenizer": tokenizer.train_and_evaluate,
  "ldm": prior_ldm.train_and_evaluate,
  "pixelcnn": prior_pixelcnn.train_and_evaluate,
  "maskgit": prior_transformer.train_and_evaluate,
  "ar": prior_transformer.train_and_evaluate,
}


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  started = time.perf_counter()
  config = FLAGS.config
  # Before the workdir is touched: a config without the keys of its stage (e.g.
  # --config.stage=ldm on a tokenizer's file) is refused by name, with a file that has them.
  config_lib.check_sections(config, config_flags.get_config_filename(FLAGS["config"]))
  cli.check_workdir(FLAGS.workdir)
  # Before anything touches a device: afterwards jax.devices() spans every process.
  try:
    distributed.initialize(
      FLAGS.distributed, FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id
    )
  except distributed.DistributedSetupError as e:
    raise app.UsageError(str(e)) from e
  logging.info(
    "JAX %s: %d process(es), %d device(s) (%s)",
    jax.__version__,
    jax.process_count(),
    jax.device_count(),
    jax.devices()[0].device_kind,
  )
  stage = config.get("stage", "tokenizer")
  if stage not in STAGES:
    raise app.UsageError(f"config.stage={stage!r} is not one of {sorted(STAGES)}.")
  results = STAGES[stage](config, FLAGS.workdir)
  if jax.process_index() == 0:
    lines = run_summary.summary_lines(
      stage=stage,
      workdir=FLAGS.workdir,
      results=results,
      config_arg=config_flags.get_config_filename(FLAGS["config"]),
      overrides=[a for a in sys.argv[1:] if a.startswith("--config.")],
      seconds=time.perf_counter() - started,
    )
    print("\n" + "\n".join(lines), flush=True)


if __name__ == "__main__":
  cli.run(main)
