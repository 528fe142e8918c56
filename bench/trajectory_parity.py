"""Does our ArcVQ-VAE train like the official PyTorch code, step by step? (issue 42)

  python bench/trajectory_parity.py --official=/path/to/ArcVQ-VAE --out=/tmp/parity
  python bench/trajectory_parity.py --official=... --out=... --experiment=relu_skip

The official code is imported from the copy --official names (bench/official_arcvq.py):
its Model, built as its main.py builds it for Fashion-MNIST (ArcLoss s from --arc_s, default
configs/fashion_mnist.py's 10; main.py itself fixes 5), initialised under
`main.seed_everything(--seed)`. Its initial weights go into our VQ-VAE through the
checkpoint converter's mapping (`--kind=arcvq_vqvae`), and both train side by side for
--steps steps on the same batches: our training pipeline's (configs/fashion_mnist.py,
`pipeline.create_train_iterator` at --seed, images u / 127.5 - 1), the official side
getting the same images in its own normalisation, ToTensor + Normalize(0.5, 0.5). Each side
runs its own step: the official `main.train` (BBNR inside the forward pass at step t, loss,
backward, torch Adam) and our `tokenizer_steps.train_step` (jitted, optax Adam).

Per step, both sides: the losses (reconstruction, VQ, ArcLoss, total), the gradient norm
before the optimizer, the distinct codes of the batch, the codebook's row norms (min, mean,
max) after the step, how many tokens the two assigned to different codes, and the largest
absolute difference of every parameter after the step (codebook, encoder, quant_conv,
decoder, all).

Two yardsticks tell float32 chaos from a difference. The control (--control, on by
default): a second official model, its initial weights moved by one float32 ulp
(np.nextafter towards +inf), trained on the same batches; how fast it leaves the official
run is how fast any rounding difference grows, and ours is compared with that rate.
--float64 also trains the official step in float64 (tests/torch_reference.py's, in the
official residual form, anchored below): the near-exact trajectory both float32 runs are
measured from. Then (--eval) the test split is scored by our metric code three ways: the
official model through its own forward pass, the official final weights through our
evaluation, our own trained weights, and the control's.

Before the run it anchors tests/torch_reference.py (the PyTorch transcription the test
suite compares ours with) to the official code: from the same weights and batch
(--anchor_batch images), the forward outputs and one training step
(`torch_reference.official_train_step` against `main.train`), for the reference's residual
form as ours (x + block(x)) and as the official layer computes it (relu(x) + block(x)).

--experiment runs a local change of OUR side inside this process only, to measure a
candidate difference; the library is not changed:
  relu_skip  our residual layers return relu(x) + conv1x1(relu(conv3x3(relu(x)))), the value
             of the official `Residual`, whose first `nn.ReLU(True)` rewrites x in place
             before `x + self._block(x)` reads it.

Written to --out: trajectory.json (everything), trajectory.md (the tables), trajectory.png
(|difference| per step, log scale).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import functools
import json
import os
import sys
import time
from collections.abc import Iterator
from typing import Any

import flax.linen as nn
import jax
import matplotlib
import numpy as np
import torch

matplotlib.use("Agg")
import matplotlib.pyplot as plt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "tests"))  # torch_reference
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # official_arcvq

import official_arcvq as oa  # noqa: E402
import torch_reference as ref  # noqa: E402

from arcvq_jax import sharding  # noqa: E402
from arcvq_jax.convert import torch_checkpoint  # noqa: E402
from arcvq_jax.convert import workdir as workdir_lib  # noqa: E402
from arcvq_jax.data import idx, pipeline  # noqa: E402
from arcvq_jax.models import vqvae  # noqa: E402
from arcvq_jax.models.layers import Conv  # noqa: E402
from arcvq_jax.train import state as state_lib  # noqa: E402
from arcvq_jax.train import tokenizer_steps  # noqa: E402

IMAGE_SHAPE = (28, 28, 1)
LOSSES = ("loss_rec", "loss_vq", "loss_arc", "loss", "grad_norm")
GROUPS = ("codebook", "encoder", "quant_conv", "decoder")
EXPERIMENTS = ("none", "relu_skip")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--official", required=True, help="the official repository (or its ArcVQ-VAE/)")
  p.add_argument("--out", required=True, help="folder for trajectory.json / .md / .png")
  p.add_argument("--steps", type=int, default=50)
  p.add_argument("--batch_size", type=int, default=1024)
  p.add_argument("--seed", type=int, default=1, help="the weights' and the batches' seed")
  p.add_argument("--arc_s", type=float, default=None, help="ArcLoss s (default: the config's)")
  p.add_argument("--config", default=os.path.join(REPO, "configs", "fashion_mnist.py"))
  p.add_argument("--data", default=None, help="the IDX folder (default: the config's)")
  p.add_argument("--anchor_batch", type=int, default=256, help="0: skip the reference check")
  p.add_argument("--eval", action=argparse.BooleanOptionalAction, default=True)
  p.add_argument(
    "--control", action=argparse.BooleanOptionalAction, default=True, help="the 1-ulp control"
  )
  p.add_argument(
    "--float64",
    action=argparse.BooleanOptionalAction,
    default=False,
    help="also train the float64 reference (official form), the exact-arithmetic yardstick",
  )
  p.add_argument("--experiment", choices=EXPERIMENTS, default="none")
  return p.parse_args(argv)


# --------------------------------------------------------------------------- experiments


class ReluSkipResidualLayer(vqvae.ResidualLayer):
  """relu(x) + conv1x1(relu(conv3x3(relu(x)))): the official `Residual`'s value."""

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    h = Conv(self.res_hidden, 3, padding=1, library=self.library, name="conv3x3")(nn.relu(x))
    return nn.relu(x) + Conv(self.hidden, 1, library=self.library, name="conv1x1")(nn.relu(h))


