"""The ablation lab's command line (see the package docstring and docs/ablation.md).

  python -m arcvq_jax.ablate --config=configs/fashion_mnist.py --sweep=configs/sweeps/zoo.py \
      --workdir=DIR [--shard=i/n] [--config.KEY=VALUE ...] [--sweep.KEY=VALUE ...]
  python -m arcvq_jax.ablate --report --workdir=DIR
  python -m arcvq_jax.ablate ... --list          # the runs of this shard and their state

Runs the runs of the shard (all without --shard) one after the other in this process, each in
DIR/runs/<setting>/seed_<s>, then writes the report of whatever is finished. The same command
again skips finished runs, resumes an interrupted one from its checkpoint and leaves failed
ones alone (--retry_failed runs them again). A run whose settings the sweep has changed since
it ran is refused (--rerun_changed moves it to DIR/stale/ and trains it again).
"""

from __future__ import annotations

import os
import re
import shlex
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from arcvq_jax import cli
from arcvq_jax.ablate import report as report_lib
from arcvq_jax.ablate import runner
from arcvq_jax.ablate import sweep as sweep_lib
from arcvq_jax.data import pipeline
from arcvq_jax.evaluation import inception as inception_lib
from arcvq_jax.losses import lpips as lpips_lib

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs as a program (absl flags are global)."""
  config_flags.DEFINE_config_file(
    "config", None, "Base config file (configs/*.py), as for arcvq_jax.main.", lock_config=False
  )
  config_flags.DEFINE_config_file(
    "sweep",
    None,
    "Sweep file (configs/sweeps/*.py): variants, grid, seeds, overrides.",
    lock_config=False,
  )
  flags.DEFINE_string("workdir", None, "The sweep's directory: runs/, results.*, plots/.")
  flags.DEFINE_string("shard", "0/1", "i/n: run the runs whose index mod n is i.")
  flags.DEFINE_bool("report", False, "Only write DIR/results.{json,md} and DIR/plots/.")
  flags.DEFINE_bool("list", False, "Only list this shard's runs and their state (writes nothing).")
  flags.DEFINE_bool("retry_failed", False, "Run failed runs again (resuming where they stopped).")
  flags.DEFINE_bool(
    "rerun_changed", False, "Move runs made with other settings to DIR/stale/ and train them again."
  )
  flags.DEFINE_bool("write_report", True, "Write the report after this shard's runs.")
  flags.DEFINE_string(
    "lpips_path",
    None,
    f"LPIPS weights (default: config.lpips_path, else {lpips_lib.DEFAULT_PATH}).",
  )
  flags.DEFINE_string("inception_path", inception_lib.DEFAULT_PATH, "FID Inception weights.")
  flags.DEFINE_string(
    "compilation_cache",
    "auto",
    "JAX's persistent compilation cache ('auto': DIR/xla_cache, unless one is set; '': off): "
    "the seeds of a setting compile once.",
  )
  flags.mark_flags_as_required(["workdir"])


def _split_config_arg(text: str) -> tuple[str, str | None]:
  match = re.match(r"^(.*?\.py)(?::(.*))?$", text)
  return (match.group(1), match.group(2)) if match else (text, None)


def load_sweep() -> tuple[sweep_lib.Sweep, str]:
  """The --sweep file as a Sweep; a missing or broken file is one message."""
  text = config_flags.get_config_filename(FLAGS["sweep"])
  path = _split_config_arg(text)[0]
  where = f"--sweep={text}"
  if not os.path.exists(path):
    raise cli.UserError(
      f"{where}: no such sweep file (relative to {os.getcwd()}). Give one of configs/sweeps/, "
      "e.g. --sweep=configs/sweeps/zoo.py."
    )
  try:
    value = FLAGS.sweep
    value.keys()
  except Exception as e:  # ml_collections' stand-in for a file that failed to load
    cause = [ln.strip() for ln in str(e).splitlines() if re.match(r"\s*\w*(Error|Exception):", ln)]
    raise cli.UserError(
      f"{where}: the sweep file failed to load: {cause[-1] if cause else e}"
    ) from e
  return sweep_lib.from_config(value, where), text


def _command(argv: list[str]) -> str:
  args = [a for a in argv[1:] if not re.match(r"^--?(shard|list|report)\b", a)]
  return shlex.join(["python", "-m", "arcvq_jax.ablate", *args])


def _print_report(result: dict, workdir: str) -> None:
  c = result["counts"]
  print(
    cli.wrap(
      f"Report of {workdir}: {c['done']} runs done, {c['failed']} failed, {c['pending']} "
      f"pending; {os.path.join(workdir, report_lib.RESULTS_MD)}, "
      f"{os.path.join(workdir, report_lib.RESULTS_JSON)}, plots in "
      f"{os.path.join(workdir, report_lib.PLOTS_DIR)}/"
    ),
    flush=True,
  )


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  workdir = FLAGS.workdir
  if FLAGS.report:
    if not os.path.isdir(os.path.join(workdir, "runs")):
      raise cli.UserError(
        f"--workdir={workdir} holds no runs/ folder: it is not the --workdir of a sweep yet."
      )
    _print_report(report_lib.write_report(workdir), workdir)
    return
  if not FLAGS["config"].present or not FLAGS["sweep"].present:
    raise app.UsageError(
      "--config and --sweep are needed to run a sweep (--report --workdir=DIR alone writes the "
      "report)."
    )
  index, count = sweep_lib.parse_shard(FLAGS.shard)
  sweep, sweep_arg = load_sweep()
  config_arg = config_flags.get_config_filename(FLAGS["config"])
  config_path, argument = _split_config_arg(config_arg)
  overrides = config_flags.get_override_values(FLAGS["config"])
  sweep_lib.check_cli_overrides(sweep, overrides)
  cli.check_workdir(workdir)
  source = sweep_lib.ConfigSource(config_path, argument, overrides)
  runs = sweep.runs()
  mine = sweep_lib.shard(runs, index, count)
  planned = runner.plan(
    workdir, source, sweep, mine, f"--sweep={sweep_arg}", FLAGS.rerun_changed, write=not FLAGS.list
  )
  if FLAGS.list:
    for p in planned:
      print(f"{p.run.index:4d}  {p.status.get('state', runner.PENDING):8s}  {p.run.relpath}")
    return
  # The data, once per data config, before any run: a missing data set is one message, not
  # one failed run after another.
  for data in {p.config.data.to_json(sort_keys=True): p.config.data for p in planned}.values():
    pipeline.dataset_info(data)
  runner.write_plan(
    workdir,
    dict(
      name=sweep.name,
      note=sweep.note,
      sweep_file=sweep_arg,
      config_file=config_arg,
      config_overrides={k: sweep_lib.to_json(v) for k, v in overrides.items()},
      sweep=sweep_lib.to_json(FLAGS.sweep.to_dict()),
      command=_command(sys.argv),
      settings=[s.describe() for s in sweep.settings()],
      runs=[dict(index=r.index, setting=r.setting.describe(), seed=r.seed) for r in runs],
    ),
  )
  logging.info(
    "Sweep %s: %d settings x %d seeds = %d runs; shard %d/%d takes %d.",
    sweep_arg,
    len(sweep.settings()),
    len(sweep.seeds),
    len(runs),
    index,
    count,
    len(mine),
  )
  cache = FLAGS.compilation_cache
  if cache == "auto":
    cache = "" if jax.config.jax_compilation_cache_dir else os.path.join(workdir, "xla_cache")
  if cache:
    jax.config.update("jax_compilation_cache_dir", cache)
  lpips_path = FLAGS.lpips_path or FLAGS.config.get("lpips_path") or lpips_lib.DEFAULT_PATH
  weights = runner.load_weights(sweep.skip_metrics, lpips_path, FLAGS.inception_path)
  for kind, why in weights.not_computed.items():
    logging.warning("%s is not computed: %s", kind, why)
  counts = runner.run_all(workdir, planned, weights, FLAGS.retry_failed, total=len(runs))
  print(
    cli.wrap(
      f"Shard {index}/{count}: {counts['done']} runs done, {counts['failed']} failed"
      + (f", {counts['skipped']} running elsewhere" if counts["skipped"] else "")
      + (", stopped by SIGTERM: run the same command to resume" if "preempted" in counts else "")
      + "."
    ),
    flush=True,
  )
  if FLAGS.write_report and "preempted" not in counts:
    _print_report(report_lib.write_report(workdir), workdir)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
