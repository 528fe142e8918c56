"""FD-FMNIST (arcvq_jax/evaluation/fd_fmnist.py): the Frechet distance in a small Fashion-MNIST
classifier's features. Checked against numpy and scipy on the same features, against the
invariants a distance between image sets must keep (a set with itself ~0, two samples of one
distribution close, noise and shuffled pixels far), and the classifier's files, determinism and
(slow) accuracy."""

from __future__ import annotations

import os
import warnings

import numpy as np
import pytest
import scipy.linalg
from data_fixtures import FASHION_MNIST_DIR

from arcvq_jax import npz_files
from arcvq_jax.data import idx
from arcvq_jax.evaluation import fd_fmnist
from arcvq_jax.evaluation import fid as fid_lib

pytestmark = pytest.mark.skipif(
  not os.path.exists(f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz"),
  reason="no Fashion-MNIST IDX files (launch/setup.sh installs them)",
)


@pytest.fixture(scope="module")
def data():
  train_images, train_labels = idx.load_idx_split(FASHION_MNIST_DIR, "train")
  test_images, test_labels = idx.load_idx_split(FASHION_MNIST_DIR, "test")
  return dict(train=(train_images, train_labels), test=(test_images, test_labels))


@pytest.fixture(scope="module")
def quick(data):
  """A classifier of 50 steps (seconds): its features already tell images from noise."""
  images, labels = data["train"]
  params = fd_fmnist.train_classifier(images[:6400], labels[:6400], epochs=1)
  return params, fd_fmnist.FMNISTFeatures(params)


def test_fd_of_a_split_with_itself_is_zero_and_far_below_noise_and_shuffled_pixels(data, quick):
  _, extractor = quick
  test, _ = data["test"]
  train, _ = data["train"]
  reference = fd_fmnist.image_stats(test, extractor, source="test")
  scale = np.trace(reference.mean_cov()[1])
  rng = np.random.default_rng(0)
  noise = rng.integers(0, 256, test.shape).astype(np.uint8)
  shuffled = test.reshape(len(test), -1)[:, rng.permutation(28 * 28)].reshape(test.shape)
  distances = {
    name: fd_fmnist.fd(fd_fmnist.image_stats(x, extractor, source=name), reference)
    for name, x in (("train", train[:10000]), ("noise", noise), ("shuffled", shuffled))
  }
  assert abs(fd_fmnist.fd(reference, reference)) < 1e-7 * scale  # float64 rounding
  # Another 10k images of the same distribution against images that are not Fashion-MNIST.
  assert distances["train"] < 0.02 * min(distances["noise"], distances["shuffled"]), distances
  assert distances["train"] > 0


def test_fd_is_the_frechet_distance_of_the_features_by_numpy_and_scipy(data, quick):
  _, extractor = quick
  a, b = data["test"][0][:3000], data["train"][0][:2000]
  fa, _ = extractor(a)
  fb, _ = extractor(b)
  mu_a, mu_b = fa.astype(np.float64).mean(0), fb.astype(np.float64).mean(0)
  s_a, s_b = (
    np.cov(fa.astype(np.float64), rowvar=False),
    np.cov(fb.astype(np.float64), rowvar=False),
  )
  with warnings.catch_warnings():  # ReLU units that never fire: singular covariances
    warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
    covmean = scipy.linalg.sqrtm(s_a @ s_b).real
  want = np.sum((mu_a - mu_b) ** 2) + np.trace(s_a + s_b - 2 * covmean)
  # image_stats streams the sets in the extractor's batches (500 rows, the last padded).
  got = fd_fmnist.fd(fd_fmnist.image_stats(a, extractor), fd_fmnist.image_stats(b, extractor))
  # to 1e-8 of the features' total variance (scipy's sqrtm of a singular product is the
  # less exact of the two)
  np.testing.assert_allclose(got, want, rtol=0, atol=1e-8 * np.trace(s_a))
  assert got > 0
  assert fa.shape == (3000, fd_fmnist.FEATURE_DIM)


def test_features_are_deterministic_and_do_not_depend_on_the_batch(data, quick):
  params, extractor = quick
  images = data["test"][0][:700]
  f1, l1 = extractor(images)
  f2, l2 = extractor(images)
  np.testing.assert_array_equal(f1, f2)
  np.testing.assert_array_equal(l1, l2)
  small = fd_fmnist.FMNISTFeatures(params, batch_size=64)
  f3, _ = small(images)
  np.testing.assert_allclose(f3, f1, rtol=1e-5, atol=1e-5)
  mask = np.arange(700) % 3 == 0
  f4, l4 = extractor(images, mask)
  np.testing.assert_array_equal(f4, f1[mask])
  np.testing.assert_array_equal(l4, l1[mask])


def test_floats_in_minus_one_one_read_as_the_uint8_levels_they_round_to(data, quick):
  _, extractor = quick
  u = data["test"][0][:100]
  x = u.astype(np.float32) / 127.5 - 1.0 + 0.001  # off the grid, rounds back to u
  np.testing.assert_array_equal(extractor(x)[0], extractor(u)[0])
  with pytest.raises(ValueError, match=r"\(B, 28, 28, 1\)"):
    extractor(np.zeros((2, 32, 32, 1), np.uint8))


def test_training_is_deterministic_from_its_seed(data):
  images, labels = data["train"][0][:1280], data["train"][1][:1280]
  a = fd_fmnist.train_classifier(images, labels, seed=3, epochs=1)
  b = fd_fmnist.train_classifier(images, labels, seed=3, epochs=1)
  c = fd_fmnist.train_classifier(images, labels, seed=4, epochs=1)
  assert fd_fmnist.fingerprint(a) == fd_fmnist.fingerprint(b)
  assert fd_fmnist.fingerprint(a) != fd_fmnist.fingerprint(c)


def test_a_saved_classifier_loads_back_and_a_damaged_one_is_refused(tmp_path, quick):
  params, extractor = quick
  path = str(tmp_path / "classifier.npz")
  fd_fmnist.save_classifier(params, path, dict(test_accuracy=0.5, seed=0))
  loaded, info = fd_fmnist.load_classifier(path)
  assert info == dict(test_accuracy=0.5, seed=0, fingerprint=extractor.fingerprint)
  assert fd_fmnist.FMNISTFeatures(loaded).fingerprint == extractor.fingerprint

  flat = npz_files.read_npz(path)
  flat["logits/bias"] = flat["logits/bias"] + 1.0  # the weights change, the stored hash not
  npz_files.save_npz(path, flat)
  with pytest.raises(fd_fmnist.ClassifierError, match="damaged"):
    fd_fmnist.load_classifier(path)
  del flat["conv0/kernel"]
  npz_files.save_npz(path, flat)
  with pytest.raises(fd_fmnist.ClassifierError, match="conv0/kernel"):
    fd_fmnist.load_classifier(path)
  with pytest.raises(fd_fmnist.ClassifierError, match="Train one"):
    fd_fmnist.load_classifier(str(tmp_path / "missing.npz"))


def test_statistics_of_two_classifiers_are_never_compared(data, quick):
  _, extractor = quick
  other = fd_fmnist.FMNISTFeatures(fd_fmnist.init_params(1))
  images = data["test"][0][:500]
  with pytest.raises(fid_lib.StatisticsError, match="different networks"):
    fd_fmnist.fd(fd_fmnist.image_stats(images, extractor), fd_fmnist.image_stats(images, other))


def test_class_accuracy_by_hand():
  logits = np.array([[3, 1, 0], [0, 2, 1], [5, 0, 0], [0, 0, 1]], np.float32)
  logits = np.pad(logits, ((0, 0), (0, 7)), constant_values=-9)
  overall, per_class = fd_fmnist.class_accuracy(logits, np.array([0, 1, 1, 2]))
  assert overall == 0.75
  assert per_class[:3] == [1.0, 0.5, 1.0] and per_class[3:] == [None] * 7


def test_score_samples_reports_whether_the_classes_come_out_right(data, quick):
  _, extractor = quick
  images, labels = data["test"]
  reference = fd_fmnist.image_stats(images, extractor)
  right = fd_fmnist.score_samples(images[:1000], labels[:1000], reference, extractor)
  _, logits = extractor(images[:1000])
  assert right["class_accuracy"] == np.mean(np.argmax(logits, 1) == labels[:1000])
  assert right["class_accuracy"] > 0.5 and right["num_samples"] == 1000
  wrong = fd_fmnist.score_samples(images[:1000], (labels[:1000] + 1) % 10, reference, extractor)
  assert wrong["class_accuracy"] < 0.3
  assert wrong["fd_fmnist"] == right["fd_fmnist"]  # the labels do not enter the distance
  unconditional = fd_fmnist.score_samples(images[:200], np.full(200, -1), reference, extractor)
  assert unconditional["class_accuracy"] is None


@pytest.mark.slow
def test_the_default_classifier_is_above_85_percent_and_is_trained_once(tmp_path, monkeypatch):
  path = str(tmp_path / "classifier.npz")
  params, info = fd_fmnist.load_or_train(path, data_dir=FASHION_MNIST_DIR)
  assert info["test_accuracy"] > 0.85, info
  assert info["epochs"] == fd_fmnist.DEFAULT_EPOCHS and info["seed"] == 0
  images, labels = idx.load_idx_split(FASHION_MNIST_DIR, "test")
  assert fd_fmnist.accuracy(fd_fmnist.FMNISTFeatures(params), images, labels) == pytest.approx(
    info["test_accuracy"]
  )

  def no_training(*args, **kwargs):
    raise AssertionError("the file exists: it must be loaded, not trained again")

  monkeypatch.setattr(fd_fmnist, "train_classifier", no_training)
  _, again = fd_fmnist.load_or_train(path, data_dir=FASHION_MNIST_DIR)
  assert again == info
