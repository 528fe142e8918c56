"""The tokenizer API (arcvq_jax/api.py): loading a run, encode/decode, writing a workdir."""

import functools
import json
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import init_params
from run_helpers import override

from arcvq_jax import api
from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax.data import idx
from arcvq_jax.train import state as state_lib
from arcvq_jax.train import tokenizer, tokenizer_steps
from arcvq_jax.train.state import init_train_state

FASHION = "/usr/share/datasets/fashion-mnist"
pytestmark = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)


def tiny_config(**overrides):
  from configs import tiny  # noqa: PLC0415 (configs/ is not a package; ROOT is on sys.path)

  c = tiny.get_config()
  c.eval_batch_size = 2000
  return override(c, **overrides)


def fashion_images(n=6):
  """Real Fashion-MNIST test images in [-1, 1], (n, 28, 28, 1)."""
  images = idx.read_idx(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz"))[:n]
  return images[..., None].astype(np.float32) / 127.5 - 1.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("run"))
  tokenizer.train_and_evaluate(tiny_config(num_train_steps=3, checkpoint_every_steps=3), workdir)
  return workdir


def restored_train_params(workdir):
  """The params as the training code restores them (full state, its own structure)."""
  config = api.load_config(workdir)
  model = state_lib.build_model(config, channels=1)
  tx = state_lib.make_optimizer(config)
  abstract = jax.eval_shape(
    functools.partial(init_train_state, model=model, tx=tx, image_shape=(28, 28, 1)),
    jax.random.PRNGKey(0),
  )
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir))
  state = checkpointer.restore(checkpointer.latest_step(), abstract, None)
  checkpointer.close()
  return config, model, state.params


@pytest.mark.slow
def test_reconstruct_equals_the_training_code(run):
  tok = api.Tokenizer.from_workdir(run)
  _config, model, params = restored_train_params(run)
  x = fashion_images()
  reconstruct = jax.jit(functools.partial(tokenizer_steps.reconstruct, model=model))
  want_x, want_idx = reconstruct(params, jnp.asarray(x))
  x_hat, tokens = tok.reconstruct(x)
  assert tokens.shape == (6, 7, 7) and tokens.dtype == jnp.int32
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_idx))
  np.testing.assert_allclose(np.asarray(x_hat), np.asarray(want_x), rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_encode_decode_by_hand(run):
  tok = api.Tokenizer.from_workdir(run)
  x = fashion_images()
  z = np.asarray(tok.encode_latents(x))
  assert z.shape == (6, 7, 7, tok.embed_dim)
  # Cosine matching (the arcvq variant): argmax of normalised dot products, in numpy.
  e = np.asarray(tok.codebook)
  zn = z / np.linalg.norm(z, axis=-1, keepdims=True)
  en = e / np.linalg.norm(e, axis=-1, keepdims=True)
  np.testing.assert_array_equal(np.asarray(tok.encode(x)), np.argmax(zn @ en.T, axis=-1))
  tokens = tok.encode(x)
  np.testing.assert_array_equal(np.asarray(tok.decode_latents(z)), np.asarray(tok.decode(tokens)))


@pytest.mark.slow
def test_write_workdir_round_trip_and_resume(run, tmp_path):
  config, _, params = restored_train_params(run)
  out = str(tmp_path / "written")
  api.write_workdir(out, config, jax.device_get(params), image_shape=(28, 28, 1), step=0)
  x = fashion_images()
  np.testing.assert_array_equal(
    np.asarray(api.Tokenizer.from_workdir(out).encode(x)),
    np.asarray(api.Tokenizer.from_workdir(run).encode(x)),
  )
  with pytest.raises(api.TokenizerLoadError, match="already has checkpoints"):
    api.write_workdir(out, config, params, image_shape=(28, 28, 1))
  # The training loop continues from the written checkpoint (fresh optimizer, data from the
  # start): two steps from step 0.
  results = tokenizer.train_and_evaluate(
    override(api.load_config(out), num_train_steps=2, checkpoint_every_steps=2), out
  )
  assert results["num_images"] == 10000
  assert ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(out)).all_steps() == [0, 2]


@pytest.mark.slow
def test_errors_name_the_problem(run, tmp_path):
  with pytest.raises(api.TokenizerLoadError, match="not the --workdir"):
    api.Tokenizer.from_workdir(str(tmp_path))
  with pytest.raises(api.TokenizerLoadError, match="no checkpoint of step 99"):
    api.Tokenizer.from_workdir(run, step=99)
  # A config.json that does not belong to the checkpoints (codebook size changed).
  bad = tmp_path / "bad"
  bad.mkdir()
  os.symlink(os.path.join(run, "checkpoints"), bad / "checkpoints")
  with open(os.path.join(run, "config.json")) as f:
    raw = json.load(f)
  raw["quantizer"]["num_codes"] = 128
  (bad / "config.json").write_text(json.dumps(raw))
  with pytest.raises(api.TokenizerLoadError, match="do not belong to the same run"):
    api.Tokenizer.from_workdir(str(bad))
  tok = api.Tokenizer.from_workdir(run)
  with pytest.raises(ValueError, match=r"tokens must lie in \[0, 64\)"):
    tok.decode(np.full((1, 7, 7), 64, np.int32))
  with pytest.raises(ValueError, match="multiples of 4"):
    tok.encode(np.zeros((1, 30, 30, 1), np.float32))
  with pytest.raises(ValueError, match=re.escape("uint8 with x / 127.5 - 1")):
    tok.encode(np.zeros((1, 28, 28, 1), np.uint8))
  pixels = np.linspace(0, 255, 28 * 28, dtype=np.float32).reshape(1, 28, 28, 1)
  with pytest.raises(ValueError, match=re.escape("got values in [0, 255]; convert [0, 255]")):
    tok.encode(pixels)
  assert tok.encode(pixels / 127.5 - 1.05).shape == (1, 7, 7)  # a resize's overshoot passes


@pytest.mark.slow
def test_vqgan_workdir_loads(tmp_path):
  from configs import tiny_vqgan  # noqa: PLC0415

  c = tiny_vqgan.get_config()
  c.loss.perceptual_weight = 0.0
  c.lpips_path = ""
  model = state_lib.build_model(c, channels=1)
  params = init_params(model, jnp.zeros((1, 28, 28, 1)), seed=3)
  api.write_workdir(str(tmp_path), c, params, image_shape=(28, 28, 1), step=5)
  tok = api.Tokenizer.from_workdir(str(tmp_path))
  x = fashion_images(2)
  reconstruct = jax.jit(functools.partial(tokenizer_steps.reconstruct, model=model))
  want_x, want_idx = reconstruct(params, jnp.asarray(x))
  x_hat, tokens = tok.reconstruct(x)
  np.testing.assert_array_equal(np.asarray(tokens), np.asarray(want_idx))
  np.testing.assert_allclose(np.asarray(x_hat), np.asarray(want_x), rtol=1e-5, atol=1e-5)
