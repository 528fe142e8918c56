"""The evaluation commands end to end: `python -m arcvq_jax.evaluate` on a tiny trained run and
`python -m arcvq_jax.evaluate_samples` on sample files, with random Inception and LPIPS weights
of the right shapes (the real ones cannot be downloaded here; their networks are tested against
the reference implementations in test_inception.py and test_lpips.py)."""

from __future__ import annotations

import glob
import json
import os
import shutil
import subprocess
import sys

import jax
import numpy as np
import pytest
from data_fixtures import raw_idx_images
from model_fixtures import random_lpips_params
from PIL import Image
from run_helpers import override, read_all_scalars, read_image_tags

from arcvq_jax import api, checkpoint_files
from arcvq_jax import evaluate as evaluate_lib
from arcvq_jax import evaluate_samples as samples_lib
from arcvq_jax.evaluation import diagnostics
from arcvq_jax.evaluation import fid as fid_lib
from arcvq_jax.evaluation import inception as inception_lib
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.train import tokenizer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)


def inception_features(params, images, batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(pool, logits) of `images` by the extractor the commands build with this batch size: the
  same program, which the session's compile cache then holds (the network itself is checked
  against pytorch-fid in test_inception.py)."""
  return inception_lib.InceptionFeatures(params, batch_size=batch_size)(images)


def run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=900,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
  folder = tmp_path_factory.mktemp("weights")
  paths = dict(inception=str(folder / "inception.npz"), lpips=str(folder / "lpips.npz"))
  inception_lib.save_params(inception_lib.random_params(0), paths["inception"])
  lpips_lib.save_params(random_lpips_params(0), paths["lpips"])
  return paths


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A tiny ArcVQ-VAE trained 6 steps (evaluated on the 10k test images by the loop)."""
  from configs import tiny  # noqa: PLC0415 (configs/ is not a package; ROOT is on sys.path)

  workdir = str(tmp_path_factory.mktemp("run"))
  tokenizer.train_and_evaluate(override(tiny.get_config(), eval_batch_size=2000), workdir)
  return workdir


@pytest.mark.slow
@needs_fashion
def test_training_writes_the_codebook_diagnostics(trained):
  for name in diagnostics.PLOTS:
    assert os.path.exists(os.path.join(trained, "diagnostics", f"step_6_codebook_{name}.png"))
  assert read_image_tags(trained)["codebook/distances"] == {6}


@pytest.mark.slow
@pytest.mark.xla_optimised  # runs long enough for XLA's optimisations to pay
@needs_fashion
def test_evaluate_command_writes_json_markdown_plots_and_rfid(trained, weights):
  n = 12
  proc = run(
    "arcvq_jax.evaluate",
    f"--workdir={trained}",
    f"--num_images={n}",
    f"--inception_path={weights['inception']}",
    f"--lpips_path={weights['lpips']}",
    "--batch_size=8",
    "--inception_batch_size=6",
  )  # 12 images: a full and a part batch
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "12 images for 2048-dimensional Inception features" in proc.stderr  # the warning
  out = os.path.join(trained, "evaluation")
  with open(os.path.join(out, "test_step_6.json")) as f:
    record = json.load(f)
  assert record["step"] == 6 and record["split"] == "test" and record["num_images"] == n
  for key in ("psnr", "ssim", "lpips", "rfid", "mse", "codebook_usage", "perplexity"):
    assert np.isfinite(record[key]), key
  with open(os.path.join(out, "test_step_6.md")) as f:
    table = f.read()
  assert table.splitlines()[0].startswith("| split | step | images | PSNR | SSIM | LPIPS | rFID")
  assert f"| test | 6 | 12 | {record['psnr']:.2f} |" in table
  for name in diagnostics.PLOTS:
    with Image.open(os.path.join(out, f"test_step_6_codebook_{name}.png")) as img:
      assert img.format == "PNG"
  assert read_image_tags(trained)["evaluate_test/usage"] == {6}
  assert read_all_scalars(trained)["evaluate_test/rfid"][6] == pytest.approx(record["rfid"])

  # rFID is the Frechet distance of the Inception features of the first 12 test images and
  # of their reconstructions by the checkpoint, computed here directly.
  tok = api.Tokenizer.from_workdir(trained)
  from arcvq_jax.data import pipeline  # noqa: PLC0415

  x = next(iter(pipeline.create_eval_iterator(tok.config.data, global_batch_size=n)))["image"]
  x_hat, _ = tok.reconstruct(x)
  params = inception_lib.load_params(weights["inception"])
  real, fake = (np.asarray(inception_features(params, a, 6)[0], np.float64) for a in (x, x_hat))
  want = fid_lib.frechet_distance(
    real.mean(0), np.cov(real, rowvar=False), fake.mean(0), np.cov(fake, rowvar=False)
  )
  assert want > 0
  assert record["rfid"] == pytest.approx(want, rel=1e-4)
  lpips_want = jax.jit(lpips_lib.lpips_distance)(lpips_lib.load_params(weights["lpips"]), x, x_hat)
  assert record["lpips"] == pytest.approx(float(np.mean(lpips_want)), rel=1e-5)


