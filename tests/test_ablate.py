"""The ablation lab (arcvq_jax/ablate): sweep files, settings and configs, sharding, the
report against the runs' own eval JSON, a SIGKILLed sweep resumed, failed runs recorded, a
changed sweep refused, and the TensorBoard reader against TensorFlow's.

One two-quantizer (arcvq, vq), two-seed, three-step sweep of configs/tiny.py on 128 training
and 50 test images (configs/sweeps/tiny.py) is run once per module, as two shards; the other
slow tests reuse it and its compilation cache."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from data_fixtures import write_small_idx_dir

from arcvq_jax import config as config_lib
from arcvq_jax.ablate import events, plots, report, runner
from arcvq_jax.ablate import sweep as sweep_lib
from arcvq_jax.quantizers import fsq, registry

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FASHION = "/usr/share/datasets/fashion-mnist"
needs_fashion = pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
TINY_SWEEP = "configs/sweeps/tiny.py"
# Runs of the tiny sweep in index order: settings x seeds, seeds innermost.
RUNS = ["runs/arcvq/seed_0", "runs/arcvq/seed_1", "runs/vq/seed_0", "runs/vq/seed_1"]
METRICS = ("psnr", "ssim", "mse", "codebook_usage", "perplexity")


def tiny_sweep(**fields) -> sweep_lib.Sweep:
  from configs.sweeps import tiny  # noqa: PLC0415 (configs/ is not a package; ROOT is on sys.path)

  c = tiny.get_config()
  for k, v in fields.items():
    c[k] = v
  return sweep_lib.from_config(c, "test sweep")


def ablate(*args: str, timeout: int = 900) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "arcvq_jax.ablate", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=timeout,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )


def read(path: str):
  with open(path) as f:
    return json.load(f)


def read_text(path: str) -> str:
  with open(path) as f:
    return f.read()


def run_dirs(workdir: str) -> set[str]:
  return {r for r in RUNS if os.path.isdir(os.path.join(workdir, r))}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("small_idx"))
  write_small_idx_dir(directory, num_train=128, num_test=50)
  return directory


@pytest.fixture(scope="module")
def sweep_args(data_dir, tmp_path_factory):
  """The tiny sweep's arguments but --workdir, with one compilation cache for the module."""
  cache = str(tmp_path_factory.mktemp("xla_cache"))
  return [
    "--config=configs/tiny.py",
    f"--sweep={TINY_SWEEP}",
    f"--config.data.path={data_dir}",
    f"--compilation_cache={cache}",
  ]


@pytest.fixture(scope="module")
def full(sweep_args, tmp_path_factory):
  """The tiny sweep run as two shards one after the other, then --report."""
  workdir = str(tmp_path_factory.mktemp("sweep_full"))
  first = ablate(*sweep_args, f"--workdir={workdir}", "--shard=0/2", "--nowrite_report")
  assert first.returncode == 0, first.stderr[-3000:]
  after_first = run_dirs(workdir)
  second = ablate(*sweep_args, f"--workdir={workdir}", "--shard=1/2", "--nowrite_report")
  assert second.returncode == 0, second.stderr[-3000:]
  rep = ablate("--report", f"--workdir={workdir}")
  assert rep.returncode == 0, rep.stderr[-3000:]
  assert "4 runs done, 0 failed, 0 pending" in " ".join(rep.stdout.split())
  return dict(workdir=workdir, after_first=after_first)


# ------------------------------------------------------------------- settings, configs, files


def test_settings_runs_and_ids():
  s = sweep_lib.from_config(
    dict(
      variants=("arcvq", "fsq"),
      baselines=("bbnr",),
      grid={
        "arc": {"s": (5.0, 10.0)},
        "quantizer": [dict(levels=(8, 5, 5, 5), embed_dim=4), dict(levels=(8, 8), embed_dim=2)],
      },
      seeds=(0, 1, 2),
      overrides={"num_train_steps": 7, "optimizer": {"lr": 1e-3}},
    ),
    "test",
  )
  ids = [x.id for x in s.settings()]
  assert ids[0] == "bbnr"
  assert ids[1:3] == [
    "arcvq__arc.s=5__quantizer.levels=8-5-5-5__quantizer.embed_dim=4",
    "arcvq__arc.s=5__quantizer.levels=8-8__quantizer.embed_dim=2",
  ]
  assert len(ids) == 1 + 2 * 2 * 2 and len(set(ids)) == len(ids)
  runs = s.runs()
  assert [r.index for r in runs] == list(range(27))
  assert [(r.setting.id, r.seed) for r in runs[:4]] == [
    ("bbnr", 0),
    ("bbnr", 1),
    ("bbnr", 2),
    (ids[1], 0),
  ]
  assert runs[3].relpath == os.path.join("runs", ids[1], "seed_0")
  assert dict(s.overrides) == {"num_train_steps": 7, "optimizer.lr": 1e-3}


