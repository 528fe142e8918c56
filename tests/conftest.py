"""Makes the repository root importable, so tests can load configs/*.py, and shares XLA's
compiled programs between the runs of one test session, subprocesses included, which it
compiles without LLVM's optimisations (tests marked `xla_optimised` with them).

Several tests train the same small model more than once (uninterrupted vs resumed runs);
XLA:CPU compile time is most of their cost, so a session-wide persistent compilation cache
(a fresh temporary folder: nothing leaks between sessions) compiles each program once.
"""

import os
import shutil
import sys
import tempfile

import jax
import pytest

from arcvq_jax import host_memory

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# torch's CUDA wheel imports triton (its GPU kernel compiler) when torchvision loads; triton's
# native library segfaults the process once TensorFlow's is loaded (TF 2.21 + triton 3.8,
# `python -c "import tensorflow, triton"`). The tests run on the CPU and never need triton:
# an unimportable triton is what torch expects on machines without it.
sys.modules.setdefault("triton", None)

# The same settings as environment variables too: the tests that run `main` or a script in a
# subprocess pass os.environ on, and those runs compile the same small programs again and again.
# The folder is this run's own (a fresh cache, so the suite's time does not depend on earlier
# runs) and is removed when the run ends: it grows to ~270 MB, and one per run filled /tmp.
_OWN_CACHE = (
  None
  if os.environ.get("JAX_COMPILATION_CACHE_DIR")
  else tempfile.mkdtemp(prefix="arcvq_xla_cache_")
)
_CACHE = {
  # pytest-xdist's workers inherit the first process's folder through the environment
  "jax_compilation_cache_dir": os.environ.get("JAX_COMPILATION_CACHE_DIR") or _OWN_CACHE,
  "jax_persistent_cache_min_compile_time_secs": 0.5,
  "jax_persistent_cache_min_entry_size_bytes": 0,
}
for _name, _value in _CACHE.items():
  jax.config.update(_name, _value)
  os.environ[_name.upper()] = str(_value)

# Most tests compile small programs and run them a few steps: LLVM's optimising passes cost
# more than they save. The suite compiles with `jax_disable_most_optimizations` (XLA's HLO
# passes as always, LLVM's optimisations off), subprocesses too; a test marked `xla_optimised`
# (one that runs its programs long: a 1000-step overfit, an evaluation over many images)
# compiles as users' runs do. See docs/contributing.md, "Compile time".
_UNOPTIMISED = "JAX_DISABLE_MOST_OPTIMIZATIONS"
os.environ[_UNOPTIMISED] = "1"
jax.config.update("jax_disable_most_optimizations", True)

# The commands start over once with the malloc of `host_memory` (jemalloc where installed, else
# glibc's huge pages; from `cli.run`). The subprocesses of the suite start with it already, so
# they run as users' commands do without starting over; pytest-xdist's workers, started after
# this file is read, run with it too.
_START = host_memory.start_environment_for_this_host(os.environ)
if _START is not None:
  os.environ.update(_START)


@pytest.fixture(autouse=True)
def _xla_optimisation(request, monkeypatch):
  if request.node.get_closest_marker("xla_optimised") is None:
    yield
    return
  monkeypatch.delenv(_UNOPTIMISED)
  jax.config.update("jax_disable_most_optimizations", False)
  try:
    yield
  finally:
    jax.config.update("jax_disable_most_optimizations", True)


# `--dist loadfile` hands whole files to the two workers in collection order, which xdist by
# default re-sorts by each file's number of tests: the heavy files, which have few tests, came
# last and one worker finished ~30 s after the other. Here the heaviest files go first (longest
# processing time first), so only short files are left for the end. Worker-seconds of the
# heaviest files (2026-11-27, -n 2); the others follow in collection order. Only the order
# changes, never what runs.
HEAVY_FILES = {
  "test_evaluate.py": 109,
  "test_train_prior.py": 109,
  "test_quantizer_zoo.py": 100,
  "test_convert_torch.py": 99,
  "test_blockwise.py": 98,
  "test_sharding.py": 84,
  "test_gan_steps.py": 82,
  "test_train_vqgan.py": 63,
  "test_ablate.py": 48,
  "test_distributed.py": 46,
  "test_colab.py": 44,
  "test_inception.py": 39,
  "test_prior_sharding.py": 37,
  "test_cli.py": 34,
  "test_train.py": 32,
  "test_bench.py": 70,  # subprocesses: the accelerator, VQGAN, PyTorch and layer benchmarks, tiny
  "test_api.py": 29,
  "test_lpips.py": 28,
  "test_unet.py": 28,
  "test_main.py": 25,
  "test_layers.py": 23,
}


def pytest_configure(config):
  if hasattr(config.option, "loadscopereorder"):  # pytest-xdist's controller
    config.option.loadscopereorder = False


def pytest_unconfigure(config):
  if _OWN_CACHE is not None:  # the process that made it: xdist's controller, or the only one
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)


def pytest_collection_modifyitems(items):
  items.sort(key=lambda item: -HEAVY_FILES.get(item.path.name, 0))  # stable within a file


@pytest.fixture
def no_persistent_cache():
  """The suite shares a persistent compilation cache (conftest.py), with which the layers
  do not take oneDNN (`onednn.available`): off here, and nothing written while it is (JAX
  decides once per process that the cache is in use; a write needs this long a compile)."""
  saved = {
    name: getattr(jax.config, name)
    for name in ("jax_enable_compilation_cache", "jax_persistent_cache_min_compile_time_secs")
  }
  jax.config.update("jax_enable_compilation_cache", False)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 1e9)
  try:
    yield
  finally:
    for name, value in saved.items():
      jax.config.update(name, value)
