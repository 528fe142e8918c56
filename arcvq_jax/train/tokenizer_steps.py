"""The VQ-VAE tokenizer's step functions: loss, train step, evaluation step (docs/math.md).

Pure pieces a stage composes: the nearest-code search (plain, blocked or split over a mesh),
the quantiser's losses, the BBNR projection, the codebook's updates outside the gradient
(EMA k-means, usage, dead-code restart), the jitted train step and the evaluation step. No
loop, data pipeline or metric writer is imported here: the tokenizer API, evaluation, the
converters and the priors use these without them. The VQGAN's steps (train/gan_steps.py)
build on the same pieces; the loop that calls either is train/loop.py.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from arcvq_jax import blockwise, sharding
from arcvq_jax import quantization as vq
from arcvq_jax.evaluation import metrics
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.train import state as state_lib
from arcvq_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def use_blocked(impl: str, num_codes: int, num_tokens: int) -> bool:
  """Whether to take the blocked ArcLoss / search: by config, or by size for 'auto'.

  Blocked is faster than naive on CPU once K x N exceeds one block (bench/bench_arcloss.py)
  and is the only option where the K x N matrix does not fit; below that the naive form
  (one small matrix) is kept.
  """
  if impl == "auto":
    return num_codes * num_tokens > blockwise.BLOCK_ELEMENTS
  return impl == "blocked"


def nearest_code(
  z: jax.Array, codebook: jax.Array, q: ml_collections.ConfigDict, mesh: Any = None
) -> jax.Array:
  """quantization.nearest_code, blocked over blocks when `q.search_impl` says so.

  z: (N, D) float32, the global batch; codebook: (K, D) -> (N,) int32. mesh: the step's
  device Mesh (default: the one `jax.set_mesh` set, if any). On a mesh of several devices a
  blocked search, or any search with `q.codebook_axis` set, runs per device with explicit
  collectives (blockwise.nearest_code_sharded): each device searches its own tokens, and its
  slice of the codebook along q.codebook_axis where that names a mesh axis. Without a mesh,
  jit partitions the plain search by the inputs' shardings. The indices are the same.
  """
  if mesh is None:
    context = jax.sharding.get_abstract_mesh()
    mesh = None if context.empty else context
  axis = q.get("codebook_axis") or None
  blocked = use_blocked(q.search_impl, codebook.shape[0], z.shape[0])
  if mesh is not None and mesh.size > 1 and (blocked or axis is not None):
    batch_axes = sharding.batch_sharding(mesh).spec[0]
    names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    if z.shape[0] % int(np.prod([mesh.shape[a] for a in names])) == 0:
      return blockwise.nearest_code_sharded(
        z, codebook, q.distance, mesh=mesh, batch_axes=batch_axes, codebook_axis=axis
      )
  if blocked:
    return blockwise.nearest_code_blocked(z, codebook, q.distance)
  return vq.nearest_code(z, codebook, q.distance)


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
    if not use_blocked(arc.impl, q.num_codes, z_flat.shape[0]):
      loss_arc = vq.arc_loss(z_flat, codebook, arc.s, arc.m, arc.top_k)
    elif mesh is None or mesh.size == 1:
      loss_arc = blockwise.arc_loss_blocked(z_flat, codebook, arc.s, arc.m, arc.top_k)
    else:
      # The rows of the loss split over the devices (the codebook's shard along
      # q.codebook_axis, if set), the tokens gathered: explicit collectives in a shard_map.
      loss_arc = blockwise.arc_loss_sharded(
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
  """mse(x_hat, x) / var(x_train) + L_vq + gamma(t) L_arc (docs/math.md, eq. 21).

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

  MSE is on [0, 1] images; PSNR, SSIM and (with lpips_params) LPIPS follow docs/math.md, eq. 36-38.
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
  init_fn = functools.partial(
    state_lib.init_train_state, model=model, tx=tx, image_shape=image_shape
  )
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