@pytest.mark.parametrize("n", [1, 2, 3, 8])
def test_shards_are_disjoint_and_cover_every_run(n):
  runs = tiny_sweep(variants=("arcvq", "vq", "fsq"), seeds=(0, 1, 2)).runs()
  shards = [sweep_lib.shard(runs, i, n) for i in range(n)]
  taken = [r.index for part in shards for r in part]
  assert sorted(taken) == list(range(len(runs)))  # each run exactly once
  assert all(r.index % n == i for i, part in enumerate(shards) for r in part)


def test_resolved_config_is_the_config_files_variant_with_the_sweeps_values():
  from configs import fashion_mnist  # noqa: PLC0415 (configs/ is not a package)

  s = sweep_lib.from_config(
    dict(
      variants=("fsq", "ema"),
      grid={"arc": {"s": (5.0,)}},
      seeds=(3,),
      overrides={"num_train_steps": 7, "batch_size": 64},
    ),
    "test",
  )
  source = sweep_lib.ConfigSource("configs/fashion_mnist.py", None, {"batch_size": 32})
  for setting in s.settings():
    got = sweep_lib.resolve(source, s, setting, 3, "test")
    want = fashion_mnist.get_config(setting.variant)
    want.num_train_steps, want.batch_size, want.arc.s, want.seed = 7, 32, 5.0, 3
    assert sweep_lib.config_record(got) == sweep_lib.config_record(want)
    config_lib.validate(got, 1)
  with pytest.raises(sweep_lib.SweepError, match=r"--config\.arc\.s is also a grid key"):
    sweep_lib.check_cli_overrides(s, {"arc.s": 1.0})


@pytest.mark.parametrize("k", [512, 1000, 4096, 32768, 100, 70000])
def test_fsq_levels_for_a_vocabulary_by_brute_force(k):
  # Every ordered tuple of levels 5..8 on 1..6 channels: the closest product on a log scale,
  # then the most channels; levels_for must pick one of exactly these.
  best = min(
    (abs(np.log(np.prod(t) / k)), -len(t))
    for n in range(1, 7)
    for t in itertools.product(range(5, 9), repeat=n)
  )
  levels = fsq.levels_for(k, max_channels=6)
  assert (abs(np.log(np.prod(levels) / k)), -len(levels)) == pytest.approx(best)
  assert list(levels) == sorted(levels, reverse=True)


def test_codebook_size_gives_every_quantizer_its_vocabulary_its_own_way():
  from configs.sweeps import codebook_size  # noqa: PLC0415 (configs/ is not a package)

  s = sweep_lib.from_config(codebook_size.get_config(), "codebook_size.py")
  source = sweep_lib.ConfigSource("configs/fashion_mnist.py", None, {})
  settings = s.settings()
  assert len(settings) == 8 * 3 and len(s.runs()) == 8 * 3 * 3
  for setting in settings:
    k = dict(setting.values)["codebook_size"]
    assert setting.id == f"{setting.variant}__codebook_size={k}"
    config = sweep_lib.resolve(source, s, setting, 0, "test")
    config_lib.validate(config, 1)
    q = registry.from_config(config)
    assert q.vocab_size == k  # 512, 4096 and 32768 are exact for every quantizer
    name = config.quantizer.name
    if name == "fsq":
      assert config.quantizer.levels == (8,) * round(np.log(k) / np.log(8))
    elif name == "lfq":
      assert config.quantizer.embed_dim == int(np.log2(k)) == q.dim
    else:
      assert config.quantizer.num_codes == k and q.dim == config.quantizer.embed_dim == 64
  with pytest.raises(sweep_lib.SweepError, match="a codebook_size is a whole number"):
    tiny_sweep(grid={"codebook_size": (512, 1.5)})


