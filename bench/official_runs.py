"""The official PyTorch ArcVQ-VAE and ours at one budget over several seeds (issue 42).

  python bench/official_runs.py --official=/path/to/ArcVQ-VAE --out=/tmp/runs --seeds 1 2 3 4 5
  python bench/official_runs.py --official=... --out=... --seeds 1 --steps 30   # a quick check

Both sides train Fashion-MNIST at batch --batch_size for --steps steps from their own
initialisation and data order, and are scored on the 10k test images by our metric code
(PSNR, SSIM, codebook usage and perplexity of the test split; arcvq_jax.evaluation):

official  its main.py's `main` up to the loop, run here step for step (bench/official_arcvq.py
          imports the code from --official): seed_everything(seed), the training images in
          torchvision's FashionMNIST form (a PIL 'L' image per item, ToTensor + Normalize(0.5,
          0.5)) read from the IDX files through arcvq_jax.data.idx, main.make_loader's loaders
          (shuffled by a torch.Generator seeded with the seed, drop_last=False: each epoch ends
          with a batch of 60000 mod 1024 = 608 images), the visualisation batch drawn, Model and
          Adam as main.py builds them (ArcLoss s = --arc_s, default configs/fashion_mnist.py's
          10; main.py itself fixes 5), then main.train epoch by epoch, and main.test after each
          full epoch as main.py runs it (its loader draws from the same generator, so the next
          epoch's order depends on it), stopping after --steps steps. DataLoader workers: 0
          (main.py's default is one per core but one: the sampler draws in the main process
          either way, so the batches are the same). Scored with the codebook as the last Adam
          step left it (main.test's forward pass projects nothing).
ours      python -m arcvq_jax.main --config=configs/fashion_mnist.py --config.seed=S
          --config.batch_size=B --config.num_train_steps=N (--config.arc.s with --arc_s), in
          a subprocess; its workdir's eval_results.json.

A run whose result file exists in --out is not run again (delete it to rerun). Written:
OUT/official/seed_S.json, OUT/ours/seed_S/ (the workdir, and main.log), OUT/runs.json and
OUT/runs.md: every run, and mean +- standard deviation (n - 1) of the four numbers per side.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import time
import types
from typing import Any

import numpy as np
import torch
from PIL import Image

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # official_arcvq

import official_arcvq as oa

from arcvq_jax.convert import torch_checkpoint
from arcvq_jax.data import idx

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIG = os.path.join(REPO, "configs", "fashion_mnist.py")
METRICS = ("psnr", "ssim", "codebook_usage", "perplexity")
SIDES = ("official", "ours")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--official", required=True, help="the official repository (or its ArcVQ-VAE/)")
  p.add_argument("--out", required=True)
  p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3, 4, 5])
  p.add_argument("--steps", type=int, default=300)
  p.add_argument("--batch_size", type=int, default=1024)
  p.add_argument("--arc_s", type=float, default=None, help="ArcLoss s (default: the config's)")
  p.add_argument("--sides", nargs="+", choices=SIDES, default=list(SIDES))
  return p.parse_args(argv)


class FashionMNIST(torch.utils.data.Dataset):
  """torchvision.datasets.FashionMNIST as main.py uses it, over the IDX arrays: `.data`
  (N, 28, 28) uint8, and items (transform(PIL 'L' image), label)."""

  def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Any):
    self.data = torch.from_numpy(np.array(images.reshape(-1, 28, 28), copy=True))
    self.targets = torch.from_numpy(labels.astype(np.int64))
    self.transform = transform

  def __len__(self) -> int:
    return len(self.data)

  def __getitem__(self, i: int):
    return self.transform(Image.fromarray(self.data[i].numpy())), int(self.targets[i])


class _Writer:
  """main.py's SummaryWriter, keeping nothing."""

  def add_scalar(self, *args, **kwargs) -> None:
    del args, kwargs


def official_run(official: oa.Official, config, seed: int, steps: int, batch_size: int):
  """main.py's main() for fashion-mnist, stopped after `steps` steps; our metrics on the
  test split. Returns (metrics, seconds spent training)."""
  main = official.main
  main.seed_everything(seed)
  t = main.transforms
  transform = t.Compose([t.ToTensor(), t.Normalize((0.5,), (0.5,))])
  train_dataset = FashionMNIST(*idx.load_idx_split(config.data.path, "train"), transform)
  test_dataset = FashionMNIST(*idx.load_idx_split(config.data.path, "test"), transform)
  data_variance = np.var(train_dataset.data.numpy() / 255.0) * 4.0
  g = torch.Generator()
  g.manual_seed(seed)
  loader = lambda dataset, size, shuffle: main.make_loader(
    dataset,
    batch_size=size,
    shuffle=shuffle,
    num_workers=0,
    pin_memory=False,
    drop_last=False,
    worker_init_fn=main.seed_worker,
    generator=g,
    persistent_workers=False,
  )
  train_loader = loader(train_dataset, batch_size, True)
  valid_loader = loader(test_dataset, batch_size, False)
  viz_loader = loader(test_dataset, min(32, batch_size), False)
  next(iter(viz_loader))  # main.py draws its visualisation batch here (from g)

  model = oa.build_model(official, float(config.arc.s))
  optimizer = oa.make_optimizer(model)
  args = types.SimpleNamespace(
    device=torch.device("cpu"),
    gamma=oa.MAIN_ARGS["gamma"],
    gamma_decay=oa.MAIN_ARGS["gamma_decay"],
    steps=0,
  )
  writer = _Writer()
  started = time.perf_counter()
  with oa.scratch_cwd():
    while args.steps < steps:
      main.train(
        itertools.islice(train_loader, steps - args.steps),
        model,
        optimizer,
        args,
        writer,
        data_variance,
      )
      if args.steps % len(train_loader) == 0:  # a full epoch: main.py tests after it
        main.test(valid_loader, model, args, writer, data_variance)
  seconds = time.perf_counter() - started
  return oa.evaluate(model, config), seconds


