"""Which prior at small scale? PixelCNN, LDM, MaskGIT and AR on one tokenizer, each trained for
the same wall-clock minutes on this machine, then sampled and scored.

  python bench/compare_priors.py --tokenizer=/tmp/arcvq_demo \
      --token_shards=/tmp/arcvq_demo_tokens --out=/tmp/compare_priors      # 8 min per prior
  python bench/compare_priors.py --tokenizer=/tmp/arcvq_demo \
      --token_shards=/tmp/arcvq_demo_tokens --out=/tmp/cp_check \
      --minutes=0.5 --num_samples=500                                       # a check

For each prior (configs/demo_pixelcnn.py, demo_ldm.py, demo_maskgit.py, demo_ar.py; the token
priors from --token_shards, made here with `python -m arcvq_jax.tokenize` when not given; the
LDM from its own precompute pass over the training split, shared by its two runs):

1. calibration: --calibration_steps steps in OUT/runs/<prior>/calibrate give its steps/s
   after compilation (the loop's own reading, from its TensorBoard events);
2. training: num_train_steps = minutes x 60 x steps/s in OUT/runs/<prior>/train, so every
   prior gets the same minutes of train steps (compilation, the tokenizer's loading and the
   LDM's pass over the images are not counted; the run's measured step time is reported
   beside the budget, and its whole wall time);
3. sampling: --num_samples samples (balanced classes, `python -m arcvq_jax.sample`'s
   `sample.run`, --batch_size per call) at each --scales guidance scale (the PixelCNN has no
   guidance: scale 1 only); samples/s is end to end (compilation and the tokenizer's decoding
   included), from sample_info.json's seconds;
4. scoring against Fashion-MNIST's test split: FD-FMNIST (the Frechet distance in a small
   Fashion-MNIST classifier's features, arcvq_jax/evaluation/fd_fmnist.py; NOT an FID) and
   the classifier's accuracy on the samples' intended classes (overall and per class); with
   --inception_path also FID, IS, precision and recall (arcvq_jax/evaluate_samples.py).
   Two reference rows bound the numbers: --num_samples training images (what a perfect
   prior would score at this sample count) and the tokenizer's reconstructions of them (the
   best a prior decoded by this tokenizer can do).

Writes OUT/compare_priors.json, OUT/compare_priors.md (the table) and OUT/grids/<prior>.png
(10 samples per class, one class per row, at the prior's best scale by FD-FMNIST). Run again
with the same arguments, it reuses what is done (plans, checkpoints, samples).

Cost: 4 x (calibration + --minutes) of training, then the sampling, where the LDM's 50 DDIM
steps dominate: on two shared cores 500 of its samples took 82 s at scale 1 and 150 s with
guidance (a doubled batch), so 10,000 at four scales take hours (--scales, --priors and
--num_samples narrow it). --inception_path adds the Inception's pass over every set (about 13
images/s on two shared cores: 13 min per 10,000). Results belong in docs/results.md with the
machine they came from.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax
import numpy as np
from absl import flags, logging
from PIL import Image

from arcvq_jax import api, cli, sample
from arcvq_jax import evaluate_samples as es
from arcvq_jax.ablate import events
from arcvq_jax.data import idx
from arcvq_jax.evaluation import fd_fmnist, inception
from arcvq_jax.evaluation import fid as fid_lib
from arcvq_jax.evaluation import images as image_lib
from arcvq_jax.train import prior_common, prior_ldm, prior_pixelcnn, prior_transformer
from configs import demo_ar, demo_ldm, demo_maskgit, demo_pixelcnn

PRIORS = {
  "pixelcnn": (demo_pixelcnn, prior_pixelcnn.train_and_evaluate),
  "ldm": (demo_ldm, prior_ldm.train_and_evaluate),
  "maskgit": (demo_maskgit, prior_transformer.train_and_evaluate),
  "ar": (demo_ar, prior_transformer.train_and_evaluate),
}
RATE_TAG = "train/steps_per_sec"
GRID_PER_CLASS = 10


# ------------------------------------------------------------------------------ pure parts


def steps_for_budget(minutes: float, steps_per_sec: float) -> int:
  """Train steps that fill `minutes` at `steps_per_sec` (at least 1)."""
  return max(1, round(minutes * 60.0 * steps_per_sec))


def train_seconds(rates: dict[int, float], start: int = 0) -> float | None:
  """Seconds of a run's steps from the loop's steps/s readings {step: rate}: each reading
  covers the steps since the previous one, the first those after the run's first step
  (whose time, with compilation, the loop does not count); that first step is added at the
  mean rate. None without a reading."""
  steps = sorted(s for s in rates if s > start)
  if not steps:
    return None
  seconds, previous = 0.0, start + 1
  for s in steps:
    seconds += (s - previous) / rates[s]
    previous = s
  counted = steps[-1] - start - 1
  return seconds * (steps[-1] - start) / counted if counted else None


def guidance_scales(stage: str, config: Any, scales: list[float]) -> list[float]:
  """The scales a prior is sampled at: all of them where it is class-conditional and was
  trained with label dropout, else 1 alone."""
  if stage == "pixelcnn" or not config.num_classes:
    return [1.0]
  drop = config.diffusion.cond_drop_prob if stage == "ldm" else config.guidance.cond_drop_prob
  return sorted(set(scales)) if drop > 0 else [1.0]


def class_grid(images: np.ndarray, labels: np.ndarray, per_class: int) -> np.ndarray:
  """(H', W', C) uint8: row c holds the first `per_class` images of class c (white where a
  class has fewer). images (N, H, W, C) uint8, labels (N,) in [0, 10)."""
  _, h, w, c = images.shape
  tiles = np.ones((10 * per_class, h, w, c), np.float32)
  for k in range(10):
    rows = np.flatnonzero(labels == k)[:per_class]
    tiles[k * per_class : k * per_class + len(rows)] = images[rows] / 255.0
  grid = image_lib.image_grid(tiles, ncols=per_class)
  return np.round(grid * 255).astype(np.uint8)


def best_scale(scores: dict[str, dict[str, Any]]) -> str:
  """The scale (a key of `scores`) with the lowest FD-FMNIST."""
  return min(scores, key=lambda s: scores[s]["fd_fmnist"])


def _fmt(value: Any, digits: int) -> str:
  return "n/a" if value is None else f"{value:.{digits}f}"


def markdown_table(results: dict[str, Any]) -> str:
  """One row per prior and scale (the best scale in bold), then the reference rows."""
  fid = results["settings"]["fid"]
  head = (
    "| prior | train steps | train min | steps/s | guidance | FD-FMNIST | class acc. | samples/s |"
  )
  rule = "|---|---|---|---|---|---|---|---|"
  if fid:
    head, rule = head + " FID |", rule + "---|"
  lines = [head, rule]
  for name, p in results["priors"].items():
    t = p["train"]
    for scale, s in p["scales"].items():
      bold = "**" if scale == p["best_scale"] else ""
      row = (
        f"| {name} | {t['num_train_steps']} | {_fmt(t['train_minutes'], 2)} | "
        f"{_fmt(t['steps_per_sec'], 2)} | {bold}{scale}{bold} | {bold}{_fmt(s['fd_fmnist'], 2)}"
        f"{bold} | {_fmt(s['class_accuracy'], 3)} | {_fmt(s['samples_per_sec'], 1)} |"
      )
      lines.append(row + (f" {_fmt(s.get('fid'), 2)} |" if fid else ""))
  for name, r in results["references"].items():
    row = f"| {name} | | | | | {_fmt(r['fd_fmnist'], 2)} | {_fmt(r['class_accuracy'], 3)} | |"
    lines.append(row + (f" {_fmt(r.get('fid'), 2)} |" if fid else ""))
  s = results["settings"]
  lines += [
    "",
    f"{s['minutes']} min of train steps per prior; {s['num_samples']} samples per row, "
    f"balanced classes; FD-FMNIST (lower is better) and class accuracy against Fashion-MNIST's "
    f"test split, classifier {results['classifier']['fingerprint']} (test accuracy "
    f"{_fmt(results['classifier'].get('test_accuracy'), 4)}). Bold: each prior's best scale.",
  ]
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------- the stages


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def write_json(path: str, value: Any) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(value, f, indent=2)
  os.replace(tmp, path)


def prior_config(stage: str, args: argparse.Namespace, shards: str, out: str) -> Any:
  """The prior's demo config, pointed at the tokenizer (and shards), without preview grids or
  intermediate checkpoints (they would count in the budget)."""
  c = PRIORS[stage][0].get_config()
  c.tokenizer_workdir = args.tokenizer
  c.seed = args.seed
  c.sample_every_steps = 0
  c.checkpoint_every_steps = 0
  if stage == "ldm":
    c.latents.dir = os.path.join(out, "ldm_latents")  # one precompute pass for both runs
  else:
    c.data.token_shards = shards
  return c


def train(stage: str, config: Any, workdir: str, steps: int, log_every: int) -> dict[str, Any]:
  """Trains (or resumes) `steps` steps in `workdir`; the run's step seconds from its events,
  its wall seconds and last logged metrics (both None where nothing was left to train)."""
  config.num_train_steps = steps
  config.log_every_steps = log_every
  t0 = time.perf_counter()
  metrics = PRIORS[stage][1](config, workdir)
  wall = time.perf_counter() - t0
  rates = events.read_scalars(workdir, {RATE_TAG}).get(RATE_TAG, {})
  seconds = train_seconds(rates)
  return dict(
    num_train_steps=steps,
    train_seconds=seconds,
    train_minutes=None if seconds is None else seconds / 60.0,
    steps_per_sec=None if not seconds else steps / seconds,
    wall_seconds=wall if metrics else None,
    metrics=metrics or None,
  )


def calibrate_and_train(
  stage: str, args: argparse.Namespace, shards: str, out: str
) -> tuple[Any, dict[str, Any]]:
  """The prior's config and its trained run: the plan (calibration steps/s ->
  num_train_steps) and the run's figures are kept in OUT/runs/<prior>/plan.json and
  train.json, and reused by a later call with the same --minutes."""
  run_dir = os.path.join(out, "runs", stage)
  plan_path = os.path.join(run_dir, "plan.json")
  config = prior_config(stage, args, shards, out)
  if os.path.exists(plan_path) and read_json(plan_path)["minutes"] == args.minutes:
    plan = read_json(plan_path)
  else:
    cal = args.calibration_steps
    calibration = train(stage, config, os.path.join(run_dir, "calibrate"), cal, cal)
    rate = calibration["steps_per_sec"]
    if not rate:
      raise RuntimeError(
        f"{stage}: the calibration run logged no steps/s; raise --calibration_steps."
      )
    plan = dict(
      minutes=args.minutes,
      calibration_steps=cal,
      calibration_steps_per_sec=rate,
      num_train_steps=steps_for_budget(args.minutes, rate),
    )
    write_json(plan_path, plan)
  logging.info("%s: %d steps for %.2f min", stage, plan["num_train_steps"], args.minutes)
  config = prior_config(stage, args, shards, out)
  steps = plan["num_train_steps"]
  config.num_train_steps = steps  # what sampling validates and records
  trained_path = os.path.join(run_dir, "train.json")
  if os.path.exists(trained_path) and read_json(trained_path)["num_train_steps"] == steps:
    return config, read_json(trained_path)  # a finished run: its figures, not a resume's
  trained = train(stage, config, os.path.join(run_dir, "train"), steps, max(1, steps // 10))
  trained["plan"] = plan
  write_json(trained_path, trained)
  return config, trained


def sample_set(
  stage: str, config: Any, workdir: str, scale: float, args: argparse.Namespace
) -> tuple[str, dict[str, Any]]:
  """(samples.npz path, sample_info) of --num_samples samples at `scale` (reused if there)."""
  out = os.path.join(workdir, "samples", f"scale{scale:g}")
  info_path = os.path.join(out, "sample_info.json")
  if os.path.exists(info_path) and read_json(info_path)["num_samples"] == args.num_samples:
    return os.path.join(out, "samples.npz"), read_json(info_path)
  settings: dict[str, Any] = dict(batch_size=args.batch_size)
  if stage != "pixelcnn":
    settings["guidance_scale"] = scale
  sample.run(
    config, workdir, num_samples=args.num_samples, seed=args.seed, out=out, num_grids=0, **settings
  )
  return os.path.join(out, "samples.npz"), read_json(info_path)


def load_samples(path: str) -> tuple[np.ndarray, np.ndarray]:
  with np.load(path) as data:
    return data["images"], data["labels"]


class Scorer:
  """FD-FMNIST and class accuracy against the test split; FID too with Inception weights."""

  def __init__(self, args: argparse.Namespace, out: str):
    params, self.classifier = fd_fmnist.load_or_train(args.classifier, data_dir=args.data_dir)
    self.extractor = fd_fmnist.FMNISTFeatures(params)
    self.reference = fd_fmnist.split_stats(self.extractor, "test", args.data_dir)
    self.inception = self.fid_reference = None
    if args.inception_path:
      self.inception = inception.InceptionFeatures(inception.load_params(args.inception_path))
      test_npz = os.path.join(out, "reference", "test_images.npz")
      stats_path = os.path.join(out, "reference", "fid_test_stats.npz")
      if os.path.exists(stats_path):
        self.fid_reference = fid_lib.FeatureStats.load(stats_path)
      else:
        images, _ = idx.load_idx_split(args.data_dir, "test")
        os.makedirs(os.path.dirname(test_npz), exist_ok=True)
        np.savez(test_npz, images=images)
        self.fid_reference = es.compute_stats(es.open_samples(test_npz), self.inception)
        self.fid_reference.save(stats_path)

  def __call__(self, images: np.ndarray, labels: np.ndarray | None, npz: str) -> dict[str, Any]:
    scores = fd_fmnist.score_samples(images, labels, self.reference, self.extractor, source=npz)
    if self.inception is not None:
      fid = es.evaluate_samples(es.open_samples(npz), self.fid_reference, self.inception)
      scores.update({k: fid[k] for k in ("fid", "inception_score", "precision", "recall")})
    return scores


def reference_rows(args: argparse.Namespace, scorer: Scorer, out: str) -> dict[str, Any]:
  """The scores of --num_samples training images and of the tokenizer's reconstructions of
  them: the floor at this sample count, and the best a prior decoded by this tokenizer gets."""
  images, labels = idx.load_idx_split(args.data_dir, "train")
  images, labels = images[: args.num_samples], labels[: args.num_samples]
  tok = api.Tokenizer.from_workdir(args.tokenizer)
  recon = np.concatenate(
    [
      prior_common.to_uint8(np.asarray(tok.decode(tok.encode(images[i : i + 500] / 127.5 - 1.0))))
      for i in range(0, len(images), 500)
    ]
  )
  rows = {}
  for name, x in (
    (f"Fashion-MNIST train ({len(images)} images)", images),
    (f"tokenizer reconstructions ({len(images)} train images)", recon),
  ):
    path = os.path.join(out, "reference", f"{'train' if x is images else 'recon'}.npz")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    np.savez(path, images=x, labels=labels)
    rows[name] = scorer(x, labels, path)
  return rows


def token_shards(args: argparse.Namespace, out: str) -> str:
  """--token_shards, or the tokenizer's shards made into OUT/tokens by the tokenize command."""
  if args.token_shards:
    return args.token_shards
  shards = os.path.join(out, "tokens")
  if not os.path.exists(os.path.join(shards, "index.json")):
    subprocess.run(
      [
        sys.executable,
        "-m",
        "arcvq_jax.tokenize",
        f"--workdir={args.tokenizer}",
        f"--out={shards}",
      ],
      check=True,
    )
  return shards


