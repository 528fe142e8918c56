"""The VQGAN stage end to end: a fake ImageNet manual download (real JPEG photos) prepared by
TFDS's own imagenet2012 builder, streamed through grain, the whole GAN stage (disc_start 0),
exact resume with both optimizer states, and the refusal to train without LPIPS weights."""

import json
import os

import imagenet_fixtures
import jax
import numpy as np
import pytest
from model_fixtures import random_lpips_params
from run_helpers import override, read_all_scalars

from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax.data import imagenet
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.train import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_VAL = 6


@pytest.fixture(scope="module")
def imagenet_dir(tmp_path_factory):
  manual = imagenet_fixtures.make_fake_imagenet_manual_dir(
    str(tmp_path_factory.mktemp("manual")), num_val=NUM_VAL
  )
  data_dir = str(tmp_path_factory.mktemp("tfds"))
  imagenet.prepare(manual, data_dir)
  return data_dir


@pytest.fixture(scope="module")
def lpips_path(tmp_path_factory):
  path = str(tmp_path_factory.mktemp("lpips") / "lpips_vgg16.npz")
  lpips_lib.save_params(random_lpips_params(), path)
  return path


def vqgan_config(data_dir, lpips_path, **overrides):
  from configs import tiny_vqgan  # noqa: PLC0415 (configs/ is not a package)

  c = tiny_vqgan.get_config()
  c.data.update(
    dict(
      source="tfds",
      name="imagenet2012",
      data_dir=data_dir,
      path="",
      train_split="train",
      eval_split="validation",
      random_crop=True,
      random_flip=True,
    )
  )
  c.data.image_size = 32
  c.model.resolution = 32
  c.model.attn_resolutions = (8,)
  c.batch_size = 4
  c.eval_batch_size = 4
  c.loss.perceptual_weight = 1.0  # off in the tiny config (offline); the full loss here
  c.lpips_path = lpips_path
  return override(c, **overrides)


@pytest.fixture(scope="module")
def uninterrupted(imagenet_dir, lpips_path, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("full"))
  results = tokenizer.train_and_evaluate(vqgan_config(imagenet_dir, lpips_path), workdir)
  return workdir, results


@pytest.mark.slow
def test_gan_stage_on_fake_imagenet_logs_all_terms_and_evaluates(uninterrupted):
  workdir, results = uninterrupted
  assert results["num_images"] == NUM_VAL
  for key in ("mse", "psnr", "ssim", "lpips", "codebook_usage", "perplexity"):
    assert np.isfinite(results[key]), key
  assert results["lpips"] > 0
  scalars = read_all_scalars(workdir)
  for tag in (
    "loss",
    "loss_l1",
    "loss_lpips",
    "loss_vq",
    "loss_arc",
    "loss_g",
    "d_weight",
    "d_loss",
    "logits_real",
    "logits_fake",
    "bbnr_radius",
    "batch_usage",
  ):
    assert sorted(scalars[f"train/{tag}"]) == [1, 2, 3, 4], tag
  assert all(np.isfinite(v) for v in scalars["train/d_loss"].values())
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2, 4]
  with open(os.path.join(workdir, "eval_results.json")) as f:
    assert json.load(f)["lpips"] == pytest.approx(results["lpips"])


@pytest.mark.slow
def test_resume_restores_both_networks_and_optimizers(
  uninterrupted, imagenet_dir, lpips_path, tmp_path
):
  full_dir, full_results = uninterrupted
  workdir = str(tmp_path / "resumed")
  tokenizer.train_and_evaluate(vqgan_config(imagenet_dir, lpips_path, num_train_steps=2), workdir)
  resumed_results = tokenizer.train_and_evaluate(vqgan_config(imagenet_dir, lpips_path), workdir)
  full, resumed = read_all_scalars(full_dir), read_all_scalars(workdir)
  for tag in ("train/loss", "train/d_loss", "train/d_weight", "train/logits_fake"):
    assert sorted(resumed[tag]) == [1, 2, 3, 4], tag
    np.testing.assert_array_equal(
      [resumed[tag][s] for s in range(1, 5)], [full[tag][s] for s in range(1, 5)], err_msg=tag
    )
  assert resumed_results == full_results
  # The final checkpoints agree leaf by leaf: autoencoder, codebook, both Adam states,
  # the discriminator's params and its BatchNorm running averages.
  a = ckpt_lib.Checkpointer(os.path.join(full_dir, "checkpoints")).restore(4, None, None)
  b = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).restore(4, None, None)
  assert set(a) == {"gen", "disc"} and set(a["disc"]) == {"params", "batch_stats", "opt_state"}
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b) > 50
  for x, y in zip(leaves_a, leaves_b, strict=True):
    np.testing.assert_array_equal(x, y)


@pytest.mark.slow
def test_training_without_lpips_weights_is_refused_with_the_converter_command(
  imagenet_dir, tmp_path
):
  missing = str(tmp_path / "nowhere" / "lpips.npz")
  with pytest.raises(Exception, match=r"arcvq_jax\.convert\.lpips_weights"):
    tokenizer.train_and_evaluate(vqgan_config(imagenet_dir, missing), str(tmp_path / "run"))
  assert not os.path.exists(os.path.join(tmp_path, "run", "checkpoints"))
