"""Fault injection on inputs, resources and the malloc: a damaged split fails before the first
step, a failure after an asynchronous save leaves that checkpoint committed, a `checkpoints`
file fails at once, a config that cannot fit in memory or holds a non-finite value is refused
before anything is allocated, the NaN stop says when there is no checkpoint yet, and the fast
malloc stays off accelerator hosts and out of child processes (docs/training.md, "Errors and
resuming")."""

import functools
import gzip
import math
import os
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from data_fixtures import FASHION_MNIST_DIR, raw_idx_images, raw_idx_labels, write_idx
from run_helpers import override

from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax import config as config_lib
from arcvq_jax import host_memory, prior_config, resources
from arcvq_jax.data import pipeline
from arcvq_jax.data.idx import DataError
from arcvq_jax.models import pixelcnn
from arcvq_jax.train import loop, prior_common, prior_pixelcnn, tokenizer_steps
from arcvq_jax.train import state as state_lib
from configs import tiny, tiny_pixelcnn

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_fashion = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION_MNIST_DIR, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
MALLOC_VARIABLES = (*host_memory.MALLOC_VARIABLES, host_memory.RESTORE_VARIABLE)
# The commands' environment without the malloc the test session runs on (conftest.py sets it).
ENV = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
ENV.update(JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)


def tiny_config(**overrides):
  """The tiny tokenizer, 2 steps, a checkpoint at 2, no image grids."""
  c = tiny.get_config()
  c.image_every_steps = 0
  c.num_train_steps = 2
  c.checkpoint_every_steps = 2
  return override(c, **overrides)


def small_idx_dir(directory, test_suffix=".gz"):
  """128 train and 64 test Fashion-MNIST images as IDX files (gzipped train files; the test
  files gzipped where test_suffix is '.gz'); the test images' path."""
  os.makedirs(directory, exist_ok=True)
  sources = {
    "train-images-idx3-ubyte.gz": raw_idx_images(f"{FASHION_MNIST_DIR}/train-images-idx3-ubyte.gz"),
    "train-labels-idx1-ubyte.gz": raw_idx_labels(f"{FASHION_MNIST_DIR}/train-labels-idx1-ubyte.gz"),
    f"t10k-images-idx3-ubyte{test_suffix}": raw_idx_images(
      f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz"
    ),
    f"t10k-labels-idx1-ubyte{test_suffix}": raw_idx_labels(
      f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz"
    ),
  }
  for name, array in sources.items():
    write_idx(os.path.join(directory, name), array[: 128 if name.startswith("train") else 64])
  return os.path.join(directory, f"t10k-images-idx3-ubyte{test_suffix}")


def truncate(path, keep=0.6):
  """Cuts a file to `keep` of its length, as an interrupted copy does."""
  with open(path, "rb") as f:
    data = f.read()
  with open(path, "wb") as f:
    f.write(data[: int(len(data) * keep)])


def run_main(*args, timeout=300, limit_memory=False):
  """`python -m arcvq_jax.main ARGS` on the CPU; (process, seconds). limit_memory: the
  command's address space capped at 16 GiB (set in the child, which exec keeps), so that a run
  that would allocate without bound fails instead of taking the machine."""
  command = [sys.executable, "-m", "arcvq_jax.main"]
  if limit_memory:
    command = [sys.executable, "-c", LIMITED_MAIN.format(cap=16 * 2**30)]
  start = time.perf_counter()
  proc = subprocess.run(
    [*command, *args], cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=ENV
  )
  return proc, time.perf_counter() - start


LIMITED_MAIN = (
  "import resource, runpy, sys; resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap})); "
  "sys.argv[0] = 'arcvq_jax.main'; runpy.run_module('arcvq_jax.main', run_name='__main__')"
)


def error_lines(stderr):
  return [line for line in stderr.splitlines() if line.startswith("error:")]


# ---------------------------------------------------------------- every input before step 1


