"""imagenet2012 prepared for real by TFDS from a fake manual download, through our pipeline.

The fake ILSVRC2012 tars (tests/imagenet_fixtures.py) hold scikit-image photos
as JPEGs of 48-300 px per side, landscape and portrait, plus TFDS's special
cases (a CMYK JPEG, a PNG named .JPEG) and a grayscale JPEG. Every pipeline
image is checked against crops of the photo resized in this file.
"""

import json

import data_fixtures as dfx
import imagenet_fixtures as ifx
import numpy as np
import pytest
from PIL import Image

from arcvq_jax.data import imagenet, pipeline
from arcvq_jax.data.pipeline import DataError

pytest.importorskip("tensorflow_datasets")
pytest.importorskip("skimage")

SIZE = 64
NUM_SYNSETS, PER_SYNSET, NUM_VAL = 3, 4, 6
NUM_TRAIN = NUM_SYNSETS * PER_SYNSET


@pytest.fixture(scope="module")
def fake_imagenet(tmp_path_factory):
  """(data_dir, truth): imagenet2012 prepared as ArrayRecord, and per split
  {file_name: (label, (H, W, 3) uint8 pixels TFDS stores)}, plus 'order':
  the file name of each record, in record order."""
  root = tmp_path_factory.mktemp("imagenet")
  files = ifx.fake_imagenet_files(NUM_SYNSETS, PER_SYNSET, NUM_VAL)
  manual_dir = ifx.write_manual_dir(str(root / "manual"), files)
  builder = imagenet.prepare(manual_dir, str(root / "data"))
  truth = {}
  for split, images in files.items():
    # TFDS's own decoding: the records' file names, and the pixels of the two
    # files TFDS re-encodes (CMYK, PNG) while preparing.
    records = builder.as_data_source(split=split)
    records = records.__getitems__(list(range(len(records))))
    stored = {r["file_name"].decode(): r for r in records}
    truth[split] = {}
    for image in images:
      pixels = ifx.decode_rgb(image.data)
      if image.kind in ("cmyk", "png"):
        pixels = stored[image.file_name]["image"]
      truth[split][image.file_name] = (image.label, pixels)
    truth[split + "_order"] = [r["file_name"].decode() for r in records]
  return str(root / "data"), truth


def _config(data_dir: str, **overrides):
  cfg = dict(
    source="tfds",
    name="imagenet2012",
    path=None,
    data_dir=data_dir,
    train_split="train",
    eval_split="validation",
    image_size=SIZE,
  )
  cfg.update(overrides)
  return dfx.data_config(**cfg)


def _resized(pixels: np.ndarray, size: int = SIZE) -> np.ndarray:
  """Shorter side -> size with PIL bicubic (antialiased), written out here."""
  h, w = pixels.shape[:2]
  if h <= w:
    new_h, new_w = size, int(np.floor(w * size / h + 0.5))
  else:
    new_h, new_w = int(np.floor(h * size / w + 0.5)), size
  return np.asarray(Image.fromarray(pixels).resize((new_w, new_h), Image.Resampling.BICUBIC))