@pytest.mark.slow
@needs_fashion
def test_metrics_on_the_whole_split_equal_the_training_loops(trained):
  with open(os.path.join(trained, "eval_results.json")) as f:
    loop = json.load(f)
  params, step = api.restore_params(trained)
  results, counts = evaluate_lib.evaluate_checkpoint(
    api.load_config(trained), params, split="test", batch_size=2000
  )
  assert step == loop["step"] == 6 and results["num_images"] == 10000
  for key in ("mse", "psnr", "ssim", "codebook_usage", "perplexity"):
    assert results[key] == pytest.approx(loop[key], rel=1e-6), key
  assert counts.sum() == 10000 * 7 * 7 and np.mean(counts > 0) == loop["codebook_usage"]


def test_missing_weights_are_skipped_with_the_command_that_makes_them(tmp_path, weights):
  none = str(tmp_path / "none.npz")
  params, skipped = evaluate_lib.load_weights("rfid", none, [])
  assert params is None and skipped["reason"] == f"no rFID weights file at {none}"
  assert "wget -nc https://github.com/mseitzer/pytorch-fid/releases/" in skipped["fix"]
  assert "python -m arcvq_jax.convert.inception_weights --pt=" in skipped["fix"]
  assert skipped["fix"].endswith(f"--out={none}")
  params, skipped = evaluate_lib.load_weights("lpips", none, [])
  assert params is None and "arcvq_jax.convert.lpips_weights --vgg16=" in skipped["fix"]
  assert evaluate_lib.load_weights("lpips", weights["lpips"], ["lpips"])[1]["reason"] == (
    "--skip=lpips was given"
  )
  params, skipped = evaluate_lib.load_weights("lpips", weights["lpips"], [])
  assert params is not None and skipped is None
  with pytest.raises(
    inception_lib.InceptionWeightsError,
    match=r"--strict.*python -m arcvq_jax\.convert\.inception_weights --pt=.* \(or pass "
    r"--skip=rfid to evaluate without rFID\)",
  ):
    evaluate_lib.load_weights("rfid", none, [], strict=True)
  damaged = tmp_path / "damaged.npz"
  damaged.write_bytes(b"not an npz")
  with pytest.raises(lpips_lib.LPIPSWeightsError, match=r"not a readable \.npz"):
    evaluate_lib.load_weights("lpips", str(damaged), [])  # there but broken: an error