def test_the_codebook_size_plot_and_ms_per_step(tmp_path):
  runs = []
  for variant, shift in (("arcvq", 0.0), ("vq", 1.0)):
    for k in (512, 4096):
      for seed in (0, 1):
        runs.append(
          dict(
            setting=dict(
              id=f"{variant}__codebook_size={k}",
              variant=variant,
              values={"codebook_size": k},
              baseline=False,
            ),
            seed=seed,
            index=len(runs),
            dir="",
            state="done",
            error=None,
            attempts=1,
            eval=dict(codebook_usage=0.5 + 0.1 * seed, psnr=16.0 + shift + seed),
            status=dict(steps_per_sec=4.0 + seed),
          )
        )
  out = tmp_path / "plot.png"
  groups = plots._by_setting(runs)
  assert plots.by_codebook_size(groups, str(out))
  assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  plain = {
    sid: [dict(r, setting=dict(r["setting"], values={})) for r in rs] for sid, rs in groups.items()
  }
  assert not plots.by_codebook_size(plain, str(tmp_path / "none.png"))
  settings = report.summarize(runs, [])
  ms = settings[0]["metrics"]["ms_per_step"]
  assert ms["values"] == pytest.approx([1000 / 4.0, 1000 / 5.0])


@pytest.mark.parametrize(
  "fields,match",
  [
    (dict(variants=("arcvq", "nope")), r"variants names unknown variant\(s\) 'nope': choose from"),
    (dict(baselines=("vq", "vq")), "names a variant twice"),
    (dict(seeds=()), "seeds must be a non-empty list of distinct integers"),
    (dict(grid={"arc": {"s": 5.0}}), r"grid\.arc\.s = 5\.0: a grid entry is a non-empty list"),
    (dict(skip_metrics=("psnr",)), "only lpips, rfid can be skipped"),
    (
      dict(variants=(), baselines=("vq",), grid={"arc": {"s": (1.0, 2.0)}}),
      "a grid applies to the variants, and there are only baselines",
    ),
    (
      dict(grid={"num_train_steps": (3, 4)}),
      r"\['num_train_steps'\] are in both grid and overrides",
    ),
  ],
)
def test_sweep_file_errors_say_what_and_where(fields, match):
  with pytest.raises(sweep_lib.SweepError, match=match):
    tiny_sweep(**fields)


def test_unknown_config_keys_and_bad_values_name_the_key():
  source = sweep_lib.ConfigSource("configs/tiny.py", None, {})
  s = tiny_sweep(grid={"arc": {"ss": (1.0, 2.0)}})
  with pytest.raises(
    sweep_lib.SweepError, match=r"'arc\.ss' is not a key .* Did you mean 'arc\.s'"
  ):
    sweep_lib.resolve(source, s, s.settings()[0], 0, "test")
  s = tiny_sweep(grid={"batch_size": ("many",)}, overrides={})
  with pytest.raises(sweep_lib.SweepError, match=r"batch_size='many' cannot be set: .* int"):
    sweep_lib.resolve(source, s, s.settings()[0], 0, "test")


@needs_fashion
@pytest.mark.slow
def test_sweep_file_error_on_the_command_line_is_one_message(tmp_path):
  bad = tmp_path / "bad_sweep.py"
  bad.write_text(
    "import ml_collections\n"
    "def get_config():\n"
    "  return ml_collections.ConfigDict(dict(variants=('vq',), seeds=(0,),\n"
    "    grid=dict(quantizer=dict(num_codez=(8, 16)))))\n"
  )
  proc = ablate("--config=configs/tiny.py", f"--sweep={bad}", f"--workdir={tmp_path / 'w'}")
  assert proc.returncode == 2, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
  assert len(errors) == 1, proc.stderr[-3000:]
  message = " ".join(proc.stderr[proc.stderr.index("error: ") :].split())
  assert "'quantizer.num_codez' is not a key of the config configs/tiny.py:vq" in message
  assert "Did you mean 'quantizer.num_codes'?" in message
  assert not os.path.exists(tmp_path / "w" / "runs")  # refused before anything was written


# ----------------------------------------------------------------------- the sweep end to end


@needs_fashion
@pytest.mark.slow
def test_shards_write_only_their_own_runs(full):
  assert full["after_first"] == {RUNS[0], RUNS[2]}  # indices 0 and 2 of 4
  assert run_dirs(full["workdir"]) == set(RUNS)