@contextlib.contextmanager
def experiment(name: str) -> Iterator[None]:
  """Our VQ-VAE as --experiment changes it, for this process and this block only."""
  if name == "none":
    yield
    return
  original = vqvae.ResidualLayer
  vqvae.ResidualLayer = ReluSkipResidualLayer  # ResidualStack looks the name up when traced
  try:
    yield
  finally:
    vqvae.ResidualLayer = original


# --------------------------------------------------------------------------- helpers


def our_config(args: argparse.Namespace):
  config = torch_checkpoint.load_config_file(args.config)
  config.seed, config.batch_size = args.seed, args.batch_size
  if args.arc_s is not None:
    config.arc.s = args.arc_s
  if args.data:
    config.data.path = args.data
  return config


def max_abs(a: Any, b: Any) -> float:
  return float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))


def rel(a: float, b: float) -> float:
  """|a - b| / max(|a|, |b|, 1e-30)."""
  return abs(a - b) / max(abs(a), abs(b), 1e-30)


def flat(tree: Any, prefix: str = "") -> dict[str, np.ndarray]:
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def param_differences(official_tree: Any, ours: Any) -> dict[str, float]:
  """Largest |official - ours| per group of parameters (and 'all'), and the largest one
  relative to that parameter's largest |value| ('all_relative')."""
  a, b = flat(official_tree), flat(jax.device_get(ours))
  out = dict.fromkeys((*GROUPS, "all", "all_relative"), 0.0)
  for name, value in a.items():
    d = max_abs(value, b[name])
    group = name.split("/")[0]
    out[group] = max(out[group], d)
    out["all"] = max(out["all"], d)
    out["all_relative"] = max(out["all_relative"], d / max(float(np.max(np.abs(value))), 1e-30))
  return out


