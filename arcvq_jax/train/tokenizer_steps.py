"""The VQ-VAE tokenizer's step functions: loss, train step, evaluation step (docs/math.md).

Pure pieces a stage composes around the model's quantizer (arcvq_jax/quantizers: its work
before the step, inside the gradient and after the optimizer), the usage EMA, the jitted
train step and the evaluation step. No loop, data pipeline or metric writer is imported
here: the tokenizer API, evaluation, the converters and the priors use these without them.
The VQGAN's steps (train/gan_steps.py) build on the same pieces; the loop that calls either
is train/loop.py.
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

from arcvq_jax import quantization as vqm
from arcvq_jax import sharding
from arcvq_jax.evaluation import metrics
from arcvq_jax.losses import lpips as lpips_lib
from arcvq_jax.models import layers
from arcvq_jax.quantizers.base import Quantized, Quantizer
from arcvq_jax.train import state as state_lib
from arcvq_jax.train.state import TrainState

Batch = dict[str, jax.Array]


def encode_and_quantize(
  params: Any,
  x: jax.Array,
  step: jax.Array,
  *,
  model: nn.Module,
  mesh: Any = None,
) -> tuple[jax.Array, jax.Array, Quantized]:
  """x (B, H, W, C) -> (z (B, h, w, D), z_flat (N, D) float32, the quantizer's output).

  `model` is a VQVAE or a VQGAN (both have `encode` / `decode`) around its quantizer. The
  quantizer runs in float32 whatever dtype the network computes in. mesh: the step's device
  Mesh, so that searches split over it, or None.
  """
  z = model.apply({"params": params}, x, method="encode")
  z_flat = z.reshape(-1, z.shape[-1]).astype(jnp.float32)
  return z, z_flat, model.quantizer.quantize(params, z_flat, step, mesh=mesh)


def tokenizer_loss(
  params: Any,
  x: jax.Array,
  step: jax.Array,
  *,
  model: nn.Module,
  data_variance: float,
  mesh: Any = None,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """mse(x_hat, x) / var(x_train) + the quantizer's loss (docs/math.md, eq. 21).

  x: (B, H, W, C) float32 in [-1, 1]; mesh: the step's Mesh or None. Returns the scalar
  loss and aux values: the terms, the tokens (N,) and the latents z (N, D) for the
  quantizer's updates outside the gradient.
  """
  z, z_flat, quant = encode_and_quantize(params, x, step, model=model, mesh=mesh)
  x_hat = model.apply(
    {"params": params}, quant.z_ste.reshape(z.shape).astype(z.dtype), method="decode"
  )
  loss_rec = jnp.mean((x_hat.astype(jnp.float32) - x) ** 2) / data_variance
  loss = loss_rec + quant.loss
  aux = dict(loss=loss, loss_rec=loss_rec, **quant.terms, indices=quant.indices, z=z_flat)
  return loss, aux


def apply_tokenizer_update(
  state: TrainState,
  params: Any,
  grads: Any,
  aux: dict[str, jax.Array],
  before: dict[str, jax.Array],
  *,
  tx: optax.GradientTransformation,
  quantizer: Quantizer,
  usage_decay: float,
) -> tuple[TrainState, dict[str, jax.Array]]:
  """The optimizer update, the usage EMA, then the quantizer's own updates (EMA k-means,
  dead-code restart).

  params: the params the gradients were taken at (after `quantizer.before_step`); aux: the
  loss terms plus 'indices' (N,) and 'z' (N, D) of the global batch; before: the metrics of
  `before_step`. Returns the next state and the step's metrics.
  """
  rng, key = jax.random.split(state.rng)
  updates, opt_state = tx.update(grads, state.opt_state, params)
  params = optax.apply_updates(params, updates)
  counts = vqm.code_histogram(aux["indices"], quantizer.vocab_size)
  usage = usage_decay * state.usage + (1.0 - usage_decay) * counts
  params, stats, usage, after = quantizer.after_step(
    params, state.ema, usage, aux["z"], aux["indices"], key
  )
  out = {k: v for k, v in aux.items() if k not in ("indices", "z")}
  out.update(
    before,
    **after,
    batch_usage=metrics.codebook_usage(counts),
    batch_perplexity=metrics.perplexity(counts),
    grad_norm=optax.tree.norm(grads),
  )
  new_state = state.replace(
    step=state.step + 1, params=params, opt_state=opt_state, ema=stats, usage=usage, rng=rng
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
  params, before = model.quantizer.before_step(state.params, state.step)
  grad_fn = jax.value_and_grad(
    functools.partial(
      tokenizer_loss,
      model=model,
      data_variance=data_variance,
      mesh=None if replicated is None else replicated.mesh,
    ),
    has_aux=True,
  )
  (_, aux), grads = grad_fn(sharding.gather_params(params, replicated), batch["image"], state.step)
  return apply_tokenizer_update(
    state,
    params,
    grads,
    aux,
    before,
    tx=tx,
    quantizer=model.quantizer,
    usage_decay=config.quantizer.usage_decay,
  )


def reconstruct(params: Any, x: jax.Array, *, model: nn.Module) -> tuple[jax.Array, jax.Array]:
  """Encode, quantise, decode: x (B, H, W, C) -> (x_hat (B, H, W, C), tokens (B, h, w)).

  The decoder takes the vectors of the tokens (`Quantizer.lookup`), as the tokenizer API's
  decode does, so both give the same images."""
  z = model.apply({"params": params}, x, method="encode")
  tokens = model.quantizer.tokens(params, z.reshape(-1, z.shape[-1]).astype(jnp.float32))
  z_q = model.quantizer.lookup(params, tokens).reshape(z.shape).astype(z.dtype)
  x_hat = model.apply({"params": params}, z_q, method="decode")
  return x_hat.astype(jnp.float32), tokens.reshape(z.shape[:-1])


def eval_step(
  params: Any,
  batch: Batch,
  lpips_params: Any = None,
  *,
  model: nn.Module,
  with_reconstructions: bool = False,
) -> dict[str, jax.Array]:
  """Sums over the real (mask == 1) images of a batch; the caller adds them up.

  MSE is on [0, 1] images; PSNR, SSIM and (with lpips_params) LPIPS follow docs/math.md, eq. 36-38.
  with_reconstructions: also return the batch's x_hat (B, H, W, C) as 'reconstructions'.
  """
  x, mask = batch["image"], batch["mask"].astype(jnp.float32)
  x_hat, indices = reconstruct(params, x, model=model)
  x01, y01 = metrics.to_unit_range(x), metrics.to_unit_range(x_hat)
  mse = jnp.mean((x01 - y01) ** 2, axis=(1, 2, 3))
  out = dict(
    count=jnp.sum(mask),
    mse=jnp.sum(mask * mse),
    psnr=jnp.sum(mask * metrics.psnr(x01, y01)),
    ssim=jnp.sum(mask * metrics.ssim(x01, y01)),
    code_counts=metrics.code_counts(indices, model.quantizer.vocab_size, mask),
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


def compiler_options(model: nn.Module) -> dict[str, str] | None:
  """XLA options for compiling the model's steps: those its convolutions were chosen for
  (a VQ-VAE with `conv_library='eigen'` on the CPU), else None."""
  return layers.compiler_options(getattr(model, "conv_library", None))


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
  state, state_sharding = sharding.fresh_state(init_fn, config.seed, mesh, config.sharding)
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
    compiler_options=compiler_options(model),
  )
  return state, state_sharding, step_fn
