"""Benchmarks that must not be found broken when they are needed run end to end on the CPU:
the GPU/TPU benchmark (--tiny models; what a session lent an accelerator runs first), the
VQGAN step's (small images), the comparison with PyTorch, the per-layer convolution and the
oneDNN kernel-gradient benchmarks (tiny batches), the ArcLoss and search benchmark (a small
case)."""

import os
import re
import subprocess
import sys

import pytest
from device_env import without_compilation_cache

from arcvq_jax import host_memory
from arcvq_jax.models import onednn_kernel_grad

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _bench_process(
  script: str, *args: str, timeout: int = 600, cache: bool = True
) -> subprocess.CompletedProcess:
  """cache=False: without the suite's persistent compilation cache, as a user runs a bench
  (with it the layers do not take oneDNN's convolutions, `onednn.available`)."""
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  if not cache:
    env = without_compilation_cache(env)
  return subprocess.run(
    [sys.executable, os.path.join(ROOT, "bench", script), *args],
    cwd=ROOT,
    env=env,
    capture_output=True,
    text=True,
    timeout=timeout,
  )


def _run_bench(script: str, *args: str, cache: bool = True) -> str:
  """The script's stdout; it must succeed."""
  proc = _bench_process(script, *args, cache=cache)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


@pytest.mark.slow
def test_accelerator_benchmark_runs_every_part_on_tiny_models():
  out = _run_bench("bench_accelerator.py", "--tiny", "--dtypes=float32", "--steps=1", "--warmup=0")
  rows = {}
  for line in out.splitlines():
    cells = [c.strip() for c in line.strip("|").split("|")]
    if len(cells) == 10 and re.fullmatch(r"[0-9.]+", cells[3]):
      rows[cells[0]] = cells
  assert sorted(rows) == ["encode", "ldm", "taming", "vqgan"], out
  for part, cells in rows.items():
    seconds, images_per_s, gflop = (float(cells[i]) for i in (3, 4, 5))
    assert seconds > 0 and images_per_s > 0, (part, cells)
    assert gflop > 0, (part, cells)  # XLA's cost analysis (taming: our step's FLOPs)


def _table_rows(stdout: str, columns: int) -> list[list[str]]:
  rows = []
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if len(cells) == columns and re.fullmatch(r"[0-9]+", cells[0]):
      rows.append(cells)
  return rows


@pytest.mark.slow
def test_pytorch_comparison_runs_every_contender_in_its_own_process():
  # the malloc our commands start with here (host_memory); PyTorch's with jemalloc too where
  # it is installed (each contender checks that its malloc reached its process)
  jemalloc = host_memory.find_jemalloc() is not None
  ours = "jemalloc" if jemalloc else "hugepages"
  torch_mallocs = ("plain", "kept", *(("jemalloc",) if jemalloc else ()))
  out = _run_bench(
    "bench_vs_pytorch.py",
    *("--batch", "8", "--steps", "1", "--warmup", "0", "--block", "1", "--gap", "0"),
    *("--malloc", ours, "plain", "--torch-malloc", *torch_mallocs),
  )
  rows = {cells[1]: cells for cells in _table_rows(out, 7)}
  # unsuffixed: the malloc each project's command runs with
  assert sorted(rows) == sorted(
    ["jax (default)", "jax (default, malloc plain)", "pytorch"]
    + [f"pytorch, malloc {m}" for m in torch_mallocs[1:]]
  ), out
  for name, cells in rows.items():
    assert float(cells[2]) > 0, (name, cells)
    assert float(cells[6]) >= 0, (name, cells)  # MiB in huge pages
  assert rows["pytorch"][4] == "1.00"
  assert float(rows["jax (default)"][5]) > 0  # XLA's FLOPs of the step


