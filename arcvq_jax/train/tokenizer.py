"""Training and evaluation of the VQ-VAE tokenizer (SPEC.md sections 1-2), one loop.

Read top to bottom: build mesh -> data -> model -> state (fresh or restored) -> jitted
step -> loop with periodic logging, images, checkpoints, evaluation.
"""

from __future__ import annotations

import functools
import json
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from absl import logging
from clu import metric_writers, periodic_actions
from jax.experimental import multihost_utils

from arcvq_jax import checkpoint as ckpt_lib
from arcvq_jax import config as config_lib
from arcvq_jax import distributed, sharding, streaming
from arcvq_jax import quantization as vq
from arcvq_jax.data import pipeline
from arcvq_jax.evaluation import diagnostics, metrics
from arcvq_jax.evaluation import images as image_lib
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.models import vqgan, vqvae
from arcvq_jax.train.state import (
  TrainState,
  init_train_state,
  learning_rate,
  make_disc_optimizer,
  make_optimizer,
)

Batch = dict[str, jax.Array]


def use_streamed(impl: str, num_codes: int, num_tokens: int) -> bool:
  """Whether to take the streamed ArcLoss / search: by config, or by size for 'auto'.

  Streamed is faster than naive on CPU once K x N exceeds one block (bench/bench_arcloss.py)
  and is the only option where the K x N matrix does not fit; below that the naive form
  (one small matrix) is kept.
  """
  if impl == "auto":
    return num_codes * num_tokens > streaming.BLOCK_ELEMENTS
  return impl == "streamed"


def nearest_code(
  z: jax.Array, codebook: jax.Array, q: ml_collections.ConfigDict, mesh: Any = None
) -> jax.Array:
  """quantization.nearest_code, streamed over blocks when `q.search_impl` says so.

  z: (N, D) float32, the global batch; codebook: (K, D) -> (N,) int32. mesh: the step's
  device Mesh (default: the one `jax.set_mesh` set, if any). On a mesh of several devices a
  streamed search, or any search with `q.codebook_axis` set, runs per device with explicit
  collectives (streaming.nearest_code_sharded): each device searches its own tokens, and its
  slice of the codebook along q.codebook_axis where that names a mesh axis. Without a mesh,
  jit partitions the plain search by the inputs' shardings. The indices are the same.
  """
  if mesh is None:
    context = jax.sharding.get_abstract_mesh()
    mesh = None if context.empty else context
  axis = q.get("codebook_axis") or None
  streamed = use_streamed(q.search_impl, codebook.shape[0], z.shape[0])
  if mesh is not None and mesh.size > 1 and (streamed or axis is not None):
    batch_axes = sharding.batch_sharding(mesh).spec[0]
    names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    if z.shape[0] % int(np.prod([mesh.shape[a] for a in names])) == 0:
      return streaming.nearest_code_sharded(
        z, codebook, q.distance, mesh=mesh, batch_axes=batch_axes, codebook_axis=axis
      )
  if streamed:
    return streaming.nearest_code_streamed(z, codebook, q.distance)
  return vq.nearest_code(z, codebook, q.distance)


class NonFiniteLossError(FloatingPointError):
  """The loss became NaN or Inf; nothing after the last good checkpoint was saved."""


# --------------------------------------------------------------------------- the step


def encode_and_quantize(
  params: Any,
  x: jax.Array,
  *,
  model: nn.Module,
  config: ml_collections.ConfigDict,
  mesh: Any = None,
) -> tuple[jax.Array, jax.Array, vq.Quantized]:
  """x (B, H, W, C) -> (z (B, h, w, D), z_flat (N, D) float32, its quantisation).

  `model` is a VQVAE or a VQGAN (both have `encode` / `decode`). The quantiser runs in
  float32 whatever dtype the network computes in. mesh: the step's device Mesh, so that the
  search splits over it (see nearest_code), or None.
  """
  z = model.apply({"params": params}, x, method="encode")
  z_flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  codebook = params["codebook"].astype(jnp.float32)
  indices = nearest_code(z_flat, codebook, config.quantizer, mesh=mesh)
  return z, z_flat, vq.quantize_with_indices(z_flat, codebook, indices)