@needs_fashion
@pytest.mark.slow
def test_report_equals_the_runs_own_eval_json(full):
  workdir = full["workdir"]
  result = read(os.path.join(workdir, "results.json"))
  assert result["counts"] == {"done": 4, "failed": 0, "pending": 0}
  assert [s["id"] for s in result["settings"]] == ["arcvq", "vq"]
  for setting in result["settings"]:
    assert setting["seeds"] == {"done": [0, 1], "failed": [], "pending": []}
    evals = [
      read(os.path.join(workdir, "runs", setting["id"], f"seed_{s}", "eval_results.json"))
      for s in (0, 1)
    ]
    for key in METRICS:
      values = np.array([e[key] for e in evals])
      stat = setting["metrics"][key]
      assert stat["values"] == pytest.approx(list(values), rel=1e-12)
      assert stat["mean"] == pytest.approx(np.mean(values), rel=1e-12)
      assert stat["std"] == pytest.approx(np.std(values, ddof=1), rel=1e-12, abs=1e-15)
    assert all(e["step"] == 3 and e["split"] == "test" for e in evals)
    for key, name in (("lpips", "LPIPS"), ("rfid", "rFID")):
      if "not_computed" in setting["metrics"][key]:  # the weights are not on this machine
        assert f"no {name} weights file" in setting["metrics"][key]["not_computed"]
    for key in ("steps_per_sec", "train_time_s", "wall_time_s"):
      assert setting["metrics"][key]["mean"] > 0
  md = read_text(os.path.join(workdir, "results.md"))
  psnr = result["settings"][0]["metrics"]["psnr"]
  assert f"| `arcvq` | 64 | 2/0/0 | {psnr['mean']:.2f} ± {psnr['std']:.2f} |" in md
  for name in ("training_curves", "psnr_vs_usage", "usage_histograms", "reconstructions"):
    path = os.path.join(workdir, "plots", f"{name}.png")
    with open(path, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n", path
  for run in RUNS:
    counts = np.load(os.path.join(workdir, run, "ablate", "counts.npy"))
    assert counts.shape == (64,) and counts.sum() == 50 * 7 * 7  # tokens of the 50 test images
    trained = read(os.path.join(workdir, run, "eval_results.json"))
    assert np.mean(counts > 0) == pytest.approx(trained["codebook_usage"], rel=1e-12)
    with np.load(os.path.join(workdir, run, "ablate", "recon.npz")) as recon:
      assert recon["images"].shape == recon["reconstructions"].shape == (8, 28, 28, 1)


@needs_fashion
@pytest.mark.slow
def test_killed_sweep_resumes_to_the_same_report(full, sweep_args, tmp_path):
  """Shard 0/2 SIGKILLed in the middle of its second run, then the same command again; the
  other shard's runs come from the uninterrupted sweep (as from another machine)."""
  workdir = str(tmp_path / "killed")
  args = [sys.executable, "-m", "arcvq_jax.ablate", *sweep_args, f"--workdir={workdir}"]
  args.append("--shard=0/2")
  proc = subprocess.Popen(
    args,
    cwd=ROOT,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  second = os.path.join(workdir, RUNS[2])
  deadline = time.monotonic() + 600
  try:
    while proc.poll() is None and time.monotonic() < deadline:
      ckpt = os.path.join(second, "checkpoints")
      if os.path.isdir(ckpt) and any(name.isdigit() for name in os.listdir(ckpt)):
        break
      time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
  finally:
    proc.wait()
  status = read(os.path.join(second, "ablate", "status.json"))
  assert status["state"] == "pending" and status["attempts"] == 1, status
  assert read(os.path.join(workdir, RUNS[0], "ablate", "status.json"))["state"] == "done"

  again = subprocess.run(args, cwd=ROOT, env=dict(os.environ, JAX_PLATFORMS="cpu"), timeout=900)
  assert again.returncode == 0
  status = read(os.path.join(second, "ablate", "status.json"))
  assert status["state"] == "done" and status["attempts"] == 2, status
  # The finished run was skipped, not trained again.
  assert read(os.path.join(workdir, RUNS[0], "ablate", "status.json"))["attempts"] == 1
  for run in (RUNS[1], RUNS[3]):
    shutil.copytree(os.path.join(full["workdir"], run), os.path.join(workdir, run))
  resumed = report.write_report(workdir)
  reference = read(os.path.join(full["workdir"], "results.json"))
  for got, want in zip(resumed["settings"], reference["settings"], strict=True):
    assert got["id"] == want["id"] and got["seeds"] == want["seeds"]
    for key in (*METRICS, "lpips", "rfid"):
      assert got["metrics"][key] == want["metrics"][key], (got["id"], key)


@needs_fashion
@pytest.mark.slow
def test_changed_sweep_is_refused_or_rerun_on_request(full, data_dir, tmp_path):
  workdir = str(tmp_path / "copy")
  shutil.copytree(full["workdir"], workdir)
  source = sweep_lib.ConfigSource("configs/tiny.py", None, {"data.path": data_dir})
  same = tiny_sweep()
  planned = runner.plan(workdir, source, same, same.runs(), "test")
  assert [p.status["state"] for p in planned] == ["done"] * 4

  changed = tiny_sweep(overrides=dict(read_overrides(), num_train_steps=4))
  with pytest.raises(sweep_lib.SweepError, match=r"4 run\(s\) .* num_train_steps: 3 -> 4"):
    runner.plan(workdir, source, changed, changed.runs(), "test")
  # A bookkeeping key (how often to checkpoint) does not change a run's numbers.
  runner.plan(
    workdir,
    source,
    tiny_sweep(overrides=dict(read_overrides(), checkpoint_every_steps=3)),
    same.runs(),
    "test",
  )
  planned = runner.plan(workdir, source, changed, changed.runs()[:1], "test", rerun_changed=True)
  assert planned[0].status == {"state": "pending", "attempts": 0}
  stale = os.listdir(os.path.join(workdir, "stale", "arcvq"))
  assert len(stale) == 1 and stale[0].startswith("seed_0.")
  assert (
    read(os.path.join(workdir, RUNS[0], "ablate", "run.json"))["config"]["num_train_steps"] == 4
  )


def read_overrides() -> dict:
  from configs.sweeps import tiny  # noqa: PLC0415 (configs/ is not a package)

  return tiny.get_config().overrides.to_dict()


@needs_fashion
@pytest.mark.slow
def test_failed_runs_are_recorded_and_the_others_finish(full, sweep_args, data_dir, tmp_path):
  """A NaN loss (lr 1e30) and an invalid config (lr -1) fail; lr 3e-4 (the default: the
  compilation cache has its programs) finishes; the same command again retrains nothing."""
  sweep_file = tmp_path / "failing.py"
  sweep_file.write_text(
    "def get_config():\n"
    "  import ml_collections\n"
    "  return ml_collections.ConfigDict(dict(variants=('vq',), seeds=(0,),\n"
    "    grid=dict(optimizer=dict(lr=(1e30, -1.0, 3e-4))),\n"
    f"    overrides={read_overrides()!r}))\n"
  )
  workdir = str(tmp_path / "w")
  args = [a for a in sweep_args if not a.startswith("--sweep=")]
  proc = ablate(*args, f"--sweep={sweep_file}", f"--workdir={workdir}")
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "1 runs done, 2 failed" in " ".join(proc.stdout.split())
  result = read(os.path.join(workdir, "results.json"))
  errors = {x["id"]: x["errors"].get("0") for x in result["settings"]}
  assert errors["vq__optimizer.lr=1e+30"].startswith("NonFiniteLossError: the tokenizer loss")
  assert errors["vq__optimizer.lr=-1"].startswith("ValueError: config.optimizer.lr: must be > 0")
  assert errors["vq__optimizer.lr=0.0003"] is None
  assert result["counts"] == {"done": 1, "failed": 2, "pending": 0}
  md = read_text(os.path.join(workdir, "results.md"))
  assert "- `vq__optimizer.lr=-1` seed 0: ValueError: config.optimizer.lr: must be > 0" in md
  failed_dir = os.path.join(workdir, "runs", "vq__optimizer.lr=1e+30", "seed_0", "ablate")
  assert "NonFiniteLossError" in read_text(os.path.join(failed_dir, "error.txt"))
  # Again: failed runs are left alone (they would fail the same way), done ones skipped.
  s = sweep_lib.from_config(
    dict(
      variants=("vq",),
      seeds=(0,),
      grid={"optimizer": {"lr": (1e30, -1.0, 3e-4)}},
      overrides=read_overrides(),
    ),
    "test",
  )
  source = sweep_lib.ConfigSource("configs/tiny.py", None, {"data.path": data_dir})
  planned = runner.plan(workdir, source, s, s.runs(), "test")
  counts = runner.run_all(workdir, planned, runner.Weights())
  assert counts == dict(done=1, failed=2, pending=0, skipped=0)
  assert [p.status["attempts"] for p in planned] == [1, 1, 1]


@needs_fashion
@pytest.mark.slow
def test_event_reader_matches_tensorflows(full):
  from run_helpers import read_all_scalars  # noqa: PLC0415 (imports TensorFlow: this test only)

  run_dir = os.path.join(full["workdir"], RUNS[3])
  assert events.read_scalars(run_dir) == read_all_scalars(run_dir)
  assert sorted(events.read_scalars(run_dir)["train/batch_usage"]) == [1, 2, 3]
