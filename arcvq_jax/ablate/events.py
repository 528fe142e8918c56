"""Scalars back from a run's TensorBoard event files, without TensorFlow.

The files are TFRecord streams of `Event` protos (arcvq_jax/metric_writer.py writes them with
tensorboard's record writer): per record a little-endian uint64 length, its masked CRC32C, the
bytes, their masked CRC32C. Scalars are TF2 float tensors (older files: simple_value); image
summaries (string tensors) are skipped. A record cut short by a killed writer ends the file.
"""

from __future__ import annotations

import glob
import os
import struct
from collections.abc import Iterator

import numpy as np
from tensorboard.compat.proto import types_pb2
from tensorboard.compat.proto.event_pb2 import Event

_HEADER = struct.Struct("<QI")


def records(path: str) -> Iterator[bytes]:
  """The payloads of a TFRecord file (CRCs not checked; a truncated tail is dropped)."""
  with open(path, "rb") as f:
    while True:
      header = f.read(_HEADER.size)
      if len(header) < _HEADER.size:
        return
      (length, _) = _HEADER.unpack(header)
      data = f.read(length)
      footer = f.read(4)
      if len(data) < length or len(footer) < 4:
        return
      yield data


def _scalar(value) -> float | None:
  if value.HasField("tensor"):
    t = value.tensor
    if t.dtype not in (types_pb2.DT_FLOAT, types_pb2.DT_DOUBLE) or t.tensor_shape.dim:
      return None  # images (strings) and other non-scalars
    if t.float_val:
      return float(t.float_val[0])
    if t.double_val:
      return float(t.double_val[0])
    if t.tensor_content:
      dtype = np.float32 if t.dtype == types_pb2.DT_FLOAT else np.float64
      return float(np.frombuffer(t.tensor_content, dtype)[0])
    return None
  if value.HasField("simple_value"):
    return float(value.simple_value)
  return None


def event_files(workdir: str) -> list[str]:
  """The workdir's event files, oldest first (by the timestamp in their names)."""
  return sorted(glob.glob(os.path.join(workdir, "events.out.tfevents.*")))


def read_scalars(workdir: str, tags: set[str] | None = None) -> dict[str, dict[int, float]]:
  """{tag: {step: value}} of the scalars in the workdir's event files (`tags`: only these).
  Where a resumed run logged a step again, the newer file's value wins."""
  out: dict[str, dict[int, float]] = {}
  for path in event_files(workdir):
    for data in records(path):
      event = Event.FromString(data)
      if not event.HasField("summary"):
        continue
      for value in event.summary.value:
        if tags is not None and value.tag not in tags:
          continue
        v = _scalar(value)
        if v is not None:
          out.setdefault(value.tag, {})[int(event.step)] = v
  return out