def ours_run(args: argparse.Namespace, seed: int) -> tuple[dict[str, float], float]:
  """`python -m arcvq_jax.main` for one seed; its eval_results.json and the wall time."""
  workdir = os.path.join(args.out, "ours", f"seed_{seed}")
  os.makedirs(workdir, exist_ok=True)
  command = [
    sys.executable,
    "-m",
    "arcvq_jax.main",
    f"--config={CONFIG}",
    f"--config.seed={seed}",
    f"--config.batch_size={args.batch_size}",
    f"--config.num_train_steps={args.steps}",
    f"--workdir={workdir}",
  ]
  if args.arc_s is not None:
    command.append(f"--config.arc.s={args.arc_s}")
  started = time.perf_counter()
  with open(os.path.join(workdir, "main.log"), "w") as log:
    proc = subprocess.run(command, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, check=False)
  if proc.returncode:
    raise RuntimeError(f"seed {seed}: arcvq_jax.main failed; see {workdir}/main.log")
  with open(os.path.join(workdir, "eval_results.json")) as f:
    return json.load(f), time.perf_counter() - started


def stats(values: list[float]) -> dict[str, float]:
  v = np.asarray(values, np.float64)
  std = float(np.std(v, ddof=1)) if len(v) > 1 else float("nan")
  return dict(mean=float(v.mean()), std=std, min=float(v.min()), max=float(v.max()))


def markdown(result: dict[str, Any]) -> str:
  s = result["settings"]
  lines = [
    "# Official ArcVQ-VAE against arcvq-jax",
    "",
    f"Fashion-MNIST, batch {s['batch_size']}, {s['steps']} steps, ArcLoss s {s['arc_s']}, "
    f"seeds {s['seeds']}; scored on the test split by our metric code. mean +- std (n - 1), "
    "(min - max).",
    "",
    "| run | n | PSNR | SSIM | usage (test split) | perplexity |",
    "|---|---|---|---|---|---|",
  ]
  for side, summary in result["summary"].items():
    cells = []
    for m in METRICS:
      v = summary[m]
      scale, digits = (100.0, 1) if m == "codebook_usage" else (1.0, 3 if m == "ssim" else 2)
      cells.append(
        f"{v['mean'] * scale:.{digits}f} +- {v['std'] * scale:.{digits}f} "
        f"({v['min'] * scale:.{digits}f} - {v['max'] * scale:.{digits}f})"
      )
    lines.append(f"| {side} | {summary['n']} | " + " | ".join(cells) + " |")
  lines += [
    "",
    "| side | seed | PSNR | SSIM | usage | perplexity | seconds |",
    "|---|---|---|---|---|---|---|",
  ]
  for run in result["runs"]:
    lines.append(
      f"| {run['side']} | {run['seed']} | {run['psnr']:.3f} | {run['ssim']:.4f} "
      f"| {run['codebook_usage']:.4f} | {run['perplexity']:.2f} | {run['seconds']:.0f} |"
    )
  return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  config = torch_checkpoint.load_config_file(CONFIG)
  if args.arc_s is not None:
    config.arc.s = args.arc_s
  try:
    official = oa.load(args.official) if "official" in args.sides else None
  except oa.UsageError as e:
    sys.exit(f"error: {e}")
  runs = []
  setting = (args.steps, args.batch_size, float(config.arc.s))
  for side in args.sides:
    os.makedirs(os.path.join(args.out, side), exist_ok=True)
    for seed in args.seeds:
      path = os.path.join(args.out, side, f"seed_{seed}.json")
      if os.path.exists(path):
        with open(path) as f:
          run = json.load(f)
        if (run["steps"], run["batch_size"], run["arc_s"]) != setting:
          sys.exit(
            f"error: {path} holds a run of {run['steps']} steps, batch {run['batch_size']}, "
            f"s {run['arc_s']}, not this one's; pass another --out."
          )
        runs.append(run)
        continue
      if side == "official":
        metrics, seconds = official_run(official, config, seed, args.steps, args.batch_size)
      else:
        metrics, seconds = ours_run(args, seed)
      run = dict(
        side=side,
        seed=seed,
        steps=args.steps,
        batch_size=args.batch_size,
        arc_s=float(config.arc.s),
        seconds=seconds,
        **metrics,
      )
      with open(path, "w") as f:
        json.dump(run, f, indent=1)
      runs.append(run)
      print(
        f"{side} seed {seed}: PSNR {run['psnr']:.3f} SSIM {run['ssim']:.4f} "
        f"usage {run['codebook_usage']:.4f} perplexity {run['perplexity']:.2f} "
        f"({seconds:.0f} s)",
        flush=True,
      )
  summary = {}
  for side in args.sides:
    mine = [r for r in runs if r["side"] == side]
    summary[side] = dict(n=len(mine), **{m: stats([r[m] for r in mine]) for m in METRICS})
  result = dict(
    settings=dict(
      steps=args.steps,
      batch_size=args.batch_size,
      seeds=args.seeds,
      arc_s=float(config.arc.s),
      official=official.folder if official else None,
    ),
    runs=runs,
    summary=summary,
  )
  with open(os.path.join(args.out, "runs.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "runs.md"), "w") as f:
    f.write(markdown(result))
  print(f"wrote {args.out}/runs.json and runs.md")


if __name__ == "__main__":
  main()
