"""Token shards (`python -m arcvq_jax.tokenize`, arcvq_jax/data/token_shards.py): the tokens
in the shards are `Tokenizer.encode`'s, whatever the devices or processes that wrote them; a
killed run continues to the same bytes without touching a finished shard; a damaged, missing
or foreign shard is named; the PixelCNN trains from them as from its own precompute pass.

The data is a small IDX folder of random images written here (numpy is the truth for the
images, labels and ids); the tokenizer is the tiny VQ-VAE with random weights (K 64: uint8
tokens, 7x7 grids)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from absl import app
from data_fixtures import write_idx
from device_env import simulated_devices
from model_fixtures import init_params
from run_helpers import override, read_scalars

from arcvq_jax import api, cli, tokenize
from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax.data import token_shards
from arcvq_jax.train import prior_common, prior_pixelcnn
from arcvq_jax.train import state as state_lib
from configs import tiny, tiny_pixelcnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_TRAIN, NUM_TEST = 2400, 40


def write_tokenizer(workdir, data_path, seed=3, channels=1):
  """A tiny VQ-VAE tokenizer workdir (random weights) whose config.data reads `data_path`."""
  c = override(tiny.get_config(), **{"data.path": str(data_path)})
  model = state_lib.build_model(c, channels=channels)
  params = init_params(model, jnp.zeros((1, 28, 28, channels)), seed=seed)
  api.write_workdir(str(workdir), c, params, image_shape=(28, 28, channels), step=0)
  return str(workdir)


@pytest.fixture(scope="module")
def env(tmp_path_factory):
  """{'data': IDX dir, 'images'/'labels': {split: arrays}, 'tok': tokenizer workdir}."""
  root = tmp_path_factory.mktemp("tokenize")
  rng = np.random.default_rng(0)
  images, labels = {}, {}
  (root / "data").mkdir()
  for split, prefix, n in (("train", "train", NUM_TRAIN), ("test", "t10k", NUM_TEST)):
    images[split] = rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels[split] = rng.integers(0, 10, (n,), dtype=np.uint8)
    write_idx(str(root / "data" / f"{prefix}-images-idx3-ubyte"), images[split])
    write_idx(str(root / "data" / f"{prefix}-labels-idx1-ubyte"), labels[split])
  tok = write_tokenizer(root / "tok", root / "data")
  return dict(root=root, data=str(root / "data"), images=images, labels=labels, tok=tok)


def as_floats(images: np.ndarray) -> np.ndarray:
  """(N, 28, 28) uint8 -> (N, 28, 28, 1) float32 in [-1, 1], as the pipeline maps them."""
  return images[..., None].astype(np.float32) / np.float32(127.5) - np.float32(1.0)


def shard_digests(directory) -> list[str]:
  with open(os.path.join(directory, token_shards.INDEX_FILE)) as f:
    return [e["sha256"] for e in json.load(f)["shards"]]


@pytest.fixture(scope="module")
def test_shards(env):
  """The 40 test images with their mirrors, in shards of 16, by one in-process run."""
  out = str(env["root"] / "test_flip")
  result = tokenize.tokenize_split(
    env["tok"], out, split="test", flip=True, batch_size=16, images_per_shard=16
  )
  return out, result


# --------------------------------------------------------------------------- the format


def test_token_dtype_and_the_record_layout_round_trip():
  assert token_shards.token_dtype(1) == token_shards.token_dtype(256) == np.uint8
  assert token_shards.token_dtype(257) == np.uint16
  assert token_shards.token_dtype(65536) == np.uint16
  assert token_shards.token_dtype(65537) == np.uint32
  dtype = token_shards.record_dtype(2, (3, 5), token_shards.token_dtype(1000))
  assert dtype.itemsize == 8 + 4 + 2 * 2 * 3 * 5  # packed, no alignment padding
  layout = json.loads(json.dumps(token_shards.record_layout(dtype)))
  assert token_shards.dtype_from_layout(layout) == dtype
  rng = np.random.default_rng(1)
  ids, labels = np.arange(7) + 100, rng.integers(-1, 10, 7)
  tokens = rng.integers(0, 1000, (7, 2, 3, 5))
  records = token_shards.encode_records(ids, labels, tokens, dtype)
  assert all(len(r) == dtype.itemsize for r in records)
  rows = token_shards.decode_records(records, dtype)
  np.testing.assert_array_equal(rows["image_id"], ids)
  np.testing.assert_array_equal(rows["label"], labels)
  np.testing.assert_array_equal(rows["tokens"], tokens)
  # The first record by hand: little-endian int64 id, int32 label, then uint16 tokens.
  assert records[0][:8] == int(ids[0]).to_bytes(8, "little")
  assert records[0][8:12] == int(labels[0]).to_bytes(4, "little", signed=True)
  assert records[0][12:14] == int(tokens[0, 0, 0, 0]).to_bytes(2, "little")
  for bad in (
    dict(layout, bytes=layout["bytes"] + 1),
    dict(layout, fields=layout["fields"][::-1]),
    dict(layout, fields=[*layout["fields"][:2], dict(layout["fields"][2], dtype="<f4")]),
    dict(layout, fields=[*layout["fields"][:2], dict(layout["fields"][2], dtype="|O")]),
  ):
    with pytest.raises(ValueError, match="record"):
      token_shards.dtype_from_layout(bad)
  with pytest.raises(token_shards.TokenShardsError, match="do not belong together"):
    token_shards.decode_records([records[0][:-1]], dtype)


@pytest.mark.parametrize("n,per_shard", [(40, 16), (48, 16), (1, 10), (10000, 10000)])
def test_shards_cover_the_split_and_processes_share_them_out(n, per_shard):
  ranges = token_shards.shard_ranges(n, per_shard)
  assert np.array_equal(np.concatenate([np.arange(a, b) for a, b in ranges]), np.arange(n))
  assert all(b - a == per_shard for a, b in ranges[:-1])
  for count in (1, 2, 3, 5):
    owned = [token_shards.owned_shards(len(ranges), p, count) for p in range(count)]
    assert sorted(s for part in owned for s in part) == list(range(len(ranges)))  # a partition


def test_process_layout_from_flags_or_the_launcher(monkeypatch):
  for name in ("SLURM_PROCID", "SLURM_NTASKS", "SLURM_STEP_NUM_TASKS", "SLURM_STEP_ID"):
    monkeypatch.delenv(name, raising=False)
  for name in ("OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_RANK", "TPU_WORKER_HOSTNAMES"):
    monkeypatch.delenv(name, raising=False)
  assert tokenize.process_layout("auto", None, None) == (0, 1)
  assert tokenize.process_layout("auto", 4, 3) == (3, 4)
  with pytest.raises(app.UsageError, match="go together"):
    tokenize.process_layout("auto", 4, None)
  with pytest.raises(app.UsageError, match=r"must be in \[0, --num_processes=4\)"):
    tokenize.process_layout("auto", 4, 4)
  with pytest.raises(app.UsageError, match="no launcher detected"):
    tokenize.process_layout("on", None, None)
  monkeypatch.setenv("SLURM_STEP_ID", "0")
  monkeypatch.setenv("SLURM_NTASKS", "8")
  monkeypatch.setenv("SLURM_PROCID", "5")
  assert tokenize.process_layout("auto", None, None) == (5, 8)
  assert tokenize.process_layout("off", None, None) == (0, 1)
  assert tokenize.process_layout("auto", 2, 1) == (1, 2)  # the flags win


def test_fingerprint_follows_the_weights_and_the_encoder_config(env):
  tok = api.Tokenizer.from_workdir(env["tok"])
  base = token_shards.fingerprint(tok.config, tok.params)
  # The config as config.json holds it (lists) and as the API loads it (tuples): the same.
  assert token_shards.fingerprint(json.loads(tok.config.to_json()), tok.params) == base
  trained_on = override(ml_collections.ConfigDict(tok.config.to_dict()), num_train_steps=99)
  trained_on.optimizer.lr = 1.0
  assert token_shards.fingerprint(trained_on, tok.params) == base
  wider = override(ml_collections.ConfigDict(tok.config.to_dict()), **{"model.hidden": 64})
  assert token_shards.fingerprint(wider, tok.params) != base
  leaves, tree = jax.tree.flatten(tok.params)
  nudged = [np.asarray(x).copy() for x in leaves]
  nudged[0].flat[0] = np.nextafter(nudged[0].flat[0], np.float32(np.inf))
  assert token_shards.fingerprint(tok.config, jax.tree.unflatten(tree, nudged)) != base


# --------------------------------------------------------------------------- writing


def test_shards_hold_the_tokenizers_tokens_labels_and_ids(env, test_shards):
  out, result = test_shards
  assert result["written"] == [0, 1, 2] and result["kept"] == []
  shards = token_shards.open(out)
  index = shards.index
  assert (index["num_images"], index["views"], index["grid"], index["dtype"]) == (
    NUM_TEST,
    2,
    [7, 7],
    "uint8",
  )
  assert [(e["start"], e["stop"]) for e in index["shards"]] == [(0, 16), (16, 32), (32, 40)]
  assert index["split"] == "test" and index["data"]["path"] == env["data"]
  assert index["label_range"] == [
    int(env["labels"]["test"].min()),
    int(env["labels"]["test"].max()),
  ]
  assert "--flip" in index["command"] and "--step=0" in index["command"]

  tok = api.Tokenizer.from_workdir(env["tok"])
  assert shards.tokenizer.same_as(token_shards.identity_of(tok, env["tok"], 0))
  x = as_floats(env["images"]["test"])
  rows = shards.read(range(NUM_TEST))
  np.testing.assert_array_equal(rows["image_id"], np.arange(NUM_TEST))
  np.testing.assert_array_equal(rows["label"], env["labels"]["test"])
  np.testing.assert_array_equal(rows["tokens"][:, 0], np.asarray(tok.encode(x)))
  np.testing.assert_array_equal(rows["tokens"][:, 1], np.asarray(tok.encode(x[:, :, ::-1])))
  # grain's MapDataset over the same records.
  element = shards.dataset()[17]
  assert int(element["image_id"]) == 17 and element["tokens"].shape == (2, 7, 7)
  np.testing.assert_array_equal(element["tokens"], rows["tokens"][17])


def test_a_restarted_run_keeps_finished_shards_and_rewrites_the_rest(env, test_shards, tmp_path):
  done, _ = test_shards
  out = tmp_path / "out"
  shutil.copytree(done, out)
  os.remove(out / token_shards.INDEX_FILE)
  names = [token_shards.shard_name(s, 3) for s in range(3)]
  kept = os.stat(out / names[0])
  os.remove(out / token_shards.sidecar_name(2, 3))  # shard 2 unfinished (killed before commit)
  (out / (names[2] + ".tmp")).write_bytes(b"partial")
  damaged = bytearray((out / names[1]).read_bytes())  # shard 1 damaged after it was written
  damaged[100] ^= 0xFF
  (out / names[1]).write_bytes(bytes(damaged))
  result = tokenize.tokenize_split(
    env["tok"], str(out), split="test", flip=True, batch_size=8, images_per_shard=16
  )
  assert result["kept"] == [0] and result["written"] == [1, 2]
  now = os.stat(out / names[0])
  assert (now.st_ino, now.st_mtime_ns) == (kept.st_ino, kept.st_mtime_ns)
  assert shard_digests(out) == shard_digests(done)  # another batch size, the same bytes
  assert not os.path.exists(out / (names[2] + ".tmp"))
  again = tokenize.tokenize_split(
    env["tok"], str(out), split="test", flip=True, batch_size=8, images_per_shard=16
  )
  assert again["written"] == [] and again["kept"] == [0, 1, 2] and again["index"] is not None


def test_the_out_directory_and_the_data_are_checked_first(env, test_shards, tmp_path):
  done, _ = test_shards
  a_file = tmp_path / "file"
  a_file.write_text("x")
  with pytest.raises(cli.UserError, match="is a file, not a directory"):
    tokenize.tokenize_split(env["tok"], str(a_file), split="test")
  (tmp_path / "busy").mkdir()
  (tmp_path / "busy" / "notes.txt").write_text("mine")
  with pytest.raises(cli.UserError, match=r"is not empty \(notes.txt\) and holds no token shards"):
    tokenize.tokenize_split(env["tok"], str(tmp_path / "busy"), split="test")
  before = {n: os.stat(os.path.join(done, n)).st_mtime_ns for n in os.listdir(done)}
  with pytest.raises(cli.UserError, match=r"holds token shards of something else \(views: 2 -> 1"):
    tokenize.tokenize_split(env["tok"], done, split="test", images_per_shard=16)
  with pytest.raises(cli.UserError, match=r"split: \"test\" -> \"train\""):
    tokenize.tokenize_split(env["tok"], done, split="train", flip=True, images_per_shard=16)
  other = write_tokenizer(tmp_path / "tok7", env["data"], seed=7)
  with pytest.raises(cli.UserError, match=r"tokenizer: step 0 \(fingerprint \w{12}\) -> step 0"):
    tokenize.tokenize_split(other, done, split="test", flip=True, images_per_shard=16)
  assert before == {n: os.stat(os.path.join(done, n)).st_mtime_ns for n in os.listdir(done)}

  rgb = write_tokenizer(tmp_path / "tok_rgb", env["data"], channels=3)
  with pytest.raises(cli.UserError, match=r"has 1-channel images but the tokenizer .* 3-channel"):
    tokenize.tokenize_split(rgb, str(tmp_path / "a"), split="test")
  odd = tmp_path / "odd"
  odd.mkdir()
  write_idx(str(odd / "t10k-images-idx3-ubyte"), np.zeros((4, 30, 30), np.uint8))
  write_idx(str(odd / "t10k-labels-idx1-ubyte"), np.zeros((4,), np.uint8))
  config = override(tiny.get_config(), **{"data.path": str(odd)})
  with pytest.raises(cli.UserError, match=r"has 30x30 images, but .* downsamples by 4"):
    tokenize.tokenize_split(env["tok"], str(tmp_path / "b"), config=config, split="test")
  prior = tmp_path / "prior"
  prior.mkdir()
  (prior / "config.json").write_text(tiny_pixelcnn.get_config().to_json())
  with pytest.raises(cli.UserError, match="is a 'pixelcnn' run, not a tokenizer"):
    tokenize.tokenize_split(str(prior), str(tmp_path / "c"), split="test")
  assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "c")


def test_two_runs_never_write_the_same_shard(env, tmp_path):
  out = tmp_path / "busy"
  out.mkdir()
  holder = subprocess.Popen(  # another run writing shard 1: byte 1 of the lock file held
    [
      sys.executable,
      "-c",
      "import fcntl, os, sys, time\n"
      f"fd = os.open({str(out / token_shards.LOCK_FILE)!r}, os.O_RDWR | os.O_CREAT)\n"
      "fcntl.lockf(fd, fcntl.LOCK_EX, 1, 1)\n"
      "print('locked', flush=True)\n"
      "time.sleep(60)",
    ],
    stdout=subprocess.PIPE,
    text=True,
  )
  try:
    assert holder.stdout.readline().strip() == "locked"
    with pytest.raises(cli.UserError, match="shard 1 is being written by another tokenize run"):
      tokenize.tokenize_split(env["tok"], str(out), split="test", images_per_shard=16)
    # Another process of the same job (shards 0 and 2) goes ahead.
    result = tokenize.tokenize_split(
      env["tok"], str(out), split="test", images_per_shard=16, process_index=0, process_count=2
    )
    assert result["written"] == [0, 2] and result["index"] is None
  finally:
    holder.kill()
    holder.wait()
  result = tokenize.tokenize_split(env["tok"], str(out), split="test", images_per_shard=16)
  assert result["written"] == [1] and result["kept"] == [0, 2] and result["index"] is not None


# --------------------------------------------------------------------------- reading back


def test_open_names_a_missing_or_damaged_shard_and_a_damaged_index(test_shards, tmp_path):
  done, _ = test_shards

  def copy(name):
    shutil.copytree(done, tmp_path / name)
    return tmp_path / name

  def refused(directory, match, **kwargs):
    with pytest.raises(token_shards.TokenShardsError, match=match) as e:
      token_shards.open(str(directory), **kwargs)
    assert "\n" not in str(e.value)
    return str(e.value)

  shard1 = token_shards.shard_name(1, 3)
  missing = copy("missing")
  os.remove(missing / shard1)
  message = refused(missing, f"{shard1} is missing")
  assert "python -m arcvq_jax.tokenize" in message and f"--out={missing}" not in message
  flipped = copy("flipped")
  data = bytearray((flipped / shard1).read_bytes())
  data[200] ^= 1
  (flipped / shard1).write_bytes(bytes(data))
  refused(flipped, f"{shard1} does not match its sha256")
  token_shards.open(str(flipped), verify=False)  # the size alone cannot see it
  truncated = copy("truncated")
  (truncated / shard1).write_bytes(data[:1000])
  refused(truncated, f"{shard1} has 1000 bytes, its entry says 131072", verify=False)
  broken = copy("broken_index")
  (broken / token_shards.INDEX_FILE).write_text('{"format": "arcvq_jax.token_shards", "vers')
  refused(broken, "index.json is damaged \\(not valid JSON")
  edited = copy("edited_index")
  index = json.loads((edited / token_shards.INDEX_FILE).read_text())
  del index["shards"][1]
  (edited / token_shards.INDEX_FILE).write_text(json.dumps(index))
  refused(edited, "index.json is damaged: its shards do not cover the 40 images")
  unfinished = copy("unfinished")
  os.remove(unfinished / token_shards.INDEX_FILE)
  os.remove(unfinished / token_shards.sidecar_name(2, 3))
  refused(unfinished, "is unfinished: 2 of 3 shards are written")
  refused(tmp_path / "nothing", "does not exist or is not a directory")
  (tmp_path / "empty").mkdir()
  refused(tmp_path / "empty", "holds no token shards")


def test_train_iterator_is_the_array_iterators_and_resumes(env, test_shards, tmp_path):
  out = str(tmp_path / "one_view")
  tokenize.tokenize_split(env["tok"], out, split="test", batch_size=40, images_per_shard=16)
  shards = token_shards.open(out)
  rows = shards.read(range(NUM_TEST))
  arrays = {"tokens": rows["tokens"][:, 0].astype(np.int32), "label": rows["label"]}
  ours = shards.train_iterator(8, seed=5, process_index=0, process_count=1)
  theirs = prior_common.create_array_iterator(arrays, 8, 5)  # the precompute pass's batches
  for _ in range(12):  # 5 steps per epoch: into the third epoch
    a, b = next(ours), next(theirs)
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
    np.testing.assert_array_equal(a["label"], b["label"])
  state = ours.get_state()
  assert state == {"next_index": 12}
  expected = next(ours)
  resumed = shards.train_iterator(8, seed=5, process_index=0, process_count=1)
  resumed.set_state(state)
  np.testing.assert_array_equal(next(resumed)["tokens"], expected["tokens"])
  # Two processes: rows p::P of the same global batch.
  halves = [next(shards.train_iterator(8, 5, process_index=p, process_count=2)) for p in (0, 1)]
  whole = next(shards.train_iterator(8, 5, process_index=0, process_count=1))
  np.testing.assert_array_equal(halves[0]["tokens"], whole["tokens"][0::2])
  np.testing.assert_array_equal(halves[1]["tokens"], whole["tokens"][1::2])

  # Two views: example j of step k is the mirror where default_rng([seed, 2, k]) draws < 0.5.
  flipped, _ = test_shards
  two = token_shards.open(flipped)
  both = two.read(range(NUM_TEST))["tokens"]
  it = two.train_iterator(8, seed=5, process_index=0, process_count=1)
  mirrors = 0
  for step in range(7):
    epoch, k = divmod(step, NUM_TEST // 8)
    ids = np.random.default_rng([5, epoch]).permutation(NUM_TEST)[8 * k : 8 * k + 8]
    view = np.random.default_rng([5, 2, step]).random(8) < 0.5
    np.testing.assert_array_equal(next(it)["tokens"], both[ids, view.astype(int)])
    mirrors += int(view.sum())
  assert 0 < mirrors < 56
  with pytest.raises(ValueError, match=r"config\.batch_size: 64 is more than the 40 images"):
    shards.train_iterator(64, 0)


def test_a_prior_refuses_another_tokenizers_shards_by_name(env, test_shards, tmp_path):
  done, _ = test_shards
  other = write_tokenizer(tmp_path / "other_tok", env["data"], seed=11)
  c = tiny_pixelcnn.get_config()
  c.tokenizer_workdir = other
  c.data.token_shards = done
  c.sample_every_steps = 0
  workdir = tmp_path / "prior"
  with pytest.raises(token_shards.TokenShardsError) as e:
    prior_pixelcnn.train_and_evaluate(c, str(workdir))
  message = str(e.value)
  assert f"{done} was made by tokenizer {env['tok']} step 0 (fingerprint " in message
  assert f"this prior's config.tokenizer_workdir uses tokenizer {other} step 0" in message
  assert f"make the right ones with: python -m arcvq_jax.tokenize --workdir={other}" in message
  assert f"--out={done}_step0" in message and "--flip" in message
  assert not os.path.exists(workdir / prior_common.TOKENIZER_RECORD)  # nothing pinned
  c.tokenizer_workdir = env["tok"]
  c.num_classes = 5
  with pytest.raises(
    ValueError, match=r"config.num_classes: is 5, but the labels .* span \[0, 9\]"
  ):
    prior_pixelcnn.train_and_evaluate(c, str(tmp_path / "prior5"))


# --------------------------------------------------------------------------- processes


def tokenize_cmd(tok, out, *flags):
  return [sys.executable, "-m", "arcvq_jax.tokenize", f"--workdir={tok}", f"--out={out}", *flags]


@pytest.mark.slow
def test_one_and_eight_devices_and_two_processes_write_the_same_shards(env, tmp_path):
  flags = ["--split=train", "--images_per_shard=500", "--flip"]
  one = tokenize.tokenize_split(
    env["tok"], str(tmp_path / "one"), split="train", flip=True, images_per_shard=500
  )
  assert one["index"] is not None
  eight = subprocess.run(
    tokenize_cmd(env["tok"], tmp_path / "eight", *flags, "--batch_size=12"),
    cwd=ROOT,
    env=simulated_devices(8),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert eight.returncode == 0, eight.stderr[-3000:]
  assert "(0 of 1, on 8 device(s))" in eight.stderr
  assert shard_digests(tmp_path / "eight") == shard_digests(tmp_path / "one")

  env1 = simulated_devices(1)
  procs = [
    subprocess.Popen(
      tokenize_cmd(env["tok"], tmp_path / "two", *flags, "--num_processes=2", f"--process_id={i}"),
      cwd=ROOT,
      env=env1,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  for i, (_, err) in enumerate(outs):  # process i wrote shards i, i + 2, ...
    wrote = sorted(int(w.split("tokens-")[1][:5]) for w in err.split("Wrote ")[1:])
    assert wrote == list(range(i, 5, 2)), err[-3000:]
  assert shard_digests(tmp_path / "two") == shard_digests(tmp_path / "one")
  rows = token_shards.open(str(tmp_path / "two")).read(range(NUM_TRAIN))
  np.testing.assert_array_equal(rows["image_id"], np.arange(NUM_TRAIN))
  np.testing.assert_array_equal(rows["label"], env["labels"]["train"])


@pytest.mark.slow
def test_a_killed_run_continues_to_the_same_shards(env, tmp_path):
  flags = ["--split=train", "--images_per_shard=100", "--batch_size=1"]  # 24 shards, slowly
  out = tmp_path / "killed"
  first = out / token_shards.sidecar_name(0, 24)
  proc = subprocess.Popen(
    tokenize_cmd(env["tok"], out, *flags),
    cwd=ROOT,
    env=simulated_devices(1),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  deadline = time.time() + 300
  while not first.exists() and proc.poll() is None and time.time() < deadline:
    time.sleep(0.01)
  proc.send_signal(signal.SIGKILL)
  proc.wait(timeout=60)
  assert first.exists() and not (out / token_shards.INDEX_FILE).exists()
  finished = [s for s in range(24) if (out / token_shards.sidecar_name(s, 24)).exists()]
  assert finished and len(finished) < 24, finished
  stats = {s: os.stat(out / token_shards.shard_name(s, 24)) for s in finished}

  resumed = subprocess.run(
    tokenize_cmd(env["tok"], out, *flags),
    cwd=ROOT,
    env=simulated_devices(1),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"kept {len(finished)} finished ones" in resumed.stdout
  for s, before in stats.items():
    now = os.stat(out / token_shards.shard_name(s, 24))
    assert (now.st_ino, now.st_mtime_ns) == (before.st_ino, before.st_mtime_ns), s
  whole = tokenize.tokenize_split(
    env["tok"], str(tmp_path / "whole"), split="train", images_per_shard=100, batch_size=64
  )
  assert whole["index"] is not None
  assert shard_digests(out) == shard_digests(tmp_path / "whole")
  leftovers = [n for n in os.listdir(out) if n.endswith(".tmp")]
  assert leftovers == []


@pytest.mark.slow
def test_cli_errors_are_one_line(env, tmp_path):
  (tmp_path / "file").write_text("x")
  proc = subprocess.run(
    tokenize_cmd(env["tok"], tmp_path / "file"),
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1].startswith("error: --out=")
  proc = subprocess.run(
    tokenize_cmd(env["tok"], tmp_path / "o", "--num_processes=2"),
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 2 and "--num_processes and --process_id go together" in proc.stderr


# --------------------------------------------------------------------------- the prior


@pytest.mark.slow
def test_pixelcnn_trains_from_shards_as_from_its_precompute_pass(env, tmp_path):
  out = str(tmp_path / "shards")
  tokenize.tokenize_split(env["tok"], out, split="test", images_per_shard=16)

  def prior(**overrides):
    c = tiny_pixelcnn.get_config()
    c.tokenizer_workdir = env["tok"]
    c.sample_every_steps = 0
    c.batch_size = 8
    return override(c, **overrides)

  pre, sh = str(tmp_path / "precompute"), str(tmp_path / "from_shards")
  prior_pixelcnn.train_and_evaluate(prior(**{"data.train_split": "test"}), pre)
  prior_pixelcnn.train_and_evaluate(prior(**{"data.token_shards": out}), sh)
  assert not os.path.exists(os.path.join(sh, "latents"))  # no precompute pass
  a, b = read_scalars(pre, "train/loss"), read_scalars(sh, "train/loss")
  assert sorted(a) == sorted(b) == [1, 2, 3, 4]
  assert [a[s] for s in range(1, 5)] == [b[s] for s in range(1, 5)]
  states = []
  for workdir in (pre, sh):
    checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir))
    states.append(checkpointer.restore(4, None, None))
    checkpointer.close()
  for x, y in zip(jax.tree.leaves(states[0]), jax.tree.leaves(states[1]), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
