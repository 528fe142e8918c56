"""Fault injection on workdirs: a refused run leaves every file as it was, a config change
that is safe to resume is allowed and recorded, one run at a time holds a workdir (and a
killed one leaves no stuck lock), and a restart after every checkpoint was damaged is a
fresh run (docs/training.md, "Errors and resuming")."""

import glob
import hashlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap

import grain
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from data_fixtures import FASHION_MNIST_DIR, raw_idx_images, raw_idx_labels, write_idx
from run_helpers import override

from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax import workdir as workdir_lib
from arcvq_jax.train import prior_common, prior_pixelcnn, tokenizer
from configs import tiny, tiny_pixelcnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def tiny_config(variant="arcvq", **overrides):
  """The tiny tokenizer, 4 steps, checkpoints at 2 and 4, no image grids."""
  c = tiny.get_config(variant)
  c.eval_batch_size = 2000
  c.image_every_steps = 0
  c.num_train_steps = 4
  c.checkpoint_every_steps = 2
  return override(c, **overrides)


def snapshot(directory):
  """{relative path: sha256} of every file under `directory`, and '<dir>' for every folder."""
  out = {}
  for root, dirs, files in os.walk(directory):
    for d in dirs:
      out[os.path.relpath(os.path.join(root, d), directory)] = "<dir>"
    for f in files:
      path = os.path.join(root, f)
      with open(path, "rb") as fh:
        out[os.path.relpath(path, directory)] = hashlib.sha256(fh.read()).hexdigest()
  return out


def small_checkpoint(workdir, step=1):
  """A real (tiny) orbax checkpoint in workdir/checkpoints, so the workdir has one to resume."""
  checkpointer = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(str(workdir)))
  checkpointer.save(step, {"w": jnp.arange(4, dtype=jnp.float32)}, None)
  checkpointer.wait()
  checkpointer.close()


def write_config_json(workdir, config):
  os.makedirs(workdir, exist_ok=True)
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2))


# --------------------------------------------------------------------------- 1. the config


def error_message(stderr):
  """The `error:` message of a command's stderr (wrapped over lines by cli.wrap), or ''."""
  start = stderr.find("error: ")
  return " ".join(stderr[start:].split()) if start >= 0 else ""


def test_compare_allows_resumable_keys_and_refuses_the_rest():
  old = workdir_lib.as_json(tiny_config())
  safe = {
    "num_train_steps": 10,
    "optimizer.lr": 1e-3,
    "log_every_steps": 7,
    "checkpoint_every_steps": 5,
    "keep_checkpoints": 9,
    "data.path": "/elsewhere/fashion-mnist",
    "sharding.mesh_shape": (-1, 1),
    "sharding.mesh_axes": ("data", "fsdp"),
  }
  unsafe = {
    "seed": 1,
    "batch_size": 64,
    "model.hidden": 64,
    "quantizer.num_codes": 32,
    "quantizer.name": "vq",
    "arc.s": 5.0,
    "data.train_split": "test",
    "data.num_workers": 2,  # the saved iterator position's format depends on it
    "optimizer.b1": 0.5,
    "optimizer.grad_clip_norm": 1.0,  # 0 -> 1 adds a state to the optimizer's
  }
  new = workdir_lib.as_json(tiny_config(**safe, **unsafe))
  allowed, refused = workdir_lib.compare(old, new, resuming=True)
  assert sorted(allowed) == sorted(safe)
  assert sorted(refused) == sorted(unsafe)
  assert allowed["num_train_steps"] == (4, 10) and refused["model.hidden"] == (32, 64)

  # Clipping on -> on at another norm keeps the state's structure.
  clipped = workdir_lib.as_json(tiny_config(**{"optimizer.grad_clip_norm": 1.0}))
  more = workdir_lib.as_json(tiny_config(**{"optimizer.grad_clip_norm": 2.0}))
  assert workdir_lib.compare(clipped, more)[1] == {}
  # A converter's checkpoint (weights, no data position) is a starting point: the data, its
  # order and the batch are the new run's; the model, quantizer and optimizer are not.
  allowed, refused = workdir_lib.compare(old, new, resuming=True, starting_point=True)
  stream = {"seed", "batch_size", "data.train_split", "data.num_workers"}
  assert sorted(allowed) == sorted(set(safe) | stream)
  assert sorted(refused) == sorted(set(unsafe) - stream)
  # Without a checkpoint there is nothing to resume: any change but the stage is allowed.
  assert workdir_lib.compare(old, new, resuming=False)[1] == {}
  prior = workdir_lib.as_json(tiny_pixelcnn.get_config())
  assert list(workdir_lib.compare(old, prior, resuming=False)[1]) == ["stage"]
  # A workdir written before model.residual_skip existed trained the identity skip: resuming it
  # with today's default ('relu') would change its network, so that is refused by name.
  before = workdir_lib.as_json(tiny_config())
  del before["model"]["residual_skip"]
  refused = workdir_lib.compare(before, workdir_lib.as_json(tiny_config()))[1]
  assert refused == {"model.residual_skip": ("identity", "relu")}
  kept = workdir_lib.as_json(tiny_config(**{"model.residual_skip": "identity"}))
  assert workdir_lib.compare(before, kept) == ({}, {})
  # A key that older versions did not write is no refusal.
  del old["quantizer"]["search_impl"]
  assert workdir_lib.compare(old, workdir_lib.as_json(tiny_config()))[1] == {}


