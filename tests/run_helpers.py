"""Helpers of the tests that run the trainer: config overrides, and reading back the
TensorBoard scalars that clu's writer logged."""

from __future__ import annotations

import glob
import os

import tensorflow as tf


def read_all_scalars(workdir: str) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of every scalar in the workdir's TensorBoard event files."""
  out: dict[str, dict[int, float]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.HasField("tensor"):
          array = tf.make_ndarray(v.tensor)
          if array.ndim:  # images
            continue
          value = float(array)
        else:
          value = v.simple_value
        out.setdefault(v.tag, {})[event.step] = value
  return out


def read_scalars(workdir: str, tag: str) -> dict[int, float]:
  """{step: value} of one scalar tag."""
  return read_all_scalars(workdir).get(tag, {})


def override(config, **overrides):
  """Sets dotted keys, e.g. override(c, **{"optimizer.lr": 1e-3}); returns config."""
  for key, value in overrides.items():
    target = config
    *parents, leaf = key.split(".")
    for p in parents:
      target = target[p]
    target[leaf] = value
  return config


def read_image_tags(workdir: str) -> dict[str, set[int]]:
  """{tag: {steps}} of every image summary in the workdir's TensorBoard event files."""
  out: dict[str, set[int]] = {}
  for path in sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*"))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.HasField("tensor") and tf.make_ndarray(v.tensor).ndim:
          out.setdefault(v.tag, set()).add(event.step)
  return out
