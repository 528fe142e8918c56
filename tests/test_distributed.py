"""Scale-out for real on one machine: two processes train together over CPU collectives
(gloo on loopback) and agree with one process; SIGTERM stops a run with a checkpoint that
resumes exactly; the launcher flags and cluster detection."""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from arcvq_jax import api, distributed

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
ENV = dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT)
TINY = ["--config=configs/tiny.py", "--config.eval_batch_size=2000", "--config.image_every_steps=0"]


def main_cmd(workdir, *flags):
  return [sys.executable, "-m", "arcvq_jax.main", f"--workdir={workdir}", *TINY, *flags]


def free_port() -> int:
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def final_params(workdir):
  params, step = api.restore_params(workdir)
  return step, jax.tree.map(np.asarray, params)


@pytest.mark.slow
@needs_fashion
def test_two_processes_agree_with_one(tmp_path):
  steps = ["--config.num_train_steps=3", "--config.checkpoint_every_steps=3"]
  single = subprocess.run(
    main_cmd(tmp_path / "one", *steps, "--distributed=off"),
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert single.returncode == 0, single.stderr[-3000:]
  port = free_port()
  procs = [
    subprocess.Popen(
      main_cmd(
        tmp_path / "two",
        *steps,
        f"--coordinator_address=localhost:{port}",
        "--num_processes=2",
        f"--process_id={i}",
      ),
      cwd=ROOT,
      env=ENV,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=600) for p in procs]
  for p, (_, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
  assert "2 process(es), 2 device(s)" in outs[0][1]
  # Each process loaded half of every batch; the global batch, ArcLoss's negatives and the
  # codebook statistics are the single process's (rows in another order).
  with open(tmp_path / "one" / "eval_results.json") as f:
    one = json.load(f)
  with open(tmp_path / "two" / "eval_results.json") as f:
    two = json.load(f)
  assert one["num_images"] == two["num_images"] == 10000
  for key in ("mse", "psnr", "ssim", "perplexity"):
    np.testing.assert_allclose(two[key], one[key], rtol=2e-4, err_msg=key)
  (s1, p1), (s2, p2) = final_params(tmp_path / "one"), final_params(tmp_path / "two")
  assert s1 == s2 == 3
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
    np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)
  # Each process saved its own position of the data iterator.
  names = sorted(os.listdir(tmp_path / "two" / "checkpoints" / "3" / "data"))
  assert any("process_1" in n for n in names), names
  # Every process of a multi-process job can load the tokenizer (onto its own device: the
  # global first device is process 0's), as the priors and tokenize do.
  port = free_port()
  script = (
    "import sys, jax, numpy as np\n"
    f"jax.distributed.initialize('localhost:{port}', num_processes=2,"
    " process_id=int(sys.argv[1]))\n"
    "from arcvq_jax import api\n"
    f"tok = api.Tokenizer.from_workdir({str(tmp_path / 'two')!r})\n"
    "x = np.linspace(-1, 1, 2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28, 1)\n"
    "print('tokens', np.asarray(tok.encode(x)).ravel().tolist())\n"
  )
  procs = [
    subprocess.Popen(
      [sys.executable, "-c", script, str(i)],
      cwd=ROOT,
      env=ENV,
      stdout=subprocess.PIPE,
      stderr=subprocess.PIPE,
      text=True,
    )
    for i in range(2)
  ]
  outs = [p.communicate(timeout=300) for p in procs]
  x = np.linspace(-1, 1, 2 * 28 * 28, dtype=np.float32).reshape(2, 28, 28, 1)
  want = np.asarray(api.Tokenizer.from_workdir(str(tmp_path / "two")).encode(x)).ravel().tolist()
  for p, (out, err) in zip(procs, outs, strict=True):
    assert p.returncode == 0, err[-3000:]
    assert f"tokens {want}" in out


@pytest.mark.slow
@needs_fashion
def test_sigterm_saves_and_the_resumed_run_is_exact(tmp_path):
  steps = [
    "--config.num_train_steps=150",
    "--config.checkpoint_every_steps=1000",
    "--config.log_every_steps=1",
  ]
  full = subprocess.run(
    main_cmd(tmp_path / "full", *steps),
    cwd=ROOT,
    env=ENV,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert full.returncode == 0, full.stderr[-3000:]

  workdir = tmp_path / "killed"
  proc = subprocess.Popen(
    main_cmd(workdir, *steps),
    cwd=ROOT,
    env=ENV,
    stderr=subprocess.PIPE,
    stdout=subprocess.DEVNULL,
    text=True,
  )
  lines = []
  for line in proc.stderr:  # SIGTERM once training is under way
    lines.append(line)
    if "[step 20] train:" in line:
      proc.send_signal(signal.SIGTERM)
      break
  lines += proc.stderr.readlines()
  assert proc.wait(timeout=300) == 0, "".join(lines)[-3000:]
  log = "".join(lines)
  assert "Preempted (SIGTERM) at step" in log, log[-3000:]
  stopped = int(log.split("Preempted (SIGTERM) at step ")[1].split()[0])
  assert 20 <= stopped < 150
  assert sorted(int(s) for s in os.listdir(workdir / "checkpoints") if s.isdigit()) == [stopped]
  assert not os.path.exists(workdir / "eval_results.json")  # no evaluation when preempted

  resumed = subprocess.run(
    main_cmd(workdir, *steps), cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600
  )
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert f"Resuming from checkpoint step {stopped}" in resumed.stderr
  (s1, p1), (s2, p2) = final_params(tmp_path / "full"), final_params(workdir)
  assert s1 == s2 == 150
  for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2), strict=True):
    np.testing.assert_array_equal(a, b)
  with open(tmp_path / "full" / "eval_results.json") as f, open(workdir / "eval_results.json") as g:
    assert json.load(f) == json.load(g)


