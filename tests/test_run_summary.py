"""The closing lines of a run (arcvq_jax/run_summary.py) on a workdir laid out as main writes
one: metrics, what was written where, the next commands."""

import importlib
import os
import re

import pytest

from arcvq_jax import config as config_lib
from arcvq_jax import prior_config, run_summary
from arcvq_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _workdir(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)  # a short relative workdir, as a user types one
  d = tmp_path / "run"
  for step in (150, 300):
    (d / "checkpoints" / str(step)).mkdir(parents=True)
  (d / "checkpoints" / "damaged").mkdir()
  (d / "diagnostics").mkdir()
  for name in ("a", "b", "c"):
    (d / "diagnostics" / f"step_300_{name}.png").write_bytes(b"")
  (d / "eval_results.json").write_text("{}")
  (d / "events.out.tfevents.1.host.1.0").write_bytes(b"")
  return "run"


def test_tokenizer_summary_names_metrics_files_and_next_commands(tmp_path, monkeypatch):
  workdir = _workdir(tmp_path, monkeypatch)
  results = dict(
    num_images=10000,
    psnr=16.8989,
    ssim=0.67512,
    mse=0.0204,
    codebook_usage=0.631,
    perplexity=310.24,
  )
  lines = run_summary.summary_lines(
    stage="tokenizer",
    workdir=workdir,
    results=results,
    config_arg="configs/demo.py",
    overrides=["--config.batch_size=64", "--config.num_train_steps=300"],
    seconds=77.4,
  )
  text = "\n".join(lines)
  assert lines[0] == "Finished the tokenizer run in 1m17s."
  assert "PSNR (dB)" in text and "16.90" in text and "63.1%" in text and "310.2" in text
  assert "LPIPS" not in text.split("Written")[0]  # not computed: not shown
  assert "steps 150, 300" in text and "3 codebook plots" in text
  assert f"tensorboard --logdir {workdir}" in text
  assert f"python -m arcvq_jax.evaluate --workdir={workdir}" in text
  assert (
    f"python -m arcvq_jax.main --config=configs/demo.py --workdir={workdir} "
    "--config.batch_size=64 --config.num_train_steps=N" in text
  )
  assert max(len(line) for line in lines) <= 150


def test_prior_summary_points_at_sampling_and_preemption_at_resume(tmp_path, monkeypatch):
  workdir = _workdir(tmp_path, monkeypatch)
  lines = run_summary.summary_lines(
    stage="ldm", workdir=workdir, results=dict(loss=0.123456), config_arg="configs/tiny_ldm.py"
  )
  text = "\n".join(lines)
  assert "train loss (last logged steps)  0.1235" in text
  assert f"python -m arcvq_jax.sample --workdir={workdir} --num_samples=64" in text
  stopped = run_summary.summary_lines(
    stage="ldm", workdir=workdir, results=dict(preempted_at_step=7), config_arg="c.py"
  )
  assert "SIGTERM at step 7" in stopped[0]
  assert stopped[1] == f"Resume: python -m arcvq_jax.main --config=c.py --workdir={workdir}"
  assert os.path.join(workdir, "checkpoints") in stopped[0]


@pytest.mark.parametrize("tokenizer_config", ["demo", "fashion_mnist", "tiny", "tiny_vqgan"])
def test_the_prior_a_tokenizer_summary_suggests_takes_that_tokenizer(
  tmp_path, monkeypatch, tokenizer_config
):
  """The suggested prior commands (PixelCNN, MaskGIT, AR) must run on the tokenizer just
  trained: each config exists, validates, and accepts that tokenizer's vocabulary and latent
  grid (Fashion-MNIST, 28x28)."""
  workdir = _workdir(tmp_path, monkeypatch)
  lines = run_summary.summary_lines(
    stage="tokenizer",
    workdir=workdir,
    results={},
    config_arg=f"configs/{tokenizer_config}.py",
  )
  assert max(len(line) for line in lines) <= 150
  prior_args = re.findall(r"--config=(\S+) --workdir=PRIOR_DIR", "\n".join(lines))
  assert prior_args == [f"configs/demo_{p}.py" for p in ("pixelcnn", "maskgit", "ar")]
  tokenizer = importlib.import_module(f"configs.{tokenizer_config}").get_config()
  quantizer = state_lib.build_model(tokenizer, channels=1).quantizer
  side = 28 // config_lib.downsample_factor(tokenizer)
  for prior_arg in prior_args:
    assert os.path.isfile(os.path.join(ROOT, prior_arg))
    module = importlib.import_module(prior_arg.removesuffix(".py").replace("/", "."))
    prior = module.get_config()
    prior.tokenizer_workdir = workdir
    prior_config.validate(prior)
    prior_config.validate_against_tokenizer(
      prior, quantizer.vocab_size, (side, side, quantizer.dim), where=workdir
    )
