"""arcvq_jax.metric_writer: TensorBoard event files without TensorFlow, read back with TF's
own summary_iterator (tests/run_helpers.py), and short console lines."""

from __future__ import annotations

import glob
import io
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
from absl import logging
from PIL import Image
from run_helpers import read_all_scalars, read_image_tags

from arcvq_jax import metric_writer


def read_images(workdir: str) -> dict[str, dict[int, list[np.ndarray]]]:
  """{tag: {step: [decoded images]}} of the image summaries in the event files."""
  out: dict[str, dict[int, list[np.ndarray]]] = {}
  for path in glob.glob(os.path.join(workdir, "events.out.tfevents.*")):
    for event in tf.compat.v1.train.summary_iterator(path):
      for v in event.summary.value:
        if v.metadata.plugin_data.plugin_name == "images":
          w, h, *pngs = tf.make_ndarray(v.tensor)
          images = [np.asarray(Image.open(io.BytesIO(p))) for p in pngs]
          assert all(img.shape[:2] == (int(h), int(w)) for img in images)
          out.setdefault(v.tag, {})[event.step] = images
  return out


def test_scalars_and_images_read_back_with_tensorflow(tmp_path):
  workdir = str(tmp_path)
  rng = np.random.default_rng(0)
  grey = rng.integers(0, 256, (2, 5, 7, 1), dtype=np.uint8)
  rgb = rng.uniform(0, 1, (1, 4, 6, 3)).astype(np.float32)
  with metric_writer.create_writer(workdir) as writer:
    writer.write_scalars(1, {"train/loss": 0.5, "train/psnr": np.float32(17.25), "lr": 3})
    writer.write_scalars(2, {"train/loss": 0.25})
    writer.write_images(2, {"grey": grey, "eval/rgb": rgb})
    writer.flush()
  scalars = read_all_scalars(workdir)
  assert scalars == {"train/loss": {1: 0.5, 2: 0.25}, "train/psnr": {1: 17.25}, "lr": {1: 3.0}}
  assert read_image_tags(workdir) == {"grey": {2}, "eval/rgb": {2}}
  images = read_images(workdir)
  np.testing.assert_array_equal(np.stack(images["grey"][2]), grey[..., 0])
  np.testing.assert_array_equal(images["eval/rgb"][2][0], np.round(rgb[0] * 255).astype(np.uint8))


def test_just_logging_writes_no_files(tmp_path):
  writer = metric_writer.create_writer(str(tmp_path / "w"), just_logging=True)
  writer.write_scalars(0, {"a": 1.0})
  writer.write_images(0, {"x": np.zeros((1, 2, 2, 3), np.uint8)})
  writer.close()
  assert not os.path.exists(tmp_path / "w")


def test_bad_images_are_refused(tmp_path):
  writer = metric_writer.create_writer(str(tmp_path), just_logging=True)
  with pytest.raises(ValueError, match=r"image 'x': expected \(N, H, W, C\)"):
    writer.write_images(0, {"x": np.zeros((2, 2, 3), np.uint8)})
  with pytest.raises(ValueError, match="expected uint8 or floats"):
    writer.write_images(0, {"x": np.zeros((1, 2, 2, 3), np.int32)})


def test_console_lines_are_short_and_grouped(monkeypatch):
  logged = []
  monkeypatch.setattr(logging, "info", lambda fmt, *args: logged.append(fmt % args))
  scalars = {f"train/metric_{i}": i / 7 for i in range(30)} | {"eval/psnr": 17.0}
  metric_writer.create_writer("unused", just_logging=True).write_scalars(300, scalars)
  assert logged[0] == "[step 300] eval: psnr=17"
  assert logged[1].startswith("[step 300] train: metric_0=0, metric_1=0.14286")
  assert all(len(line) <= metric_writer.MAX_LINE for line in logged)
  assert sum(line.count("=") for line in logged) == 31


def test_does_not_import_tensorflow(tmp_path):
  code = (
    "import sys; from arcvq_jax import metric_writer; "
    "w = metric_writer.create_writer(sys.argv[1]); w.write_scalars(0, {'a': 1}); w.close(); "
    "assert 'tensorflow' not in sys.modules, 'tensorflow imported'"
  )
  proc = subprocess.run([sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stderr