def _centre(resized: np.ndarray, size: int = SIZE) -> np.ndarray:
  h, w = resized.shape[:2]
  return resized[(h - size) // 2 : (h - size) // 2 + size, (w - size) // 2 : (w - size) // 2 + size]


def _find_crop(image: np.ndarray, resized: dict[str, np.ndarray]) -> tuple[str, int, int, bool]:
  """The unique (file, top, left, flipped) whose window equals `image` exactly."""
  matches = []
  for name, full in resized.items():
    windows = np.lib.stride_tricks.sliding_window_view(full, image.shape)[..., 0, :, :, :]
    for flipped, target in ((False, image), (True, image[:, ::-1])):
      tops, lefts = np.nonzero(np.all(windows == target, axis=(-3, -2, -1)))
      matches += [
        (name, int(top), int(left), flipped) for top, left in zip(tops, lefts, strict=True)
      ]
  assert len(matches) == 1, matches
  return matches[0]


def _uint8(batch_images: np.ndarray) -> np.ndarray:
  images = dfx.to_uint8(batch_images)
  # x / 127.5 - 1 exactly, so the inversion above loses nothing.
  np.testing.assert_array_equal(
    images.astype(np.float32) / np.float32(127.5) - np.float32(1), batch_images
  )
  return images


# ----------------------------------------------------------------------------
# The fake download and TFDS's preparation.


@pytest.mark.slow
def test_tfds_prepared_the_fake_download(fake_imagenet):
  data_dir, truth = fake_imagenet
  assert pipeline.dataset_info(_config(data_dir)) == {
    "image_shape": (SIZE, SIZE, 3),
    "num_train": NUM_TRAIN,
    "num_eval": NUM_VAL,
  }
  # Labels: the synset folder for train, validation_labels.txt for validation.
  synsets = ifx.synsets()
  for name, (label, _) in truth["train"].items():
    assert synsets[label] == name.split("_")[0]
  assert [
    synsets[truth["validation"][f"ILSVRC2012_val_{k:08d}.JPEG"][0]] for k in range(1, NUM_VAL + 1)
  ] == ifx.validation_synsets()[:NUM_VAL]
  # TFDS turned the CMYK and PNG files into RGB JPEGs of the same picture.
  for image in ifx.fake_imagenet_files(NUM_SYNSETS, PER_SYNSET, NUM_VAL)["train"]:
    if image.kind in ("cmyk", "png"):
      stored = truth["train"][image.file_name][1].astype(np.float64)
      assert np.abs(stored - ifx.decode_rgb(image.data)).mean() < 4, image.file_name
  with pytest.raises(DataError, match=r"config\.data\.image_size"):
    pipeline.dataset_info(_config(data_dir, image_size=None))


# ----------------------------------------------------------------------------
# Evaluation: resize + centre crop, in record order, padded.


@pytest.mark.slow
def test_eval_is_centre_crops_in_order_with_padding(fake_imagenet):
  data_dir, truth = fake_imagenet
  cfg = _config(data_dir, random_crop=True, random_flip=True)  # Eval ignores both.
  batches = list(
    pipeline.create_eval_iterator(cfg, global_batch_size=4, process_index=0, process_count=1)
  )
  assert len(batches) == 2  # ceil(6 / 4)
  assert batches[1]["mask"].tolist() == [True, True, False, False]
  assert np.all(batches[1]["image"][2:] == 0) and batches[1]["label"][2:].tolist() == [0, 0]
  images = _uint8(np.concatenate([b["image"] for b in batches])[:NUM_VAL])
  labels = np.concatenate([b["label"] for b in batches])[:NUM_VAL]
  assert images.shape == (NUM_VAL, SIZE, SIZE, 3)
  for image, label, name in zip(images, labels, truth["validation_order"], strict=True):
    want_label, pixels = truth["validation"][name]
    assert label == want_label
    np.testing.assert_array_equal(image, _centre(_resized(pixels)), err_msg=name)

  # Two processes: their local batches, in process order, are the global batch.
  halves = [
    list(pipeline.create_eval_iterator(cfg, global_batch_size=4, process_index=p, process_count=2))
    for p in range(2)
  ]
  for step, batch in enumerate(batches):
    np.testing.assert_array_equal(
      np.concatenate([halves[0][step]["image"], halves[1][step]["image"]]), batch["image"]
    )


# ----------------------------------------------------------------------------
# Training: random crops and flips, labels, determinism, resume, processes.


@pytest.mark.slow
def test_train_images_are_random_crops_and_flips_of_the_resized_photo(fake_imagenet):
  data_dir, truth = fake_imagenet
  resized = {name: _resized(pixels) for name, (_, pixels) in truth["train"].items()}
  cfg = _config(data_dir, random_crop=True, random_flip=True)
  it = pipeline.create_train_iterator(
    cfg, global_batch_size=4, seed=0, process_index=0, process_count=1
  )
  crops = []
  for epoch in range(2):
    seen = []
    for _ in range(NUM_TRAIN // 4):
      batch = next(it)
      assert batch["image"].shape == (4, SIZE, SIZE, 3) and batch["image"].dtype == np.float32
      assert batch["label"].dtype == np.int32
      for image, label in zip(_uint8(batch["image"]), batch["label"], strict=True):
        name, top, left, flipped = _find_crop(image, resized)
        assert label == truth["train"][name][0]
        seen.append(name)
        crops.append((epoch, name, top, left, flipped))
    assert sorted(seen) == sorted(truth["train"])  # Each epoch covers the split once.
  # The randomness is real: both flips occur, crops leave the centre, and an
  # image is cropped differently in the two epochs.
  assert {c[4] for c in crops} == {False, True}
  centre = {
    name: ((r.shape[0] - SIZE) // 2, (r.shape[1] - SIZE) // 2) for name, r in resized.items()
  }
  assert any((top, left) != centre[name] for _, name, top, left, _ in crops)
  by_epoch = [{c[1]: c[2:] for c in crops if c[0] == e} for e in range(2)]
  assert by_epoch[0] != by_epoch[1]
  # Offsets spread over the slack: some crops sit near the top / left edge.
  slack = {name: max(r.shape[:2]) - SIZE for name, r in resized.items()}
  assert any(
    max(top, left) < slack[name] // 4 for _, name, top, left, _ in crops if slack[name] > 40
  )


@pytest.mark.slow
def test_train_without_random_crop_is_centre_crops_maybe_flipped(fake_imagenet):
  data_dir, truth = fake_imagenet
  centres = {name: _centre(_resized(pixels)) for name, (_, pixels) in truth["train"].items()}
  for random_flip in (False, True):
    cfg = _config(data_dir, random_crop=False, random_flip=random_flip)
    it = pipeline.create_train_iterator(
      cfg, global_batch_size=4, seed=1, process_index=0, process_count=1
    )
    flips = []
    for _ in range(NUM_TRAIN // 4):
      for image in _uint8(next(it)["image"]):
        _name, top, left, flipped = _find_crop(image, centres)
        assert (top, left) == (0, 0)
        flips.append(flipped)
    assert set(flips) == ({False, True} if random_flip else {False})


@pytest.mark.slow
def test_train_augmentation_is_a_function_of_seed_and_step(fake_imagenet):
  data_dir, _ = fake_imagenet
  cfg = _config(data_dir, random_crop=True, random_flip=True)
  make = lambda seed, **kw: pipeline.create_train_iterator(
    cfg, global_batch_size=4, seed=seed, **{"process_index": 0, "process_count": 1, **kw}
  )
  a, b, c = make(7), make(7), make(8)
  reference = []
  for _ in range(5):
    x, y, z = next(a), next(b), next(c)
    np.testing.assert_array_equal(x["image"], y["image"])
    np.testing.assert_array_equal(x["label"], y["label"])
    assert not np.array_equal(x["image"], z["image"])
    reference.append(x)

  # Resume from a saved state: the same crops and flips follow.
  it = make(7)
  for _ in range(2):
    next(it)
  state = json.loads(json.dumps(it.get_state()))
  assert state == {"next_index": 2}
  resumed = make(7)
  resumed.set_state(state)
  for want in reference[2:]:
    got = next(resumed)
    np.testing.assert_array_equal(got["image"], want["image"])
    np.testing.assert_array_equal(got["label"], want["label"])

  # Two processes: process p holds rows p::2 of the one-process global batch,
  # augmentation included.
  shards = [make(7, process_index=p, process_count=2) for p in range(2)]
  for want in reference:
    local = [next(s) for s in shards]
    for p in range(2):
      assert local[p]["image"].shape == (2, SIZE, SIZE, 3)
      np.testing.assert_array_equal(local[p]["image"], want["image"][p::2])
      np.testing.assert_array_equal(local[p]["label"], want["label"][p::2])


def test_random_crop_needs_resized_images(tmp_path):
  for i, pixels in enumerate(np.random.default_rng(0).integers(0, 256, (4, 20, 30, 3), np.uint8)):
    Image.fromarray(pixels).save(tmp_path / f"{i}.png")
  cfg = dfx.data_config(source="folder", path=str(tmp_path), random_crop=True)
  with pytest.raises(DataError, match=r"config\.data\.random_crop"):
    pipeline.create_train_iterator(
      cfg, global_batch_size=2, seed=0, process_index=0, process_count=1
    )
  cfg.random_crop, cfg.random_flip = False, True  # Flips need no resizing.
  batch = next(
    pipeline.create_train_iterator(
      cfg, global_batch_size=4, seed=0, process_index=0, process_count=1
    )
  )
  assert batch["image"].shape == (4, 20, 30, 3)


# ----------------------------------------------------------------------------
# Preparing: the messages and the helper.


def test_unprepared_imagenet_names_the_manual_download(tmp_path):
  cfg = _config(str(tmp_path))
  with pytest.raises(DataError) as e:
    pipeline.dataset_info(cfg)
  message = str(e.value)
  assert f"tfds build imagenet2012 --data_dir={tmp_path} --manual_dir=" in message
  assert "--file_format=array_record" in message
  assert "ILSVRC2012_img_train.tar" in message and "ILSVRC2012_img_val.tar" in message
  assert (
    f"python -m arcvq_jax.data.imagenet --manual_dir=MANUAL_DIR --data_dir={tmp_path}"
  ) in message


def test_prepare_helper_and_tfrecord_error(tmp_path):
  manual = tmp_path / "manual"
  with pytest.raises(DataError, match=r"ILSVRC2012_img_train\.tar"):
    imagenet.prepare(str(manual), str(tmp_path / "nothing"))
  ifx.make_fake_imagenet_manual_dir(str(manual), num_synsets=1, per_synset=2, num_val=2)
  imagenet.main([f"--manual_dir={manual}", f"--data_dir={tmp_path / 'ar'}"])
  assert pipeline.dataset_info(_config(str(tmp_path / "ar"))) == {
    "image_shape": (SIZE, SIZE, 3),
    "num_train": 2,
    "num_eval": 2,
  }

  # TFDS's default format (and most existing copies): TFRecord.
  imagenet.prepare(str(manual), str(tmp_path / "tfr"), file_format="tfrecord")
  with pytest.raises(DataError) as e:
    pipeline.create_train_iterator(
      _config(str(tmp_path / "tfr")), global_batch_size=2, seed=0, process_index=0, process_count=1
    )
  message = str(e.value)
  assert "stored as tfrecord" in message
  assert (
    f"tfds convert_format --dataset_version_dir={tmp_path}/tfr/imagenet2012/5.1.0 "
    "--out_file_format=array_record"
  ) in message


# ----------------------------------------------------------------------------
# The trainer, end to end.
