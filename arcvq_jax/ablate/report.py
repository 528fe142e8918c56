"""The sweep's report: DIR/results.json, DIR/results.md and DIR/plots/*.png.

Gathers every run under DIR/runs (whatever shard ran it) from its ablate/ files and, per
setting, the mean and standard deviation over its finished seeds of each metric. The standard
deviation is the sample one (ddof=1); with one finished seed it is null. A metric that no
finished seed of a setting has (LPIPS or rFID without their weights, or skipped by the sweep)
is reported as not computed, with the reason. Runs that DIR/sweep.json plans but that have no
folder yet are counted as pending.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from arcvq_jax.ablate import plots
from arcvq_jax.ablate import runner as runner_lib

RESULTS_JSON, RESULTS_MD, PLOTS_DIR = "results.json", "results.md", "plots"
# (key, header, format, source): source 'eval' is the run's eval.json, 'status' its status.json.
METRICS = (
  ("psnr", "PSNR", ".2f", "eval"),
  ("ssim", "SSIM", ".4f", "eval"),
  ("lpips", "LPIPS", ".4f", "eval"),
  ("rfid", "rFID", ".2f", "eval"),
  ("codebook_usage", "usage", ".1%", "eval"),
  ("perplexity", "perplexity", ".1f", "eval"),
  ("mse", "MSE", ".5f", "eval"),
  ("train_time_s", "train time (s)", ".0f", "status"),
  ("steps_per_sec", "steps/s", ".2f", "status"),
  ("ms_per_step", "ms/step", ".1f", "status"),  # 1000 / steps_per_sec, per run
  ("wall_time_s", "wall time (s)", ".0f", "status"),
)
TABLE = ("psnr", "ssim", "lpips", "rfid", "codebook_usage", "perplexity", "train_time_s")


def gather_runs(workdir: str) -> list[dict[str, Any]]:
  """One record per run folder: setting, seed, state, error, eval metrics, status."""
  out = []
  for path in sorted(glob.glob(os.path.join(workdir, "runs", "*", "seed_*", "ablate", "run.json"))):
    directory = os.path.dirname(path)
    run = runner_lib.read_json(path)
    status = runner_lib.read_json(os.path.join(directory, "status.json")) or {}
    state = status.get("state", runner_lib.PENDING)
    ev = runner_lib.read_json(os.path.join(directory, "eval.json")) if state == "done" else None
    if state == runner_lib.DONE and ev is None:  # not expected: done is written last
      state = runner_lib.PENDING
    out.append(
      dict(
        setting=run["setting"],
        seed=run["seed"],
        index=run.get("index"),
        dir=os.path.relpath(os.path.dirname(directory), workdir),
        state=state,
        error=status.get("error"),
        attempts=status.get("attempts", 0),
        eval=ev or {},
        status=status,
      )
    )
  return out


def _stats(values: Sequence[float]) -> dict[str, Any]:
  x = np.asarray(values, np.float64)
  return dict(
    mean=float(np.mean(x)),
    std=float(np.std(x, ddof=1)) if len(x) > 1 else None,
    n=len(x),
    values=[float(v) for v in x],
  )


def _value(run: Mapping[str, Any], key: str, source: str) -> float | None:
  """A run's metric: from its eval.json or its status.json (ms/step from its steps/s)."""
  if key == "ms_per_step":
    rate = run["status"].get("steps_per_sec")
    return 1000.0 / rate if rate else None
  return (run["eval"] if source == "eval" else run["status"]).get(key)


def summarize(runs: Sequence[Mapping[str, Any]], planned: Sequence[Mapping[str, Any]]):
  """Per setting: seeds by state, errors, and each metric's statistics over finished seeds."""
  order: dict[str, dict[str, Any]] = {}
  for p in planned:
    order.setdefault(p["setting"]["id"], p["setting"])
  for r in sorted(runs, key=lambda r: (r["index"] is None, r["index"] or 0, r["dir"])):
    order.setdefault(r["setting"]["id"], r["setting"])
  present = {(r["setting"]["id"], r["seed"]) for r in runs}
  settings = []
  for sid, setting in order.items():
    mine = sorted((r for r in runs if r["setting"]["id"] == sid), key=lambda r: r["seed"])
    done = [r for r in mine if r["state"] == runner_lib.DONE]
    seeds = {
      "done": [r["seed"] for r in done],
      "failed": [r["seed"] for r in mine if r["state"] == runner_lib.FAILED],
      "pending": [r["seed"] for r in mine if r["state"] == runner_lib.PENDING]
      + [
        p["seed"] for p in planned if p["setting"]["id"] == sid and (sid, p["seed"]) not in present
      ],
    }
    metrics: dict[str, Any] = {}
    for key, _, _, source in METRICS:
      values = [_value(r, key, source) for r in done]
      values = [v for v in values if v is not None]
      if values:
        metrics[key] = _stats(values)
      elif done:
        reasons = sorted({r["eval"].get("not_computed", {}).get(key, "not recorded") for r in done})
        metrics[key] = dict(not_computed="; ".join(reasons))
    settings.append(
      dict(
        setting,
        num_codes=next((r["eval"].get("num_codes") for r in done), None),
        seeds=seeds,
        errors={str(r["seed"]): r["error"] for r in mine if r["state"] == runner_lib.FAILED},
        metrics=metrics,
      )
    )
  return settings