def test_flags_go_together():
  with pytest.raises(distributed.DistributedSetupError, match="go together"):
    distributed.initialize("auto", coordinator_address="localhost:1234")
  with pytest.raises(distributed.DistributedSetupError, match="choose auto, on or off"):
    distributed.initialize("sometimes")
  # One process, nothing detected: nothing to start.
  assert distributed.initialize("auto") is False
  assert distributed.initialize("off", "localhost:1", 2, 0) is False


@pytest.mark.parametrize(
  "env, want",
  [
    ({}, None),
    ({"TPU_WORKER_HOSTNAMES": "localhost"}, None),
    ({"TPU_WORKER_HOSTNAMES": "10.0.0.2,10.0.0.3"}, "tpu"),
    ({"SLURM_NTASKS": "1", "SLURM_PROCID": "0"}, None),
    ({"SLURM_NTASKS": "8", "SLURM_PROCID": "3"}, "slurm"),
    ({"SLURM_NTASKS": "8"}, None),  # inside sbatch's script, not an srun step
    ({"OMPI_COMM_WORLD_SIZE": "4"}, "ompi"),
  ],
)
def test_detected_cluster(monkeypatch, env, want):
  for key in (
    "TPU_WORKER_HOSTNAMES",
    "SLURM_NTASKS",
    "SLURM_STEP_NUM_TASKS",
    "SLURM_PROCID",
    "SLURM_STEP_ID",
    "OMPI_COMM_WORLD_SIZE",
  ):
    monkeypatch.delenv(key, raising=False)
  for key, value in env.items():
    monkeypatch.setenv(key, value)
  assert distributed.detected_cluster() == want


def test_watcher_turns_sigterm_into_a_stop():
  watcher = distributed.PreemptionWatcher().install()
  try:
    assert not watcher.should_stop(1)
    os.kill(os.getpid(), signal.SIGTERM)
    deadline = time.time() + 5
    while not watcher.should_stop(2) and time.time() < deadline:
      time.sleep(0.01)
    assert watcher.should_stop(2)
  finally:
    watcher.restore()
  assert signal.getsignal(signal.SIGTERM) is not watcher._on_sigterm
