"""Every reconstruction metric of the paper's Tables 1-2 for a trained tokenizer, on one split.

  python -m arcvq_jax.evaluate --workdir=DIR [--config=configs/imagenet.py] [--split=validation]

Loads checkpoint --step (default: the latest) of the run in --workdir through the tokenizer API
(`arcvq_jax.api`), reconstructs every image of the split (default: config.data.eval_split) and
reports PSNR, SSIM, LPIPS, rFID (Frechet distance between the Inception features of the
originals and of the reconstructions), MSE, codebook usage and perplexity. --config defaults to
the run's own config.json; give one to change e.g. config.data.data_dir.

Writes into DIR/evaluation/: {split}_step_{N}.json, {split}_step_{N}.md (a markdown table) and
the codebook diagnostics {split}_step_{N}_codebook_{norm_vs_usage,distances,usage}.png (the
paper's Fig. 2 and 3, from this split's code counts); scalars and images also go to DIR's
TensorBoard events ('evaluate_{split}/...').

Weights: LPIPS from --lpips_path (default config.lpips_path, else ~/.cache/arcvq_jax/
lpips_vgg16.npz), the FID Inception from --inception_path; both are converted once from the
public files. Where a file is missing, its metric is left out (null in the JSON) and listed
under "skipped" with the reason and the one command that provides the file, on the console
and in the JSON; every other metric is still computed. --strict makes a missing file an error
instead (for numbers that must be complete); --skip=lpips,rfid leaves metrics out on purpose.

"codebook_usage" is the share of codebook rows that tokens of this split select (eval-split
usage); the training run's TensorBoard 'train/ema_usage' and its diagnostics plots count the
rows whose EMA selection rate during training exceeds 1e-3 (training-time usage).
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterator
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import app, flags, logging
from etils import epath
from ml_collections import config_flags
from tqdm.auto import tqdm

from arcvq_jax import api, cli, metric_writer, sharding
from arcvq_jax import config as config_lib
from arcvq_jax.data import pipeline
from arcvq_jax.evaluation import diagnostics
from arcvq_jax.evaluation import fid as fid_lib
from arcvq_jax.evaluation import inception as inception_lib
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.train import tokenizer_steps

DEFAULT_LPIPS_PATH = lpips_lib.DEFAULT_PATH
SKIPPABLE = ("lpips", "rfid")
METRIC_NAMES = {"lpips": "LPIPS", "rfid": "rFID"}
# Columns of the markdown table: (key, header, format).
COLUMNS = (
  ("num_images", "images", "d"),
  ("psnr", "PSNR", ".2f"),
  ("ssim", "SSIM", ".4f"),
  ("lpips", "LPIPS", ".4f"),
  ("rfid", "rFID", ".2f"),
  ("codebook_usage", "usage (split)", ".1%"),
  ("perplexity", "perplexity", ".1f"),
  ("mse", "MSE", ".5f"),
)


def _local_rows(x: jax.Array) -> np.ndarray:
  """This process's rows of an array split along its first axis (replicas counted once)."""
  rows = {}
  for shard in x.addressable_shards:
    rows.setdefault(shard.index[0].start or 0, shard.data)
  return np.concatenate([np.asarray(rows[k]) for k in sorted(rows)])


def _limited(
  batches: Iterator[dict[str, np.ndarray]], global_batch_size: int, num_images: int, bar
) -> Iterator[dict[str, np.ndarray]]:
  """The eval batches, masked after the first `num_images` (0: all) of the split."""
  p, local = jax.process_index(), global_batch_size // jax.process_count()
  for b, batch in enumerate(batches):
    if num_images and b * global_batch_size >= num_images:
      return
    if num_images:
      positions = b * global_batch_size + p * local + np.arange(local)
      batch = dict(batch, mask=batch["mask"] & (positions < num_images))
    yield batch
    bar.update(int(batch["mask"].sum()) * jax.process_count())  # exact on one host


