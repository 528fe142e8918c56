"""Time and peak memory of importing a full-size taming f16 VQGAN checkpoint (issue 8).

  python bench/bench_convert.py                    # f16-1024 shapes, with Adam states
  python bench/bench_convert.py --no-optimizer     # a weights-only .ckpt
  python bench/bench_convert.py --parity           # + full-size parity on one 256x256 photo

Builds taming-transformers' VQModel at vqgan_imagenet_f16_1024's size (ch 128, ch_mult
(1, 1, 2, 2, 4), 2 res blocks, attention at 16, z 256, K 1024, D 256) from the real `taming`
package (pip install --no-deps taming-transformers-rom1504==0.0.6) with random weights, plus
its PatchGAN (ndf 64, 3 layers, random BatchNorm statistics) and LPIPS (random VGG16), and
saves it as taming's main.py does: a Lightning-style dict with 'state_dict', 'global_step',
and (unless --no-optimizer) both optimizers' Adam states, as Lightning keeps by default.

The conversion runs as the user runs it, `python -m arcvq_jax.convert.torch_checkpoint` in a
fresh process (JAX on the CPU): wall time of the whole command (imports included), the
converter's own timing (read / map / total, from conversion.json) and the peak resident set
size of that process (ru_maxrss of the child). --parity then compares our reconstruction of
one photo with taming's (indices identical; max |diff| / max |x_hat|).
"""

from __future__ import annotations

import argparse
import atexit
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.modules.setdefault("triton", None)  # as tests/conftest.py: torch's GPU compiler is not needed

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch_reference as ref  # noqa: E402

F16_1024 = dict(
  double_z=False,
  z_channels=256,
  resolution=256,
  in_channels=3,
  out_ch=3,
  ch=128,
  ch_mult=[1, 1, 2, 2, 4],
  num_res_blocks=2,
  attn_resolutions=[16],
  dropout=0.0,
)


def adam_state(params: list[torch.nn.Parameter], step: int) -> dict:
  """torch.optim.Adam(params, betas=(0.5, 0.9)).state_dict() after `step` steps (random
  moments): what Lightning stores per optimizer."""
  state = {
    i: {
      "step": torch.tensor(float(step)),
      "exp_avg": torch.randn_like(p) * 1e-3,
      "exp_avg_sq": torch.rand_like(p) * 1e-6,
    }
    for i, p in enumerate(params)
  }
  group = dict(
    lr=4.5e-6 * 12,
    betas=(0.5, 0.9),
    eps=1e-8,
    weight_decay=0,
    amsgrad=False,
    maximize=False,
    foreach=None,
    capturable=False,
    differentiable=False,
    fused=None,
    params=list(range(len(params))),
  )
  return {"state": state, "param_groups": [group]}


def save_ckpt(path: str, with_optimizer: bool) -> torch.nn.Module:
  model = ref.taming_vqmodel(F16_1024, n_embed=1024, embed_dim=256)
  ckpt = {
    "epoch": 40,
    "global_step": 600000,
    "pytorch-lightning_version": "1.0.8",
    "state_dict": model.state_dict(),
    "lr_schedulers": [],
  }
  if with_optimizer:
    ae = [p for n, p in model.named_parameters() if not n.startswith("loss.")]
    ckpt["optimizer_states"] = [
      adam_state(ae, 600000),
      adam_state(list(model.loss.discriminator.parameters()), 600000),
    ]
  torch.save(ckpt, path)
  return model


def parity(model: torch.nn.Module, workdir: str) -> dict:
  """taming vs ours on skimage's astronaut at 256x256."""
  import jax  # noqa: PLC0415
  from skimage import data as skdata  # noqa: PLC0415
  from skimage.transform import resize  # noqa: PLC0415

  from arcvq_jax.convert import torch_checkpoint as tc  # noqa: PLC0415
  from arcvq_jax.convert import workdir as workdir_lib  # noqa: PLC0415
  from arcvq_jax.train import state as state_lib  # noqa: PLC0415
  from arcvq_jax.train import tokenizer_steps  # noqa: PLC0415

  x = resize(skdata.astronaut(), (256, 256), anti_aliasing=True).astype(np.float32)[None] * 2 - 1
  with torch.no_grad():
    x_hat_ref, _, idx_ref, _ = ref.taming_forward(model, torch.tensor(x.transpose(0, 3, 1, 2)))
  x_hat_ref = x_hat_ref.numpy().transpose(0, 2, 3, 1)
  config = tc.load_config_file(os.path.join(workdir, "config.py"))
  state = workdir_lib.restore_state(workdir, config, x.shape[1:])
  net = state_lib.build_model(config, channels=3)
  x_hat, indices = jax.jit(lambda p, x: tokenizer_steps.reconstruct(p, x, model=net))(
    state.gen.params, x
  )
  return dict(
    indices_equal=bool(np.array_equal(np.asarray(indices).reshape(-1), idx_ref.numpy())),
    x_hat_rel_err=float(np.max(np.abs(np.asarray(x_hat) - x_hat_ref)) / np.max(np.abs(x_hat_ref))),
  )


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--no-optimizer", action="store_true", help="omit optimizer_states")
  parser.add_argument("--parity", action="store_true", help="full-size parity on one photo")
  parser.add_argument("--dir", default=None, help="scratch folder (default: a temporary one)")
  args = parser.parse_args()

  folder = args.dir or tempfile.mkdtemp(prefix="bench_convert_")
  if not args.dir:  # ~1 GiB of checkpoint and workdir
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
  os.makedirs(folder, exist_ok=True)
  ckpt = os.path.join(folder, "vqgan_f16_1024_random.ckpt")
  workdir = os.path.join(folder, "out")
  t0 = time.perf_counter()
  model = save_ckpt(ckpt, not args.no_optimizer)
  print(
    f"saved {ckpt}: {os.path.getsize(ckpt) / 2**20:.0f} MiB "
    f"({sum(v.numel() for v in model.state_dict().values()) / 1e6:.1f} M tensor elements "
    f"in the state_dict) in {time.perf_counter() - t0:.1f} s"
  )

  cmd = [
    sys.executable,
    "-m",
    "arcvq_jax.convert.torch_checkpoint",
    "--kind=taming_vqgan",
    f"--ckpt={ckpt}",
    "--config=configs/imagenet_f16.py",
    f"--workdir={workdir}",
  ]
  t0 = time.perf_counter()
  proc = subprocess.run(
    cmd, cwd=ROOT, capture_output=True, text=True, env=dict(os.environ, JAX_PLATFORMS="cpu")
  )
  wall = time.perf_counter() - t0
  if proc.returncode:
    sys.exit(proc.stderr[-3000:])
  peak_rss = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 2**20  # KiB -> GiB
  with open(os.path.join(workdir, "conversion.json")) as f:
    report = json.load(f)
  out_bytes = sum(
    os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(workdir) for n in names
  )
  print(proc.stdout.strip())
  print(
    f"conversion command: {wall:.1f} s wall (imports included); converter: read "
    f"{report['seconds']['read']:.1f} s, map {report['seconds']['map']:.1f} s, total "
    f"{report['seconds']['total']:.1f} s; peak RSS {peak_rss:.2f} GiB; workdir "
    f"{out_bytes / 2**20:.0f} MiB"
  )
  if args.parity:
    print("parity on a 256x256 photo:", parity(model, workdir))


if __name__ == "__main__":
  main()