def _cell(stat: Mapping[str, Any] | None, fmt: str) -> str:
  if not stat:
    return "-"
  if "not_computed" in stat:
    return "not computed"
  scale, suffix = (100.0, " %") if fmt.endswith("%") else (1.0, "")
  fmt = fmt[:-1] + "f" if suffix else fmt
  text = format(scale * stat["mean"], fmt)
  if stat["std"] is not None:
    text += " ± " + format(scale * stat["std"], fmt)
  return text + suffix


def markdown(result: Mapping[str, Any]) -> str:
  sweep, settings = result["sweep"], result["settings"]
  lines = [f"# Ablation: {sweep.get('name') or os.path.basename(result['workdir'])}", ""]
  if sweep.get("note"):
    lines += [sweep["note"], ""]
  if sweep.get("command"):
    lines += ["Command (every shard, then the report):", "", f"    {sweep['command']}", ""]
  for m in result["machines"]:
    lines.append(
      f"Machine: {m.get('processor')}, {m.get('cpu_count')} CPU cores, {m.get('device')}, "
      f"{m.get('platform')}, JAX {m.get('jax')}"
    )
  loads = [v for r in result["runs"] for v in r.get("load_average") or () if v is not None]
  if loads:
    line = (
      f"1-minute load average at the runs' starts and ends: {min(loads):.1f} to {max(loads):.1f}"
    )
    cores = max((m.get("cpu_count") or 0 for m in result["machines"]), default=0)
    if cores and max(loads) > cores:
      line += f" (above its {cores} cores: a shared machine, slower than an idle one)"
    lines.append(line)
  lines += [
    "",
    f"Mean ± sample std (ddof=1) over the finished seeds; metrics on the "
    f"{result['split'] or 'evaluation'} split at the end of training; usage = share of the "
    "vocabulary (codes) that the split's tokens select; train time = steps / measured steps/s "
    "(without compilation and evaluation).",
    "",
  ]
  head = ["setting", "codes", "seeds done/failed/pending"] + [
    h for k, h, _, _ in METRICS if k in TABLE
  ]
  head += ["steps/s", "ms/step"]
  lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
  fmts = {k: f for k, _, f, _ in METRICS}
  for s in settings:
    n = s["seeds"]
    cells = [f"`{s['id']}`", str(s.get("num_codes") or "-")]
    cells.append(f"{len(n['done'])}/{len(n['failed'])}/{len(n['pending'])}")
    cells += [_cell(s["metrics"].get(k), fmts[k]) for k in TABLE]
    cells.append(_cell(s["metrics"].get("steps_per_sec"), ".2f"))
    cells.append(_cell(s["metrics"].get("ms_per_step"), ".1f"))
    lines.append("| " + " | ".join(cells) + " |")
  reasons = sorted(
    {
      f"{k}: {v['not_computed']}"
      for s in settings
      for k, v in s["metrics"].items()
      if "not_computed" in v
    }
  )
  if reasons:
    lines += ["", "Not computed:", ""] + [f"- {r}" for r in reasons]
  failed = [(s["id"], seed, e) for s in settings for seed, e in s["errors"].items()]
  if failed:
    lines += ["", "Failed runs:", ""] + [f"- `{i}` seed {seed}: {e}" for i, seed, e in failed]
  if result.get("plots"):
    lines += ["", "Plots:", ""] + [f"- [{p}]({PLOTS_DIR}/{p})" for p in result["plots"]]
  return "\n".join(lines) + "\n"


def write_report(workdir: str, with_plots: bool = True) -> dict[str, Any]:
  """Writes DIR/results.json, DIR/results.md and DIR/plots/; returns the results."""
  plan = runner_lib.read_json(os.path.join(workdir, runner_lib.SWEEP_FILE)) or {}
  runs = gather_runs(workdir)
  settings = summarize(runs, plan.get("runs", []))
  machines = []
  for r in runs:
    m = r["status"].get("machine")
    if m and m not in machines:
      machines.append(m)
  splits = sorted({r["eval"].get("split") for r in runs if r["eval"].get("split")})
  result = dict(
    workdir=os.path.abspath(workdir),
    written=time.strftime("%Y-%m-%dT%H:%M:%S"),
    sweep={k: v for k, v in plan.items() if k != "runs"},
    split=", ".join(splits),
    machines=machines,
    std="sample standard deviation over seeds (ddof=1); null with one finished seed",
    counts={
      state: sum(r["state"] == state for r in runs)
      for state in (runner_lib.DONE, runner_lib.FAILED, runner_lib.PENDING)
    },
    settings=settings,
    runs=[
      dict(
        setting=r["setting"]["id"],
        seed=r["seed"],
        dir=r["dir"],
        state=r["state"],
        error=r["error"],
        attempts=r["attempts"],
        load_average=r["status"].get("load_average"),
        metrics={k: r["eval"].get(k) for k, *_ in METRICS if r["eval"].get(k) is not None}
        | {k: r["status"].get(k) for k, _, _, src in METRICS if src == "status"},
      )
      for r in runs
    ],
  )
  result["counts"][runner_lib.PENDING] += sum(len(s["seeds"]["pending"]) for s in settings) - sum(
    r["state"] == runner_lib.PENDING for r in runs
  )
  result["plots"] = (
    plots.write_plots(workdir, runs, os.path.join(workdir, PLOTS_DIR)) if with_plots else []
  )
  runner_lib.write_json(os.path.join(workdir, RESULTS_JSON), result)
  tmp = runner_lib.tmp_name(os.path.join(workdir, RESULTS_MD))
  with open(tmp, "w") as f:
    f.write(markdown(result))
  os.replace(tmp, os.path.join(workdir, RESULTS_MD))
  return result
