"""Every quantizer of the zoo through the whole tokenizer: the VQ-VAE and VQGAN train steps,
the tokenizer API (encode, decode, reconstruct, tokens equal to the training code's), the
evaluation step (counts over the vocabulary), and both priors' use of its tokens.

The quantizers' math is tested against vector-quantize-pytorch and numpy transcriptions in
tests/test_quantizers_*.py; 1 vs 8 devices in tests/test_sharding.py; the stage end to end
on the command line for a quantizer without a codebook in test_stage_runs_without_a_codebook.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from arcvq_jax import api, prior_config, sharding
from arcvq_jax import config as config_lib
from arcvq_jax.data import idx
from arcvq_jax.models import discriminator, pixelcnn
from arcvq_jax.quantizers import registry
from arcvq_jax.train import gan_steps, prior_pixelcnn, tokenizer_steps
from arcvq_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
# One variant per quantizer of the registry, and the rotation trick's gradient path.
ZOO = ["arcvq", "vq", "vq_rotation", "simvq", "fsq", "lfq"]


def test_the_zoo_covers_the_registry():
  names = {config_lib.VARIANTS[v]["name"] for v in ZOO}
  assert names == set(registry.QUANTIZERS)


def tiny(variant: str):
  from configs import tiny as tiny_config  # noqa: PLC0415 (configs/ is no package)

  c = tiny_config.get_config(variant)
  c.batch_size = 8
  return c


def fashion_images(n=8):
  images = idx.read_idx(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz"))[:n]
  return images[..., None].astype(np.float32) / 127.5 - 1.0


@pytest.mark.slow
@pytest.mark.parametrize("variant", ZOO)
def test_vqvae_training_api_evaluation_and_priors(variant, tmp_path):
  c = tiny(variant)
  config_lib.validate(c, num_devices=1)
  mesh = sharding.make_mesh((-1,), ("data",))
  model = state_lib.build_model(c, channels=1)
  q = model.quantizer
  assert q.name == config_lib.VARIANTS[variant]["name"]
  state, _, step = tokenizer_steps.create_state_and_step(
    c, model, state_lib.make_optimizer(c), mesh, (28, 28, 1), data_variance=0.3
  )
  x = jnp.asarray(fashion_images())
  before = jax.device_get(state.params)
  for _ in range(2):
    state, metrics = step(state, {"image": x})
    assert np.isfinite(float(metrics["loss"])), metrics
  assert state.usage.shape == (q.vocab_size,)
  assert float(jnp.sum(state.usage)) > 0
  # The encoder learns through the quantizer's gradient path.
  conv = before["encoder"]["conv_1"]["kernel"]
  assert not np.array_equal(conv, np.asarray(state.params["encoder"]["conv_1"]["kernel"]))

  # The tokenizer API on a workdir holding these params: the training code's tokens.
  workdir = str(tmp_path / "tok")
  api.write_workdir(workdir, c, jax.device_get(state.params), (28, 28, 1), step=2)
  tok = api.Tokenizer.from_workdir(workdir)
  assert tok.num_codes == q.vocab_size and tok.embed_dim == q.dim
  assert (tok.codebook is None) == (q.codebook(state.params) is None)
  x_hat, tokens = tok.reconstruct(x)
  # Jitted, as the API's: op by op, every op of the networks would compile a program of its own.
  reconstruct = jax.jit(functools.partial(tokenizer_steps.reconstruct, model=model))
  want_x, want_tokens = reconstruct(state.params, x)
  np.testing.assert_array_equal(tokens, want_tokens)
  np.testing.assert_allclose(x_hat, want_x, rtol=1e-5, atol=1e-5)
  assert tokens.shape == (8, 7, 7) and 0 <= int(tokens.min()) <= int(tokens.max()) < q.vocab_size
  np.testing.assert_array_equal(tok.decode(tokens), x_hat)
  np.testing.assert_array_equal(tok.decode_latents(tok.encode_latents(x)), x_hat)  # the LDM's path

  # Evaluation counts tokens over the whole vocabulary.
  eval_step = jax.jit(functools.partial(tokenizer_steps.eval_step, model=model))
  out = eval_step(state.params, {"image": x, "mask": jnp.ones((8,), bool)})
  assert out["code_counts"].shape == (q.vocab_size,) and float(out["code_counts"].sum()) == 8 * 49

  # A PixelCNN over its tokens (vocabulary from the tokenizer), one step.
  pc = prior_config.pixelcnn_config()
  pc.pixelcnn.update(dict(dim=8, n_layers=2, head_dim=16))
  pc.num_classes = 0
  pc.batch_size = 8
  prior = pixelcnn.from_config(pc, num_codes=tok.num_codes)
  p_state, _, p_step = prior_pixelcnn.create_state_and_step(
    pc, prior, prior_pixelcnn.common.make_optimizer(pc), mesh, (7, 7)
  )
  p_state, p_metrics = p_step(p_state, {"tokens": tokens, "label": jnp.zeros((8,), jnp.int32)})
  assert np.isfinite(float(p_metrics["loss"]))
  logits = jax.jit(prior.apply)({"params": p_state.params}, tokens, None)
  assert logits.shape == (8, 7, 7, q.vocab_size)


@pytest.mark.slow
@pytest.mark.parametrize("variant", ZOO)
def test_vqgan_generator_and_discriminator_steps(variant):
  from configs import tiny_vqgan  # noqa: PLC0415 (configs/ is no package)

  c = tiny_vqgan.get_config(variant)
  # Two levels without attention at a level (f2; the middle block keeps its attention): the
  # quantizer's part of the step is the same, the step compiles ~30 % faster.
  c.model.update(dict(ch_mult=(1, 2), attn_resolutions=()))
  c.batch_size = 4
  config_lib.validate(c, num_devices=1)
  mesh = sharding.make_mesh((-1,), ("data",))
  model = state_lib.build_model(c, channels=1)
  state, _, steps = gan_steps.create_state_and_steps(
    c,
    model,
    discriminator.from_config(c),
    state_lib.make_optimizer(c),
    state_lib.make_disc_optimizer(c),
    mesh,
    (28, 28, 1),
    None,
  )
  x = jnp.asarray(fashion_images(4))
  state, metrics = steps(state, {"image": x}, 0)
  for key in ("loss", "loss_rec", "loss_g", "d_weight", "d_loss"):
    assert np.isfinite(float(metrics[key])), (key, metrics)
  assert state.usage.shape == (model.quantizer.vocab_size,)


@pytest.mark.slow
def test_stage_runs_without_a_codebook(tmp_path):
  """FSQ (no codebook, no params) through `main`: training, evaluation (usage over its 1000
  tokens), no codebook plots, the summary."""
  workdir = str(tmp_path / "fsq")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "arcvq_jax.main",
      "--config=configs/tiny.py:fsq",
      f"--workdir={workdir}",
      "--config.num_train_steps=2",
      "--config.eval_batch_size=2000",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  results = api.load_config(workdir)
  assert results.quantizer.name == "fsq"
  with open(os.path.join(workdir, "eval_results.json")) as f:
    ev = json.load(f)
  assert ev["num_images"] == 10000 and 0 < ev["codebook_usage"] <= 1
  assert not os.path.exists(os.path.join(workdir, "diagnostics"))
  assert "Finished the tokenizer run" in proc.stdout