def test_lpips_params_for_training(tmp_path, weights):
  from configs import tiny, tiny_vqgan  # noqa: PLC0415

  vqgan = tiny_vqgan.get_config()
  assert vqgan.loss.perceptual_weight == 0 and lpips_lib.params_for_training(vqgan) is None
  vqgan.lpips_path = str(tmp_path / "none.npz")  # perceptual weight 0: never needed
  assert lpips_lib.params_for_training(vqgan) is None
  vqgan.lpips_path = weights["lpips"]  # there: evaluation reports LPIPS
  assert lpips_lib.params_for_training(vqgan) is not None
  vqgan.loss.perceptual_weight = 1.0
  assert lpips_lib.params_for_training(vqgan) is not None
  vqgan.lpips_path = str(tmp_path / "none.npz")
  with pytest.raises(lpips_lib.LPIPSWeightsError, match=r"arcvq_jax\.convert\.lpips_weights"):
    lpips_lib.params_for_training(vqgan)
  vqvae = tiny.get_config()
  assert lpips_lib.params_for_training(vqvae) is None
  vqvae.lpips_path = str(tmp_path / "none.npz")
  assert lpips_lib.params_for_training(vqvae) is None


@pytest.mark.slow
@needs_fashion
def test_evaluate_without_weights_computes_the_rest_and_lists_what_it_skipped(trained, tmp_path):
  missing = [f"--inception_path={tmp_path}/no_inception.npz", f"--lpips_path={tmp_path}/no.npz"]
  proc = run("arcvq_jax.evaluate", f"--workdir={trained}", "--num_images=8", *missing)
  assert proc.returncode == 0, proc.stderr[-3000:]
  with open(os.path.join(trained, "evaluation", "test_step_6.json")) as f:
    record = json.load(f)
  assert record["lpips"] is None and record["rfid"] is None
  for key in ("psnr", "ssim", "mse", "codebook_usage", "perplexity"):
    assert np.isfinite(record[key]), key
  assert sorted(record["skipped"]) == ["lpips", "rfid"]
  assert record["skipped"]["lpips"]["reason"] == f"no LPIPS weights file at {tmp_path}/no.npz"
  assert "arcvq_jax.convert.inception_weights" in record["skipped"]["rfid"]["fix"]
  assert "eval-split usage" in record["notes"]["codebook_usage"]
  console = " ".join(proc.stdout.split())
  assert f"LPIPS skipped: no LPIPS weights file at {tmp_path}/no.npz. To include it: pip" in console
  assert "rFID skipped: no rFID weights file" in console
  with open(os.path.join(trained, "evaluation", "test_step_6.md")) as f:
    assert "| n/a | n/a |" in f.read()

  strict = run("arcvq_jax.evaluate", f"--workdir={trained}", "--num_images=8", "--strict", *missing)
  assert strict.returncode == 2 and "Traceback" not in strict.stderr, strict.stderr[-3000:]
  assert "arcvq_jax.convert.lpips_weights" in " ".join(strict.stderr.split())


@pytest.mark.slow
@needs_fashion
def test_evaluate_on_a_workdir_with_a_damaged_newest_checkpoint(trained, tmp_path):
  workdir = str(tmp_path / "run")
  shutil.copytree(trained, workdir)
  checkpoints = os.path.join(workdir, "checkpoints")
  assert checkpoint_files.checkpoint_steps(checkpoints) == [3, 6]
  arrays = glob.glob(os.path.join(checkpoints, "6", "state", "ocdbt.process_0", "d", "*"))
  with open(max(arrays, key=os.path.getsize), "r+b") as f:
    f.truncate(100)
  proc = run("arcvq_jax.evaluate", f"--workdir={workdir}", "--num_images=8", "--skip=lpips,rfid")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "step 6" in proc.stderr and "damaged" in proc.stderr
  # orbax's reads abandoned in the damaged step print nothing (they printed ~2,000 lines)
  for noise in ("Traceback", "Exception ignored", "never retrieved", "Event loop is closed"):
    assert noise not in proc.stderr, noise
  with open(os.path.join(workdir, "evaluation", "test_step_3.json")) as f:
    assert json.load(f)["step"] == 3
  # The tokenizer API reads the same step; the files stay where they are (read-only).
  tok = api.Tokenizer.from_workdir(workdir)
  state, step = checkpoint_files.restore_newest_state(checkpoints)
  assert step == 3
  np.testing.assert_array_equal(tok.params["codebook"], state["params"]["codebook"])
  assert checkpoint_files.checkpoint_steps(checkpoints) == [3, 6]


