"""The gated PixelCNN (arcvq_jax/models/pixelcnn.py) and its sampler: causality by gradients
and by perturbation, conditioning, deterministic ancestral sampling."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from ml_collections import ConfigDict
from model_fixtures import init_params

from arcvq_jax import prior_config
from arcvq_jax.models import layers, pixelcnn
from arcvq_jax.train import prior_pixelcnn

H = W = 6
K = 16


@pytest.fixture(scope="module")
def model_and_params():
  model = pixelcnn.GatedPixelCNN(num_codes=K, dim=8, n_layers=4, num_classes=3, head_dim=16)
  tokens = jax.random.randint(jax.random.PRNGKey(0), (2, H, W), 0, K)
  labels = jnp.asarray([0, 2])
  params = init_params(model, tokens, labels, seed=1)
  return model, params, tokens, labels


@pytest.mark.slow
def test_output_at_a_position_does_not_depend_on_later_positions(model_and_params):
  model, params, tokens, labels = model_and_params
  emb = model.apply({"params": params}, tokens, method=lambda m, t: m.embedding(t))
  logits_fn = lambda x: model.apply({"params": params}, x, labels, method="from_embeddings")
  n = H * W
  # jac[p, b, i, j, :]: d(sum of the logits of example 0 at position p) / d(input b, i, j).
  jac = jax.jit(jax.jacrev(lambda x: logits_fn(x)[0].sum(-1).reshape(-1)))(emb)
  depends = np.asarray(jnp.abs(jac[:, 0]).sum(-1)).reshape(n, n) > 0  # [p, q]
  assert float(jnp.abs(jac[:, 1]).sum()) == 0.0  # never from the other example of the batch
  later = np.triu(np.ones((n, n), bool))  # q >= p: the position itself and after it
  assert not depends[later].any(), np.argwhere(depends & later)[:5]
  # No blind spot: with 4 layers every earlier position of a 6x6 grid reaches the logits
  # (the vertical stack covers the rows above, the horizontal one the row's left part).
  assert depends[~later].all()


@pytest.mark.slow
def test_changing_later_tokens_changes_nothing_before(model_and_params):
  model, params, tokens, labels = model_and_params
  base = model.apply({"params": params}, tokens, labels)
  for p in (0, 7, 20, 35):
    i, j = divmod(p, W)
    changed = tokens.at[:, i, j].set((tokens[:, i, j] + 5) % K)
    out = model.apply({"params": params}, changed, labels)
    flat_base = np.asarray(base).reshape(2, H * W, K)
    flat_out = np.asarray(out).reshape(2, H * W, K)
    np.testing.assert_array_equal(flat_out[:, : p + 1], flat_base[:, : p + 1])
    if p < H * W - 1:
      assert np.abs(flat_out[:, p + 1 :] - flat_base[:, p + 1 :]).max() > 0


@pytest.mark.slow
def test_class_conditioning_changes_the_logits(model_and_params):
  model, params, tokens, labels = model_and_params
  a = model.apply({"params": params}, tokens, labels)
  b = model.apply({"params": params}, tokens, (labels + 1) % 3)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-4
  unconditional = pixelcnn.GatedPixelCNN(num_codes=K, dim=8, n_layers=2, num_classes=0)
  p0 = init_params(unconditional, tokens)
  assert "class_cond_embedding" not in p0["layers_0"]
  assert unconditional.apply({"params": p0}, tokens).shape == (2, H, W, K)


def test_sampling_follows_the_model_in_raster_order():
  # A 'model' that is certain the next token is (previous token in raster order + 1) mod K,
  # and label + 3 at the first position: the samples are exact sequences.
  def apply_fn(tokens, labels):
    b = tokens.shape[0]
    flat = tokens.reshape(b, H * W)
    prev = jnp.concatenate([(labels + 2)[:, None], flat[:, :-1]], axis=1)
    return (jax.nn.one_hot((prev + 1) % K, K) * 1e4).reshape(b, H, W, K)

  labels = jnp.asarray([0, 1, 5])
  keys = prior_pixelcnn.sample_keys(jax.random.PRNGKey(0), jnp.arange(3))
  tokens = jax.jit(lambda y, k: prior_pixelcnn.sample_tokens(apply_fn, y, k, (H, W)))(labels, keys)
  want = (np.asarray(labels)[:, None] + 3 + np.arange(H * W)[None]) % K
  np.testing.assert_array_equal(np.asarray(tokens).reshape(3, -1), want)


@pytest.mark.slow
def test_sampling_is_deterministic_per_sample_and_batch_independent(model_and_params):
  model, params, _, _ = model_and_params
  config = ConfigDict(dict(num_classes=3, sampling=dict(temperature=1.0)))
  sample = prior_pixelcnn.make_sample_fn(model, config, (H, W))
  key = jax.random.PRNGKey(7)
  labels = jnp.asarray([0, 1, 2, 0])
  all4 = sample(params, labels, prior_pixelcnn.sample_keys(key, jnp.arange(4)))
  again = sample(params, labels, prior_pixelcnn.sample_keys(key, jnp.arange(4)))
  np.testing.assert_array_equal(np.asarray(all4), np.asarray(again))
  last2 = sample(params, labels[2:], prior_pixelcnn.sample_keys(key, jnp.arange(2, 4)))
  np.testing.assert_array_equal(np.asarray(last2), np.asarray(all4[2:]))
  assert all4.dtype == jnp.int32 and int(all4.min()) >= 0 and int(all4.max()) < K
  other = sample(params, labels, prior_pixelcnn.sample_keys(jax.random.PRNGKey(8), jnp.arange(4)))
  assert np.any(np.asarray(other) != np.asarray(all4))


def test_cpu_conv_library_picks_the_compile_options_not_the_values(model_and_params):
  """pixelcnn.cpu_conv_library compiles the PixelCNN's programs for another convolution
  library on the CPU: the same logits (to float32 rounding), a checked key, and a config
  without the key (an older workdir) keeps XLA's default."""
  model, params, tokens, labels = model_and_params
  c = prior_config.pixelcnn_config()
  c.tokenizer_workdir = "/runs/tok"
  assert c.pixelcnn.cpu_conv_library == "eigen"
  eigen = prior_pixelcnn.compiler_options(c)
  assert eigen == (layers.EIGEN_CONV_COMPILER_OPTIONS if jax.default_backend() == "cpu" else None)
  assert prior_pixelcnn.compiler_options(ConfigDict(dict(num_classes=3))) is None
  c.pixelcnn.cpu_conv_library = "ynn"
  assert prior_pixelcnn.compiler_options(c) is None
  apply = lambda p, t, y: model.apply({"params": p}, t, y)
  default = jax.jit(apply)(params, tokens, labels)
  chosen = jax.jit(apply, compiler_options=eigen)(params, tokens, labels)
  np.testing.assert_allclose(np.asarray(chosen), np.asarray(default), rtol=1e-5, atol=1e-5)
  c.pixelcnn.cpu_conv_library = "onednn"
  with pytest.raises(ValueError, match=r"config\.pixelcnn\.cpu_conv_library: "):
    prior_config.validate(c)
