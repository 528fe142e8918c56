"""launch/: each script says what it will do, prints the exact commands in dry-run mode, and
stops with a message naming a missing variable."""

import os
import subprocess

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def launch(script, *args, **env):
  clean = {
    k: v
    for k, v in os.environ.items()
    if k not in ("CONFIG", "WORKDIR", "TPU_NAME", "ZONE", "ACCELERATOR_TYPE", "NPROC")
  }
  return subprocess.run(
    ["bash", os.path.join(ROOT, "launch", script), *args],
    env=dict(clean, DRY_RUN="1", **env),
    capture_output=True,
    text=True,
    timeout=60,
  )


def test_tpu_vm_commands():
  tpu = dict(TPU_NAME="arcvq", ZONE="us-central2-b")
  create = launch("tpu_vm.sh", "create", ACCELERATOR_TYPE="v4-32", SPOT="1", **tpu)
  assert create.returncode == 0, create.stderr
  assert (
    "+ gcloud compute tpus tpu-vm create arcvq --zone=us-central2-b "
    "--accelerator-type=v4-32 --version=tpu-ubuntu2204-base --spot"
  ) in create.stdout
  setup = launch("tpu_vm.sh", "setup", **tpu)
  assert setup.returncode == 0, setup.stderr
  assert "scp --recurse --worker=all --zone=us-central2-b" in setup.stdout
  assert "pip\\ install\\ -q\\ -e\\ .\\ \\'jax\\[tpu\\]\\'" in setup.stdout
  run = launch(
    "tpu_vm.sh",
    "run",
    "--config.batch_size=64",
    CONFIG="configs/imagenet.py",
    WORKDIR="gs://bucket/run1",
    **tpu,
  )
  assert run.returncode == 0, run.stderr
  assert "ssh arcvq --worker=all --zone=us-central2-b" in run.stdout
  assert (
    "python\\ -m\\ arcvq_jax.main\\ --config=configs/imagenet.py\\ "
    "--workdir=gs://bucket/run1\\ --config.batch_size=64"
  ) in run.stdout


@pytest.mark.parametrize(
  "action, env, missing",
  [
    ("create", dict(ZONE="z"), "TPU_NAME"),
    ("create", dict(TPU_NAME="t", ZONE="z"), "ACCELERATOR_TYPE"),
    ("run", dict(TPU_NAME="t", ZONE="z", CONFIG="c"), "WORKDIR"),
  ],
)
def test_tpu_vm_names_the_missing_variable(action, env, missing):
  proc = launch("tpu_vm.sh", action, **env)
  assert proc.returncode == 2
  assert f"error: {missing} is not set" in proc.stderr
  assert not proc.stdout.strip().startswith("+")  # nothing was run


def test_tpu_vm_refuses_a_local_workdir():
  proc = launch("tpu_vm.sh", "run", TPU_NAME="t", ZONE="z", CONFIG="c", WORKDIR="/tmp/run")
  assert proc.returncode == 2 and "is not a gs:// path" in proc.stderr


def test_gpu_local_one_and_many_processes():
  one = launch(
    "gpu_local.sh", "--config.batch_size=8", CONFIG="configs/imagenet.py", WORKDIR="/runs/f8"
  )
  assert one.returncode == 0, one.stderr
  assert (
    "+ python -m arcvq_jax.main --config=configs/imagenet.py --workdir=/runs/f8 "
    "--config.batch_size=8"
  ) in one.stdout
  many = launch("gpu_local.sh", CONFIG="c", WORKDIR="w", NPROC="2", PORT="4000")
  assert many.returncode == 0, many.stderr
  for i in range(2):
    assert (
      f"+ env CUDA_VISIBLE_DEVICES={i} python -m arcvq_jax.main --config=c --workdir=w "
      f"--coordinator_address=localhost:4000 --num_processes=2 --process_id={i}"
    ) in many.stdout
  missing = launch("gpu_local.sh", WORKDIR="w")
  assert missing.returncode == 2 and "error: CONFIG is not set" in missing.stderr


def test_slurm_script():
  proc = launch(
    "slurm_gpu.sbatch",
    "--config.batch_size=240",
    CONFIG="configs/imagenet.py",
    WORKDIR="/shared/f8",
  )
  assert proc.returncode == 0, proc.stderr
  assert (
    "+ srun --kill-on-bad-exit=1 python -m arcvq_jax.main --config=configs/imagenet.py "
    "--workdir=/shared/f8 --config.batch_size=240"
  ) in proc.stdout
  with open(os.path.join(ROOT, "launch", "slurm_gpu.sbatch")) as f:
    assert "#SBATCH --signal=TERM@120" in f.read()  # the preemption checkpoint's warning
  missing = launch("slurm_gpu.sbatch", CONFIG="c")
  assert missing.returncode == 2 and "error: WORKDIR is not set" in missing.stderr
