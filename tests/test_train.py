"""The tokenizer loop end to end on real Fashion-MNIST files: resume, NaN stop, bad configs."""

import json
import os

import jax
import numpy as np
import pytest
from run_helpers import override, read_scalars

from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax import config as config_lib
from arcvq_jax import workdir as workdir_lib
from arcvq_jax.train import loop, tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)


def tiny_config(**overrides):
  from configs import tiny  # noqa: PLC0415 (configs/ is not a package; ROOT is on sys.path)

  c = tiny.get_config()
  c.eval_batch_size = 2000
  c.data.eval_split = "test"
  return override(c, **overrides)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  results = tokenizer.train_and_evaluate(tiny_config(), workdir)
  return workdir, results


@pytest.mark.slow
def test_end_to_end_writes_checkpoints_eval_and_logs(uninterrupted):
  workdir, results = uninterrupted
  assert results["num_images"] == 10000
  for key in ("mse", "psnr", "ssim", "codebook_usage", "perplexity"):
    assert np.isfinite(results[key]), key
  assert 0 < results["codebook_usage"] <= 1 and 1 <= results["perplexity"] <= 64
  with open(os.path.join(workdir, "eval_results.json")) as f:
    assert json.load(f)["psnr"] == pytest.approx(results["psnr"])
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [3, 6]
  losses = read_scalars(workdir, "train/loss")
  assert sorted(losses) == [1, 2, 3, 4, 5, 6]
  assert read_scalars(workdir, "eval/psnr")[6] == pytest.approx(results["psnr"], rel=1e-5)


@pytest.mark.slow
def test_resume_gives_the_same_losses_as_an_uninterrupted_run(uninterrupted, tmp_path):
  full_dir, full_results = uninterrupted
  workdir = str(tmp_path / "resumed")
  tokenizer.train_and_evaluate(tiny_config(num_train_steps=3), workdir)
  resumed_results = tokenizer.train_and_evaluate(tiny_config(), workdir)
  full, resumed = read_scalars(full_dir, "train/loss"), read_scalars(workdir, "train/loss")
  assert sorted(resumed) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_array_equal([resumed[s] for s in range(1, 7)], [full[s] for s in range(1, 7)])
  assert resumed_results == full_results


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  workdir = str(tmp_path)
  tokenizer.train_and_evaluate(tiny_config(num_train_steps=3), workdir)
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  good = checkpointer.restore(3, None, None)
  with pytest.raises(
    loop.NonFiniteLossError,
    match=(
      r"loss became nan by step \d+; the last good checkpoint is step 3 .* "
      r"Lower config\.optimizer\.lr"
    ),
  ):
    tokenizer.train_and_evaluate(
      tiny_config(**{"optimizer.lr": 1e30, "num_train_steps": 12}), workdir
    )
  checkpointer = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"))
  assert checkpointer.all_steps() == [3]
  again = checkpointer.restore(3, None, None)
  for a, b in zip(jax.tree.leaves(good), jax.tree.leaves(again), strict=True):
    np.testing.assert_array_equal(a, b)


@pytest.mark.slow
def test_changed_model_refuses_to_resume(uninterrupted, tmp_path):
  workdir = str(tmp_path)
  tokenizer.train_and_evaluate(tiny_config(num_train_steps=3), workdir)
  # Refused by the config check, before the checkpoint is read or anything is written.
  with pytest.raises(workdir_lib.ConfigConflictError, match=r"quantizer\.num_codes 64 -> 32"):
    tokenizer.train_and_evaluate(tiny_config(**{"quantizer.num_codes": 32}), workdir)
  # Without config.json to compare with, the checkpoint's shapes refuse it.
  os.remove(os.path.join(workdir, "config.json"))
  with pytest.raises(ckpt_lib.CheckpointError, match="does not match this run's config"):
    tokenizer.train_and_evaluate(tiny_config(**{"quantizer.num_codes": 32}), workdir)


@pytest.mark.parametrize(
  "key,value,match",
  [
    ("arc.top_k", 0, "config.arc.top_k"),
    ("arc.s", 0.0, "config.arc.s"),
    ("arc.s", -1.0, "config.arc.s"),
    ("quantizer.distance", "manhattan", "config.quantizer.distance"),
    ("quantizer.bbnr", "sometimes", "config.quantizer.bbnr"),
    ("quantizer.codebook_update", "kmeans", "config.quantizer.codebook_update"),
    ("quantizer.num_codes", 0, "config.quantizer.num_codes"),
    ("quantizer.ema_decay", 1.0, "config.quantizer.ema_decay"),
    ("optimizer.lr", 0.0, "config.optimizer.lr"),
    ("batch_size", 30, "config.batch_size: 30 is not divisible by the 8 devices"),
    ("model.hidden", 33, "config.model.hidden"),
    ("data.source", "s3", "config.data.source"),
    ("quantizer.codebook_axis", "model", "config.quantizer.codebook_axis: 'model' is not one"),
    ("arc.impl", "fast", "config.arc.impl"),
  ],
)
def test_bad_config_values_name_the_key(key, value, match):
  c = tiny_config(**{key: value})
  with pytest.raises(ValueError, match=match.replace(".", r"\.")):
    config_lib.validate(c, num_devices=8)


def test_top_k_larger_than_the_batch_tokens_is_refused():
  c = tiny_config(**{"arc.top_k": 10_000})
  with pytest.raises(ValueError, match=r"config\.arc\.top_k: 10000 is more than the 1568"):
    config_lib.validate_against_data(c, (28, 28, 1))


def test_unknown_variant_is_refused():
  with pytest.raises(ValueError, match="unknown variant 'arcface'"):
    config_lib.apply_variant(config_lib.vqvae_config(), "arcface")