def cpu_name() -> str:
  """The CPU's model name (Linux's /proc/cpuinfo), else what platform knows."""
  try:
    with open("/proc/cpuinfo") as f:
      for line in f:
        if line.startswith("model name"):
          return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return platform.processor() or platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(
    description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
  )
  p.add_argument("--tokenizer", default="/tmp/arcvq_demo", help="the tokenizer's --workdir")
  p.add_argument("--token_shards", default="", help="its token shards (default: made in OUT)")
  p.add_argument("--out", required=True, help="where runs, samples and results go")
  p.add_argument("--minutes", type=float, default=8.0, help="train minutes per prior")
  p.add_argument("--calibration_steps", type=int, default=30)
  p.add_argument("--num_samples", type=int, default=10000, help="samples per prior and scale")
  p.add_argument("--batch_size", type=int, default=500, help="samples per sampling call")
  p.add_argument("--scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
  p.add_argument("--priors", nargs="+", choices=list(PRIORS), default=list(PRIORS))
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--data_dir", default=fd_fmnist.DEFAULT_DATA_DIR, help="Fashion-MNIST IDX")
  p.add_argument("--classifier", default=fd_fmnist.DEFAULT_PATH, help="FD-FMNIST classifier")
  p.add_argument("--inception_path", default="", help="FID Inception weights: also FID")
  args = p.parse_args(argv)
  if args.minutes <= 0 or args.calibration_steps < 2 or args.num_samples < 10:
    p.error("give --minutes > 0, --calibration_steps >= 2 and --num_samples >= 10")
  return args


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  flags.FLAGS.mark_as_parsed()  # absl logging without absl's app: its handler, short lines,
  logging.use_absl_handler()  # the libraries' INFO chatter off (as the commands do)
  cli.setup_logging(0)
  logging.set_verbosity(logging.INFO)
  out = os.path.abspath(os.path.expanduser(args.out))
  os.makedirs(os.path.join(out, "grids"), exist_ok=True)
  shards = token_shards(args, out)
  scorer = Scorer(args, out)
  results: dict[str, Any] = dict(
    settings=dict(
      tokenizer=args.tokenizer,
      token_shards=shards,
      minutes=args.minutes,
      calibration_steps=args.calibration_steps,
      num_samples=args.num_samples,
      batch_size=args.batch_size,
      scales=args.scales,
      seed=args.seed,
      fid=bool(args.inception_path),
    ),
    machine=dict(
      processor=cpu_name(),
      cpus=os.cpu_count(),
      devices=[str(d) for d in jax.devices()],
    ),
    classifier=scorer.classifier,
    priors={},
    references=reference_rows(args, scorer, out),
  )
  for stage in args.priors:
    config, trained = calibrate_and_train(stage, args, shards, out)
    workdir = os.path.join(out, "runs", stage, "train")
    scores = {}
    for scale in guidance_scales(stage, config, args.scales):
      npz, info = sample_set(stage, config, workdir, scale, args)
      images, labels = load_samples(npz)
      s = scorer(images, labels, npz)
      s.update(samples_per_sec=args.num_samples / info["seconds"], sample_seconds=info["seconds"])
      scores[f"{scale:g}"] = s
      logging.info(
        "%s, scale %g: %s", stage, scale, {k: s[k] for k in ("fd_fmnist", "class_accuracy")}
      )
    best = best_scale(scores)
    images, labels = load_samples(os.path.join(workdir, "samples", f"scale{best}", "samples.npz"))
    grid = class_grid(images, labels, GRID_PER_CLASS)
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(
      os.path.join(out, "grids", f"{stage}.png")
    )
    results["priors"][stage] = dict(train=trained, scales=scores, best_scale=best)
    write_json(os.path.join(out, "compare_priors.json"), results)  # after every prior
  table = markdown_table(results)
  with open(os.path.join(out, "compare_priors.md"), "w") as f:
    f.write(table)
  print(table)


if __name__ == "__main__":
  main()
