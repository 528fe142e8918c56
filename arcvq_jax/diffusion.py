"""Denoising diffusion as pure functions: LDM's beta schedule, q(x_t | x_0), the eps loss,
class-label dropout, classifier-free guidance and the DDIM sampler (docs/math.md, eq. 28-33).

Notation as in DDPM / DDIM: `alphas_cumprod[t]` is abar_t = prod_{s <= t} (1 - beta_s) for
t = 0 .. T-1; x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps. The network predicts eps.

An `eps_fn(x, t, labels) -> eps` is any function of x (B, h, w, D) float32, t (B,) int32 and
labels (B,) int32 (or None for an unconditional model); the trainer and the sampler pass
`functools.partial(model.apply, {'params': params})`-style closures. Nothing here knows Flax.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

EpsFn = Callable[[jax.Array, jax.Array, jax.Array | None], jax.Array]
BETA_SCHEDULES = ("linear", "sqrt_linear")


class Schedule(NamedTuple):
  """The noise schedule, float64 numpy (T,) arrays; cast to float32 where used."""

  betas: np.ndarray
  alphas_cumprod: np.ndarray

  @property
  def num_timesteps(self) -> int:
    return int(self.betas.shape[0])


def make_schedule(
  kind: str = "linear",
  num_timesteps: int = 1000,
  linear_start: float = 0.0015,
  linear_end: float = 0.0195,
) -> Schedule:
  """LDM's `make_beta_schedule` (ldm/modules/diffusionmodules/util.py).

  'linear' (LDM's name, Table 8's "linear"): beta_t = linspace(sqrt(start), sqrt(end), T)[t]^2,
  i.e. linear in sqrt(beta). 'sqrt_linear': beta_t = linspace(start, end, T)[t] (DDPM's).
  """
  if kind == "linear":
    betas = np.linspace(linear_start**0.5, linear_end**0.5, num_timesteps, dtype=np.float64) ** 2
  elif kind == "sqrt_linear":
    betas = np.linspace(linear_start, linear_end, num_timesteps, dtype=np.float64)
  else:
    raise ValueError(f"beta schedule {kind!r} is not one of {BETA_SCHEDULES}")
  if not (np.all(betas > 0) and np.all(betas < 1)):
    raise ValueError(f"betas must lie in (0, 1), got [{betas.min()}, {betas.max()}]")
  return Schedule(betas=betas, alphas_cumprod=np.cumprod(1.0 - betas))


def _expand(a: jax.Array, x: jax.Array) -> jax.Array:
  """(B,) -> (B, 1, ..., 1) broadcastable against x."""
  return a.reshape(a.shape + (1,) * (x.ndim - a.ndim))


def q_sample(schedule: Schedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
  """x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise. x0, noise: (B, ...); t: (B,) int."""
  abar = jnp.asarray(schedule.alphas_cumprod, x0.dtype)[t]
  return _expand(jnp.sqrt(abar), x0) * x0 + _expand(jnp.sqrt(1.0 - abar), x0) * noise


def drop_labels(key: jax.Array, labels: jax.Array, prob: float, null_class: int) -> jax.Array:
  """Classifier-free guidance training: each label becomes `null_class` with probability prob."""
  if prob <= 0:
    return labels
  drop = jax.random.bernoulli(key, prob, labels.shape)
  return jnp.where(drop, jnp.asarray(null_class, labels.dtype), labels)


def eps_loss(
  key: jax.Array,
  eps_fn: EpsFn,
  x0: jax.Array,
  labels: jax.Array | None,
  schedule: Schedule,
  cond_drop_prob: float = 0.0,
  null_class: int = 0,
) -> tuple[jax.Array, dict[str, jax.Array]]:
  """LDM's loss_simple: mean over everything of (eps - eps_theta(x_t, t, y))^2, float32.

  key: drawn into t ~ U{0..T-1} (B,), eps ~ N(0, I) like x0, and the label dropout.
  x0: (B, h, w, D) float32 (already scaled latents). Returns (loss, aux) with aux the per-
  example loss (B,) and t (B,) for diagnostics.
  """
  k_t, k_noise, k_drop = jax.random.split(key, 3)
  b = x0.shape[0]
  t = jax.random.randint(k_t, (b,), 0, schedule.num_timesteps, dtype=jnp.int32)
  noise = jax.random.normal(k_noise, x0.shape, jnp.float32)
  x_t = q_sample(schedule, x0, t, noise)
  if labels is not None:
    labels = drop_labels(k_drop, labels, cond_drop_prob, null_class)
  eps = eps_fn(x_t, t, labels).astype(jnp.float32)
  per_example = jnp.mean((eps - noise) ** 2, axis=tuple(range(1, x0.ndim)))
  return jnp.mean(per_example), dict(per_example=per_example, t=t)


def guided_eps(
  eps_fn: EpsFn, x: jax.Array, t: jax.Array, labels: jax.Array | None, scale: float, null_class: int
) -> jax.Array:
  """Classifier-free guidance: eps_u + scale (eps_c - eps_u), LDM's DDIMSampler order.

  Both predictions come from one call on the doubled batch [x; x] with labels
  [null; labels]. scale == 1 (or an unconditional model, labels None) is the conditional
  prediction alone, one call on the batch.
  """
  if labels is None or scale == 1.0:
    return eps_fn(x, t, labels)
  null = jnp.full_like(labels, null_class)
  both = eps_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), jnp.concatenate([null, labels]))
  eps_u, eps_c = jnp.split(both, 2)
  return eps_u + scale * (eps_c - eps_u)


def ddim_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
  """The DDIM sub-sequence, ascending: LDM's 'uniform' discretisation, t_i = i * (T // S) + 1.

  (LDM adds 1 "to get the final alpha values right"; its `range(0, T, T // S)` would give
  more than S steps when S does not divide T, this gives exactly S.)
  """
  if not 1 <= num_steps <= num_timesteps:
    raise ValueError(f"DDIM steps must be in [1, {num_timesteps}], got {num_steps}")
  c = num_timesteps // num_steps
  steps = np.arange(num_steps) * c + 1
  return np.minimum(steps, num_timesteps - 1).astype(np.int32)


def ddim_coefficients(
  schedule: Schedule, num_steps: int, eta: float = 0.0, final_alpha_one: bool = True
) -> dict[str, np.ndarray]:
  """Per-step arrays, ascending in t, float64 numpy (S,):

  t: the timesteps; a: abar_t; a_prev: abar of the next-smaller DDIM step (for the first,
  smallest step: 1 with final_alpha_one, else abar_0 as LDM's sampler); sigma: the DDIM
  noise scale eta * sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev)) (DDIM Eq. 16).
  """
  t = ddim_timesteps(schedule.num_timesteps, num_steps)
  ac = schedule.alphas_cumprod
  a = ac[t]
  first = 1.0 if final_alpha_one else ac[0]
  a_prev = np.concatenate([[first], ac[t[:-1]]])
  sigma = eta * np.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
  return dict(t=t, a=a, a_prev=a_prev, sigma=sigma)


def ddim_step(
  x: jax.Array,
  eps: jax.Array,
  a: jax.Array,
  a_prev: jax.Array,
  sigma: jax.Array,
  noise: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
  """One DDIM update (DDIM Eq. 12): returns (x_prev, pred_x0).

  pred_x0 = (x - sqrt(1 - a) eps) / sqrt(a);
  x_prev = sqrt(a_prev) pred_x0 + sqrt(1 - a_prev - sigma^2) eps + sigma noise.
  a, a_prev, sigma: scalars; noise is needed only when sigma > 0.
  """
  pred_x0 = (x - jnp.sqrt(1.0 - a) * eps) / jnp.sqrt(a)
  dir_xt = jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
  x_prev = jnp.sqrt(a_prev) * pred_x0 + dir_xt
  if noise is not None:
    x_prev = x_prev + sigma * noise
  return x_prev, pred_x0


def ddim_sample(
  eps_fn: EpsFn,
  x_T: jax.Array,
  labels: jax.Array | None,
  schedule: Schedule,
  *,
  num_steps: int = 250,
  guidance_scale: float = 1.0,
  null_class: int = 0,
  eta: float = 0.0,
  final_alpha_one: bool = True,
  key: jax.Array | None = None,
) -> jax.Array:
  """DDIM from x_T (B, h, w, D) down to x_0, as one `lax.scan` over the S steps.

  labels: (B,) int32 classes (None: unconditional). guidance_scale, null_class: see
  `guided_eps`. eta 0 is deterministic; eta > 0 needs `key`. final_alpha_one: the last
  step goes to abar = 1 and returns the model's x0 prediction (LDM's sampler stops at
  abar_0 = 1 - beta_0 and keeps sqrt(beta_0) of the predicted noise). Jit the caller; the
  schedule, step count, scale and eta are static.
  """
  if eta > 0 and key is None:
    raise ValueError("DDIM with eta > 0 draws noise: pass a PRNG key")
  coef = ddim_coefficients(schedule, num_steps, eta, final_alpha_one)
  # x_T's float dtype throughout (float32 in use; the tests run float64 to check exactness).
  dtype = x_T.dtype if jnp.issubdtype(x_T.dtype, jnp.floating) else jnp.float32
  # Descending: the scan runs from t = T-ish down to t = 1.
  xs = {k: jnp.asarray(v[::-1], jnp.int32 if k == "t" else dtype) for k, v in coef.items()}
  xs["index"] = jnp.arange(num_steps)
  b = x_T.shape[0]

  def body(x, step):
    t = jnp.full((b,), step["t"], jnp.int32)
    eps = guided_eps(eps_fn, x, t, labels, guidance_scale, null_class).astype(dtype)
    noise = None
    if eta > 0:
      noise = jax.random.normal(jax.random.fold_in(key, step["index"]), x.shape, dtype)
    x_prev, _ = ddim_step(x, eps, step["a"], step["a_prev"], step["sigma"], noise)
    return x_prev, None

  x0, _ = jax.lax.scan(body, x_T.astype(dtype), xs)
  return x0
