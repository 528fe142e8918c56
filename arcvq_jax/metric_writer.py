"""Metrics to the console and to TensorBoard event files, without TensorFlow.

  writer = metric_writer.create_writer(workdir)          # just_logging=True on other hosts
  writer.write_scalars(step, {"train/loss": 0.1, "train/psnr": 17.2})
  writer.write_images(step, {"reconstructions": grid[None]})   # (N, H, W, C)
  writer.flush(); writer.close()

The method names and meanings are clu's `MetricWriter`'s (write_scalars, write_images,
flush, close), so callers need not change; but clu's writer imports TensorFlow (~1.5 GB, and
its start-up chatter) only to write event files. This one writes them with the `tensorboard`
package's pure-Python record writer and protos (its EventFileWriter is not used: it imports
TensorFlow wherever TF is installed), through etils' epath (local or gs://, as the
checkpoints), in the data format of TF2's `tf.summary.scalar` / `tf.summary.image` (a float
tensor; a string tensor [width, height, png, ...]), so TensorBoard shows them as before and
`tf.compat.v1.train.summary_iterator` reads them back.

Scalars are also logged through absl, a few short lines per call ("[step 50] train: loss=0.1,
psnr=17.2"); images by name and shape only.
"""

from __future__ import annotations

import io
import itertools
import os
import socket
import time
from collections.abc import Mapping
from typing import Any

import numpy as np
from absl import logging
from etils import epath
from PIL import Image
from tensorboard.compat.proto import summary_pb2, tensor_pb2, tensor_shape_pb2, types_pb2
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.summary.writer.record_writer import RecordWriter

# Longest logged line (the message; absl's prefix comes on top).
MAX_LINE = 110
_file_ids = itertools.count()


def _tensor_proto(dtype: int, shape: tuple[int, ...], **values: Any) -> tensor_pb2.TensorProto:
  dims = [tensor_shape_pb2.TensorShapeProto.Dim(size=s) for s in shape]
  return tensor_pb2.TensorProto(
    dtype=dtype, tensor_shape=tensor_shape_pb2.TensorShapeProto(dim=dims), **values
  )


def _metadata(plugin: str) -> summary_pb2.SummaryMetadata:
  return summary_pb2.SummaryMetadata(
    plugin_data=summary_pb2.SummaryMetadata.PluginData(plugin_name=plugin)
  )


def _as_uint8(images: Any, name: str) -> np.ndarray:
  """(N, H, W, C) uint8 from uint8, or from floats in [0, 1] (clipped, rounded)."""
  x = np.asarray(images)
  if x.ndim != 4 or x.shape[-1] not in (1, 3, 4):
    raise ValueError(f"image {name!r}: expected (N, H, W, C) with C in 1, 3, 4; got {x.shape}.")
  if x.dtype == np.uint8:
    return x
  if not np.issubdtype(x.dtype, np.floating):
    raise ValueError(f"image {name!r}: expected uint8 or floats in [0, 1], got {x.dtype}.")
  return np.round(np.clip(np.nan_to_num(x), 0.0, 1.0) * 255.0).astype(np.uint8)


def _png(image: np.ndarray) -> bytes:
  mode = {1: "L", 3: "RGB", 4: "RGBA"}[image.shape[-1]]
  buf = io.BytesIO()
  Image.fromarray(image[..., 0] if mode == "L" else image, mode=mode).save(buf, format="PNG")
  return buf.getvalue()


def _format(value: float) -> str:
  return f"{value:.5g}"


def scalar_lines(step: int, scalars: Mapping[str, float], width: int = MAX_LINE) -> list[str]:
  """The log lines of one write_scalars call: tags grouped by their prefix before '/',
  "[step 50] train: loss=0.1, psnr=17.2", continued on further lines past `width`."""
  groups: dict[str, list[str]] = {}
  for tag in sorted(scalars):
    prefix, _, name = tag.rpartition("/")
    groups.setdefault(prefix, []).append(f"{name}={_format(scalars[tag])}")
  lines = []
  for prefix, items in groups.items():
    head = f"[step {step}] {prefix + ': ' if prefix else ''}"
    line = head
    for item in items:
      if line != head and len(line) + len(item) + 2 > width:
        lines.append(line.rstrip(", "))
        line = " " * len(head)
      line += item + ", "
    lines.append(line.rstrip(", "))
  return lines


class MetricWriter:
  """Logs scalars through absl and, unless just_logging, writes TensorBoard event files
  into `logdir` (events.out.tfevents.*, one per writer, flushed after every call)."""

  def __init__(self, logdir: str, *, just_logging: bool = False):
    self.logdir = logdir
    self._records = None
    if not just_logging:
      directory = epath.Path(logdir)
      directory.mkdir(parents=True, exist_ok=True)
      name = (
        f"events.out.tfevents.{int(time.time()):010d}.{socket.gethostname()}."
        f"{os.getpid()}.{next(_file_ids)}"
      )
      self.path = str(directory / name)
      self._records = RecordWriter((directory / name).open("wb"))
      self._add(Event(wall_time=time.time(), file_version="brain.Event:2"))

  def _add(self, event: Event) -> None:
    self._records.write(event.SerializeToString())
    self._records.flush()

  def _write(self, step: int, values: list[summary_pb2.Summary.Value]) -> None:
    if self._records is not None:
      self._add(
        Event(step=int(step), wall_time=time.time(), summary=summary_pb2.Summary(value=values))
      )

  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Scalars by tag (numbers, numpy or jax scalars) at `step`."""
    values = {tag: float(np.asarray(v)) for tag, v in scalars.items()}
    for line in scalar_lines(step, values):
      logging.info("%s", line)
    self._write(
      step,
      [
        summary_pb2.Summary.Value(
          tag=tag,
          metadata=_metadata("scalars"),
          tensor=_tensor_proto(types_pb2.DT_FLOAT, (), float_val=[v]),
        )
        for tag, v in values.items()
      ],
    )

  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Image batches by tag: (N, H, W, C), uint8 or float in [0, 1], C in 1, 3, 4."""
    values = []
    shapes = []
    for tag, batch in images.items():
      x = _as_uint8(batch, tag)
      shapes.append(f"{tag} {'x'.join(map(str, x.shape))}")
      if self._records is None:
        continue
      h, w = x.shape[1:3]
      data = [str(w).encode(), str(h).encode(), *(_png(img) for img in x)]
      values.append(
        summary_pb2.Summary.Value(
          tag=tag,
          metadata=_metadata("images"),
          tensor=_tensor_proto(types_pb2.DT_STRING, (len(data),), string_val=data),
        )
      )
    logging.info("[step %d] images: %s", step, ", ".join(shapes))
    if values:
      self._write(step, values)

  def flush(self) -> None:
    if self._records is not None:
      self._records.flush()

  def close(self) -> None:
    if self._records is not None:
      self._records.close()
      self._records = None

  def __enter__(self) -> MetricWriter:
    return self

  def __exit__(self, *exc: object) -> None:
    self.close()


def create_writer(workdir: str, *, just_logging: bool = False) -> MetricWriter:
  """A writer logging to the console and to TensorBoard event files in `workdir`; with
  just_logging (e.g. on every process but the first), to the console only."""
  return MetricWriter(workdir, just_logging=just_logging)