def quantizer_losses(
  z_flat: jax.Array,
  quant: vq.Quantized,
  codebook: jax.Array,
  step: jax.Array,
  *,
  config: ml_collections.ConfigDict,
  replicated: Any = None,
) -> dict[str, jax.Array]:
  """L_vq (Eq. 3), L_arc (Eq. 10-12) and gamma(t) (Eq. 13), float32 scalars.

  z_flat: (N, D) float32 latents of the global batch; codebook: (K, D) float32;
  replicated: the mesh's replicated NamedSharding (or None off a mesh).
  Returns loss_vq, loss_arc, arc_weight and loss_q = loss_vq + arc_weight * loss_arc.
  """
  q, arc = config.quantizer, config.arc
  loss_vq = vq.vq_loss(
    z_flat, quant.z_q, q.beta, legacy=q.legacy_beta, codebook_term=q.codebook_update == "loss"
  )
  if arc.enabled:
    mesh = None if replicated is None else replicated.mesh
    if not use_streamed(arc.impl, q.num_codes, z_flat.shape[0]):
      loss_arc = vq.arc_loss(z_flat, codebook, arc.s, arc.m, arc.top_k)
    elif mesh is None or mesh.size == 1:
      loss_arc = streaming.arc_loss_streamed(z_flat, codebook, arc.s, arc.m, arc.top_k)
    else:
      # The rows of the loss split over the devices (the codebook's shard along
      # q.codebook_axis, if set), the tokens gathered: explicit collectives in a shard_map.
      loss_arc = streaming.arc_loss_sharded(
        z_flat,
        codebook,
        arc.s,
        arc.m,
        arc.top_k,
        mesh=mesh,
        batch_axes=sharding.batch_sharding(mesh).spec[0],
        codebook_axis=q.get("codebook_axis") or None,
      )
    arc_w = vq.arc_weight(step, arc.gamma0, arc.decay)
  else:
    loss_arc = arc_w = jnp.zeros((), jnp.float32)
  return dict(
    loss_vq=loss_vq, loss_arc=loss_arc, arc_weight=arc_w, loss_q=loss_vq + arc_w * loss_arc
  )


