"""The pure parts of bench/compare_priors.py (the budget, the step seconds read back from the
loop's steps/s, the scales a prior is sampled at, the class grid, the table), by hand. The
whole comparison is run by hand with a tiny budget (bench/README.md)."""

from __future__ import annotations

import importlib.util
import os

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def cp():
  spec = importlib.util.spec_from_file_location(
    "compare_priors", os.path.join(ROOT, "bench", "compare_priors.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_the_budget_fills_the_minutes_at_the_calibrated_rate(cp):
  assert cp.steps_for_budget(8, 1.25) == 600
  assert cp.steps_for_budget(0.01, 0.1) == 1  # at least one step


def test_train_seconds_add_up_the_intervals_of_the_loop_readings(cp):
  # readings after steps 10, 20, 25: steps 2-10 at 2/s, 11-20 at 1/s, 21-25 at 5/s; step 1
  # (with compilation) is not timed and counts at the mean rate of the other 24.
  timed = 9 / 2 + 10 / 1 + 5 / 5
  assert cp.train_seconds({10: 2.0, 20: 1.0, 25: 5.0}) == pytest.approx(timed * 25 / 24)
  # a calibration run: one reading after its last step gives back that rate
  assert 30 / cp.train_seconds({30: 1.5}) == pytest.approx(1.5)
  assert cp.train_seconds({}) is None


def test_only_priors_trained_with_label_dropout_are_guided(cp):
  scales = [1.0, 3.0, 1.5, 1.0]
  pcnn = cp.PRIORS["pixelcnn"][0].get_config()
  assert cp.guidance_scales("pixelcnn", pcnn, scales) == [1.0]
  for stage in ("ldm", "maskgit", "ar"):
    c = cp.PRIORS[stage][0].get_config()
    assert cp.guidance_scales(stage, c, scales) == [1.0, 1.5, 3.0], stage
  ar = cp.PRIORS["ar"][0].get_config()
  ar.guidance.cond_drop_prob = 0.0
  assert cp.guidance_scales("ar", ar, scales) == [1.0]


def test_the_class_grid_puts_class_c_in_row_c(cp):
  labels = np.arange(40) % 10
  images = (np.arange(40, dtype=np.uint8)[:, None, None, None] * 6).repeat(4, 1).repeat(4, 2)
  grid = cp.class_grid(images, labels, per_class=3)
  # image_grid: 2 px borders, so tile (r, c) starts at (2 + 6 r, 2 + 6 c)
  assert grid.shape == (2 + 6 * 10, 2 + 6 * 3, 1)
  for k in range(10):
    for j, i in enumerate(np.flatnonzero(labels == k)[:3]):
      assert grid[2 + 6 * k, 2 + 6 * j, 0] == images[i, 0, 0, 0]


def test_the_table_has_a_row_per_prior_and_scale_and_bolds_the_best(cp):
  score = lambda fd: dict(fd_fmnist=fd, class_accuracy=0.8, samples_per_sec=10.0)
  train = dict(num_train_steps=100, train_minutes=1.0, steps_per_sec=1.6)
  results = dict(
    settings=dict(fid=False, minutes=1.0, num_samples=500),
    classifier=dict(fingerprint="abc", test_accuracy=0.9),
    priors=dict(
      ar=dict(train=train, scales={"1": score(5.0), "2": score(3.0)}, best_scale="2"),
    ),
    references={"train": dict(fd_fmnist=0.5, class_accuracy=0.95)},
  )
  assert cp.best_scale(results["priors"]["ar"]["scales"]) == "2"
  rows = [line for line in cp.markdown_table(results).splitlines() if line.startswith("| ar")]
  assert rows == [
    "| ar | 100 | 1.00 | 1.60 | 1 | 5.00 | 0.800 | 10.0 |",
    "| ar | 100 | 1.00 | 1.60 | **2** | **3.00** | 0.800 | 10.0 |",
  ]