@pytest.mark.slow
def test_vqgan_step_benchmark_runs_on_small_images():
  # its default --forms once named a form that bench_vs_pytorch no longer had
  out = _run_bench(
    "bench_vqgan_step.py", *("--batch", "1", "--steps", "1", "--warmup", "0", "--image-size", "32")
  )
  rows = [cells for cells in _table_rows_named(out, "f8") if len(cells) == 10]
  assert len(rows) == 1, out
  _, forms, dtype, batch, gen_s, disc_s, images_per_s = rows[0][:7]
  assert (forms, dtype, batch) == ("default", "float32", "1")
  assert float(gen_s) > 0 and float(disc_s) > 0 and float(images_per_s) > 0


def _table_rows_named(stdout: str, first: str) -> list[list[str]]:
  rows = []
  for line in stdout.splitlines():
    cells = [c.strip() for c in line.strip().strip("|").split("|")]
    if cells[0] == first:
      rows.append(cells)
  return rows


@pytest.mark.slow
def test_train_step_benchmark_takes_the_conv_library():
  out = _run_bench(
    "bench_train_step.py", "--batch", "2", "--steps", "1", "--warmup", "0", "--library", "eigen"
  )
  rows = _table_rows_named(out, "2")
  assert len(rows) == 1 and rows[0][1:4] == ["arcvq", "auto", "eigen"], out


@pytest.mark.slow
def test_convolution_layers_benchmark_runs_every_layer():
  out = _run_bench(
    "bench_conv_layers.py",
    *("--batch", "2", "--steps", "1", "--warmup", "0", "--block", "1"),
    cache=False,
  )
  names = [line.split("|")[1].strip() for line in out.splitlines() if line.startswith("| ")]
  assert "encoder conv_2" in names and "decoder conv_trans_2" in names, out
  assert any(line.startswith("| all convolutions") for line in out.splitlines()), out
  assert "| onednn: form | onednn ms |" in out and "| eigen: form | eigen ms |" in out, out
  assert "| encoder conv_3 | onednn |" in out, out  # the shipped library's own form


@pytest.mark.slow
def test_pytorch_comparison_ends_when_a_contender_fails():
  # batch 0 cannot build a step: the run must end with one line, not wait for it forever
  proc = _bench_process(
    "bench_vs_pytorch.py",
    *("--no-torch", "--batch", "0", "--steps", "1", "--warmup", "0"),
    timeout=120,
  )
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == (
    "jax (default): its process failed (its traceback is above)"
  )


@pytest.mark.slow
def test_arcloss_benchmark_checks_and_times_the_search_in_one_pass():
  # A small case with a token tail and two blocks of codes: the script asserts that the
  # blocked forms agree with the naive ones and the one-pass search with the separate one.
  out = _run_bench(
    "bench_arcloss.py",
    *("--cases", "600,8,700", "--chunk", "256", "--nearest", "--runs", "1", "--warmup", "0"),
  )
  assert len(_table_rows(out, 11)) == 1, out  # the ArcLoss
  assert len(_table_rows(out, 8)) == 2, out  # the search, both distances
  (together,) = _table_rows(out, 6)
  assert together[:3] == ["600", "8", "700"] and float(together[3]) > 0, out


@pytest.mark.slow
@pytest.mark.skipif(
  not onednn_kernel_grad.available(), reason="no oneDNN handler here (the `onednn` extra)"
)
def test_onednn_kernel_grad_benchmark_checks_layers_and_the_step():
  out = _run_bench("bench_onednn_kernel_grad.py", *("--batch", "2", "--rounds", "1"), cache=False)
  rows = {cells[1]: cells for cells in _table_rows(out, 7)}
  assert sorted(rows) == [
    "decoder conv_1",
    "encoder conv_2",
    "encoder conv_3",
    "residual conv3x3",
    "train step",
  ], out
  assert rows["residual conv3x3"][2] == "gemm" and rows["encoder conv_2"][2] == "eigen"
  for name in ("decoder conv_1", "encoder conv_2", "encoder conv_3", "residual conv3x3"):
    assert float(rows[name][6]) < 1e-4, rows[name]  # the handler's gradient against the other
  without, with_handler = re.findall(r"update ([0-9.]+) / ([0-9.]+)", rows["train step"][6])[0]
  assert abs(float(without) - float(with_handler)) < 1e-4 * abs(float(without)), rows