def tokenizer_loss(
  params: Any,
  x: jax.Array,
  step: jax.Array,
  *,
  model: nn.Module,
  config: ml_collections.ConfigDict,
  data_variance: float,
  replicated: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """mse(x_hat, x) / var(x_train) + L_vq + gamma(t) L_arc (SPEC.md section 2).

  x: (B, H, W, C) float32 in [-1, 1]; replicated: the mesh's replicated NamedSharding (or
  None off a mesh). Returns the scalar loss and aux values:
  the terms, the code indices (N,) and the latents z (N, D) for codebook updates.
  """
  z, z_flat, quant = encode_and_quantize(
    params, x, model=model, config=config, mesh=None if replicated is None else replicated.mesh
  )
  terms = quantizer_losses(
    z_flat,
    quant,
    params["codebook"].astype(jnp.float32),
    step,
    config=config,
    replicated=replicated,
  )
  x_hat = model.apply(
    {"params": params}, quant.z_ste.reshape(z.shape).astype(z.dtype), method="decode"
  )
  loss_rec = jnp.mean((x_hat.astype(jnp.float32) - x) ** 2) / data_variance
  loss = loss_rec + terms.pop("loss_q")
  aux = dict(loss=loss, loss_rec=loss_rec, **terms, indices=quant.indices, z=z_flat)
  return loss, aux


def project_codebook(state: TrainState, q: ml_collections.ConfigDict) -> tuple[Any, jax.Array]:
  """BBNR (Eq. 5-7): the params with the codebook projected into the ball of radius M(t).

  The projection happens before the codebook is used at step t; the projected rows are what
  the optimizer then updates and stores. Returns (params, M(t)).
  """
  radius = vq.bbnr_radius(state.step, q.bbnr_alpha, q.bbnr)
  params = dict(state.params)
  if q.bbnr != "off":
    params["codebook"] = vq.bbnr_project(params["codebook"], radius)
  return params, radius


def apply_tokenizer_update(
  state: TrainState,
  params: Any,
  grads: Any,
  aux: dict[str, jax.Array],
  radius: jax.Array,
  *,
  tx: optax.GradientTransformation,
  q: ml_collections.ConfigDict,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer update, then the codebook's own updates (EMA, usage, dead-code restart).

  params: the (BBNR-projected) params the gradients were taken at; aux: the loss terms plus
  'indices' (N,) and 'z' (N, D) of the global batch. Returns the next state and the step's
  metrics (aux's scalars plus codebook statistics).
  """
  rng, restart_key = jax.random.split(state.rng)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)

  counts = vq.code_histogram(aux["indices"], q.num_codes)
  ema = state.ema
  if q.codebook_update == "ema":
    ema, params["codebook"] = vq.ema_codebook_update(
      ema, aux["z"], aux["indices"], q.ema_decay, q.ema_eps
    )
  usage = q.usage_decay * state.usage + (1.0 - q.usage_decay) * counts
  num_restarted = jnp.zeros((), jnp.int32)
  if q.restart_threshold > 0:
    params["codebook"], usage, dead = vq.restart_dead_codes(
      restart_key, params["codebook"], usage, aux["z"], q.restart_threshold
    )
    num_restarted = jnp.sum(dead).astype(jnp.int32)

  norms = jnp.linalg.norm(params["codebook"], axis=-1)
  out = {k: v for k, v in aux.items() if k not in ("indices", "z")}
  out.update(
    codebook_norm_mean=jnp.mean(norms),
    codebook_norm_max=jnp.max(norms),
    batch_usage=metrics.codebook_usage(counts),
    batch_perplexity=metrics.perplexity(counts),
    grad_norm=optax.tree.norm(grads),
    codes_restarted=num_restarted,
  )
  if q.bbnr != "off":  # M(t) = inf otherwise: nothing to plot
    out["bbnr_radius"] = radius
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, ema=ema, usage=usage, rng=rng
  )
  return new_state, out


def train_step(
  state: TrainState,
  batch: Batch,
  *,
  model: nn.Module,
  tx: optax.GradientTransformation,
  config: ml_collections.ConfigDict,
  data_variance: float,
  replicated: Any = None,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step. batch['image']: (B, H, W, C) in [-1, 1], sharded along 'data'.

  replicated: the mesh's replicated NamedSharding, for the parts computed whole per device.
  """
  params, radius = project_codebook(state, config.quantizer)
  grad_fn = jax.value_and_grad(
    functools.partial(
      tokenizer_loss, model=model, config=config, data_variance=data_variance, replicated=replicated
    ),
    has_aux=True,
  )
  (_, aux), grads = grad_fn(sharding.gather_params(params, replicated), batch["image"], state.step)
  return apply_tokenizer_update(state, params, grads, aux, radius, tx=tx, q=config.quantizer)


def reconstruct(
  params: Any, x: jax.Array, *, model: nn.Module, config: ml_collections.ConfigDict
) -> tuple[jax.Array, jax.Array]:
  """Encode, quantise, decode: x (B, H, W, C) -> (x_hat (B, H, W, C), indices (B, h, w))."""
  z, _, quant = encode_and_quantize(params, x, model=model, config=config)
  z_q = quant.z_q.reshape(z.shape).astype(z.dtype)
  x_hat = model.apply({"params": params}, z_q, method="decode")
  return x_hat.astype(jnp.float32), quant.indices.reshape(z.shape[:-1])


def eval_step(
  params: Any,
  batch: Batch,
  lpips_params: Any = None,
  *,
  model: nn.Module,
  config: ml_collections.ConfigDict,
  with_reconstructions: bool = False,
) -> dict[str, jax.Array]:
  """Sums over the real (mask == 1) images of a batch; the caller adds them up.

  MSE is on [0, 1] images; PSNR, SSIM and (with lpips_params) LPIPS follow SPEC.md section 5.
  with_reconstructions: also return the batch's x_hat (B, H, W, C) as 'reconstructions'.
  """
  x, mask = batch["image"], batch["mask"].astype(jnp.float32)
  x_hat, indices = reconstruct(params, x, model=model, config=config)
  x01, y01 = metrics.to_unit_range(x), metrics.to_unit_range(x_hat)
  mse = jnp.mean((x01 - y01) ** 2, axis=(1, 2, 3))
  out = dict(
    count=jnp.sum(mask),
    mse=jnp.sum(mask * mse),
    psnr=jnp.sum(mask * metrics.psnr(x01, y01)),
    ssim=jnp.sum(mask * metrics.ssim(x01, y01)),
    code_counts=metrics.code_counts(indices, config.quantizer.num_codes, mask),
  )
  if lpips_params is not None:
    out["lpips"] = jnp.sum(mask * lpips_lib.lpips_distance(lpips_params, x, x_hat))
  if with_reconstructions:
    out["reconstructions"] = x_hat
  return out


def evaluate(
  eval_fn: Callable,
  params: Any,
  batches: Iterator[dict[str, np.ndarray]],
  batch_sharding,
  lpips_params: Any = None,
) -> dict[str, float]:
  """Runs `eval_fn` over all batches; returns MSE, PSNR, SSIM, codebook usage, perplexity
  (and LPIPS with lpips_params)."""
  totals: dict[str, np.ndarray] = {}
  for local in batches:
    out = jax.device_get(
      eval_fn(params, sharding.global_batch(local, batch_sharding), lpips_params)
    )
    for k, v in out.items():
      totals[k] = totals.get(k, 0) + np.asarray(v, np.float64)
  if not totals or totals["count"] == 0:
    raise ValueError("the evaluation split is empty; check config.data.eval_split.")
  n = float(totals["count"])
  counts = totals["code_counts"]
  results = dict(
    num_images=int(n),
    mse=float(totals["mse"] / n),
    psnr=float(totals["psnr"] / n),
    ssim=float(totals["ssim"] / n),
    codebook_usage=float(metrics.codebook_usage(counts)),
    perplexity=float(metrics.perplexity(counts)),
  )
  if "lpips" in totals:
    results["lpips"] = float(totals["lpips"] / n)
  return results


# --------------------------------------------------------------------------- the loop


def num_train_steps(config: ml_collections.ConfigDict, num_train_images: int) -> int:
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(config.num_epochs * (num_train_images // config.batch_size))


def _mean_metrics(history: list[dict[str, jax.Array]]) -> dict[str, float]:
  """Per key, the mean over the steps that logged it (GAN terms start part-way)."""
  stacked = jax.device_get(history)
  keys = dict.fromkeys(k for m in stacked for k in m)
  return {k: float(np.mean([m[k] for m in stacked if k in m])) for k in keys}


def _check_finite(history: list[dict[str, jax.Array]], first_step: int, checkpointer) -> None:
  losses = np.asarray(jax.device_get([m["loss"] for m in history]))
  bad = np.flatnonzero(~np.isfinite(losses))
  if bad.size:
    step = first_step + int(bad[0])
    checkpointer.wait()  # an asynchronous save of the last good step finishes first
    raise NonFiniteLossError(
      f"the loss became {losses[bad[0]]} at step {step}. Nothing after the last good "
      f"checkpoint (step {checkpointer.latest_step()}, in {checkpointer.directory}) was "
      "saved. Lower config.optimizer.lr or set config.optimizer.grad_clip_norm, then run "
      "the same command again to resume from that checkpoint."
    )


def create_state_and_step(
  config: ml_collections.ConfigDict,
  model: nn.Module,
  tx: optax.GradientTransformation,
  mesh: jax.sharding.Mesh,
  image_shape: tuple[int, int, int],
  data_variance: float,
) -> tuple[TrainState, Any, Callable]:
  """A fresh state laid out by its shardings, the shardings, and the jitted train step.

  The step takes (state, batch) with the batch split along 'data', donates the state, and
  returns (state, metrics) with the metrics replicated.
  """
  init_fn = functools.partial(init_train_state, model=model, tx=tx, image_shape=image_shape)
  key = jax.random.PRNGKey(config.seed)
  state_sharding = sharding.state_shardings(jax.eval_shape(init_fn, key), mesh, config.sharding)
  state = jax.jit(init_fn, out_shardings=state_sharding)(key)
  step_fn = jax.jit(
    functools.partial(
      train_step,
      model=model,
      tx=tx,
      config=config,
      data_variance=data_variance,
      replicated=sharding.replicated(mesh),
    ),
    in_shardings=(state_sharding, sharding.batch_sharding(mesh)),
    out_shardings=(state_sharding, sharding.replicated(mesh)),
    donate_argnums=(0,),
  )
  return state, state_sharding, step_fn


def build_model(config: ml_collections.ConfigDict, channels: int) -> nn.Module:
  """The autoencoder config.model.name names ('vqvae' or 'vqgan'), for `channels` channels."""
  if config.model.name == "vqgan":
    return vqgan.from_config(config, channels=channels)
  return vqvae.from_config(config, channels=channels)


def load_lpips(config: ml_collections.ConfigDict) -> Any:
  """The LPIPS weights of config.lpips_path, or None where it is empty.

  A VQGAN with loss.perceptual_weight > 0 needs them (config.validate refuses an empty
  path); a missing or damaged file stops the run here, before anything is compiled, with
  the converter command in the message.
  """
  if not config.get("lpips_path"):
    return None
  return lpips_lib.load_params(os.path.expanduser(config.lpips_path))


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains (or resumes) in `workdir`, then evaluates; returns the final eval metrics.

  A VQ-VAE (config.model.name 'vqvae') takes one jitted step per batch; a VQGAN ('vqgan')
  takes the generator step and, from gan.disc_train_start on, the discriminator step
  (train/gan_steps.py). Both resume exactly from their checkpoints. On SIGTERM (any process
  of a multi-process run) every process saves the current step, waits for the write and
  returns {'preempted_at_step': step} without evaluating.
  """
  config_lib.validate(config, jax.device_count(), jax.process_count())
  info = pipeline.dataset_info(config.data)
  image_shape = tuple(info["image_shape"])
  config_lib.validate_against_data(config, image_shape)
  lpips_params = load_lpips(config)
  total_steps = num_train_steps(config, info["num_train"])
  is_main = jax.process_index() == 0
  if is_main:
    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
      f.write(config.to_json_best_effort(indent=2))

  mesh = sharding.make_mesh(config.sharding.mesh_shape, config.sharding.mesh_axes)
  batch_sharding, replicated = sharding.batch_sharding(mesh), sharding.replicated(mesh)
  if lpips_params is not None:
    lpips_params = jax.device_put(lpips_params, replicated)
  model = build_model(config, channels=image_shape[-1])
  tx = make_optimizer(config)
  logging.info(
    "Training images: %d, steps: %d, learning rate %.3g",
    info["num_train"],
    total_steps,
    learning_rate(config),
  )

  if config.model.name == "vqgan":
    # Imported here: gan_steps builds on this module's step pieces.
    from arcvq_jax.train import gan_steps  # noqa: PLC0415

    disc_model = gan_steps.discriminator_from_config(config)
    state, state_sharding, step_fn = gan_steps.create_state_and_steps(
      config, model, disc_model, tx, make_disc_optimizer(config), mesh, image_shape, lpips_params
    )
  else:
    data_variance = pipeline.train_image_variance(config.data)
    logging.info("Training image variance in [-1, 1]: %.5f", data_variance)
    state, state_sharding, vqvae_step = create_state_and_step(
      config, model, tx, mesh, image_shape, data_variance
    )
    step_fn = lambda state, batch, t: vqvae_step(state, batch)  # noqa: E731

  train_iter = pipeline.create_train_iterator(
    config.data,
    global_batch_size=config.batch_size,
    seed=config.seed,
    process_index=jax.process_index(),
    process_count=jax.process_count(),
  )
  checkpointer = ckpt_lib.Checkpointer(
    ckpt_lib.checkpoint_dir(workdir),
    config.keep_checkpoints,
    async_save=config.get("checkpoint_async", False),
  )
  start = checkpointer.latest_step()
  if start is not None:
    logging.info("Resuming from checkpoint step %d in %s", start, checkpointer.directory)
    state = checkpointer.restore(start, ckpt_lib.abstract_like(state), train_iter)
  start = int(jax.device_get(state.step))

  eval_fn = jax.jit(
    functools.partial(eval_step, model=model, config=config),
    in_shardings=(state_sharding.params, batch_sharding, replicated),
    out_shardings=replicated,
  )
  recon_fn = jax.jit(functools.partial(reconstruct, model=model, config=config))

  def eval_batches():
    return pipeline.create_eval_iterator(
      config.data,
      global_batch_size=config.eval_batch_size,
      process_index=jax.process_index(),
      process_count=jax.process_count(),
    )

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  report_progress = periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer)
  # A fixed set of test images for the reconstruction grids (process 0's, on every process:
  # the jitted call takes host arrays as the same value everywhere).
  preview = next(iter(eval_batches()))["image"][:8]
  if jax.process_count() > 1:
    preview = multihost_utils.broadcast_one_to_all(preview)

  def run_eval(step: int) -> dict[str, float]:
    results = evaluate(eval_fn, state.params, eval_batches(), batch_sharding, lpips_params)
    writer.write_scalars(step, {f"eval/{k}": v for k, v in results.items()})
    if is_main:
      os.makedirs(os.path.join(workdir, "eval"), exist_ok=True)
      for name in (f"eval/step_{step}.json", "eval_results.json"):
        with open(os.path.join(workdir, name), "w") as f:
          json.dump(dict(step=step, split=config.data.eval_split, **results), f, indent=2)
    logging.info("eval at step %d: %s", step, results)
    return results

  history: list[dict[str, jax.Array]] = []
  history_start = start
  preemption = distributed.PreemptionWatcher().install()
  try:
    for step in range(start + 1, total_steps + 1):
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = sharding.global_batch(next(train_iter), batch_sharding)
        state, step_metrics = step_fn(state, batch, step - 1)
      history.append(step_metrics)
      report_progress(step, time.time())

      is_last = step == total_steps
      if step % config.log_every_steps == 0 or is_last:
        _check_finite(history, history_start + 1, checkpointer)
        writer.write_scalars(step, {f"train/{k}": v for k, v in _mean_metrics(history).items()})
        usage = jax.device_get(state.usage)
        writer.write_scalars(step, {"train/ema_usage": float(np.mean(usage > 1e-3))})
        history, history_start = [], step
      if config.image_every_steps and (step % config.image_every_steps == 0 or is_last):
        x_hat, _ = recon_fn(state.params, preview)
        grid = image_lib.side_by_side(np.asarray(preview), np.asarray(x_hat), value_range=(-1, 1))
        writer.write_images(step, {"reconstructions": grid[None]})
      saved = (
        config.checkpoint_every_steps and step % config.checkpoint_every_steps == 0
      ) or is_last
      if saved:
        _check_finite(history, history_start + 1, checkpointer)
        checkpointer.save(step, state, train_iter)
      if not is_last and preemption.should_stop(step):
        # SIGTERM (preemption, scancel, maintenance): save this step, wait for the write,
        # and leave; the same command resumes here.
        if not saved:
          _check_finite(history, history_start + 1, checkpointer)
          checkpointer.save(step, state, train_iter)
        checkpointer.wait()
        checkpointer.close()
        writer.flush()
        logging.warning(
          "Preempted (SIGTERM) at step %d of %d: checkpoint saved in %s; run "
          "the same command to resume.",
          step,
          total_steps,
          checkpointer.directory,
        )
        return dict(preempted_at_step=step)
      if config.eval_every_steps and step % config.eval_every_steps == 0 and not is_last:
        run_eval(step)
  finally:
    preemption.restore()
  writer.flush()

  results = run_eval(total_steps)
  # The paper's Fig. 2-3, from the training-time (EMA) usage of the rows. Every process
  # takes part in gathering a codebook that the 'fsdp' axis may have split across hosts.
  codebook, usage = multihost_utils.process_allgather(
    (state.params["codebook"], state.usage), tiled=True
  )
  if is_main:
    diagnostics.write_codebook_diagnostics(
      os.path.join(workdir, "diagnostics"),
      np.asarray(codebook),
      np.asarray(usage),
      prefix=f"step_{total_steps}_",
      writer=writer,
      step=total_steps,
    )
  checkpointer.wait()
  checkpointer.close()
  writer.flush()
  return results