@needs_fashion
@pytest.mark.parametrize("suffix", [".gz", ""])
def test_a_truncated_test_split_is_found_by_the_start_up_check(tmp_path, suffix):
  images = small_idx_dir(str(tmp_path), suffix)
  data = override(tiny.get_config().data, path=str(tmp_path))
  pipeline.check_splits(data)  # whole files pass
  truncate(images)
  with pytest.raises(DataError, match=f"{images}.*(truncated|could not be read)"):
    pipeline.check_splits(data)


@needs_fashion
def test_a_gzip_file_cut_at_a_stream_boundary_is_found(tmp_path):
  # gzip's trailer ends the stream cleanly here: only the payload size against the header
  # tells that images are missing
  images = small_idx_dir(str(tmp_path))
  with gzip.open(images, "rb") as f:
    whole = f.read()
  with gzip.open(images, "wb") as f:
    f.write(whole[: len(whole) - 28 * 28 * 3])
  with pytest.raises(DataError, match=f"{images}.* holds 47824 data bytes .* needs 50176"):
    pipeline.check_splits(override(tiny.get_config().data, path=str(tmp_path)))


@needs_fashion
@pytest.mark.slow
def test_a_truncated_test_split_fails_the_command_before_the_first_step(tmp_path):
  images = small_idx_dir(str(tmp_path / "data"))
  truncate(images)
  workdir = tmp_path / "run"
  proc, _ = run_main(
    "--config=configs/tiny.py",
    f"--workdir={workdir}",
    f"--config.data.path={tmp_path / 'data'}",
    "--config.image_every_steps=0",
    "--config.eval_batch_size=64",
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(error_lines(proc.stderr)) == 1 and images in proc.stderr
  assert "first step" not in proc.stderr and "Traceback" not in proc.stderr
  assert not os.path.exists(workdir / "checkpoints")


FAILING_EVALUATION = textwrap.dedent(
  """
  import sys
  from configs import tiny
  from arcvq_jax.train import tokenizer

  def fail(self, step, params):
    raise RuntimeError("injected evaluation failure")

  tokenizer.Evaluation.__call__ = fail
  c = tiny.get_config()
  c.num_train_steps, c.checkpoint_every_steps, c.image_every_steps = 2, 2, 0
  c.checkpoint_async = True
  tokenizer.train_and_evaluate(c, sys.argv[1])
  """
)


@needs_fashion
@pytest.mark.slow
def test_a_failing_final_evaluation_leaves_the_last_checkpoint_committed(tmp_path):
  workdir = str(tmp_path / "run")
  proc = subprocess.run(
    [sys.executable, "-c", FAILING_EVALUATION, workdir],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=300,
    env=ENV,
  )
  assert proc.returncode == 1 and "injected evaluation failure" in proc.stderr
  # the step's save, started asynchronously just before the evaluation, is in place
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["2"]
  assert ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints")).all_steps() == [2]
  # and orbax's threads had finished before the interpreter closed their event loop
  assert "Event loop is closed" not in proc.stderr
  assert "cannot schedule new futures" not in proc.stderr


def test_checkpoints_that_is_a_file_is_refused_at_once(tmp_path):
  (tmp_path / "checkpoints").write_text("not a directory")
  start = time.perf_counter()
  with pytest.raises(ckpt_lib.CheckpointError, match="checkpoints is a file"):
    loop.open_checkpointer(tiny_config(), str(tmp_path))
  assert time.perf_counter() - start < 5
  assert (tmp_path / "checkpoints").read_text() == "not a directory"


@needs_fashion
@pytest.mark.slow
def test_checkpoints_that_is_a_file_fails_the_command_in_seconds(tmp_path):
  os.makedirs(tmp_path / "run")
  (tmp_path / "run" / "checkpoints").write_text("not a directory")
  proc, seconds = run_main(
    "--config=configs/tiny.py",
    f"--workdir={tmp_path / 'run'}",
    "--config.num_train_steps=2",
    timeout=150,  # the command waited 300 s in orbax before
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(error_lines(proc.stderr)) == 1 and "checkpoints is a file" in proc.stderr
  assert seconds < 120


# ------------------------------------------------------------------------- resource sanity


def test_the_state_estimate_is_the_shapes_by_hand():
  c = tiny_config()
  model = state_lib.build_model(c, channels=1)
  e = resources.tokenizer_estimate(c, model, (28, 28, 1), num_devices=1)
  k, d = c.quantizer.num_codes, c.quantizer.embed_dim
  # the codebook, Adam's two moments of it and its gradient, float32
  assert e.codebook == 4 * k * d * 4
  params = jax.eval_shape(state_lib.init_fn(c, (28, 28, 1)), jax.random.PRNGKey(0)).params
  num_params = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  # params, two moments, gradients, plus the small rest (usage (K,), step, rng, EMA stats)
  assert 4 * num_params * 4 <= e.state <= 4 * num_params * 4 + 8 * k * (d + 1) + 64
  assert e.inputs == resources.INPUT_BATCHES * c.batch_size * 28 * 28 * 4


def test_a_codebook_that_cannot_fit_is_refused_with_the_estimate():
  c = tiny_config(**{"quantizer.num_codes": 2_000_000_000})
  model = state_lib.build_model(c, channels=1)
  with pytest.raises(resources.ResourceError) as raised:
    resources.check_tokenizer_fits(c, model, (28, 28, 1))
  message = str(raised.value)
  # 2e9 x 16 float32 is 119.2 GiB; with Adam's moments and the gradient 476.8 GiB
  assert "the codebook's share 476.8 GiB" in message
  assert "lower config.quantizer.num_codes" in message
  assert "of RAM available" in message


def test_a_run_that_fits_is_admitted_and_one_that_does_not_is_refused():
  c = tiny_config()
  model = state_lib.build_model(c, channels=1)

  class Device:  # an accelerator with a given amount of free memory
    platform, device_kind, id = "gpu", "Test GPU", 0

    def __init__(self, free):
      self.free = free

    def memory_stats(self):
      return {"bytes_limit": self.free, "bytes_in_use": 0}

  e = resources.check_tokenizer_fits(c, model, (28, 28, 1), devices=[Device(2**40)])
  with pytest.raises(resources.ResourceError, match="free on Test GPU 0"):
    resources.check_tokenizer_fits(c, model, (28, 28, 1), devices=[Device(e.total - 1)])


def test_a_priors_state_that_cannot_fit_is_refused_before_it_is_allocated():
  c = tiny_pixelcnn.get_config()
  model = pixelcnn.from_config(c, num_codes=64)
  init_fn = functools.partial(
    prior_pixelcnn.init_state, model=model, tx=prior_common.make_optimizer(c), config=c, grid=(7, 7)
  )
  params = jax.eval_shape(init_fn, jax.random.PRNGKey(0)).params
  n = sum(math.prod(x.shape) for x in jax.tree.leaves(params))
  # float32 params, gradients, Adam's two moments and the EMA: five copies (a scalar count
  # and step besides).
  assert c.ema.decay > 0
  expected = 5 * 4 * n

  class Device:
    platform, device_kind, id = "gpu", "Test GPU", 0

    def __init__(self, free):
      self.free = free

    def memory_stats(self):
      return {"bytes_limit": self.free, "bytes_in_use": 0}

  got = resources.check_state_fits(init_fn, c, "config.pixelcnn.dim", devices=[Device(2**40)])
  assert expected <= got < expected + 64
  with pytest.raises(resources.ResourceError, match=r"config\.pixelcnn\.dim"):
    resources.check_state_fits(init_fn, c, "config.pixelcnn.dim", devices=[Device(got - 1)])


@pytest.mark.slow
def test_the_activation_estimate_is_near_what_xla_allocates():
  # the compiled train step's temporaries (XLA's own figure) against the estimate from the
  # forward pass's trace
  c = tiny_config(**{"batch_size": 128})
  model = state_lib.build_model(c, channels=1)
  e = resources.tokenizer_estimate(c, model, (28, 28, 1), num_devices=1)
  params = jax.eval_shape(state_lib.init_fn(c, (28, 28, 1)), jax.random.PRNGKey(0)).params
  grad = jax.value_and_grad(
    lambda p, x, t: tokenizer_steps.tokenizer_loss(p, x, t, model=model, data_variance=1.0),
    has_aux=True,
  )
  x = jax.ShapeDtypeStruct((128, 28, 28, 1), np.float32)
  compiled = jax.jit(grad).lower(params, x, np.int32(0)).compile()
  temp = compiled.memory_analysis().temp_size_in_bytes
  assert 0.5 * temp <= e.train_activations <= 2 * temp


@needs_fashion
@pytest.mark.slow
def test_num_codes_two_billion_fails_the_command_with_the_estimate(tmp_path):
  proc, seconds = run_main(
    "--config=configs/tiny.py",
    f"--workdir={tmp_path}",
    "--config.quantizer.num_codes=2000000000",
    timeout=180,
    limit_memory=True,
  )
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert len(error_lines(proc.stderr)) == 1
  assert "this run needs about" in proc.stderr and "config.quantizer.num_codes" in proc.stderr
  assert "Traceback" not in proc.stderr and "first step" not in proc.stderr
  assert seconds < 120


@pytest.mark.parametrize(
  ("key", "value"),
  [
    ("optimizer.lr", float("inf")),
    ("optimizer.lr", float("nan")),
    ("arc.s", float("inf")),
    ("quantizer.beta", float("nan")),
    ("quantizer.bbnr_alpha", float("-inf")),
  ],
)
def test_non_finite_values_are_refused_by_name(key, value):
  with pytest.raises(ValueError, match=rf"config\.{key}: must be a finite number, got {value}"):
    config_lib.validate(tiny_config(**{key: value}), 1)


def test_adam_betas_out_of_range_are_refused():
  with pytest.raises(ValueError, match=r"config\.optimizer\.b2: must be in \[0, 1\), got 1.0"):
    config_lib.validate(tiny_config(**{"optimizer.b2": 1.0}), 1)


def test_a_priors_non_finite_learning_rate_is_refused():
  c = tiny_pixelcnn.get_config()
  c.tokenizer_workdir = "/somewhere"
  c.optimizer.lr = float("inf")
  with pytest.raises(ValueError, match=r"config\.optimizer\.lr: must be a finite number"):
    prior_config.validate(c)


@pytest.mark.slow
def test_lr_inf_on_the_command_line_is_one_error(tmp_path):
  proc, _ = run_main(
    "--config=configs/tiny.py", f"--workdir={tmp_path}", "--config.optimizer.lr=inf", timeout=120
  )
  assert proc.returncode == 2 and len(error_lines(proc.stderr)) == 1
  assert "error: config.optimizer.lr: must be a finite number, got inf." in proc.stderr
  assert "Traceback" not in proc.stderr


def test_the_nan_stop_without_a_checkpoint_says_there_is_none(tmp_path):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path / "checkpoints"))
  history = [{"loss": np.float32(1.0)}, {"loss": np.float32(np.nan)}]
  with pytest.raises(loop.NonFiniteLossError) as raised:
    loop.check_finite(history, 1, checkpointer, "tokenizer")
  checkpointer.close()
  message = str(raised.value)
  assert "None" not in message
  assert "loss became nan by step 2, before the first checkpoint was written" in message
  assert "nothing to resume from" in message and "starts from step 0" in message


