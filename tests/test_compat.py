"""Workdirs written by arcvq-jax 0.1 (before the quantizer interface, tests/fixtures/
workdir_v0_1, made by make_workdir_v0_1.py from commit b9ba5f6) load and give the tokens and
reconstructions that version gave, and training resumes from them."""

import os
import shutil

import jax
import numpy as np
import pytest

from arcvq_jax import api
from arcvq_jax.train import tokenizer

FIXTURES = os.path.join(os.path.dirname(os.path.abspath(__file__)), "fixtures", "workdir_v0_1")
VARIANTS = ("arcvq", "ema")


@pytest.mark.parametrize("variant", VARIANTS)
def test_old_workdir_gives_the_same_tokens_and_reconstructions(variant):
  workdir = os.path.join(FIXTURES, variant)
  expected = np.load(os.path.join(workdir, "expected.npz"))
  config = api.load_config(workdir)
  assert "name" not in config.quantizer  # written before quantizers had names
  tok = api.Tokenizer.from_workdir(workdir)
  assert tok.quantizer.name == "arcvq" and tok.num_codes == 32
  x_hat, tokens = tok.reconstruct(expected["images"])
  np.testing.assert_array_equal(np.asarray(tokens), expected["tokens"])
  np.testing.assert_allclose(np.asarray(x_hat), expected["x_hat"], rtol=0, atol=1e-5)


@pytest.mark.slow
@pytest.mark.skipif(
  not os.path.exists("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz"),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
def test_training_resumes_from_an_old_workdir(tmp_path):
  # The EMA run: its train state carries the EMA k-means statistics, the part of the state
  # the quantizer interface now owns.
  workdir = str(tmp_path / "ema")
  shutil.copytree(os.path.join(FIXTURES, "ema"), workdir)
  config = api.load_config(workdir)
  before = api.restore_params(workdir)[0]
  config.num_train_steps = 4
  results = tokenizer.train_and_evaluate(config, workdir)
  params, step = api.restore_params(workdir)
  assert step == 4 and np.isfinite(results["psnr"])
  changed = [
    not np.array_equal(a, b)
    for a, b in zip(jax.tree.leaves(before), jax.tree.leaves(params), strict=True)
  ]
  assert any(changed)
