"""The report's figures (PNG, matplotlib's Agg canvas: no display, no pyplot state).

training_curves.png   train/batch_usage, train/ema_usage and train/batch_perplexity over the
                      steps, per setting (mean over its finished seeds), from the runs'
                      TensorBoard event files (read without TensorFlow: ablate/events.py)
psnr_vs_usage.png     final PSNR against test-split codebook usage, one point per run
usage_histograms.png  per setting, the test-split selection frequency of every code, sorted
                      (averaged over seeds rank by rank), log scale
by_codebook_size.png  usage and PSNR against a `codebook_size` grid, one line per variant
reconstructions.png   the same test images (top row) and each setting's reconstructions
                      (its lowest finished seed), one row per setting
"""

from __future__ import annotations

import math
import os
import socket
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from arcvq_jax.ablate import events
from arcvq_jax.evaluation import metrics

CURVES = (
  ("train/batch_usage", "batch usage"),
  ("train/ema_usage", "EMA usage (training)"),
  ("train/batch_perplexity", "batch perplexity"),
)


def _figure(width: float, height: float) -> Figure:
  fig = Figure(figsize=(width, height), dpi=100)
  FigureCanvasAgg(fig)
  return fig


def _save(fig: Figure, path: str) -> None:
  tmp = f"{path}.tmp.{socket.gethostname()}.{os.getpid()}.png"
  fig.savefig(tmp, format="png", bbox_inches="tight")
  os.replace(tmp, path)


MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")
LINESTYLES = ("-", "--", ":", "-.")