def evaluate_checkpoint(
  config: ml_collections.ConfigDict,
  params: Any,
  *,
  split: str,
  inception_params: Any = None,
  lpips_params: Any = None,
  batch_size: int | None = None,
  inception_batch_size: int = 100,
  num_images: int = 0,
) -> tuple[dict[str, float], np.ndarray]:
  """The metrics of the tokenizer (config, params) on `split`, and its (V,) token counts.

  Reconstruction metrics are tokenizer_steps.eval_step's (jitted, batch split over all devices);
  with inception_params, the originals and reconstructions also go through the FID Inception
  and 'rfid' is their Frechet distance. Images are streamed: only feature statistics are kept.
  """
  tok = api.Tokenizer(config, params)
  mesh = sharding.make_mesh((-1,), (sharding.DATA_AXIS,))
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  batch_size = batch_size or config.eval_batch_size
  data = config.data.copy_and_resolve_references()
  data.eval_split = split
  info = pipeline.dataset_info(data)
  total = min(num_images, info["num_eval"]) if num_images else info["num_eval"]
  if inception_params is not None:
    fid_lib.warn_if_few(total, inception_lib.POOL_DIM, f"rFID on {total} images")

  step = functools.partial(tokenizer_steps.eval_step, model=tok.model, with_reconstructions=True)
  params = jax.device_put(tok.params, replicated)
  if lpips_params is not None:
    lpips_params = jax.device_put(lpips_params, replicated)
  abstract_batch = dict(
    image=jax.ShapeDtypeStruct((batch_size, *info["image_shape"]), np.float32),
    mask=jax.ShapeDtypeStruct((batch_size,), np.bool_),
  )
  out_shapes = jax.eval_shape(step, params, abstract_batch, lpips_params)
  step_fn = jax.jit(
    step,
    in_shardings=(replicated, batch_sharding, replicated),
    out_shardings={k: batch_sharding if k == "reconstructions" else replicated for k in out_shapes},
    compiler_options=tokenizer_steps.compiler_options(tok.model),
  )

  extractor = stats_real = stats_fake = None
  if inception_params is not None:
    extractor = inception_lib.InceptionFeatures(inception_params, inception_batch_size, mesh)
    stats_real, stats_fake = fid_lib.FeatureStats(keep=0), fid_lib.FeatureStats(keep=0)
  counts = np.zeros(tok.num_codes, np.int64)

  def eval_fn(params, batch, lpips_params):
    out = dict(step_fn(params, batch, lpips_params))
    x_hat = out.pop("reconstructions")
    counts[:] += np.asarray(jax.device_get(out["code_counts"]), np.int64)
    if extractor is not None:
      mask = _local_rows(batch["mask"])
      stats_real.update(extractor(_local_rows(batch["image"]), mask)[0])
      stats_fake.update(extractor(_local_rows(x_hat), mask)[0])
    return out

  with tqdm(
    total=total, desc=f"evaluating {split}", unit="img", disable=jax.process_index() != 0
  ) as bar:
    batches = pipeline.create_eval_iterator(data, global_batch_size=batch_size)
    results = tokenizer_steps.evaluate(
      eval_fn, params, _limited(batches, batch_size, num_images, bar), batch_sharding, lpips_params
    )
  if extractor is not None:
    results["rfid"] = fid_lib.fid_from_stats(stats_real, stats_fake)
  return results, counts


def markdown_table(rows: list[dict[str, Any]]) -> str:
  """One row per result dict (keys: split, step and the metrics; missing ones are 'n/a')."""
  lines = [
    "| split | step | " + " | ".join(h for _, h, _ in COLUMNS) + " |",
    "|---|---|" + "---|" * len(COLUMNS),
  ]
  for r in rows:
    cells = [r["split"], str(r["step"])]
    cells += ["n/a" if r.get(k) is None else format(r[k], f) for k, _, f in COLUMNS]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def load_weights(
  kind: str, path: str, skip: list[str], strict: bool = False
) -> tuple[Any, dict[str, str] | None]:
  """(params, None) for metric `kind` ('lpips' or 'rfid') with weights at `path`, or
  (None, {'reason', 'fix'}) where the metric is skipped: named in --skip, or its file is
  missing (without --strict). A missing file under --strict, or a damaged file, raises the
  weights error, whose message gives the command that makes a good one."""
  name = METRIC_NAMES[kind]
  if kind in skip:
    return None, dict(reason=f"--skip={kind} was given", fix=f"leave {kind} out of --skip")
  lib = lpips_lib if kind == "lpips" else inception_lib
  error = lpips_lib.LPIPSWeightsError if kind == "lpips" else inception_lib.InceptionWeightsError
  if not epath.Path(path).expanduser().exists():
    reason = f"no {name} weights file at {path}"
    if strict:
      raise error(
        f"{reason} (--strict: every metric or none). Make it with: {lib.provide_command(path)}"
        f" (or pass --skip={kind} to evaluate without {name})"
      )
    return None, dict(reason=reason, fix=lib.provide_command(path))
  return lib.load_params(os.path.expanduser(path)), None


# ---------------------------------------------------------------------------------- the CLI

FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command's flags, defined only when it runs as a program: absl flags are global,
  and other modules (main, the converters) define some of the same names."""
  config_flags.DEFINE_config_file(
    "config", None, "Config (default: the run's config.json).", lock_config=False
  )
  flags.DEFINE_string("workdir", None, "The run's --workdir (config.json, checkpoints/).")
  flags.DEFINE_integer("step", None, "Checkpoint step (default: the latest).", lower_bound=0)
  flags.DEFINE_string("split", None, "Split to evaluate (default: config.data.eval_split).")
  flags.DEFINE_string("inception_path", inception_lib.DEFAULT_PATH, "FID Inception weights.")
  flags.DEFINE_string(
    "lpips_path", None, f"LPIPS weights (default: config.lpips_path, else {DEFAULT_LPIPS_PATH})."
  )
  flags.DEFINE_list("skip", [], f"Metrics to leave out: any of {', '.join(SKIPPABLE)}.")
  flags.DEFINE_bool(
    "strict",
    False,
    "A missing LPIPS or Inception weights file is an error (default: the metric is skipped "
    "and listed with the command that provides the file).",
  )
  flags.DEFINE_integer("batch_size", 0, "Global batch (0: config.eval_batch_size).", lower_bound=0)
  flags.DEFINE_integer("inception_batch_size", 100, "Global batch of the Inception.", lower_bound=1)
  flags.DEFINE_integer(
    "num_images", 0, "Evaluate the first N images of the split (0: all).", lower_bound=0
  )
  flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  unknown = sorted(set(FLAGS.skip) - set(SKIPPABLE))
  if unknown:
    raise app.UsageError(f"--skip={','.join(unknown)}: only {', '.join(SKIPPABLE)} can be skipped.")
  workdir = FLAGS.workdir
  config = FLAGS.config if FLAGS.config is not None else api.load_config(workdir)
  stage = config.get("stage", "tokenizer")
  if stage != "tokenizer":
    raise cli.UserError(
      f"{workdir} is a {stage!r} run (a prior); evaluate measures a tokenizer's "
      f"reconstructions. Give a tokenizer's --workdir (this prior's: "
      f"{config.get('tokenizer_workdir')}), or score the prior's samples: python -m "
      f"arcvq_jax.sample --workdir={workdir}, then python -m arcvq_jax.evaluate_samples "
      "--samples=.../samples.npz and a reference (see its --help)."
    )
  source = config_flags.get_config_filename(FLAGS["config"]) if FLAGS.config else None
  config_lib.check_sections(config, source or os.path.join(workdir, api.CONFIG_FILE))
  split = FLAGS.split or config.data.eval_split
  if FLAGS.split:  # a split the data set lacks: refused before weights and checkpoint are read
    data = config.data.copy_and_resolve_references()
    data.eval_split = split
    try:
      pipeline.dataset_info(data)
    except pipeline.DataError as e:
      raise cli.UserError(f"--split={split}: {e}") from e
  # Weights first: a damaged file (or, with --strict, a missing one) stops here, before
  # anything is read or compiled.
  lpips_path = FLAGS.lpips_path or config.get("lpips_path") or DEFAULT_LPIPS_PATH
  lpips_params, lpips_skipped = load_weights("lpips", lpips_path, FLAGS.skip, FLAGS.strict)
  inception_params, rfid_skipped = load_weights(
    "rfid", FLAGS.inception_path, FLAGS.skip, FLAGS.strict
  )
  skipped = {k: v for k, v in (("lpips", lpips_skipped), ("rfid", rfid_skipped)) if v}
  for kind, why in skipped.items():
    logging.warning("%s skipped: %s. To include it: %s", METRIC_NAMES[kind], *why.values())
  params, step = api.restore_params(workdir, FLAGS.step)
  logging.info("Evaluating step %d of %s on split %r", step, workdir, split)
  results, counts = evaluate_checkpoint(
    config,
    params,
    split=split,
    inception_params=inception_params,
    lpips_params=lpips_params,
    batch_size=FLAGS.batch_size or None,
    inception_batch_size=FLAGS.inception_batch_size,
    num_images=FLAGS.num_images,
  )
  record = dict(
    split=split,
    step=step,
    workdir=workdir,
    **dict.fromkeys(skipped),
    **results,
    skipped=skipped,
    inception_weights=os.path.expanduser(FLAGS.inception_path)
    if inception_params is not None
    else None,
    notes=dict(
      codebook_usage=f"share of the {len(counts)} tokens of the vocabulary that the {split} "
      "split selects (eval-split usage; the training run's train/ema_usage and diagnostics "
      "plots count tokens by their training-time EMA selection rate)"
    ),
  )
  # The console gets the numbers; the skipped metrics' commands and the notes follow as
  # wrapped lines (they are in the JSON file whole).
  print(json.dumps({k: v for k, v in record.items() if k not in ("skipped", "notes")}, indent=2))
  print(markdown_table([record]))
  for kind, why in skipped.items():
    print(cli.wrap(f"{METRIC_NAMES[kind]} skipped: {why['reason']}. To include it: {why['fix']}"))

  if jax.process_index() != 0:
    return
  out_dir = os.path.join(workdir, "evaluation")
  os.makedirs(out_dir, exist_ok=True)
  name = f"{split}_step_{step}"
  with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
    json.dump(record, f, indent=2)
  with open(os.path.join(out_dir, f"{name}.md"), "w") as f:
    f.write(markdown_table([record]))
  writer = metric_writer.create_writer(workdir)
  writer.write_scalars(step, {f"evaluate_{split}/{k}": v for k, v in results.items()})
  codebook = api.Tokenizer(config, params).codebook
  if codebook is not None:  # FSQ and LFQ have no codebook rows to plot
    diagnostics.write_codebook_diagnostics(
      out_dir,
      np.asarray(jax.device_get(codebook)),
      counts,
      prefix=f"{name}_",
      writer=writer,
      step=step,
      tag=f"evaluate_{split}",
      source=diagnostics.split_source(split, step),
    )
  writer.close()
  logging.info("Wrote %s/%s.{json,md} and the codebook plots", out_dir, name)


if __name__ == "__main__":
  define_flags()
  cli.run(main)
