"""Fault injection, issue 38 item 5: a mistake the user can fix ends every command (main,
evaluate, sample, evaluate_samples, ablate, the converters) in one `error:` line that names
the flag or file and the fix, with exit status 2 and no traceback (--debug shows it); the
tokenizer API raises one typed error (api.TokenizerInputError, a ValueError) for NaN or
out-of-range inputs, empty batches and wrong shapes.

The commands run as subprocesses where absl's path matters: each case here fails before jax
compiles anything (a config file, a flag, a weights file), a few seconds each. The API,
the config checks and the checkpoint reader are tested in-process.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import pickle
import re
import subprocess
import sys
import types

import jax.numpy as jnp
import numpy as np
import pytest
from model_fixtures import init_params

from arcvq_jax import api, cli, npz_files
from arcvq_jax import config as config_lib
from arcvq_jax.ablate import runner
from arcvq_jax.ablate import sweep as sweep_lib
from arcvq_jax.convert import torch_load, torch_state
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def command(module: str, *args: str) -> subprocess.CompletedProcess:
  """`python -m module args` in the repository root, on the CPU."""
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def assert_one_error_line(proc: subprocess.CompletedProcess, *phrases: str) -> str:
  """Exit status 2, stderr is one `error:` message (wrapped lines indented), no traceback;
  the message (line wrapping undone) holds every phrase. Returns the message."""
  err = proc.stderr
  assert proc.returncode == cli.USER_ERROR_STATUS, (proc.returncode, err[-3000:])
  assert "Traceback" not in err, err[-3000:]
  assert err.startswith("error: "), err[-3000:]
  lines = err.rstrip("\n").splitlines()
  assert all(line.startswith("    ") for line in lines[1:]), err[-3000:]  # wrapped, one message
  message = " ".join(err.split())
  for phrase in phrases:
    assert phrase in message, (phrase, message)
  return message


def main_args(workdir, *args: str) -> list[str]:
  return ["--config=configs/tiny.py", f"--workdir={workdir}", *args]


def load_config_file(path: str):
  spec = importlib.util.spec_from_file_location("config_under_test", os.path.join(ROOT, path))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


# ------------------------------------------------------------------ config files that fail

BROKEN_CONFIGS = {
  "syntax.py": ("def get_config(\n  return 1\n", ["SyntaxError", "line 1"]),
  "raises.py": (
    "def get_config():\n  raise RuntimeError('no data set named x')\n",
    ["RuntimeError: no data set named x", "line 2"],
  ),
  "imports.py": (
    "import no_such_module_abc\n\ndef get_config():\n  return None\n",
    ["ModuleNotFoundError: No module named 'no_such_module_abc'", "line 1"],
  ),
  "returns_none.py": ("def get_config():\n  return None\n", ["get_config() returned None"]),
  "no_function.py": ("X = 1\n", ["defines no get_config() function", "configs/tiny.py"]),
}


def write_broken(tmp_path, name: str) -> str:
  path = tmp_path / name
  path.write_text(BROKEN_CONFIGS[name][0])
  return str(path)


def test_a_config_file_with_a_syntax_error_is_one_line(tmp_path):
  path = write_broken(tmp_path, "syntax.py")
  proc = command("arcvq_jax.main", f"--config={path}", f"--workdir={tmp_path / 'w'}")
  assert_one_error_line(
    proc, f"--config={path}: the file failed to load", *BROKEN_CONFIGS["syntax.py"][1], "Fix"
  )
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_every_broken_config_file_is_one_line_naming_file_and_cause(tmp_path):
  """A get_config that raises, an import of a missing module, a get_config that returns None
  (not "has no key 'Attribute'", also with an override), a file without get_config (not
  "has no key 'module'"), an empty --config=, a directory."""
  for name, extra in (
    ("raises.py", []),
    ("imports.py", []),
    ("returns_none.py", ["--config.batch_size=3"]),
    ("no_function.py", []),
  ):
    path = write_broken(tmp_path, name)
    proc = command("arcvq_jax.main", f"--config={path}", f"--workdir={tmp_path / 'w'}", *extra)
    message = assert_one_error_line(proc, f"--config={path}", *BROKEN_CONFIGS[name][1])
    assert "has no key" not in message
  proc = command("arcvq_jax.main", "--config=", f"--workdir={tmp_path / 'w'}")
  assert_one_error_line(proc, "--config= is empty", "--config=configs/demo.py")
  proc = command("arcvq_jax.main", "--config=configs", f"--workdir={tmp_path / 'w'}")
  assert_one_error_line(proc, "--config=configs: is a directory", "configs/demo.py")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_debug_shows_the_traceback_of_a_config_file_that_fails(tmp_path):
  path = write_broken(tmp_path, "raises.py")
  proc = command("arcvq_jax.main", f"--config={path}", f"--workdir={tmp_path}")
  assert_one_error_line(proc, "RuntimeError: no data set named x", "--debug")
  proc = command("arcvq_jax.main", f"--config={path}", f"--workdir={tmp_path}", "--debug")
  assert proc.returncode != 0
  assert "Traceback" in proc.stderr and "RuntimeError: no data set named x" in proc.stderr
  assert f'File "{path}", line 2' in proc.stderr  # the cause's own frame


@pytest.mark.slow
def test_a_sweep_file_that_fails_to_load_is_one_line(tmp_path):
  path = write_broken(tmp_path, "syntax.py")
  proc = command(
    "arcvq_jax.ablate", "--config=configs/tiny.py", f"--sweep={path}", f"--workdir={tmp_path}/w"
  )
  assert_one_error_line(proc, f"--sweep={path}: the file failed to load", "SyntaxError", "line 1")
  path = write_broken(tmp_path, "returns_none.py")
  proc = command(
    "arcvq_jax.ablate", "--config=configs/tiny.py", f"--sweep={path}", f"--workdir={tmp_path}/w"
  )
  assert_one_error_line(proc, "get_config() returned None", "configs/sweeps/tiny.py")


# ----------------------------------------------------------------- flags and config overrides


def test_a_config_key_given_as_a_flag_names_the_override(tmp_path):
  proc = command("arcvq_jax.main", *main_args(tmp_path, "--batch_size=3"))
  assert_one_error_line(proc, "--batch_size", "--config.batch_size=VALUE")


@pytest.mark.slow
def test_override_mistakes_name_the_key_and_its_type(tmp_path):
  proc = command("arcvq_jax.main", *main_args(tmp_path, "--lr=1e-3"))
  assert_one_error_line(proc, "--config.optimizer.lr=VALUE")
  proc = command("arcvq_jax.main", *main_args(tmp_path, "--batchsize=3"))
  assert_one_error_line(proc, "did you mean the config key --config.batch_size=VALUE?")
  proc = command("arcvq_jax.main", *main_args(tmp_path, "--config.model.hidden.x=3"))
  message = assert_one_error_line(proc, "--config.model.hidden.x", "model.hidden", "(int)")
  assert "'Attribute'" not in message
  proc = command("arcvq_jax.main", *main_args(tmp_path, "--config.batch_size=abc"))
  assert_one_error_line(proc, "--config.batch_size=abc", "takes an int", "Give an int")


def test_a_stage_override_without_its_sections_names_a_config_file_that_has_them(tmp_path):
  proc = command("arcvq_jax.main", *main_args(tmp_path / "w", "--config.stage=ldm"))
  assert_one_error_line(
    proc, "config.stage: is 'ldm', but configs/tiny.py has no", "unet", "configs/tiny_ldm.py"
  )
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.slow
def test_a_vqgan_or_pixelcnn_override_without_its_sections_is_one_line(tmp_path):
  proc = command("arcvq_jax.main", *main_args(tmp_path / "w", "--config.model.name=vqgan"))
  assert_one_error_line(proc, "config.model.name: is 'vqgan'", "gan", "configs/tiny_vqgan.py")
  proc = command("arcvq_jax.main", *main_args(tmp_path / "w", "--config.stage=pixelcnn"))
  assert_one_error_line(proc, "config.stage: is 'pixelcnn'", "configs/tiny_pixelcnn.py")
  assert not os.path.exists(tmp_path / "w")


@pytest.mark.parametrize(
  ("stage", "model", "needs"),
  [("ldm", None, "unet"), ("pixelcnn", None, "pixelcnn"), ("tokenizer", "vqgan", "gan")],
)
def test_check_sections_points_at_config_files_that_have_them(stage, model, needs):
  key = "model.name" if model else "stage"
  value = model or stage
  examples = config_lib.EXAMPLE_CONFIGS[value]
  for path in examples:  # the files the message names do have the sections
    config_lib.check_sections(load_config_file(path), path)
  config = load_config_file("configs/tiny.py")
  if model:
    config.model.name = model
  else:
    config.stage = stage
  with pytest.raises(ValueError) as e:
    config_lib.check_sections(config, "configs/tiny.py")
  message = str(e.value)
  assert message.startswith(f"config.{key}: is {value!r}, but configs/tiny.py has no")
  assert needs in message and all(path in message for path in examples)
  assert cli.is_user_error(e.value)


def test_an_empty_workdir_is_refused_by_name():
  for empty in ("", "  "):
    with pytest.raises(cli.UserError, match=r"--workdir is empty: give a directory"):
      cli.check_workdir(empty)
  with pytest.raises(api.TokenizerLoadError, match="the workdir is an empty path"):
    api.load_config("")


@pytest.mark.slow
def test_an_empty_workdir_is_one_line_in_every_command(tmp_path):
  assert_one_error_line(command("arcvq_jax.main", *main_args("")), "--workdir is empty")
  for module in ("arcvq_jax.evaluate", "arcvq_jax.sample"):
    assert_one_error_line(command(module, "--workdir="), "the workdir is an empty path")


def test_a_negative_count_names_the_flag(tmp_path):
  proc = command("arcvq_jax.evaluate", f"--workdir={tmp_path}", "--batch_size=-5")
  assert_one_error_line(proc, "--batch_size=-5", "not a non-negative integer", "--help")


@pytest.mark.slow
def test_non_positive_counts_and_non_finite_settings_name_the_flag(tmp_path):
  where = f"--workdir={tmp_path}"
  for module, given, flag, phrase in (
    ("sample", where, "--num_samples=-4", "not a positive integer"),
    ("sample", where, "--num_samples=0", "not a positive integer"),
    ("sample", where, "--batch_size=0", "not a positive integer"),
    ("sample", where, "--ddim_steps=0", "not a positive integer"),
    ("evaluate", where, "--num_images=-1", "not a non-negative integer"),
    ("evaluate", where, "--inception_batch_size=0", "not a positive integer"),
    ("evaluate_samples", f"--samples={tmp_path}/s.npz", "--batch_size=0", "not a positive"),
  ):
    assert_one_error_line(command(f"arcvq_jax.{module}", given, flag), flag, phrase)
  proc = command("arcvq_jax.sample", f"--workdir={tmp_path}", "--temperature=nan")
  assert_one_error_line(proc, "--temperature=nan", "a finite temperature > 0")


# ------------------------------------------------------------ errors of a command run as __main__


def test_errors_of_a_command_run_as_main_are_user_errors(monkeypatch):
  """`python -m arcvq_jax.evaluate_samples` defines ImageSetError in module __main__: it
  ended in a traceback although it is listed in USER_ERRORS."""
  fake_main = types.ModuleType("__main__")
  fake_main.__spec__ = importlib.util.spec_from_loader("arcvq_jax.evaluate_samples", loader=None)
  monkeypatch.setitem(sys.modules, "__main__", fake_main)
  as_main = type("ImageSetError", (ValueError,), {"__module__": "__main__"})
  assert cli.is_user_error(as_main("x.npz has no array 'images'"))
  subclass = type("Sub", (api.TokenizerInputError,), {})
  assert cli.is_user_error(subclass("x"))  # a subclass of a listed error
  other = type("KeyError2", (KeyError,), {"__module__": "__main__"})
  assert not cli.is_user_error(other("params"))


@pytest.mark.slow
def test_evaluate_samples_refuses_bad_sample_files_in_one_line(tmp_path):
  (tmp_path / "random.npz").write_bytes(np.random.default_rng(0).bytes(3000))
  np.savez(tmp_path / "empty.npz", images=np.zeros((0, 8, 8, 3), np.uint8))
  np.savez(tmp_path / "few.npz", images=np.zeros((3, 8, 8, 3), np.uint8))
  for name, phrase in (
    ("random.npz", "is not an .npz file"),
    ("empty.npz", "holds no images"),
    ("few.npz", "the Inception Score needs at least 10"),
  ):
    proc = command(
      "arcvq_jax.evaluate_samples", f"--samples={tmp_path / name}", f"--reference={tmp_path}"
    )
    assert_one_error_line(proc, str(tmp_path / name), phrase)


def test_a_weights_or_statistics_file_that_is_no_npz_is_a_value_error(tmp_path):
  """The LPIPS / Inception weights and FID statistics readers turn OSError and ValueError
  into their one-line errors; numpy raised EOFError for an empty file and BadZipFile for a
  cut-short one (tracebacks), and called any other file "pickled (object) data"."""
  np.savez(tmp_path / "good.npz", a=np.zeros(1000))
  good = (tmp_path / "good.npz").read_bytes()
  cases = {"empty.npz": b"", "cut.npz": good[: len(good) // 2], "notes.npz": b"mu = 1\n"}
  for name, data in cases.items():
    (tmp_path / name).write_bytes(data)
  for name, phrase in (
    ("empty.npz", "is empty (0 bytes)"),
    ("cut.npz", "damaged or cut short"),
    ("notes.npz", "is not an .npz file"),
  ):
    with pytest.raises(ValueError, match=re.escape(phrase)):
      npz_files.read_npz(str(tmp_path / name))
    with pytest.raises(lpips_lib.LPIPSWeightsError, match=re.escape(phrase)):
      lpips_lib.load_params(str(tmp_path / name))
  np.testing.assert_array_equal(npz_files.read_npz(str(tmp_path / "good.npz"))["a"], 0)


# ---------------------------------------------------------------------- the weight converters


class _RunsCode:
  """Unpickling this calls os.system (pickle's REDUCE): it must never happen."""

  def __init__(self, marker: str):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


@pytest.fixture
def bad_files(tmp_path):
  """{kind: path} of files no converter may read: random bytes, an empty file, a text file,
  a directory, torch.save / plain pickles that would run code, a cut-short checkpoint."""
  torch = pytest.importorskip("torch")
  marker = str(tmp_path / "pwned")
  files = dict(
    random=tmp_path / "random.pt",
    empty=tmp_path / "empty.pt",
    text=tmp_path / "notes.txt",
    evil=tmp_path / "evil.pt",
    evil_legacy=tmp_path / "evil_legacy.pt",
    evil_pickle4=tmp_path / "evil_pickle4.pt",
    truncated=tmp_path / "truncated.pt",
  )
  files["random"].write_bytes(b"\x13" + np.random.default_rng(0).bytes(3000))
  files["empty"].write_bytes(b"")
  files["text"].write_text("features.0.weight = 1\n")
  torch.save({"features.0.weight": _RunsCode(marker)}, files["evil"])
  torch.save(_RunsCode(marker), files["evil_legacy"], _use_new_zipfile_serialization=False)
  files["evil_pickle4"].write_bytes(pickle.dumps({"w": _RunsCode(marker)}, protocol=4))
  good = tmp_path / "good.pt"
  torch.save({"features.0.weight": torch.zeros(3)}, good)
  files["truncated"].write_bytes(good.read_bytes()[:200])
  paths = {k: str(v) for k, v in files.items()}
  paths["directory"] = str(tmp_path)
  return paths, marker


def test_the_torch_reader_says_what_each_bad_file_is(bad_files):
  paths, marker = bad_files
  expected = dict(
    random=(torch_load.CheckpointReadError, "is not a PyTorch checkpoint: it is neither a zip"),
    empty=(torch_load.CheckpointReadError, "is empty (0 bytes)"),
    text=(torch_load.CheckpointReadError, "is not a PyTorch checkpoint"),
    directory=(torch_load.CheckpointReadError, "is a directory, not a checkpoint file"),
    evil=(torch_load.UnsafeCheckpointError, "(posix.system)"),
    evil_legacy=(torch_load.UnsafeCheckpointError, "(posix.system)"),
    evil_pickle4=(torch_load.UnsafeCheckpointError, "(posix.system)"),
    truncated=(torch_load.CheckpointReadError, "damaged or not a checkpoint"),
  )
  for kind, (error, phrase) in expected.items():
    for read in (torch_load.read_checkpoint, torch_state.load_torch_state):
      with pytest.raises(error) as e:
        read(paths[kind])
      message = str(e.value)
      assert phrase in message and paths[kind] in message, (kind, message)
      assert " ()" not in message and ": )" not in message, (kind, message)  # no empty reason
      assert cli.is_user_error(e.value)
  assert not os.path.exists(marker)


def test_the_lpips_converter_refuses_a_random_file_in_one_line(bad_files):
  paths, _ = bad_files
  proc = command(
    "arcvq_jax.convert.lpips_weights", f"--vgg16={paths['random']}", f"--lin={paths['random']}"
  )
  assert_one_error_line(proc, paths["random"], "is not a PyTorch checkpoint", "Download")


@pytest.mark.slow
def test_the_weight_converters_refuse_bad_files_in_one_line(bad_files, tmp_path):
  paths, marker = bad_files
  out = str(tmp_path / "out.npz")
  for module, kind, phrase in (
    ("lpips_weights", "evil", "refusing to load"),
    ("inception_weights", "empty", "is empty (0 bytes)"),
    ("inception_weights", "evil_pickle4", "refusing to load"),
  ):
    flag = [f"--vgg16={paths[kind]}", f"--lin={paths[kind]}"] if "lpips" in module else []
    flag = flag or [f"--pt={paths[kind]}"]
    proc = command(f"arcvq_jax.convert.{module}", *flag, f"--out={out}")
    assert_one_error_line(proc, paths[kind], phrase)
  assert not os.path.exists(marker) and not os.path.exists(out)


def test_the_checkpoint_converter_refuses_a_text_file_with_status_2(bad_files, tmp_path):
  paths, _ = bad_files
  proc = command(
    "arcvq_jax.convert.torch_checkpoint",
    f"--ckpt={paths['text']}",
    "--kind=arcvq_vqvae",
    "--config=configs/mnist.py",
    f"--workdir={tmp_path / 'out'}",
  )
  assert_one_error_line(proc, paths["text"], "is not a PyTorch checkpoint")
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.slow
def test_the_checkpoint_converter_names_what_each_bad_file_is(bad_files, tmp_path):
  paths, marker = bad_files
  for kind, phrase in (
    ("random", "neither a zip archive (what torch.save writes) nor a pickle"),
    ("empty", "is empty (0 bytes)"),
    ("directory", "is a directory, not a checkpoint file"),
    ("truncated", "damaged or not a checkpoint"),
  ):
    proc = command(
      "arcvq_jax.convert.torch_checkpoint",
      f"--ckpt={paths[kind]}",
      "--kind=arcvq_vqvae",
      "--config=configs/mnist.py",
      f"--workdir={tmp_path / 'out'}",
    )
    message = assert_one_error_line(proc, paths[kind], phrase)
    assert "no such file" not in message and "Python objects ()" not in message
  assert not os.path.exists(marker)


# ------------------------------------------------------------------------- the tokenizer API


@pytest.fixture(scope="module")
def tok():
  config = load_config_file("configs/tiny.py")  # K = 64 codes of D = 16, f = 4, 1 channel
  model = state_lib.build_model(config, channels=1)
  return api.Tokenizer(config, init_params(model, jnp.zeros((1, 28, 28, 1))))


def test_api_refuses_nan_images(tok):
  images = np.zeros((2, 28, 28, 1), np.float32)
  images[1, 3, 4, 0] = np.nan
  for given in (images, jnp.asarray(images)):  # host array and device array
    with pytest.raises(api.TokenizerInputError, match="images hold NaN or infinite values"):
      tok.encode(given)
  images[1, 3, 4, 0] = np.inf
  with pytest.raises(api.TokenizerInputError, match="NaN or infinite"):
    tok.encode_latents(images)


def test_api_refuses_tokens_outside_the_vocabulary_before_int32(tok):
  big = np.full((1, 7, 7), 2**40, np.int64)  # 2^40 mod 2^32 = 0: a valid token once wrapped
  with pytest.raises(api.TokenizerInputError, match=r"tokens must lie in \[0, 64\)") as e:
    tok.decode(big)
  assert "1099511627776" in str(e.value)
  for bad in (np.full((1, 7, 7), -1), jnp.full((1, 7, 7), 64)):
    with pytest.raises(api.TokenizerInputError, match=r"\[0, 64\)"):
      tok.decode(bad)
  with pytest.raises(api.TokenizerInputError, match=r"\[0, 64\)"):
    tok.lookup(np.array([3, 64]))
  with pytest.raises(api.TokenizerInputError, match="integers of shape"):
    tok.decode(np.zeros((1, 7, 7), np.float32))


def test_api_refuses_empty_batches(tok):
  with pytest.raises(api.TokenizerInputError, match=r"images of shape \(0, 28, 28, 1\) are empty"):
    tok.encode(np.zeros((0, 28, 28, 1), np.float32))
  with pytest.raises(api.TokenizerInputError, match="are empty"):
    tok.decode(np.zeros((0, 7, 7), np.int32))
  with pytest.raises(api.TokenizerInputError, match="are empty"):
    tok.decode_latents(np.zeros((0, 7, 7, 16), np.float32))


def test_api_refuses_latents_of_another_width_or_not_finite(tok):
  with pytest.raises(api.TokenizerInputError, match=r"latents must be \(B, h, w, 16\)"):
    tok.quantize(np.zeros((1, 7, 7, 3), np.float32))
  with pytest.raises(api.TokenizerInputError, match=r"\(B, h, w, 16\)"):
    tok.decode_latents(np.zeros((7, 7, 16), np.float32))
  with pytest.raises(api.TokenizerInputError, match="NaN or infinite"):
    tok.quantize(np.full((1, 7, 7, 16), np.nan, np.float32))


def test_api_input_errors_are_one_typed_user_error(tok):
  assert issubclass(api.TokenizerInputError, ValueError)
  assert "arcvq_jax.api.TokenizerInputError" in cli.USER_ERRORS
  with pytest.raises(api.TokenizerInputError) as e:
    tok.encode(np.zeros((1, 28, 28, 3), np.float32))  # 3 channels for a 1-channel model
  assert cli.is_user_error(e.value)


# -------------------------------------------------------------------------- a failed ablation run


def test_a_failed_ablation_run_logs_one_line_and_keeps_the_traceback(tmp_path, caplog):
  sweep = sweep_lib.from_config(
    dict(variants=("vq",), seeds=(0,), grid={"optimizer": {"lr": (-1.0,)}}, overrides={}),
    "test sweep",
  )
  source = sweep_lib.ConfigSource("configs/tiny.py", None, {})
  (planned,) = runner.plan(str(tmp_path), source, sweep, sweep.runs(), "test")
  with caplog.at_level(logging.INFO):
    status = runner.execute(str(tmp_path), planned, runner.Weights())
  assert status["state"] == runner.FAILED
  assert status["error"].startswith("ValueError: config.optimizer.lr: must be > 0")
  failed = [r for r in caplog.records if "failed" in r.getMessage()]
  assert len(failed) == 1, [r.getMessage() for r in caplog.records]
  assert failed[0].exc_info is None and "\n" not in failed[0].getMessage()
  assert "config.optimizer.lr: must be > 0" in failed[0].getMessage()
  error_txt = os.path.join(tmp_path, planned.run.relpath, "ablate", "error.txt")
  assert "error.txt" in failed[0].getMessage()
  with open(error_txt) as f:
    assert "Traceback" in f.read()
