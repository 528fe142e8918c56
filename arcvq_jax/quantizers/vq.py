"""`vq`: the VQ-VAE / taming-transformers quantizer (docs/math.md, eq. 5-7, 13-16).

Nearest-code search (Euclidean by default; cosine for the paper's ablations), the VQ loss
with beta on the commitment term or on the codebook term (taming's "legacy"), a codebook
learned by that loss or by EMA k-means, optional dead-code restart, and a choice of
gradient path: the straight-through estimator or the rotation trick (Fifty et al., ICLR
2025: the encoder's gradient rotated with the latent onto its code, eq. 6b). ArcVQ
(quantizers/arcvq.py) is this quantizer plus BBNR and ArcLoss.

The search is the plain one for small problems and the blocked one (blockwise.py) for
large K x N; on a mesh of several devices it runs per device with explicit collectives,
splitting the codebook along `codebook_axis` where that names a mesh axis.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from arcvq_jax import blockwise, sharding
from arcvq_jax import quantization as vqm
from arcvq_jax.quantizers.base import Params, Quantized, Quantizer, config_error

sg = jax.lax.stop_gradient
GRADIENT_PATHS = ("ste", "rotation")


def use_blocked(impl: str, num_codes: int, num_tokens: int) -> bool:
  """Whether to take the blocked ArcLoss / search: by config, or by size for 'auto'.

  Blocked is faster than naive on CPU once K x N exceeds one block (bench/bench_arcloss.py)
  and is the only option where the K x N matrix does not fit; below that the naive form
  (one small matrix) is kept. 'streamed' is the blocked form's name in configs before 0.2.
  """
  if impl == "auto":
    return num_codes * num_tokens > blockwise.BLOCK_ELEMENTS
  return impl in ("blocked", "streamed")


def mesh_or_context(mesh: Any) -> Any:
  """`mesh`, else the one a surrounding `jax.set_mesh` set, else None."""
  if mesh is not None:
    return mesh
  context = jax.sharding.get_abstract_mesh()
  return None if context.empty else context


def nearest_code(
  z: jax.Array,
  codebook: jax.Array,
  distance: str,
  *,
  search_impl: str = "auto",
  codebook_axis: str | None = None,
  mesh: Any = None,
) -> jax.Array:
  """quantization.nearest_code, computed in blocks when `search_impl` says so.

  z: (N, D) float32, the global batch; codebook: (K, D) -> (N,) int32. mesh: the step's
  device Mesh (default: the one `jax.set_mesh` set, if any). On a mesh of several devices a
  blocked search, or any search with `codebook_axis` set, runs per device with explicit
  collectives (blockwise.nearest_code_sharded): each device searches its own tokens, and its
  slice of the codebook along codebook_axis where that names a mesh axis. Without a mesh,
  jit partitions the plain search by the inputs' shardings. The indices are the same.
  """
  mesh = mesh_or_context(mesh)
  blocked = use_blocked(search_impl, codebook.shape[0], z.shape[0])
  if mesh is not None and mesh.size > 1 and (blocked or codebook_axis is not None):
    batch_axes = sharding.batch_sharding(mesh).spec[0]
    names = (batch_axes,) if isinstance(batch_axes, str) else tuple(batch_axes)
    if z.shape[0] % int(np.prod([mesh.shape[a] for a in names])) == 0:
      return blockwise.nearest_code_sharded(
        z, codebook, distance, mesh=mesh, batch_axes=batch_axes, codebook_axis=codebook_axis
      )
  if blocked:
    return blockwise.nearest_code_blocked(z, codebook, distance)
  return vqm.nearest_code(z, codebook, distance)


def rotate_to(z: jax.Array, z_q: jax.Array) -> jax.Array:
  """The rotation trick (Fifty et al. 2025, eq. 6b in docs/math.md): z_q in value; the
  gradient w.r.t. z is the incoming one rotated and scaled as z -> z_q (no gradient to z_q).

  z, z_q: (N, D) float32. Householder form: with u = z/|z|, q = z_q/|z_q| and
  w = (u + q)/|u + q|, R z = z - 2 (z.w) w + 2 (z.u) q, and the result is R z |z_q|/|z|.

  Every norm is guarded as v / max(|v|, 1e-6), vector-quantize-pytorch's form, which gives
  z_q to float rounding; the rotation trick's authors' code divides by |v| + 1e-6, which puts
  its value up to about 5e-6/|z| (relative) off z_q (5e-5 at |z| = |z_q| = 0.1; docs/math.md,
  section 4, after eq. 6b).
  """
  eps = 1e-6  # as vector-quantize-pytorch's safe_div and l2norm
  unit = lambda v: v / jnp.maximum(jnp.linalg.norm(v, axis=-1, keepdims=True), eps)
  norm_z = jnp.linalg.norm(z, axis=-1, keepdims=True)
  norm_q = jnp.linalg.norm(z_q, axis=-1, keepdims=True)
  u, q = sg(unit(z)), sg(unit(z_q))
  w = sg(unit(u + q))
  dot = lambda a, b: jnp.sum(a * b, axis=-1, keepdims=True)
  rotated = z - 2.0 * dot(z, w) * w + 2.0 * dot(z, u) * q
  return rotated * sg(norm_q / jnp.maximum(norm_z, eps))


def straight_through(z: jax.Array, z_q: jax.Array, path: str) -> jax.Array:
  """What the decoder sees: z_q in value, the encoder's gradient by `path` ('ste': identity,
  eq. 6; 'rotation': the rotation trick, eq. 6b)."""
  if path == "rotation":
    return rotate_to(z, z_q)
  return z + sg(z_q - z)


@dataclasses.dataclass(frozen=True)
class VQ(Quantizer):
  """A learned codebook (K, D) searched by nearest neighbour."""

  num_codes: int
  embed_dim: int
  distance: str = "euclidean"
  init: str = "uniform"
  beta: float = 0.25
  legacy_beta: bool = False
  codebook_update: str = "loss"  # or 'ema'
  ema_decay: float = 0.99
  ema_eps: float = 1e-5
  restart_threshold: float = 0.0
  gradient: str = "ste"  # or 'rotation'
  search_impl: str = "auto"
  codebook_axis: str | None = None

  name = "vq"
  has_codebook = True

  @classmethod
  def settings(cls, config: ml_collections.ConfigDict) -> dict[str, Any]:
    """VQ's fields from config.quantizer (validated); a key the config lacks (one written
    before the key existed) takes the field's default."""
    q = config.quantizer
    vq_fields = {f.name for f in dataclasses.fields(VQ)}
    out = {  # the defaults of `cls` (ArcVQ matches by cosine by default)
      f.name: q.get(f.name, f.default)
      for f in dataclasses.fields(cls)
      if f.name in vq_fields and (f.default is not dataclasses.MISSING or f.name in q)
    }
    out["codebook_axis"] = out.get("codebook_axis") or None
    _check_choice(out, "distance", vqm.DISTANCES)
    _check_choice(out, "init", vqm.INITS)
    _check_choice(out, "codebook_update", ("loss", "ema"))
    _check_choice(out, "gradient", GRADIENT_PATHS)
    for key in ("num_codes", "embed_dim"):
      if not isinstance(out.get(key), int) or out[key] < 1:
        raise config_error(
          f"quantizer.{key}", f"must be an integer >= 1, got {out.get(key)!r}", "Set it."
        )
    return out

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> VQ:
    if config.get("arc") is not None and config.arc.get("enabled", False):
      raise config_error(
        "arc.enabled",
        "the 'vq' quantizer has no ArcLoss",
        "Set --config.quantizer.name=arcvq for ArcLoss, or --config.arc.enabled=False.",
      )
    if config.quantizer.get("bbnr", "off") != "off":
      raise config_error(
        "quantizer.bbnr",
        f"is {config.quantizer.bbnr!r}, but the 'vq' quantizer has no norm ball",
        "Set --config.quantizer.name=arcvq for BBNR, or --config.quantizer.bbnr=off.",
      )
    return cls(**cls.settings(config))

  @property
  def vocab_size(self) -> int:
    return self.num_codes

  @property
  def dim(self) -> int:
    return self.embed_dim

  def param_inits(self) -> dict[str, Callable[[jax.Array], jax.Array]]:
    return {
      "codebook": functools.partial(
        vqm.init_codebook, num_codes=self.num_codes, dim=self.embed_dim, kind=self.init
      )
    }

  def frozen_params(self) -> tuple[str, ...]:
    # An EMA codebook is not a gradient-trained parameter: its slot gets no update.
    return ("codebook",) if self.codebook_update == "ema" else ()

  def init_stats(self, params: Params) -> vqm.EMAState:
    codebook = params["codebook"]
    # Counts of one and sums equal to the rows make the EMA codebook start at the initial
    # codebook (and keep the Laplace-smoothed division finite).
    return vqm.EMAState(
      cluster_size=jnp.ones((codebook.shape[0],), jnp.float32), embed_sum=codebook
    )

  def search(self, codebook: jax.Array, z: jax.Array, mesh: Any) -> jax.Array:
    return nearest_code(
      z,
      codebook,
      self.distance,
      search_impl=self.search_impl,
      codebook_axis=self.codebook_axis,
      mesh=mesh,
    )

  def quantize(
    self, params: Params, z: jax.Array, step: jax.Array, *, mesh: Any = None
  ) -> Quantized:
    del step
    codebook = params["codebook"].astype(jnp.float32)
    return self.quantized_at(codebook, z, self.search(codebook, z, mesh))

  def quantized_at(self, codebook: jax.Array, z: jax.Array, indices: jax.Array) -> Quantized:
    """The quantizer's output for latents z (N, D) whose nearest codes are `indices` (N,):
    `quantize` after its search (a subclass that finds the indices another way calls it)."""
    z_q = jnp.take(codebook, indices, axis=0)
    loss = vqm.vq_loss(
      z,
      z_q,
      self.beta,
      legacy=self.legacy_beta,
      codebook_term=self.codebook_update == "loss",
    )
    return Quantized(
      z_ste=straight_through(z, z_q, self.gradient),
      indices=indices,
      loss=loss,
      terms=dict(loss_vq=loss),
    )

  def after_step(
    self,
    params: Params,
    stats: Any,
    usage: jax.Array,
    z: jax.Array,
    indices: jax.Array,
    key: jax.Array,
  ) -> tuple[Params, Any, jax.Array, dict[str, jax.Array]]:
    params = dict(params)
    if self.codebook_update == "ema":
      stats, params["codebook"] = vqm.ema_codebook_update(
        stats, z, indices, self.ema_decay, self.ema_eps
      )
    restarted = jnp.zeros((), jnp.int32)
    if self.restart_threshold > 0:
      params["codebook"], usage, dead = vqm.restart_dead_codes(
        key, params["codebook"], usage, z, self.restart_threshold
      )
      restarted = jnp.sum(dead).astype(jnp.int32)
      if self.codebook_update == "ema":
        # The EMA statistics of a re-seeded row restart too (at the mean count), else the
        # next EMA update (eq. 13-14) pulls the row back to where it was.
        count = jnp.mean(stats.cluster_size)
        stats = vqm.EMAState(
          cluster_size=jnp.where(dead, count, stats.cluster_size),
          embed_sum=jnp.where(dead[:, None], params["codebook"] * count, stats.embed_sum),
        )
    norms = jnp.linalg.norm(params["codebook"], axis=-1)
    out = dict(
      codebook_norm_mean=jnp.mean(norms),
      codebook_norm_max=jnp.max(norms),
      codes_restarted=restarted,
    )
    return params, stats, usage, out

  def tokens(self, params: Params, z: jax.Array, *, mesh: Any = None) -> jax.Array:
    return self.search(params["codebook"].astype(jnp.float32), z, mesh)

  def lookup(self, params: Params, indices: jax.Array) -> jax.Array:
    return jnp.take(params["codebook"].astype(jnp.float32), indices, axis=0)

  def codebook(self, params: Params) -> jax.Array:
    return params["codebook"]


def _check_choice(q: dict[str, Any], key: str, choices: tuple[str, ...]) -> None:
  value = q[key]
  if value not in choices:
    raise config_error(
      f"quantizer.{key}", f"{value!r} is not supported", f"Use one of {list(choices)}."
    )