# ---------------------------------------------------------------------------- the malloc


@pytest.mark.parametrize(
  ("environ", "plugins", "devices", "expected"),
  [
    ({}, [], [], None),
    ({}, ["xla_cuda12"], ["nvidia0", "nvidiactl"], "cuda"),
    ({}, ["jax_cuda12_plugin"], ["dxg"], "cuda"),  # WSL
    ({}, ["xla_cuda12"], [], None),  # a plugin without its GPU: JAX runs on the CPU
    ({}, [], ["nvidia0"], None),  # a GPU without the plugin: JAX runs on the CPU
    ({}, ["libtpu"], ["accel0"], "tpu"),
    ({}, ["libtpu"], ["vfio/0"], "tpu"),
    ({}, ["jax_rocm60_plugin"], ["kfd"], "rocm"),
    ({"JAX_PLATFORMS": "cpu"}, ["xla_cuda12"], ["nvidia0"], None),  # the user's choice
    ({"JAX_PLATFORMS": "cuda,cpu"}, [], [], "cuda"),
    ({"JAX_PLATFORMS": "tpu"}, [], [], "tpu"),
    ({"JAX_PLATFORMS": ""}, ["libtpu"], ["accel0"], "tpu"),
  ],
)  # fmt: skip
def test_an_accelerator_is_told_before_jax_is_imported(
  tmp_path, environ, plugins, devices, expected
):
  for name in devices:
    os.makedirs(os.path.dirname(tmp_path / name), exist_ok=True)
    (tmp_path / name).write_text("")
  assert host_memory.accelerator(environ, plugins, dev=str(tmp_path)) == expected


