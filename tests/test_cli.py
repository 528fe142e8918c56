"""The command lines' shared behaviour (arcvq_jax/cli.py): a mistake the user can fix ends in
one message naming the problem and the fix, with a non-zero status and no traceback (unless
--debug); --help exits 0; library chatter stays off and lines stay short."""

from __future__ import annotations

import gzip
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from absl import app
from data_fixtures import write_idx

from arcvq_jax import cli
from arcvq_jax.data.idx import DataError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)


def run(module: str, *args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", module, *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def flat(text: str) -> str:
  """The text with its line wrapping undone."""
  return " ".join(text.split())


def assert_user_error(proc: subprocess.CompletedProcess, *phrases: str) -> None:
  assert proc.returncode == cli.USER_ERROR_STATUS, (proc.returncode, proc.stderr[-3000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  message = flat(proc.stderr[proc.stderr.index("error: ") :])
  for phrase in phrases:
    assert phrase in message, (phrase, message)


def main_args(workdir, *args: str) -> list[str]:
  return ["--config=configs/tiny.py", f"--workdir={workdir}", *args]


# ------------------------------------------------------------------------ in-process units


def test_wrap_keeps_lines_short_and_commands_whole():
  command = "`python -m arcvq_jax.convert.lpips_weights --vgg16=vgg16-397923af.pth --out=x`"
  text = "word " * 60 + command + " and " + "more " * 40
  lines = cli.wrap(text, width=100).splitlines()
  assert len(lines) > 3 and all(len(line) <= 100 for line in lines)
  assert any(command in line for line in lines)
  assert flat(cli.wrap(text, width=100)) == flat(text)
  assert cli.wrap("short") == "short"


def test_user_errors_are_recognised():
  assert cli.is_user_error(DataError("x"))
  assert cli.is_user_error(cli.UserError("x"))
  assert cli.is_user_error(app.UsageError("x"))
  assert cli.is_user_error(ValueError("config.arc.s: must be > 0, got 0. The paper uses 10."))
  assert not cli.is_user_error(ValueError("operands could not be broadcast together"))
  assert not cli.is_user_error(KeyError("params"))


def test_check_workdir(tmp_path):
  cli.check_workdir(str(tmp_path / "new" / "run"))
  assert os.path.isdir(tmp_path / "new" / "run") and not os.listdir(tmp_path / "new" / "run")
  (tmp_path / "file").write_text("")
  with pytest.raises(cli.UserError, match="is a file, not a directory"):
    cli.check_workdir(str(tmp_path / "file"))
  with pytest.raises(cli.UserError, match=r"cannot be written \(Not a directory\)"):
    cli.check_workdir(str(tmp_path / "file" / "run"))
  cli.check_workdir("gs://bucket/run")  # left to the first write


def test_an_older_jax_is_refused_with_the_upgrade_command(capsys):
  for version in (cli.MIN_JAX_VERSION, "0.10.2", "0.10.0.dev20260101", "1.0"):
    cli.check_jax_version(version)
  cli.check_jax_version()  # the installed one
  with pytest.raises(SystemExit) as exit_info:
    cli.check_jax_version("0.9.1")
  assert exit_info.value.code == cli.USER_ERROR_STATUS
  message = flat(capsys.readouterr().err)
  assert message.startswith("error: jax 0.9.1 is older than this project needs (0.9.2)")
  assert f"pip install -U 'jax>={cli.MIN_JAX_VERSION}'" in message


def test_pyproject_asks_for_the_jax_the_commands_check_for():
  with open(os.path.join(ROOT, "pyproject.toml")) as f:
    (floor,) = re.findall(r'"jax>=([0-9.]+)"', f.read())
  assert floor == cli.MIN_JAX_VERSION


# --------------------------------------------------------------------------- main's errors


@pytest.mark.slow
def test_wrong_config_path(tmp_path):
  proc = run("arcvq_jax.main", "--config=configs/nope.py", f"--workdir={tmp_path}")
  assert_user_error(proc, "--config=configs/nope.py: no such config file", "configs/demo.py")


@pytest.mark.slow
def test_unknown_config_key(tmp_path):
  proc = run("arcvq_jax.main", *main_args(tmp_path, "--config.batchsize=3"))
  assert_user_error(proc, "--config.batchsize", "has no key 'batchsize'", "'batch_size'")


@pytest.mark.slow
def test_unknown_variant_and_bad_value(tmp_path):
  proc = run("arcvq_jax.main", "--config=configs/tiny.py:nope", f"--workdir={tmp_path}")
  assert_user_error(proc, "unknown variant 'nope'", "configs/fashion_mnist.py:vanilla")
  proc = run("arcvq_jax.main", *main_args(tmp_path, "--config.batch_size=abc"))
  assert_user_error(proc, "--config.batch_size=abc")


@pytest.mark.slow
@needs_fashion
def test_invalid_config_value_names_the_key(tmp_path):
  proc = run("arcvq_jax.main", *main_args(tmp_path, "--config.arc.top_k=0"))
  assert_user_error(proc, "config.arc.top_k: must be an integer >= 1, got 0", "uses 3")


@pytest.mark.slow
def test_missing_data(tmp_path):
  proc = run("arcvq_jax.main", *main_args(tmp_path / "run", f"--config.data.path={tmp_path}/no"))
  assert_user_error(proc, "does not exist", "apt-get install dataset-fashion-mnist")


@pytest.mark.slow
def test_truncated_data_file(tmp_path):
  data = tmp_path / "idx"
  data.mkdir()
  rng = np.random.default_rng(0)
  for prefix, n in (("train", 64), ("t10k", 32)):
    write_idx(
      str(data / f"{prefix}-images-idx3-ubyte"), rng.integers(0, 255, (n, 28, 28), np.uint8)
    )
    write_idx(str(data / f"{prefix}-labels-idx1-ubyte"), np.zeros(n, np.uint8))
  with open(data / "train-images-idx3-ubyte", "r+b") as f:
    f.truncate(1000)
  proc = run("arcvq_jax.main", *main_args(tmp_path / "run", f"--config.data.path={data}"))
  assert_user_error(proc, "train-images-idx3-ubyte", "truncated", "Download it again")


@pytest.mark.slow
def test_truncated_gzip_data_file(tmp_path):
  data = tmp_path / "idx"
  shutil.copytree(FASHION, data) if os.path.isdir(FASHION) else data.mkdir()
  if not os.path.isdir(FASHION):
    for name in ("train-images-idx3-ubyte", "t10k-images-idx3-ubyte"):
      write_idx(str(data / f"{name}.gz"), np.zeros((8, 28, 28), np.uint8))
    for name in ("train-labels-idx1-ubyte", "t10k-labels-idx1-ubyte"):
      write_idx(str(data / f"{name}.gz"), np.zeros(8, np.uint8))
  path = data / "train-images-idx3-ubyte.gz"
  with gzip.open(path) as f:
    assert f.read(4)  # readable before
  with open(path, "r+b") as f:
    f.truncate(os.path.getsize(path) // 2)
  proc = run("arcvq_jax.main", *main_args(tmp_path / "run", f"--config.data.path={data}"))
  assert_user_error(proc, "train-images-idx3-ubyte.gz")


@pytest.mark.slow
def test_workdir_that_cannot_be_written(tmp_path):
  (tmp_path / "file").write_text("")
  proc = run("arcvq_jax.main", *main_args(tmp_path / "file" / "run"))
  assert_user_error(proc, f"--workdir={tmp_path}/file/run cannot be written", "Give a directory")
  proc = run("arcvq_jax.main", *main_args(tmp_path / "file"))
  assert_user_error(proc, "is a file, not a directory")


@pytest.mark.slow
def test_debug_shows_the_traceback(tmp_path):
  proc = run("arcvq_jax.main", *main_args(tmp_path / "run", "--debug", "--config.data.path=/no"))
  assert proc.returncode != 0 and "Traceback" in proc.stderr and "DataError" in proc.stderr


# ---------------------------------------------------------------- the other entry points


@pytest.mark.slow
@pytest.mark.parametrize("module", ["arcvq_jax.main", "arcvq_jax.evaluate", "arcvq_jax.sample"])
def test_help_exits_zero(module):
  proc = run(module, "--help")
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "--workdir" in proc.stdout


@pytest.mark.slow
def test_evaluate_on_a_folder_that_is_no_run(tmp_path):
  proc = run("arcvq_jax.evaluate", f"--workdir={tmp_path}")
  assert_user_error(proc, "config.json not found", "arcvq_jax.main")


@pytest.mark.slow
def test_evaluate_on_a_prior_run_points_at_its_tokenizer_and_at_sample_scoring(tmp_path):
  from configs import tiny_pixelcnn  # noqa: PLC0415

  config = tiny_pixelcnn.get_config()
  config.tokenizer_workdir = "/runs/tok"
  (tmp_path / "config.json").write_text(config.to_json())
  proc = run("arcvq_jax.evaluate", f"--workdir={tmp_path}")
  assert_user_error(
    proc, "is a 'pixelcnn' run (a prior)", "(this prior's: /runs/tok)", "arcvq_jax.evaluate_samples"
  )


@pytest.mark.slow
def test_evaluate_unknown_flag_value():
  proc = run("arcvq_jax.evaluate", "--workdir=/tmp", "--skip=psnr")
  assert_user_error(proc, "--skip=psnr: only lpips, rfid can be skipped", "--help")


@pytest.mark.slow
def test_converter_missing_file(tmp_path):
  proc = run(
    "arcvq_jax.convert.torch_checkpoint",
    f"--ckpt={tmp_path}/none.pt",
    "--kind=arcvq_vqvae",
    "--config=configs/mnist.py",
    f"--workdir={tmp_path}/out",
  )
  assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "none.pt" in flat(proc.stderr)


# ---------------------------------------------------------------- a quiet, readable run


@pytest.mark.slow
@needs_fashion
def test_default_console_output_is_short_and_without_library_chatter(tmp_path):
  proc = run(
    "arcvq_jax.main",
    *main_args(tmp_path / "run", "--config.num_train_steps=2", "--config.eval_batch_size=2000"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  output = proc.stdout + proc.stderr
  for chatter in ("oneDNN", "Unable to initialize backend", "absl::InitializeLog", "orbax"):
    assert chatter not in output, chatter
  long = [line for line in output.splitlines() if len(line) > cli.MAX_WIDTH and "\r" not in line]
  assert not long, long
