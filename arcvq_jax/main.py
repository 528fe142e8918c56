"""Entry point: `python -m arcvq_jax.main --config=configs/demo.py --workdir=DIR`.

Flags only; the stage the config names does the work. Re-running the same command in the
same workdir resumes from its latest checkpoint.
"""

from __future__ import annotations

import logging as logging_std

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from arcvq_jax.train import tokenizer

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file(
    "config", None, "Experiment config file (configs/*.py[:variant]).", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, logs and evaluation results.")
flags.mark_flags_as_required(["config", "workdir"])

STAGES = {"tokenizer": tokenizer.train_and_evaluate}


class _QuietLibraries(logging_std.Filter):
  """Drops the INFO chatter of orbax (several lines per checkpoint); keeps its warnings."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return record.levelno >= logging_std.WARNING or "/orbax/" not in record.pathname


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  logging.get_absl_handler().addFilter(_QuietLibraries())
  config = FLAGS.config
  logging.info("JAX %s: %d process(es), %d device(s): %s", jax.__version__, jax.process_count(),
               jax.device_count(), jax.devices())
  stage = config.get("stage", "tokenizer")
  if stage not in STAGES:
    raise app.UsageError(f"config.stage={stage!r} is not one of {sorted(STAGES)}.")
  STAGES[stage](config, FLAGS.workdir)


if __name__ == "__main__":
  app.run(main)
