"""The prior stages' train steps on 1 and on 8 (simulated CPU) devices, data-parallel and
with FSDP ('data' x 'fsdp'), give the same losses and parameters: the batch is split, the
step's random draws (t, noise, label dropout) do not depend on the layout."""

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
    [sys.executable, os.path.join(ROOT, "tests", "prior_multidevice_script.py")],
    env=env,
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [text for text in proc.stdout.splitlines() if text.startswith("RESULT")][-1]
  return json.loads(line[len("RESULT") :])


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["ldm", "pixelcnn"])
def test_one_eight_and_fsdp_devices_agree(results, stage):
  r = results[stage]
  assert r["one"]["fsdp_leaves"] == r["eight"]["fsdp_leaves"] == 0
  assert r["fsdp"]["fsdp_leaves"] >= 10  # kernels, their Adam moments and EMA
  for layout in ("eight", "fsdp"):
    np.testing.assert_allclose(r[layout]["losses"], r["one"]["losses"], rtol=1e-4)
    for key in ("params", "ema"):
      np.testing.assert_allclose(r[layout][key], r["one"][key], rtol=1e-4)
