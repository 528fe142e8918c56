"""The lines a finished `python -m arcvq_jax.main` run ends on: what it measured, what it
wrote where, and the commands that come next (evaluate, sample, tokenise, resume)."""

from __future__ import annotations

import glob
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

WIDTH = 150  # the console's line budget (cli.MAX_WIDTH)
# (key, label, format) of the metrics shown, in this order; other keys are not shown.
METRICS = (
  ("psnr", "PSNR (dB)", ".2f"),
  ("ssim", "SSIM", ".4f"),
  ("lpips", "LPIPS", ".4f"),
  ("mse", "MSE", ".5f"),
  ("codebook_usage", "codebook usage on the eval split", ".1%"),
  ("perplexity", "perplexity on the eval split", ".1f"),
  ("loss", "train loss (last logged steps)", ".4f"),
  ("bits_per_token", "bits per token (train)", ".3f"),
)


def _table(rows: Sequence[tuple[str, str]]) -> list[str]:
  width = max(len(label) for label, _ in rows)
  return [f"  {label:<{width}}  {value}" for label, value in rows]


def _command_lines(command: str, indent: int = 4, width: int = WIDTH) -> list[str]:
  """A shell command on lines of at most `width` characters (where its words allow), joined
  by backslash continuations, so that it still pastes as one command."""
  lines, line = [], " " * indent
  for word in command.split(" "):
    if line.strip() and len(line) + 1 + len(word) + 2 > width:
      lines.append(line + " \\")
      line = " " * (indent + 2)
    line += ("" if not line.strip() else " ") + word
  return [*lines, line]


def _duration(seconds: float) -> str:
  seconds = round(seconds)
  m, s = divmod(seconds, 60)
  h, m = divmod(m, 60)
  return f"{h}h{m:02d}m{s:02d}s" if h else (f"{m}m{s:02d}s" if m else f"{s}s")


def summary_lines(
  *,
  stage: str,
  workdir: str,
  results: Mapping[str, Any],
  config_arg: str,
  overrides: Sequence[str] = (),
  seconds: float | None = None,
) -> list[str]:
  """The closing lines of a run of `stage` in `workdir` that returned `results`.

  config_arg: the --config value the run was started with (for the resume command);
  overrides: its --config.x=y flags.
  """
  q = shlex.quote
  base = ["python -m arcvq_jax.main", f"--config={q(config_arg)}", f"--workdir={q(workdir)}"]
  rerun = " ".join([*base, *map(q, overrides)])
  lines: list[str] = []
  if "preempted_at_step" in results:
    return [
      f"Stopped by SIGTERM at step {results['preempted_at_step']}; the checkpoint of that step "
      f"is in {os.path.join(workdir, 'checkpoints')}.",
      f"Resume: {rerun}",
    ]
  took = f" in {_duration(seconds)}" if seconds is not None else ""
  lines.append(f"Finished the {stage} run{took}.")
  rows = [(label, format(results[key], fmt)) for key, label, fmt in METRICS if key in results]
  if "num_images" in results:
    rows.insert(0, ("images evaluated", str(results["num_images"])))
  if rows:
    lines += ["", *_table(rows)]

  made = []
  steps = (
    sorted(int(d) for d in os.listdir(os.path.join(workdir, "checkpoints")) if d.isdigit())
    if os.path.isdir(os.path.join(workdir, "checkpoints"))
    else []
  )
  if steps:
    made.append(("checkpoints/", f"checkpoints of steps {', '.join(map(str, steps))}"))
  if os.path.exists(os.path.join(workdir, "eval_results.json")):
    made.append(("eval_results.json", "the metrics above (eval/step_N.json: one per evaluation)"))
  plots = sorted(glob.glob(os.path.join(workdir, "diagnostics", "*.png")))
  if plots:
    made.append(("diagnostics/", f"{len(plots)} codebook plots (norms, usage, distances)"))
  logs = bool(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))
  if logs:
    made.append(("events.out.tfevents.*", "TensorBoard logs (losses, usage, image grids)"))
  if made:
    lines += ["", f"Written in {workdir}:", *_table(made)]

  nxt = []
  if stage == "tokenizer":
    nxt.append(("evaluate (+LPIPS, rFID)", f"python -m arcvq_jax.evaluate --workdir={q(workdir)}"))
    nxt.append(("tokens in Python", f"arcvq_jax.api.Tokenizer.from_workdir({workdir!r})"))
    shards = f"{workdir.rstrip('/')}_tokens"
    nxt.append(
      (
        "its training split as token shards, once (the prior below reads them with "
        "--config.data.token_shards=DIR: no encoding pass of its own)",
        f"python -m arcvq_jax.tokenize --workdir={q(workdir)} --out={q(shards)}",
      )
    )
    for label, prior in (
      ("a prior on its tokens (a PixelCNN)", "demo_pixelcnn"),
      ("or MaskGIT's transformer", "demo_maskgit"),
      ("or an autoregressive transformer (LlamaGen's)", "demo_ar"),
    ):
      nxt.append(
        (
          label,
          f"python -m arcvq_jax.main --config=configs/{prior}.py --workdir=PRIOR_DIR "
          f"--config.tokenizer_workdir={q(workdir)}",
        )
      )
  else:
    nxt.append(("sample", f"python -m arcvq_jax.sample --workdir={q(workdir)} --num_samples=64"))
  if logs:
    nxt.append(("look at the curves", f"tensorboard --logdir {q(workdir)}"))
  longer = [o for o in overrides if not o.startswith("--config.num_train_steps=")]
  nxt.append(
    (
      "train on (more steps)",
      " ".join([*base, *map(q, longer), "--config.num_train_steps=N"]),
    )
  )
  lines += ["", "Next:"]
  for label, command in nxt:
    lines += [f"  {label}:", *_command_lines(command)]
  return lines
