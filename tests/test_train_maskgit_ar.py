"""The transformer priors (MaskGIT, the AR transformer) as stages of the training loop, on
token shards of a tiny tokenizer: training through main's stage table, exact resume, 1 and 8
devices, sampling through the CLI, the refusals (another tokenizer's shards, a vocabulary
above 2^16), the published sizes of the ImageNet configs, and the ADM reference batch in
evaluate_samples. The networks and their math are tested in tests/test_ar.py and
tests/test_maskgit.py.

The data is a small IDX folder of random images written here; the tokenizer is the tiny
VQ-VAE with random weights (K 64, 7x7 grids)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fixtures import write_idx
from device_env import simulated_devices
from model_fixtures import init_params
from run_helpers import override, read_scalars

from arcvq_jax import api, cli, evaluate_samples, main, prior_config, sample, tokenize
from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax import config as config_lib
from arcvq_jax.data import token_shards
from arcvq_jax.evaluation import fid as fid_lib
from arcvq_jax.models import ar, maskgit
from arcvq_jax.train import prior_common, prior_transformer
from arcvq_jax.train import state as state_lib
from configs import imagenet_ar, imagenet_maskgit, tiny, tiny_ar, tiny_maskgit

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST = 96, 16
CONFIGS = {"maskgit": tiny_maskgit, "ar": tiny_ar}


def write_tokenizer(workdir, data_path, seed=3, variant="arcvq", **overrides):
  """A tiny VQ-VAE tokenizer workdir (random weights) whose config.data reads `data_path`."""
  c = override(tiny.get_config(variant), **{"data.path": str(data_path), **overrides})
  model = state_lib.build_model(c, channels=1)
  params = init_params(model, jnp.zeros((1, 28, 28, 1)), seed=seed)
  api.write_workdir(str(workdir), c, params, image_shape=(28, 28, 1), step=0)
  return str(workdir)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """{'data': IDX dir, 'tok': tokenizer workdir, 'shards': its train split as token shards}."""
  root = tmp_path_factory.mktemp("token_priors")
  rng = np.random.default_rng(0)
  (root / "data").mkdir()
  for prefix, n in (("train", NUM_TRAIN), ("t10k", NUM_TEST)):
    write_idx(
      str(root / "data" / f"{prefix}-images-idx3-ubyte"),
      rng.integers(0, 256, (n, 28, 28), dtype=np.uint8),
    )
    write_idx(
      str(root / "data" / f"{prefix}-labels-idx1-ubyte"), rng.integers(0, 10, (n,), dtype=np.uint8)
    )
  tok = write_tokenizer(root / "tok", root / "data")
  shards = str(root / "shards")
  tokenize.tokenize_split(tok, shards, split="train", images_per_shard=48, batch_size=48)
  return dict(root=root, data=str(root / "data"), tok=tok, shards=shards)


def prior(stage, env, **overrides):
  c = CONFIGS[stage].get_config()
  c.tokenizer_workdir = env["tok"]
  c.data.token_shards = env["shards"]
  c.batch_size = 16
  return override(c, **overrides)


def restored(workdir, step):
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir))
  state = checkpointer.restore(step, None, None)
  checkpointer.close()
  return state


@pytest.fixture(scope="module", params=["maskgit", "ar"])
def trained(request, env, tmp_path_factory):
  """(stage, workdir) of a tiny prior trained for 4 steps from the shards through main's
  stage table, with its preview grid at step 4."""
  stage = request.param
  workdir = str(tmp_path_factory.mktemp(f"{stage}_full"))
  metrics = main.STAGES[stage](prior(stage, env), workdir)
  assert np.isfinite(metrics["loss"]) and 0 <= metrics["accuracy"] <= 1
  return stage, workdir


# --------------------------------------------------------------------------- the stages


@pytest.mark.slow
def test_a_stopped_run_resumes_exactly(trained, env, tmp_path):
  stage, full = trained
  assert ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(full)).all_steps() == [2, 4]
  assert not os.path.exists(os.path.join(full, "latents"))  # no precompute pass
  resumed = str(tmp_path / "resumed")
  prior_transformer.train_and_evaluate(prior(stage, env, num_train_steps=2), resumed)
  prior_transformer.train_and_evaluate(prior(stage, env), resumed)
  a, b = restored(full, 4), restored(resumed, 4)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):  # params, EMA, Adam
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  assert int(a["step"]) == 4 and a["ema_params"] is not None
  la, lb = read_scalars(full, "train/loss"), read_scalars(resumed, "train/loss")
  assert sorted(lb) == [1, 2, 3, 4] and [la[s] for s in range(1, 5)] == [lb[s] for s in range(1, 5)]
  # The warm-up (tiny_maskgit: 2 steps) is in the optimizer state: resumed with it.
  extra = {"maskgit": "train/mask_fraction", "ar": "train/bits_per_token"}[stage]
  assert sorted(read_scalars(full, extra)) == [1, 2, 3, 4]


@pytest.mark.slow
def test_the_cli_samples_with_the_stages_flags(trained, tmp_path):
  stage, full = trained
  flags = {
    "maskgit": ["--decode_steps=3", "--choice_temperature=2.0", "--guidance_scale=1.5"],
    "ar": ["--top_k=5", "--top_p=0.9", "--temperature=0.8", "--guidance_scale=1.5"],
  }[stage]
  out = str(tmp_path / "cli")
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "arcvq_jax.sample",
      f"--workdir={full}",
      "--num_samples=5",
      "--labels=4",
      "--batch_size=4",
      "--use_ema",
      f"--out={out}",
      *flags,
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  with np.load(os.path.join(out, "samples.npz")) as d:
    images, labels = d["images"], d["labels"]
  assert images.shape == (5, 28, 28, 1) and images.dtype == np.uint8
  assert list(labels) == [4] * 5
  with open(os.path.join(out, "sample_info.json")) as f:
    info = json.load(f)
  assert info["stage"] == stage and info["step"] == 4 and info["use_ema"] is True
  for flag in flags:
    key, value = flag[2:].split("=")
    assert info[key] == type(info[key])(value), (key, info[key])
  # Sample i depends on (seed, i) only: the same images in batches of 2.
  settings = {f[2:].split("=")[0]: float(f.split("=")[1]) for f in flags}
  settings = {k: int(v) if k in ("decode_steps", "top_k") else v for k, v in settings.items()}
  again = sample.run(
    api.load_config(full),
    full,
    num_samples=3,
    labels="4",
    out=str(tmp_path / "py"),
    batch_size=2,
    use_ema=True,
    **settings,
  )
  with np.load(os.path.join(again, "samples.npz")) as d:
    np.testing.assert_array_equal(d["images"], images[:3])
  # A flag of the other stage is refused by name.
  other = "--top_k=3" if stage == "maskgit" else "--decode_steps=3"
  proc = subprocess.run(
    [sys.executable, "-m", "arcvq_jax.sample", f"--workdir={full}", "--num_samples=2", other],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {other.split('=')[0]}")


@pytest.mark.slow
def test_one_and_eight_devices_give_the_same_steps():
  proc = subprocess.run(
    [sys.executable, os.path.join(ROOT, "tests", "token_prior_multidevice_script.py")],
    env=simulated_devices(8, unoptimised=True),
    capture_output=True,
    text=True,
    timeout=900,
  )
  assert proc.returncode == 0, proc.stderr[-4000:]
  line = [t for t in proc.stdout.splitlines() if t.startswith("RESULT")][-1]
  results = json.loads(line[len("RESULT") :])
  for stage, r in results.items():
    assert r["one"]["fsdp_leaves"] == 0 and r["fsdp"]["fsdp_leaves"] >= 20, stage
    assert r["fsdp"]["embedding_spec"] == "P(None, 'fsdp')"  # the param_rules entry
    np.testing.assert_allclose(r["fsdp"]["losses"], r["one"]["losses"], rtol=1e-5)
    for key in ("params", "ema"):
      np.testing.assert_allclose(r["fsdp"][key], r["one"][key], rtol=1e-6)


# --------------------------------------------------------------------------- the refusals


def test_a_prior_refuses_another_tokenizers_shards(env, tmp_path):
  other = write_tokenizer(tmp_path / "other_tok", env["data"], seed=11)
  workdir = tmp_path / "prior"
  for stage in ("maskgit", "ar"):
    with pytest.raises(
      token_shards.TokenShardsError,
      match=f"this prior's config.tokenizer_workdir uses tokenizer {other}",
    ):
      prior_transformer.train_and_evaluate(prior(stage, env, tokenizer_workdir=other), str(workdir))
    assert not os.path.exists(workdir / prior_common.TOKENIZER_RECORD)  # nothing pinned


def test_a_vocabulary_above_two_to_the_sixteen_is_one_line(env, tmp_path):
  big = write_tokenizer(
    tmp_path / "lfq17", env["data"], variant="lfq", **{"quantizer.embed_dim": 17}
  )
  c = prior("ar", env, tokenizer_workdir=big, **{"tokenizer_expect.num_codes": 0})
  c.data.token_shards = None
  c.tokenizer_expect.latent_shape = ()
  workdir = tmp_path / "prior"
  with pytest.raises(ValueError) as e:
    prior_transformer.train_and_evaluate(c, str(workdir))
  message = str(e.value)
  assert message.startswith(f"config.tokenizer_workdir: the tokenizer at {big} (step 0): ")
  assert "131072 codes" in message and "factorized heads" in message
  assert "\n" not in message and cli.is_user_error(e.value)
  assert not os.path.exists(workdir / prior_common.TOKENIZER_RECORD)
  c = override(tiny_maskgit.get_config(), tokenizer_workdir="tok")
  c.tokenizer_expect.num_codes = 2**16 + 1
  with pytest.raises(
    ValueError, match=r"^config\.tokenizer_expect\.num_codes: a token prior over 65537"
  ):
    prior_config.validate(c)
  prior_config.validate(override(c, **{"tokenizer_expect.num_codes": 2**16}))


@pytest.mark.parametrize(
  ("stage", "key", "value", "match"),
  [
    ("ar", "sampling.top_p", 0.0, r"config\.sampling\.top_p: must be in \(0, 1\]"),
    ("ar", "sampling.top_k", -1, r"config\.sampling\.top_k: must be an integer >= 0"),
    ("ar", "ar.num_heads", 16, r"config\.ar\.num_heads: gives heads of 2 channels"),
    ("ar", "guidance.cond_drop_prob", 0.0, r"guidance_scale: is 1\.5 but .* without label"),
    ("maskgit", "sampling.decode_steps", 0, r"config\.sampling\.decode_steps: must be"),
    ("maskgit", "maskgit.dim", 33, r"config\.maskgit\.dim: 33 is not divisible"),
    ("maskgit", "num_classes", 0, r"guidance_scale: is 1\.5 but the model is unconditional"),
  ],
)
def test_bad_settings_are_refused_by_key(stage, key, value, match):
  c = CONFIGS[stage].get_config()
  c.tokenizer_workdir = "tok"
  c.sampling.guidance_scale = 1.5
  prior_config.validate(c)
  with pytest.raises(ValueError, match=match):
    prior_config.validate(override(c, **{key: value}))


def test_check_sections_names_the_token_priors_config_files():
  for stage in ("maskgit", "ar"):
    c = tiny.get_config()
    c.stage = stage
    with pytest.raises(ValueError, match=f"configs/tiny_{stage}.py") as e:
      config_lib.check_sections(c, "configs/tiny.py")
    assert stage in str(e.value) and "guidance" in str(e.value)


# --------------------------------------------------------------------------- published sizes


def num_params(model: object) -> int:
  labels = jnp.zeros((1,), jnp.int32)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.PRNGKey(0), jnp.zeros((1, 256), jnp.int32), labels)
  )
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(shapes))


def llamagen_count(dim: int, depth: int, vocab: int = 16384, classes: int = 1000) -> int:
  """LlamaGen's GPT by hand: wqkv, wo, SwiGLU (2/3 of 4 dim, up to a multiple of 256) and two
  RMSNorm scales per layer; token embedding, class embedding (+ null), final norm, head."""
  hidden = -(-int(2 * 4 * dim / 3) // 256) * 256
  layer = 3 * dim * dim + dim * dim + 3 * dim * hidden + 2 * dim
  return depth * layer + vocab * dim + (classes + 1) * dim + dim + dim * vocab


@pytest.mark.parametrize(("variant", "published"), [("b", 111e6), ("l", 343e6)])
def test_imagenet_ar_has_llamagens_sizes(variant, published):
  c = imagenet_ar.get_config(variant)
  c.tokenizer_workdir = "tok"
  prior_config.validate(c)
  model = prior_transformer.model_from_config(c, num_codes=16384, grid=(16, 16))
  assert isinstance(model, ar.ARTransformer)
  count = num_params(model)
  assert count == llamagen_count(c.ar.dim, c.ar.depth)
  assert round(count / 1e6) == published / 1e6  # LlamaGen's table: 111M and 343M
  assert c.sampling.guidance_scale == {"b": 2.0, "l": 2.0}[variant]


def test_imagenet_maskgit_has_maskgits_size():
  c = imagenet_maskgit.get_config()
  c.tokenizer_workdir = "tok"
  prior_config.validate(c)
  model = prior_transformer.model_from_config(c, num_codes=1024, grid=(16, 16))
  assert isinstance(model, maskgit.MaskGITTransformer)
  d = c.maskgit.dim
  # 24 layers as LlamaGen-B's (SwiGLU 2048 wide: the parameters of a 3072-wide GELU MLP),
  # V + 1 token rows ([MASK]), 1 + N learned positions, a head with a bias.
  layer = 4 * d * d + 3 * d * 2048 + 2 * d
  expected = 24 * layer + 1025 * d + 1001 * d + 257 * d + d + d * 1024 + 1024
  assert num_params(model) == expected
  assert (c.maskgit.depth, c.maskgit.dim, c.maskgit.num_heads) == (24, 768, 16)
  assert (c.sampling.decode_steps, c.sampling.choice_temperature) == (8, 4.5)


# --------------------------------------------------------------------------- the ADM batch


class FakeExtractor:
  """Stands in for the Inception: pool features (B, 2048) are the images' pixels tiled
  (a fixed function of the image), logits uniform."""

  batch_size = 4
  fingerprint = "fake"

  def __call__(self, images, mask):
    x = np.asarray(images, np.float64).reshape(len(images), -1)[:, :2048]
    pool = np.tile(x, (1, -(-2048 // x.shape[1])))[:, :2048][np.asarray(mask)]
    return pool, np.zeros((len(pool), 1008))


def write_adm_batch(path, images, mu, sigma):
  """The layout of guided-diffusion's reference batches (VIRTUAL_imagenet256_labeled.npz):
  arr_0 the images, mu / sigma the 2048-d pool statistics, mu_s / sigma_s the spatial ones."""
  np.savez(path, arr_0=images, mu=mu, sigma=sigma, mu_s=mu[:4], sigma_s=sigma[:4, :4])


@pytest.mark.slow  # the Frechet distance of 2048-d covariances (a matrix square root)
def test_the_adm_reference_batch_is_read_as_its_statistics_and_images(tmp_path):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (12, 8, 8, 3), dtype=np.uint8)
  a = rng.normal(size=(2048, 2048))
  mu, sigma = rng.normal(size=2048), a @ a.T / 2048
  path = str(tmp_path / "VIRTUAL_fake_labeled.npz")
  write_adm_batch(path, images, mu, sigma)
  assert evaluate_samples.is_adm_batch(path)
  ours = str(tmp_path / "ours.npz")
  stats = fid_lib.FeatureStats(keep=4)
  stats.update(rng.normal(size=(6, 2048)))
  stats.save(ours)
  assert not evaluate_samples.is_adm_batch(ours)

  ref, images_stats = evaluate_samples.load_adm_batch(path)  # mu / sigma, no image read
  got_mu, got_sigma = ref.mean_cov()
  np.testing.assert_array_equal(got_mu, mu)
  np.testing.assert_array_equal(got_sigma, sigma)
  assert ref.info["image_shape"] == [8, 8, 3] and ref.info["source"].startswith("ADM")
  assert images_stats is None and len(ref.features) == 0 and ref.count == 0
  # With its images: their features (precision / recall) and their own statistics.
  ref, images_stats = evaluate_samples.load_adm_batch(path, FakeExtractor(), keep=10)
  np.testing.assert_array_equal(ref.mean_cov()[0], mu)  # FID still against the file's
  own = FakeExtractor()(images, np.ones(12, bool))[0]
  assert len(ref.features) == 10
  assert all(any(np.allclose(f, o) for o in own) for f in ref.features)
  np.testing.assert_allclose(images_stats.mean_cov()[0], own.mean(0), rtol=1e-12)
  np.testing.assert_allclose(images_stats.mean_cov()[1], np.cov(own, rowvar=False), atol=1e-8)
  # FID of a set (its own images here) against it: the Frechet distance to mu / sigma.
  samples = evaluate_samples.NpzSamples(path)
  result = evaluate_samples.evaluate_samples(
    samples, ref, FakeExtractor(), pr_features=10, reference_images=images_stats
  )
  want = fid_lib.frechet_distance(own.mean(0), np.cov(own, rowvar=False), mu, sigma)
  np.testing.assert_allclose(result["fid"], want, rtol=1e-6)
  assert abs(result["fid_reference_images"]) < 1e-6 * want  # sqrtm of singular covariances
  assert result["precision"] == result["recall"] == 1.0  # the same images on both sides
  assert result["reference"].startswith("ADM reference batch")