def test_check_config_refuses_by_name_and_writes_nothing(tmp_path):
  workdir = str(tmp_path / "run")
  workdir_lib.commit(tiny_config(), workdir, {}, 1, (28, 28, 1))  # what a run writes
  small_checkpoint(workdir)
  before = snapshot(workdir)
  with pytest.raises(workdir_lib.ConfigConflictError) as e:
    workdir_lib.check_config(tiny_config("vanilla"), workdir, (28, 28, 1))
  message = str(e.value)
  assert 'quantizer.name "arcvq" -> "vq"' in message and 'variant "arcvq" -> "vanilla"' in message
  assert "new --workdir" in message and "config.json" in message
  with pytest.raises(workdir_lib.ConfigConflictError, match=r"trained on 28x28x1 images.* 32x32x1"):
    workdir_lib.check_config(tiny_config(), workdir, (32, 32, 1))
  assert snapshot(workdir) == before


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A finished tiny tokenizer run (4 steps, checkpoints 2 and 4)."""
  workdir = str(tmp_path_factory.mktemp("trained"))
  tokenizer.train_and_evaluate(tiny_config(), workdir)
  return workdir


def copy_of(workdir, tmp_path, name="copy"):
  target = str(tmp_path / name)
  shutil.copytree(workdir, target)
  return target


def _other_shape_data(directory):
  """Fashion-MNIST padded to 32x32: 64 training and 16 test images as IDX files."""
  os.makedirs(directory)
  for split, n in (("train", 64), ("t10k", 16)):
    images = raw_idx_images(f"{FASHION_MNIST_DIR}/{split}-images-idx3-ubyte.gz")[:n]
    labels = raw_idx_labels(f"{FASHION_MNIST_DIR}/{split}-labels-idx1-ubyte.gz")[:n]
    padded = np.pad(images, ((0, 0), (2, 2), (2, 2)))
    write_idx(os.path.join(directory, f"{split}-images-idx3-ubyte"), padded)
    write_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte"), labels)
  return directory


def _fake_prior(workdir, tokenizer_workdir):
  """A PixelCNN workdir as a run leaves it: config.json, tokenizer.json pinning the
  tokenizer, and a checkpoint (these refusals come before any checkpoint is read)."""
  c = tiny_pixelcnn.get_config()
  c.tokenizer_workdir = tokenizer_workdir
  write_config_json(workdir, c)
  record = dict(
    workdir=os.path.abspath(tokenizer_workdir),
    step=4,
    num_codes=64,
    latent_shape=[7, 7, 16],
    image_shape=[28, 28, 1],
  )
  with open(os.path.join(workdir, prior_common.TOKENIZER_RECORD), "w") as f:
    json.dump(record, f)
  small_checkpoint(workdir)
  open(os.path.join(workdir, workdir_lib.LOCK_FILE), "w").close()  # empty once a run ends
  return c


# Each refusal: prepare(trained tokenizer workdir, its copy, tmp_path) sets the copy up and
# returns the refused run; the error it must end in; and what that error must say.


def _vanilla_on_arcvq(trained, workdir, tmp_path):
  return lambda: tokenizer.train_and_evaluate(tiny_config("vanilla"), workdir)


def _other_width(trained, workdir, tmp_path):
  return lambda: tokenizer.train_and_evaluate(tiny_config(**{"model.hidden": 64}), workdir)


def _other_width_without_config_json(trained, workdir, tmp_path):
  # Nothing to compare the config with: the checkpoint's shapes refuse it, before any write.
  os.remove(os.path.join(workdir, "config.json"))
  return _other_width(trained, workdir, tmp_path)


def _other_image_shape(trained, workdir, tmp_path):
  data = _other_shape_data(str(tmp_path / "data32"))
  return lambda: tokenizer.train_and_evaluate(tiny_config(**{"data.path": data}), workdir)


def _prior_on_a_tokenizer_workdir(trained, workdir, tmp_path):
  c = tiny_pixelcnn.get_config()
  c.tokenizer_workdir = trained
  return lambda: prior_pixelcnn.train_and_evaluate(c, workdir)


def _tokenizer_on_a_prior_workdir(trained, workdir, tmp_path):
  shutil.rmtree(workdir)
  _fake_prior(workdir, trained)
  return lambda: tokenizer.train_and_evaluate(tiny_config(), workdir)


def _prior_on_another_tokenizer(trained, workdir, tmp_path):
  # The same tokenizer's files at another path are another tokenizer to a pinned prior.
  shutil.rmtree(workdir)
  c = _fake_prior(workdir, trained)
  c.tokenizer_workdir = copy_of(trained, tmp_path, "moved_tokenizer")
  return lambda: prior_pixelcnn.train_and_evaluate(c, workdir)


REFUSALS = {
  "vanilla_on_arcvq": (_vanilla_on_arcvq, workdir_lib.ConfigConflictError, 'variant "arcvq"'),
  "other_width": (_other_width, workdir_lib.ConfigConflictError, "model.hidden 32 -> 64"),
  "other_width_without_config_json": (
    _other_width_without_config_json,
    ckpt_lib.CheckpointError,
    "does not match this run's config",
  ),
  "other_image_shape": (_other_image_shape, workdir_lib.ConfigConflictError, "32x32x1"),
  "prior_on_a_tokenizer_workdir": (
    _prior_on_a_tokenizer_workdir,
    workdir_lib.ConfigConflictError,
    'stage "tokenizer" -> "pixelcnn"',
  ),
  "tokenizer_on_a_prior_workdir": (
    _tokenizer_on_a_prior_workdir,
    workdir_lib.ConfigConflictError,
    'stage "pixelcnn" -> "tokenizer"',
  ),
  "prior_on_another_tokenizer": (
    _prior_on_another_tokenizer,
    prior_common.PriorSetupError,
    "was trained on the tokenizer",
  ),
}


@pytest.mark.slow
@needs_fashion
@pytest.mark.parametrize("kind", list(REFUSALS))
def test_a_refused_run_leaves_every_file_as_it_was(kind, trained, tmp_path):
  prepare, error, match = REFUSALS[kind]
  workdir = copy_of(trained, tmp_path)
  refused_run = prepare(trained, workdir, tmp_path)
  before = snapshot(workdir)
  with pytest.raises(error, match=match):
    refused_run()
  assert snapshot(workdir) == before


@pytest.mark.slow
@needs_fashion
def test_a_safe_change_is_allowed_and_recorded(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  results = tokenizer.train_and_evaluate(
    tiny_config(**{"num_train_steps": 5, "optimizer.lr": 1e-3, "log_every_steps": 5}), workdir
  )
  assert results["num_images"] == 10000
  with open(os.path.join(workdir, workdir_lib.CHANGES_FILE)) as f:
    (record,) = json.load(f)
  assert record["step"] == 4
  assert record["changes"] == {
    "log_every_steps": [1, 5],
    "num_train_steps": [4, 5],
    "optimizer.lr": [3e-4, 1e-3],
  }
  with open(os.path.join(workdir, "config.json")) as f:
    saved = json.load(f)
  assert saved["num_train_steps"] == 5 and saved["optimizer"]["lr"] == 1e-3
  assert ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir)).latest_step() == 5


@pytest.mark.slow
@needs_fashion
def test_the_command_refuses_vanilla_on_an_arcvq_workdir_in_one_line(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  before = snapshot(workdir)
  proc = subprocess.run(
    [
      sys.executable,
      "-m",
      "arcvq_jax.main",
      "--config=configs/tiny.py:vanilla",
      f"--workdir={workdir}",
      "--config.num_train_steps=4",
      "--config.checkpoint_every_steps=2",
      "--config.image_every_steps=0",
      "--config.eval_batch_size=2000",
    ],
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.count("error: ") == 1
  message = error_message(proc.stderr)
  assert 'quantizer.name "arcvq" -> "vq"' in message and "cannot change on resume" in message
  assert snapshot(workdir) == before


# --------------------------------------------------------------------------- 2. the lock


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
  workdir = str(tmp_path)
  with workdir_lib.hold(workdir):
    with open(os.path.join(workdir, workdir_lib.LOCK_FILE)) as f:
      record = json.load(f)
    assert record["pid"] == os.getpid() and record["command"]
    with pytest.raises(workdir_lib.WorkdirLockedError) as e, workdir_lib.hold(workdir):
      pass
    assert f"pid {os.getpid()} on host " in str(e.value) and "another --workdir" in str(e.value)
  with workdir_lib.hold(workdir):  # released: free again
    pass
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE)) as f:
    assert f.read() == ""  # an idle workdir's lock file is empty


HOLDER = textwrap.dedent(
  """
  import sys, time
  from arcvq_jax import workdir
  with workdir.hold(sys.argv[1]):
    print("held", flush=True)
    time.sleep(600)
  """
)


def test_a_killed_holder_leaves_no_stuck_lock(tmp_path):
  workdir = str(tmp_path)
  holder = subprocess.Popen(
    [sys.executable, "-c", HOLDER, workdir], env=ENV, stdout=subprocess.PIPE, text=True
  )
  try:
    assert holder.stdout.readline().strip() == "held"
    locked = pytest.raises(workdir_lib.WorkdirLockedError, match=f"pid {holder.pid} ")
    with locked, workdir_lib.hold(workdir):
      pass
  finally:
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=60)
  with open(os.path.join(workdir, workdir_lib.LOCK_FILE)) as f:
    assert json.load(f)["pid"] == holder.pid  # the dead holder's record is still there...
  lock_file = os.path.join(workdir, workdir_lib.LOCK_FILE)
  with workdir_lib.hold(workdir), open(lock_file) as f:  # ...and ignored: the flock is free
    assert json.load(f)["pid"] == os.getpid()


@pytest.mark.slow
@needs_fashion
def test_the_command_refuses_a_held_workdir_naming_the_holder(tmp_path):
  workdir = str(tmp_path / "run")
  with workdir_lib.hold(workdir):
    proc = subprocess.run(
      [sys.executable, "-m", "arcvq_jax.main", "--config=configs/tiny.py", f"--workdir={workdir}"],
      cwd=ROOT,
      env=ENV,
      capture_output=True,
      text=True,
      timeout=600,
    )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert proc.stderr.count("error: ") == 1
  assert f"is in use by another run: pid {os.getpid()} on host " in error_message(proc.stderr)
  assert sorted(os.listdir(workdir)) == [workdir_lib.LOCK_FILE]  # nothing else written


@pytest.mark.slow
@needs_fashion
def test_every_process_of_a_multi_process_run_stops_on_a_held_workdir(tmp_path):
  """Process 0 locks; process 1 must not go on alone into the first collective and hang."""
  workdir = str(tmp_path / "run")
  with socket.socket() as s:
    s.bind(("localhost", 0))
    port = s.getsockname()[1]
  with workdir_lib.hold(workdir):
    procs = [
      subprocess.Popen(
        [
          sys.executable,
          "-m",
          "arcvq_jax.main",
          "--config=configs/tiny.py",
          f"--workdir={workdir}",
          f"--coordinator_address=localhost:{port}",
          "--num_processes=2",
          f"--process_id={i}",
        ],
        cwd=ROOT,
        env=ENV,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
      )
      for i in range(2)
    ]
    errs = [p.communicate(timeout=300)[1] for p in procs]
  assert [p.returncode for p in procs] == [2, 2], errs[0][-3000:] + errs[1][-3000:]
  assert f"in use by another run: pid {os.getpid()} " in error_message(errs[0])
  assert "process 0 refused the workdir" in error_message(errs[1])


# --------------------------------------------------------------------------- 6. all damaged


def _damage(checkpoint_dir, step):
  """Truncates the largest array file of a step (what a full disk or a cut copy leaves)."""
  files = glob.glob(os.path.join(checkpoint_dir, str(step), "state", "ocdbt.process_0", "d", "*"))
  with open(max(files, key=os.path.getsize), "r+b") as f:
    f.truncate(100)


def test_all_damaged_puts_the_data_iterator_back_at_its_start(tmp_path, caplog):
  directory = str(tmp_path / "checkpoints")
  it = iter(grain.MapDataset.range(100).to_iter_dataset())
  checkpointer = ckpt_lib.Checkpointer(directory)
  for step, consumed in ((1, 5), (2, 3)):
    for _ in range(consumed):
      next(it)
    state = {"w": jnp.arange(1000, dtype=jnp.float32) * step, "step": jnp.asarray(step)}
    checkpointer.save(step, state, it)
  checkpointer.wait()
  checkpointer.close()
  for step in (1, 2):
    _damage(directory, step)
  fresh = iter(grain.MapDataset.range(100).to_iter_dataset())
  abstract = ckpt_lib.abstract_like({"w": jnp.zeros(1000, jnp.float32), "step": jnp.asarray(0)})
  with caplog.at_level(logging.WARNING):
    assert ckpt_lib.Checkpointer(directory).restore_latest(abstract, fresh) is None
  assert next(fresh) == 0  # the start of the data, not a damaged step's position
  (warning,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("All ")]
  assert "All 2 checkpoints" in warning and "damaged" in warning and "afresh" in warning


@pytest.mark.slow
@needs_fashion
def test_a_restart_after_all_checkpoints_were_damaged_equals_a_fresh_run(trained, tmp_path):
  workdir = copy_of(trained, tmp_path)
  for step in (2, 4):
    _damage(ckpt_lib.checkpoint_dir(workdir), step)
  tokenizer.train_and_evaluate(tiny_config(), workdir)
  assert len(os.listdir(os.path.join(ckpt_lib.checkpoint_dir(workdir), "damaged"))) == 2
  results = []
  for run in (trained, workdir):
    with open(os.path.join(run, "eval_results.json")) as f:
      results.append(json.load(f))
  assert results[0] == results[1]
  fresh = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(trained)).restore(4, None, None)
  restarted = ckpt_lib.Checkpointer(ckpt_lib.checkpoint_dir(workdir)).restore(4, None, None)
  for a, b in zip(jax.tree.leaves(fresh), jax.tree.leaves(restarted), strict=True):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