def test_installed_plugins_are_found_without_importing_them(tmp_path, monkeypatch):
  namespace = tmp_path / "jax_plugins" / "xla_cuda12"
  namespace.mkdir(parents=True)
  (namespace / "__init__.py").write_text("raise ImportError('imported')\n")
  (tmp_path / "libtpu").mkdir()
  (tmp_path / "libtpu" / "__init__.py").write_text("raise ImportError('imported')\n")
  monkeypatch.syspath_prepend(str(tmp_path))
  assert {"xla_cuda12", "libtpu"} <= set(host_memory.installed_jax_plugins())
  assert "jax_plugins.xla_cuda12" not in sys.modules


def test_the_restarted_process_puts_the_users_variables_back():
  user = {"LD_PRELOAD": "/opt/libprof.so", "GLIBC_TUNABLES": "glibc.malloc.arena_max=2", "X": "1"}
  changes = host_memory.start_environment(user, (2, 36), "madvise", "/usr/lib/libjemalloc.so.2")
  restarted = dict(user, **changes)
  restarted[host_memory.RESTORE_VARIABLE] = host_memory.restore_record(user, changes)
  assert host_memory.restore_environment(restarted)
  assert restarted == user  # MALLOC_CONF, which the user had not set, is gone again
  assert not host_memory.restore_environment(restarted)  # nothing recorded: nothing done


