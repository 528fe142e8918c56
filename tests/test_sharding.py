"""Data parallelism: the same run on 1 and on 8 (simulated CPU) devices gives the same losses,
for every quantizer of the zoo (and the VQGAN, and the fsdp axis).

ArcLoss takes its negatives from the GLOBAL batch: a per-device ArcLoss would differ from
the single-device value by far more than the tolerance here.
"""

import json
import os
import subprocess
import sys

import device_env
import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def results():
  env = device_env.simulated_devices(8, unoptimised=True)
  proc = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "tests", "multidevice_script.py"),
      "arcvq",
      "arcvq_blocked",
      "ema",
      "restart",
      "vq_rotation",
      "simvq",
      "fsq",
      "lfq",
      "vqgan",
      "arcvq_fsdp",
      "vqgan_fsdp",
    ],
    env=env,
    capture_output=True,
    text=True,
    timeout=1800,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT") :])


@pytest.mark.slow
@pytest.mark.parametrize(
  "variant",
  [
    "arcvq",
    "arcvq_blocked",
    "ema",
    "restart",
    "vq_rotation",
    "simvq",
    "fsq",
    "lfq",
    "vqgan",
    "arcvq_fsdp",
    "vqgan_fsdp",
  ],
)
def test_one_and_eight_devices_agree(results, variant):
  """*_fsdp: the 8 devices form a 2 x 4 ('data', 'fsdp') mesh with the parameters and their
  Adam moments split over 'fsdp'; they must give the 1-device (= data-parallel) run."""
  one_losses, one_sum, one_cb, one_sharded = results[variant]["one"]
  eight_losses, eight_sum, eight_cb, eight_sharded = results[variant]["eight"]
  assert one_sharded == 0
  if variant.endswith("_fsdp"):
    assert eight_sharded >= 10, eight_sharded  # kernels, codebook and their moments
    for a, b in zip(results[variant.removesuffix("_fsdp")]["eight"][0], eight_losses, strict=True):
      np.testing.assert_allclose(a["loss"], b["loss"], rtol=2e-4)  # = pure data parallelism
  else:
    assert eight_sharded == 0
  keys = ["loss", "loss_rec", "batch_usage", "batch_perplexity"]
  keys += [k for k in ("loss_vq", "loss_arc") if k in one_losses[0]]  # the quantizer's terms
  if variant.startswith("vqgan"):  # BatchNorm's statistics and the adaptive weight are global too
    keys += ["loss_g", "d_weight", "d_loss", "logits_real", "logits_fake"]
  for a, b in zip(one_losses, eight_losses, strict=True):
    assert sorted(a) == sorted(b)
    for key in keys:
      np.testing.assert_allclose(a[key], b[key], rtol=2e-4, atol=1e-6, err_msg=key)
  if variant.startswith("arcvq"):
    assert one_losses[0]["loss_arc"] > 0
  if variant == "arcvq_blocked":  # the blocked forms give the naive run's losses
    for a, b in zip(results["arcvq"]["one"][0], one_losses, strict=True):
      np.testing.assert_allclose(a["loss"], b["loss"], rtol=1e-4)
  if variant == "restart":
    assert one_losses[0]["codes_restarted"] == eight_losses[0]["codes_restarted"] > 0
  np.testing.assert_allclose(np.asarray(one_cb), np.asarray(eight_cb), rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(one_sum, eight_sum, rtol=1e-4)