# ------------------------------------------------------------------------- evaluate_samples


def toy_images(n: int, seed: int, size: int = 16) -> np.ndarray:
  """(n, size, size, 3) uint8: smooth random blobs (not pure noise)."""
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[:size, :size] / size
  out = []
  for _ in range(n):
    c = rng.uniform(0, 1, (3, 3))
    img = np.stack([np.sin(6 * (c[k, 0] * xx + c[k, 1] * yy) + 6 * c[k, 2]) for k in range(3)], -1)
    out.append(np.round((img + 1) * 127.5).astype(np.uint8))
  return np.stack(out)


@pytest.fixture(scope="module")
def extractor(weights):
  return inception_lib.InceptionFeatures(
    inception_lib.load_params(weights["inception"]), batch_size=6
  )


@pytest.mark.slow
def test_npz_folder_and_float_samples_read_the_same_images(tmp_path, extractor):
  images = toy_images(10, 0)
  np.savez(str(tmp_path / "u8.npz"), images=images)
  np.savez_compressed(str(tmp_path / "f32.npz"), arr_0=images / 127.5 - 1.0)  # ADM's key
  os.makedirs(tmp_path / "png" / "sub")
  for i, img in enumerate(images):
    Image.fromarray(img).save(tmp_path / "png" / ("sub" if i % 2 else "") / f"{i:03d}.png")
  u8 = samples_lib.open_samples(str(tmp_path / "u8.npz"))
  rows = [r[m] for r, m in u8.batches(4)]
  assert [len(r) for r in rows] == [4, 4, 2]
  np.testing.assert_array_equal(np.concatenate(rows), images)
  floats = np.concatenate(
    [r[m] for r, m in samples_lib.open_samples(str(tmp_path / "f32.npz")).batches(4)]
  )
  assert floats.dtype == np.float32
  np.testing.assert_allclose(floats, images / 127.5 - 1.0, atol=1e-6)
  folder = samples_lib.open_samples(str(tmp_path / "png"))
  assert folder.num_images == 10 and folder.image_shape == (16, 16, 3)
  a = samples_lib.compute_stats(u8, extractor, keep=10)
  b = samples_lib.compute_stats(folder, extractor, keep=10)
  for x, y in zip(a.mean_cov(), b.mean_cov(), strict=True):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-9)
  assert samples_lib.open_samples(str(tmp_path / "u8.npz"), limit=3).num_images == 3


def test_image_set_errors(tmp_path):
  os.makedirs(tmp_path / "mixed")
  Image.fromarray(toy_images(1, 0)[0]).save(tmp_path / "mixed" / "a.png")
  Image.fromarray(toy_images(1, 0, size=20)[0]).save(tmp_path / "mixed" / "b.png")
  mixed = samples_lib.open_samples(str(tmp_path / "mixed"))
  with pytest.raises(samples_lib.ImageSetError, match=r"b\.png is 20x20 but .*a\.png is 16x16"):
    list(mixed.batches(2))
  np.savez(str(tmp_path / "wrong.npz"), x=np.zeros((2, 4, 4, 3), np.uint8))
  with pytest.raises(samples_lib.ImageSetError, match=r"no array 'images' or 'arr_0'"):
    samples_lib.open_samples(str(tmp_path / "wrong.npz"))
  np.savez(str(tmp_path / "int.npz"), images=np.zeros((2, 4, 4, 3), np.int32))
  with pytest.raises(samples_lib.ImageSetError, match="dtype int32"):
    samples_lib.open_samples(str(tmp_path / "int.npz"))
  a, b = dict(image_shape=(16, 16, 3)), dict(image_shape=[32, 32, 3])
  with pytest.raises(samples_lib.ImageSetError, match="16x16 images but the reference's are 32x32"):
    samples_lib.check_comparable(a, b)
  samples_lib.check_comparable(a, b, allow_size_mismatch=True)
  with pytest.raises(fid_lib.StatisticsError, match="other Inception weights"):
    samples_lib.check_comparable(dict(a, network="bbbb"), dict(a, network="aaaa"))