COMMAND = textwrap.dedent(
  """
  import os, subprocess, sys
  from arcvq_jax import cli

  CHILD = '''
  import os
  names = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF", "ARCVQ_MALLOC_RESTORE")
  mapped = "libjemalloc" in open("/proc/self/maps").read()
  print("child", [os.environ.get(k) for k in names], mapped, sep="|")
  '''

  def main(argv):
    mapped = "libjemalloc" in open("/proc/self/maps").read()
    print("main", os.getpid(), mapped, sep="|", flush=True)
    subprocess.run([sys.executable, "-c", CHILD], check=True)

  if __name__ == "__main__":
    print("start", os.getpid(), sep="|", flush=True)
    cli.run(main)
  """
)


def run_command(tmp_path, **environ):
  """COMMAND's output lines, split into fields, run in ENV plus `environ`."""
  script = tmp_path / "command.py"
  script.write_text(COMMAND)
  proc = subprocess.run(
    [sys.executable, str(script)],
    cwd=ROOT,
    env=dict(ENV, **environ),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return [line.split("|") for line in proc.stdout.splitlines()]


needs_jemalloc = pytest.mark.skipif(
  host_memory.start_environment_for_this_host({"JAX_PLATFORMS": "cpu"}) is None
  or host_memory.find_jemalloc() is None,
  reason="needs libjemalloc.so.2 (libjemalloc2) and a CPU host",
)


@needs_jemalloc
def test_children_of_the_restarted_command_start_on_the_system_malloc(tmp_path):
  lines = run_command(tmp_path, GLIBC_TUNABLES="glibc.malloc.arena_max=4")
  assert [line[0] for line in lines] == ["start", "start", "main", "child"]
  assert lines[2][2] == "True"  # the command runs on jemalloc
  # its child gets the user's settings only, and glibc's malloc
  assert lines[3][1:] == [str(["glibc.malloc.arena_max=4", None, None, None]), "False"]


def test_no_fast_malloc_where_jax_runs_on_an_accelerator(tmp_path):
  lines = run_command(tmp_path, JAX_PLATFORMS="cuda")
  assert [line[0] for line in lines] == ["start", "main", "child"]  # never restarted
  assert lines[1][2] == "False"
  assert lines[2][1:] == [str([None, None, None, None]), "False"]
