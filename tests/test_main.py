"""The command line: `python -m arcvq_jax.main --config=... --workdir=...` on real files."""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
pytestmark = pytest.mark.skipif(
  not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)


def run_main(*args):
  return subprocess.run(
    [sys.executable, "-m", "arcvq_jax.main", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


@pytest.mark.slow
def test_cli_trains_evaluates_and_resumes(tmp_path):
  workdir = str(tmp_path / "run")
  common = ["--config=configs/tiny.py", f"--workdir={workdir}", "--config.eval_batch_size=2000"]
  first = run_main(*common, "--config.num_train_steps=2", "--config.checkpoint_every_steps=2")
  assert first.returncode == 0, first.stderr[-3000:]
  with open(os.path.join(workdir, "eval_results.json")) as f:
    results = json.load(f)
  assert results["step"] == 2 and results["num_images"] == 10000
  assert os.path.isdir(os.path.join(workdir, "checkpoints", "2"))
  second = run_main(*common, "--config.num_train_steps=4", "--config.checkpoint_every_steps=2")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "Resuming from checkpoint step 2" in second.stderr
  with open(os.path.join(workdir, "eval_results.json")) as f:
    assert json.load(f)["step"] == 4


def test_cli_bad_config_names_the_key(tmp_path):
  proc = run_main("--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.arc.top_k=0")
  assert proc.returncode != 0
  assert "config.arc.top_k: must be an integer >= 1, got 0" in proc.stderr


@pytest.mark.slow
def test_cli_missing_data_says_how_to_get_it(tmp_path):
  proc = run_main(
    "--config=configs/tiny.py", f"--workdir={tmp_path}", f"--config.data.path={tmp_path}/nowhere"
  )
  assert proc.returncode != 0
  assert "apt-get install dataset-fashion-mnist" in proc.stderr