def one_ulp_up(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
  """Every float32 entry moved to the next float32 towards +inf."""
  return {
    k: torch.from_numpy(np.nextafter(v.numpy(), np.float32(np.inf))) for k, v in state.items()
  }


def row_norms(codebook: Any) -> dict[str, float]:
  n = np.linalg.norm(np.asarray(codebook, np.float64), axis=-1)
  return dict(min=float(n.min()), mean=float(n.mean()), max=float(n.max()))


# --------------------------------------------------------------------------- the anchor


def _official_copy(official: oa.Official, init: dict[str, torch.Tensor], arc_s: float):
  model = oa.build_model(official, arc_s)
  model.load_state_dict(init)
  return model


def _reference(init: dict[str, torch.Tensor], arc_s: float, relu_skip: bool):
  a = oa.MAIN_ARGS
  model = ref.ArcVQVAEModel(
    channels=a["num_channels"],
    hidden=a["hidden_size"],
    num_res_layers=a["num_residual_layers"],
    res_hidden=a["num_residual_hidden"],
    num_codes=a["num_embedding"],
    embed_dim=a["embedding_dim"],
    beta=a["commitment_cost"],
    arc_s=arc_s,
    arc_m=a["arc_m"],
    relu_skip=relu_skip,
  )
  model.load_state_dict(init)
  return model


def anchor_reference(
  official: oa.Official, init: dict[str, torch.Tensor], x: torch.Tensor, dv: float, arc_s: float
) -> dict[str, Any]:
  """tests/torch_reference.py against the official code from the same weights and batch x
  (B, 1, H, W): forward outputs at step 0, then one training step each."""
  a = oa.MAIN_ARGS
  results = {}
  for relu_skip in (False, True):
    off, mine = _official_copy(official, init, arc_s), _reference(init, arc_s, relu_skip)
    rec = oa.recorder(off)
    with torch.no_grad(), oa.scratch_cwd():
      x_off, total_off, _, arc_off = off(x, step=0, gamma=a["gamma"], gamma_decay=a["gamma_decay"])
      x_ref, vq_ref, arc_ref, w_ref, idx_ref = mine(
        x, step=0, gamma0=a["gamma"], decay=a["gamma_decay"]
      )
    forward = dict(
      x_hat_max_abs=max_abs(x_off, x_ref),
      loss_vq_rel=rel(float(rec.values["loss_vq"]), float(vq_ref)),
      loss_arc_rel=rel(float(arc_off), float(arc_ref)),
      quantiser_total_rel=rel(float(total_off), float(vq_ref + w_ref * arc_ref)),
      tokens_differ=int(np.sum(rec.values["indices"].numpy() != idx_ref.numpy())),
    )
    off, mine = _official_copy(official, init, arc_s), _reference(init, arc_s, relu_skip)
    s_off = oa.train_step(official, off, oa.make_optimizer(off), x, 0, dv)
    s_ref = ref.official_train_step(
      mine, ref.official_optimizer(mine, a["lr"]), x, 0, dv, a["gamma"], a["gamma_decay"]
    )
    after_off, after_ref = off.state_dict(), mine.state_dict()
    step = {f"{k}_rel": rel(s_off[k], s_ref[k]) for k in LOSSES}
    step["params_max_abs"] = max(max_abs(after_off[k], after_ref[k]) for k in after_off)
    step["tokens_differ"] = int(np.sum(s_off["indices"] != s_ref["indices"].numpy()))
    results["relu_skip" if relu_skip else "x_plus_block"] = dict(forward=forward, step=step)
  return results


# --------------------------------------------------------------------------- the trajectory


def run(args: argparse.Namespace) -> dict[str, Any]:
  official = oa.load(args.official)
  config = our_config(args)
  arc_s = float(config.arc.s)

  # The official initial weights, as main.py draws them.
  official.main.seed_everything(args.seed)
  model_off = oa.build_model(official, arc_s)
  init = copy.deepcopy(model_off.state_dict())
  opt_off = oa.make_optimizer(model_off)

  # Ours from those weights, and our step.
  model = state_lib.build_model(config, channels=IMAGE_SHAPE[-1])
  tx = state_lib.make_optimizer(config)
  abstract = workdir_lib.abstract_state(config, IMAGE_SHAPE).params
  state = state_lib.state_from_params(
    config, IMAGE_SHAPE, oa.params_as_ours(model_off, abstract), step=0
  )
  dv_ours = pipeline.train_image_variance(config.data)
  dv_off = oa.data_variance(idx.load_idx_split(config.data.path, "train")[0])
  options = tokenizer_steps.compiler_options(model)
  step_fn = jax.jit(
    functools.partial(
      tokenizer_steps.train_step, model=model, tx=tx, config=config, data_variance=dv_ours
    ),
    compiler_options=options,
  )

  @functools.partial(jax.jit, compiler_options=options)
  def tokens_fn(params, x, step):
    projected, _ = model.quantizer.before_step(params, step)
    return tokenizer_steps.encode_and_quantize(projected, x, step, model=model)[2].indices

  batches = pipeline.create_train_iterator(
    config.data,
    global_batch_size=args.batch_size,
    seed=args.seed,
    process_index=0,
    process_count=1,
  )
  first = next(batches)
  x_first = oa.normalise(oa.to_uint8(first["image"]))
  anchor = (
    anchor_reference(official, init, x_first[: args.anchor_batch], dv_off, arc_s)
    if args.anchor_batch > 0
    else None
  )

  if args.control:
    model_ctl = oa.build_model(official, arc_s)
    model_ctl.load_state_dict(one_ulp_up(init))
    opt_ctl = oa.make_optimizer(model_ctl)
  if args.float64:  # the official step in float64 (the anchored reference, official form)
    model_64 = _reference(init, arc_s, relu_skip=True).double()
    opt_64 = ref.official_optimizer(model_64, oa.MAIN_ARGS["lr"])

  records = []
  batch = first
  for t in range(args.steps):
    if t:
      batch = next(batches)
    x_ours = batch["image"]
    x_off = oa.normalise(oa.to_uint8(x_ours))
    started = time.perf_counter()
    s_off = oa.train_step(official, model_off, opt_off, x_off, t, dv_off)
    time_off = time.perf_counter() - started
    tokens = np.asarray(tokens_fn(state.params, x_ours, state.step)).reshape(-1)
    started = time.perf_counter()
    state, out = step_fn(state, {"image": x_ours})
    out = jax.device_get(out)
    time_ours = time.perf_counter() - started
    off_tree = oa.params_as_ours(model_off, abstract)
    k = config.quantizer.num_codes
    records.append(
      dict(
        step=t,
        official=dict(
          {name: s_off[name] for name in (*LOSSES, "arc_weight")},
          batch_codes=len(np.unique(s_off["indices"])),
          codebook_norms=row_norms(off_tree["codebook"]),
          seconds=time_off,
        ),
        ours=dict(
          {name: float(out[name]) for name in (*LOSSES, "arc_weight", "bbnr_radius")},
          batch_codes=round(float(out["batch_usage"]) * k),
          codebook_norms=row_norms(jax.device_get(state.params["codebook"])),
          seconds=time_ours,
        ),
        input_max_abs=max_abs(x_off.permute(0, 2, 3, 1).numpy(), x_ours),
        tokens_differ=int(np.sum(tokens != s_off["indices"])),
        num_tokens=int(tokens.size),
        param_diff=param_differences(off_tree, state.params),
      )
    )
    r = records[-1]
    if args.control:
      s_ctl = oa.train_step(official, model_ctl, opt_ctl, x_off, t, dv_off)
      r["control"] = dict(
        {name: s_ctl[name] for name in LOSSES},
        tokens_differ=int(np.sum(s_ctl["indices"] != s_off["indices"])),
        param_diff=param_differences(off_tree, oa.params_as_ours(model_ctl, abstract)),
      )
    if args.float64:
      a = oa.MAIN_ARGS
      s_64 = ref.official_train_step(
        model_64, opt_64, x_off.double(), t, dv_off, a["gamma"], a["gamma_decay"]
      )
      exact = oa.params_as_ours(model_64, abstract)
      indices_64 = s_64["indices"].numpy()
      r["float64"] = dict(
        {name: s_64[name] for name in LOSSES},
        official_tokens_differ=int(np.sum(s_off["indices"] != indices_64)),
        ours_tokens_differ=int(np.sum(tokens != indices_64)),
        official_param_diff=param_differences(exact, off_tree),
        ours_param_diff=param_differences(exact, state.params),
      )
    print(
      f"step {t:3d}  rec {r['official']['loss_rec']:.5f} / {r['ours']['loss_rec']:.5f}  "
      f"tokens differ {r['tokens_differ']:5d}  max|d params| {r['param_diff']['all']:.3g}  "
      + (
        f"control: {r['control']['tokens_differ']:5d} {r['control']['param_diff']['all']:.3g}  "
        if args.control
        else ""
      )
      + f"({time_off:.1f} s / {time_ours:.1f} s)",
      flush=True,
    )

  evaluation = None
  if args.eval:
    mesh = sharding.make_mesh((1,), ("data",), devices=jax.devices()[:1])
    eval_fn = jax.jit(
      functools.partial(tokenizer_steps.eval_step, model=model), compiler_options=options
    )

    def ours_eval(params):
      batches = pipeline.create_eval_iterator(
        config.data, global_batch_size=config.eval_batch_size, process_index=0, process_count=1
      )
      return tokenizer_steps.evaluate(eval_fn, params, batches, sharding.batch_sharding(mesh))

    evaluation = dict(
      official=oa.evaluate(model_off, config),
      official_weights_our_evaluation=ours_eval(oa.params_as_ours(model_off, abstract)),
      ours=ours_eval(state.params),
    )
    if args.control:  # how far rounding alone moves the scores at this step
      evaluation["control"] = oa.evaluate(model_ctl, config)

  return dict(
    settings=dict(
      steps=args.steps,
      batch_size=args.batch_size,
      seed=args.seed,
      arc_s=arc_s,
      experiment=args.experiment,
      config=os.path.relpath(args.config, REPO),
      official=official.folder,
      data_variance=dict(official=dv_off, ours=dv_ours),
      devices=str(jax.devices()),
      torch_threads=torch.get_num_threads(),
    ),
    anchor=anchor,
    steps=records,
    summary=dict(
      ours=summarise(records), control=summarise(records, "control") if args.control else None
    ),
    evaluation=evaluation,
  )


def summarise(records: list[dict[str, Any]], side: str = "ours") -> dict[str, Any]:
  """Step 0 agreement, and whether the losses drift one way: per loss, the mean signed
  relative difference (side - official) / |official| over the steps and the share of steps
  where `side` ('ours' or 'control') is higher."""
  out: dict[str, Any] = {}
  for name in LOSSES:
    signed = np.array(
      [(r[side][name] - r["official"][name]) / abs(r["official"][name]) for r in records]
    )
    out[name] = dict(
      step0_rel=float(abs(signed[0])),
      mean_signed_rel=float(np.mean(signed)),
      max_abs_rel=float(np.max(np.abs(signed))),
      share_higher=float(np.mean(signed > 0)),
    )
  differ = [r["tokens_differ"] if side == "ours" else r[side]["tokens_differ"] for r in records]
  out["first_step_tokens_differ"] = next((t for t, d in enumerate(differ) if d), None)
  return out


# --------------------------------------------------------------------------- outputs


def markdown(result: dict[str, Any]) -> str:
  s = result["settings"]
  lines = [
    "# Trajectory parity: official ArcVQ-VAE against arcvq-jax",
    "",
    f"{s['steps']} steps, batch {s['batch_size']}, seed {s['seed']}, ArcLoss s {s['arc_s']}, "
    f"experiment `{s['experiment']}`, config {s['config']}; devices {s['devices']}, "
    f"torch threads {s['torch_threads']}. Data variance: official "
    f"{s['data_variance']['official']:.9f}, ours {s['data_variance']['ours']:.9f}.",
    "",
  ]
  if result["anchor"]:
    lines += [
      "## tests/torch_reference.py against the official code (same weights and batch)",
      "",
      "| residual form | fwd max abs x_hat | fwd rel VQ | fwd rel ArcLoss | fwd tokens differ "
      "| step rel loss | step rel grad norm | step max abs params |",
      "|---|---|---|---|---|---|---|---|",
    ]
    for form, v in result["anchor"].items():
      f, st = v["forward"], v["step"]
      lines.append(
        f"| {form} | {f['x_hat_max_abs']:.3g} | {f['loss_vq_rel']:.3g} | {f['loss_arc_rel']:.3g} "
        f"| {f['tokens_differ']} | {st['loss_rel']:.3g} | {st['grad_norm_rel']:.3g} "
        f"| {st['params_max_abs']:.3g} |"
      )
    lines.append("")
  lines += [
    "## Per step (official / ours)",
    "",
    "| t | rec | VQ | ArcLoss | total | grad norm | codes in batch | tokens differ "
    "| max row norm | max abs d codebook | max abs d params | control: tokens differ "
    "| control: max abs d params |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in result["steps"]:
    o, u, c = r["official"], r["ours"], r.get("control")
    pair = lambda k, o=o, u=u: f"{o[k]:.5f} / {u[k]:.5f}"
    control = f"{c['tokens_differ']} | {c['param_diff']['all']:.3g}" if c else "- | -"
    lines.append(
      f"| {r['step']} | {pair('loss_rec')} | {pair('loss_vq')} | {pair('loss_arc')} "
      f"| {pair('loss')} | {o['grad_norm']:.4f} / {u['grad_norm']:.4f} "
      f"| {o['batch_codes']} / {u['batch_codes']} | {r['tokens_differ']} "
      f"| {o['codebook_norms']['max']:.5f} / {u['codebook_norms']['max']:.5f} "
      f"| {r['param_diff']['codebook']:.3g} | {r['param_diff']['all']:.3g} | {control} |"
    )
  if result["steps"] and "float64" in result["steps"][0]:
    lines += [
      "",
      "## Against the float64 run of the official step (exact arithmetic, nearly)",
      "",
      "| t | tokens differ: official | ours | max abs d params: official | ours "
      "| max abs d codebook: official | ours |",
      "|---|---|---|---|---|---|---|",
    ]
    for r in result["steps"]:
      f = r["float64"]
      lines.append(
        f"| {r['step']} | {f['official_tokens_differ']} | {f['ours_tokens_differ']} "
        f"| {f['official_param_diff']['all']:.3g} | {f['ours_param_diff']['all']:.3g} "
        f"| {f['official_param_diff']['codebook']:.3g} | {f['ours_param_diff']['codebook']:.3g} |"
      )
  lines += [
    "",
    "## Drift (side - official, relative to official)",
    "",
    "| side | quantity | at step 0 | mean signed | max abs | share of steps higher |",
    "|---|---|---|---|---|---|",
  ]
  for side, summary in result["summary"].items():
    if summary is None:
      continue
    for name in LOSSES:
      v = summary[name]
      lines.append(
        f"| {side} | {name} | {v['step0_rel']:.3g} | {v['mean_signed_rel']:+.3g} "
        f"| {v['max_abs_rel']:.3g} | {v['share_higher']:.2f} |"
      )
    lines.append(
      f"| {side} | first step whose tokens differ | {summary['first_step_tokens_differ']} | | | |"
    )
  if result["evaluation"]:
    lines += [
      "",
      "## Test split, our metric code",
      "",
      "| model, evaluation | PSNR | SSIM | usage | perplexity |",
      "|---|---|---|---|---|",
    ]
    for name, e in result["evaluation"].items():
      lines.append(
        f"| {name} | {e['psnr']:.4f} | {e['ssim']:.5f} | {e['codebook_usage']:.4f} "
        f"| {e['perplexity']:.3f} |"
      )
  return "\n".join(lines) + "\n"


def plot(result: dict[str, Any], path: str) -> None:
  steps = [r["step"] for r in result["steps"]]
  floor = 1e-12  # zeros drawn at the floor of the log scale
  fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
  for name in (*GROUPS, "all"):
    left.plot(steps, [max(r["param_diff"][name], floor) for r in result["steps"]], label=name)
  if result["steps"] and "control" in result["steps"][0]:
    left.plot(
      steps,
      [max(r["control"]["param_diff"]["all"], floor) for r in result["steps"]],
      "k:",
      label="all, 1-ulp control",
    )
  if result["steps"] and "float64" in result["steps"][0]:
    for side, style in (("official", "r-."), ("ours", "b-.")):
      values = [max(r["float64"][f"{side}_param_diff"]["all"], floor) for r in result["steps"]]
      left.plot(steps, values, style, label=f"all, {side} vs float64")
  left.set(yscale="log", xlabel="step", ylabel="max |official - other|", title="parameters")
  left.legend()
  for name in LOSSES:
    values = [max(rel(r["official"][name], r["ours"][name]), floor) for r in result["steps"]]
    right.plot(steps, values, label=name)
  shares = [max(r["tokens_differ"] / r["num_tokens"], floor) for r in result["steps"]]
  right.plot(steps, shares, "k--", label="tokens differ (share)")
  if result["steps"] and "control" in result["steps"][0]:
    shares = [max(r["control"]["tokens_differ"] / r["num_tokens"], floor) for r in result["steps"]]
    right.plot(steps, shares, "k:", label="tokens differ, 1-ulp control")
  right.set(yscale="log", xlabel="step", ylabel="relative difference", title="losses")
  right.legend()
  fig.suptitle(
    f"official ArcVQ-VAE vs arcvq-jax, batch {result['settings']['batch_size']}, "
    f"experiment {result['settings']['experiment']}"
  )
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv: list[str] | None = None) -> None:
  args = parse_args(argv)
  os.makedirs(args.out, exist_ok=True)
  try:
    with experiment(args.experiment):
      result = run(args)
  except oa.UsageError as e:
    sys.exit(f"error: {e}")
  with open(os.path.join(args.out, "trajectory.json"), "w") as f:
    json.dump(result, f, indent=1)
  with open(os.path.join(args.out, "trajectory.md"), "w") as f:
    f.write(markdown(result))
  plot(result, os.path.join(args.out, "trajectory.png"))
  print(f"wrote {args.out}/trajectory.json, trajectory.md, trajectory.png")


if __name__ == "__main__":
  main()