@pytest.mark.slow
@pytest.mark.xla_optimised  # runs long enough for XLA's optimisations to pay
def test_evaluate_samples_command_caches_the_reference(tmp_path, weights):
  samples, reference = toy_images(24, 1), toy_images(30, 2)
  np.savez(str(tmp_path / "samples.npz"), images=samples)
  os.makedirs(tmp_path / "ref")
  for i, img in enumerate(reference):
    Image.fromarray(img).save(tmp_path / "ref" / f"{i:03d}.png")
  stats = str(tmp_path / "cache" / "ref_stats.npz")
  common = [
    f"--inception_path={weights['inception']}",
    "--batch_size=12",
    f"--reference_stats={stats}",
  ]
  first = run("arcvq_jax.evaluate_samples", *common, f"--reference={tmp_path / 'ref'}")
  assert first.returncode == 0, first.stderr[-3000:]
  assert "reference statistics of 30 images" in first.stdout
  cached = fid_lib.FeatureStats.load(stats)
  assert cached.count == 30 and cached.info["image_shape"] == [16, 16, 3]
  assert cached.info["network"] == inception_lib.fingerprint(
    inception_lib.load_params(weights["inception"])
  )

  out = str(tmp_path / "results.json")
  second = run(
    "arcvq_jax.evaluate_samples", *common, f"--samples={tmp_path / 'samples.npz'}", f"--out={out}"
  )  # no --reference: the cached statistics are used
  assert second.returncode == 0, second.stderr[-3000:]
  with open(out) as f:
    results = json.load(f)
  assert results["num_samples"] == 24 and results["num_reference"] == 30
  assert "24 images for 2048-dimensional" in second.stderr
  for key in ("fid", "inception_score", "precision", "recall"):
    assert np.isfinite(results[key]), key
  assert results["fid"] > 0 and 1 <= results["inception_score"] <= 1008
  assert 0 <= results["precision"] <= 1 and 0 <= results["recall"] <= 1
  with open(str(tmp_path / "results.md")) as f:
    assert f.read().startswith("| samples | reference | FID | IS | precision | recall |")

  # The same numbers from the library, on the same features.
  params = inception_lib.load_params(weights["inception"])
  pool_s, logits_s = (np.asarray(a, np.float64) for a in inception_features(params, samples, 12))
  pool_r = np.asarray(inception_features(params, reference, 12)[0], np.float64)
  assert results["fid"] == pytest.approx(
    fid_lib.frechet_distance(
      pool_s.mean(0), np.cov(pool_s, rowvar=False), pool_r.mean(0), np.cov(pool_r, rowvar=False)
    ),
    rel=1e-4,
  )
  assert results["inception_score"] == pytest.approx(fid_lib.inception_score(logits_s)[0], rel=1e-4)
  want_pr = fid_lib.precision_recall(pool_r, pool_s)
  assert (results["precision"], results["recall"]) == pytest.approx(want_pr, abs=1 / 24)

  too_many = run(
    "arcvq_jax.evaluate_samples",
    *common,
    f"--samples={tmp_path / 'samples.npz'}",
    "--num_samples=50000",
  )
  assert too_many.returncode != 0
  assert "--num_samples=50000 but" in too_many.stderr and "has only 24" in too_many.stderr


@needs_fashion
def test_dataset_reference_reads_the_split_through_the_pipeline():
  from configs import tiny  # noqa: PLC0415

  data = tiny.get_config().data
  ref = samples_lib.DatasetSamples(data, "test", limit=5)
  assert ref.num_images == 5 and ref.image_shape == (28, 28, 1)
  batches = list(ref.batches(4))
  assert [m.tolist() for _, m in batches] == [[True] * 4, [True] + [False] * 3]
  got = np.concatenate([x[m] for x, m in batches])
  want = raw_idx_images(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz"))[:5]
  np.testing.assert_array_equal(np.round((got[..., 0] + 1) * 127.5), want)