def _style(i: int, n: int) -> dict[str, Any]:
  """Colour, marker and line style of setting i of n: distinct pairs past tab10's colours."""
  cmap = colormaps["tab10" if n <= 10 else "tab20"]
  return dict(
    color=cmap(i % cmap.N), marker=MARKERS[i % len(MARKERS)], ls=LINESTYLES[(i // 10) % 4]
  )


def _by_setting(runs: Sequence[Mapping[str, Any]]) -> dict[str, list[Mapping[str, Any]]]:
  out: dict[str, list[Mapping[str, Any]]] = {}
  for r in sorted(runs, key=lambda r: (r["index"] is None, r["index"] or 0, r["seed"])):
    if r["state"] == "done":
      out.setdefault(r["setting"]["id"], []).append(r)
  return out


def _legend(ax, n: int) -> None:
  if n:
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)


def training_curves(workdir: str, groups: Mapping[str, Sequence[Mapping]], path: str) -> bool:
  tags = {t for t, _ in CURVES}
  curves = {
    sid: [events.read_scalars(os.path.join(workdir, r["dir"]), tags) for r in rs]
    for sid, rs in groups.items()
  }
  if not any(any(c) for c in curves.values()):
    return False
  fig = _figure(13, 3.6)
  axes = [fig.add_subplot(1, len(CURVES), i + 1) for i in range(len(CURVES))]
  for i, (sid, per_seed) in enumerate(curves.items()):
    style = _style(i, len(curves))
    for ax, (tag, _) in zip(axes, CURVES, strict=True):
      series = [s.get(tag, {}) for s in per_seed if s.get(tag)]
      if not series:
        continue
      steps = sorted(set.intersection(*(set(s) for s in series)))
      if not steps:
        continue
      mean = [np.mean([s[t] for s in series]) for t in steps]
      ax.plot(steps, mean, color=style["color"], ls=style["ls"], label=sid, linewidth=1.2)
  for ax, (tag, title) in zip(axes, CURVES, strict=True):
    ax.set_title(f"{title}\n({tag}, mean over seeds)", fontsize=9)
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
  _legend(axes[-1], len(groups))
  fig.tight_layout()
  _save(fig, path)
  return True


def psnr_vs_usage(groups: Mapping[str, Sequence[Mapping]], path: str) -> bool:
  if not groups:
    return False
  fig = _figure(7.5, 4.5)
  ax = fig.add_subplot()
  for i, (sid, rs) in enumerate(groups.items()):
    style = _style(i, len(groups))
    usage = [100 * r["eval"]["codebook_usage"] for r in rs]
    psnr = [r["eval"]["psnr"] for r in rs]
    ax.scatter(usage, psnr, color=style["color"], marker=style["marker"], label=sid, s=26)
  ax.set_xlabel("codebook usage on the test split (%)")
  ax.set_ylabel("PSNR (dB)")
  ax.set_title("PSNR vs usage, one point per run", fontsize=10)
  ax.grid(alpha=0.3)
  _legend(ax, len(groups))
  fig.tight_layout()
  _save(fig, path)
  return True


def by_codebook_size(groups: Mapping[str, Sequence[Mapping]], path: str) -> bool:
  """Usage and PSNR against the sweep's `codebook_size` (log scale), one line per variant,
  mean and sample std over the seeds as error bars. Only for sweeps with that grid key."""
  lines: dict[str, dict[int, list[Mapping]]] = {}
  for rs in groups.values():
    values = rs[0]["setting"].get("values") or {}
    if "codebook_size" not in values:
      continue
    others = [f"{k}={v}" for k, v in values.items() if k != "codebook_size"]
    name = "__".join([rs[0]["setting"].get("variant") or "base", *others])
    lines.setdefault(name, {})[int(values["codebook_size"])] = list(rs)
  if not lines:
    return False
  fig = _figure(12, 4.2)
  panels = (
    ("codebook_usage", 100.0, "codebook usage on the test split (%)"),
    ("psnr", 1.0, "PSNR (dB)"),
  )
  axes = [fig.add_subplot(1, 2, i + 1) for i in range(2)]
  for i, (name, by_k) in enumerate(lines.items()):
    style = _style(i, len(lines))
    ks = sorted(by_k)
    for ax, (key, scale, _) in zip(axes, panels, strict=True):
      values = [[scale * r["eval"][key] for r in by_k[k]] for k in ks]
      mean = [float(np.mean(v)) for v in values]
      std = [float(np.std(v, ddof=1)) if len(v) > 1 else 0.0 for v in values]
      ax.errorbar(
        ks,
        mean,
        yerr=std,
        color=style["color"],
        marker=style["marker"],
        ls=style["ls"],
        label=name,
        capsize=3,
        linewidth=1.2,
        markersize=5,
      )
  for ax, (_, _, label) in zip(axes, panels, strict=True):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("codebook size K (vocabulary)")
    ax.set_ylabel(label)
    ax.grid(alpha=0.3)
  axes[0].set_title("usage against K (mean ± std over seeds)", fontsize=10)
  axes[1].set_title("PSNR against K (mean ± std over seeds)", fontsize=10)
  _legend(axes[1], len(lines))
  fig.tight_layout()
  _save(fig, path)
  return True


def usage_histograms(workdir: str, groups: Mapping[str, Sequence[Mapping]], path: str) -> bool:
  panels = []
  for sid, rs in groups.items():
    counts = []
    for r in rs:
      file = os.path.join(workdir, r["dir"], "ablate", "counts.npy")
      if os.path.exists(file):
        counts.append(np.load(file).astype(np.float64))
    if counts and len({len(c) for c in counts}) == 1:
      panels.append((sid, counts))
  if not panels:
    return False
  cols = min(4, len(panels))
  rows = math.ceil(len(panels) / cols)
  fig = _figure(4 * cols, 2.8 * rows)
  for i, (sid, counts) in enumerate(panels):
    ax = fig.add_subplot(rows, cols, i + 1)
    freq = np.mean([np.sort(c)[::-1] / max(c.sum(), 1.0) for c in counts], axis=0)
    ax.fill_between(np.arange(len(freq)), freq, step="mid", linewidth=0)
    if np.any(freq > 0):
      ax.set_yscale("log")
    ax.set_xlim(-0.5, len(freq) - 0.5)
    usage = np.mean([metrics.codebook_usage(c) for c in counts])
    ppl = np.mean([metrics.perplexity(c) for c in counts])
    ax.set_title(f"{sid}\nusage {100 * usage:.1f} %, perplexity {ppl:.1f}", fontsize=8)
    ax.set_xlabel(f"codes by decreasing use (of {len(freq)})", fontsize=7)
    ax.tick_params(labelsize=7)
  fig.suptitle("test-split token share per code (mean over seeds, rank by rank)", fontsize=10)
  fig.tight_layout()
  _save(fig, path)
  return True


def _strip(images: np.ndarray) -> np.ndarray:
  """(N, H, W, C) in [-1, 1] -> (H, N * (W + 2), C) in [0, 1], 2-pixel white gaps."""
  x = np.clip((np.asarray(images, np.float32) + 1.0) / 2.0, 0.0, 1.0)
  n, h, w, c = x.shape
  out = np.ones((h, n * (w + 2) - 2, c), np.float32)
  for i in range(n):
    out[:, i * (w + 2) : i * (w + 2) + w] = x[i]
  return out


def reconstructions(workdir: str, groups: Mapping[str, Sequence[Mapping]], path: str) -> bool:
  rows: list[tuple[str, np.ndarray]] = []
  for sid, rs in groups.items():
    file = os.path.join(workdir, rs[0]["dir"], "ablate", "recon.npz")
    if not os.path.exists(file):
      continue
    with np.load(file) as data:
      if not rows:
        rows.append(("test images", _strip(data["images"])))
      rows.append((f"{sid} (seed {rs[0]['seed']})", _strip(data["reconstructions"])))
  if not rows:
    return False
  h, w = rows[0][1].shape[:2]
  fig = _figure(2 + w / 40, 0.3 + len(rows) * (h / 40 + 0.15))
  for i, (label, strip) in enumerate(rows):
    ax = fig.add_subplot(len(rows), 1, i + 1)
    ax.imshow(strip[..., 0] if strip.shape[-1] == 1 else strip, cmap="gray", vmin=0, vmax=1)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel(label, rotation=0, ha="right", va="center", fontsize=7)
  fig.tight_layout()
  _save(fig, path)
  return True


def write_plots(workdir: str, runs: Sequence[Mapping[str, Any]], out_dir: str) -> list[str]:
  """The figures of the finished runs into out_dir; returns the names written."""
  os.makedirs(out_dir, exist_ok=True)
  groups = _by_setting(runs)
  written = []
  for name, draw in (
    ("training_curves.png", lambda p: training_curves(workdir, groups, p)),
    ("psnr_vs_usage.png", lambda p: psnr_vs_usage(groups, p)),
    ("by_codebook_size.png", lambda p: by_codebook_size(groups, p)),
    ("usage_histograms.png", lambda p: usage_histograms(workdir, groups, p)),
    ("reconstructions.png", lambda p: reconstructions(workdir, groups, p)),
  ):
    if draw(os.path.join(out_dir, name)):
      written.append(name)
  return written
