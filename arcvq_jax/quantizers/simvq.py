"""`simvq`: SimVQ (Zhu et al. 2024, "Addressing Representation Collapse in Vector Quantized
Models with One Linear Layer"; docs/math.md, section 8.4, eq. 44-46).

A frozen random codebook C (K, D), drawn once from N(0, 1/D) (vector-quantize-pytorch's
`torch.randn(K, D) * D**-0.5`, the official code's `normal_(std=D**-0.5)`), seen through one
learned linear map W (D, D) without bias: the codes are the rows of the implicit codebook
C W. Every step's gradient reaches all of W, so every code moves, used or not: the point of
the method (no dead codes without restarts). Nearest neighbour against C W (Euclidean by
default, `quantizer.distance`), the VQ loss of eq. 7 (codebook term, which trains W, and the
commitment term weighted by `quantizer.beta`; `quantizer.legacy_beta` swaps the weights),
and the gradient path of `quantizer.gradient`: 'ste' (the paper's, the default here) or
'rotation' (the rotation trick, vector-quantize-pytorch's default).

Parameters in the model's tree: 'codebook' (C, frozen: `frozen_params`, so the optimizer
leaves it; it is also under stop-gradient here) and 'codebook_transform' (W, stored as
(in, out) so that C W is `codebook @ codebook_transform`; a torch `nn.Linear.weight` is W^T).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from arcvq_jax import quantization as vqm
from arcvq_jax.quantizers.base import Params, Quantized, Quantizer, config_error
from arcvq_jax.quantizers.vq import GRADIENT_PATHS, nearest_code, rotate_to

sg = jax.lax.stop_gradient


def init_frozen_codebook(key: jax.Array, num_codes: int, dim: int) -> jax.Array:
  """C (K, D) float32 ~ N(0, 1/D) (docs/math.md, eq. 44)."""
  return jax.random.normal(key, (num_codes, dim), jnp.float32) * dim**-0.5


def init_transform(key: jax.Array, dim: int) -> jax.Array:
  """W (D, D) float32 ~ U(-1/sqrt(D), 1/sqrt(D)): torch's default `nn.Linear(D, D)` init
  (kaiming_uniform with a = sqrt(5)), as the library and the official code start from."""
  bound = dim**-0.5
  return jax.random.uniform(key, (dim, dim), jnp.float32, -bound, bound)


def implicit_codebook(codebook: jax.Array, transform: jax.Array) -> jax.Array:
  """C (K, D), W (D, D) -> C W (K, D) float32 (eq. 44). C under stop-gradient (frozen)."""
  return sg(codebook.astype(jnp.float32)) @ transform.astype(jnp.float32)


def decoder_input(z: jax.Array, z_q: jax.Array, path: str) -> jax.Array:
  """What the decoder sees (eq. 45): z_q in value; the encoder's gradient unchanged ('ste',
  eq. 6) or rotated ('rotation', eq. 6b); none to z_q (W learns from eq. 46 alone).

  The straight-through form is sg(z_q) + (z - sg(z)), z_q bit for bit (z - z = 0), so that
  `lookup` of the tokens decodes exactly what training decoded; z + sg(z_q - z) (eq. 6 as
  written, the library's) rounds z_q in its last bits. Same gradient."""
  if path == "rotation":
    return rotate_to(z, z_q)
  return sg(z_q) + (z - sg(z))


@dataclasses.dataclass(frozen=True)
class SimVQ(Quantizer):
  """A frozen random codebook through one learned linear map (eq. 44-46)."""

  num_codes: int
  embed_dim: int
  distance: str = "euclidean"
  beta: float = 0.25
  legacy_beta: bool = False
  gradient: str = "ste"  # or 'rotation'
  search_impl: str = "auto"
  codebook_axis: str | None = None

  name = "simvq"
  has_codebook = True

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> SimVQ:
    q = config.quantizer
    if config.get("arc") is not None and config.arc.get("enabled", False):
      raise config_error(
        "arc.enabled",
        "the 'simvq' quantizer has no ArcLoss",
        "Set --config.arc.enabled=False (the simvq variant does).",
      )
    if q.get("bbnr", "off") != "off":
      raise config_error(
        "quantizer.bbnr",
        f"is {q.bbnr!r}, but the 'simvq' quantizer has no norm ball",
        "Set --config.quantizer.bbnr=off (the simvq variant does).",
      )
    if q.get("codebook_update", "loss") != "loss":
      raise config_error(
        "quantizer.codebook_update",
        f"is {q.codebook_update!r}, but SimVQ's codebook C is frozen and W learns by the loss",
        "Set --config.quantizer.codebook_update=loss.",
      )
    if q.get("restart_threshold", 0.0) > 0:
      raise config_error(
        "quantizer.restart_threshold",
        f"is {q.restart_threshold}, but SimVQ's codes all move with W and are never restarted",
        "Set --config.quantizer.restart_threshold=0.",
      )
    d = {f.name: f.default for f in dataclasses.fields(cls)}
    out = dict(
      num_codes=q.get("num_codes"),
      embed_dim=q.get("embed_dim"),
      distance=q.get("distance", d["distance"]),
      beta=float(q.get("beta", d["beta"])),
      legacy_beta=bool(q.get("legacy_beta", d["legacy_beta"])),
      gradient=q.get("gradient", d["gradient"]),
      search_impl=q.get("search_impl", d["search_impl"]),
      codebook_axis=q.get("codebook_axis") or None,
    )
    for key in ("num_codes", "embed_dim"):
      if not isinstance(out[key], int) or isinstance(out[key], bool) or out[key] < 1:
        raise config_error(
          f"quantizer.{key}", f"must be an integer >= 1, got {out[key]!r}", "Set it."
        )
    for key, choices in (("distance", vqm.DISTANCES), ("gradient", GRADIENT_PATHS)):
      if out[key] not in choices:
        raise config_error(
          f"quantizer.{key}", f"{out[key]!r} is not supported", f"Use one of {list(choices)}."
        )
    return cls(**out)

  @property
  def vocab_size(self) -> int:
    return self.num_codes

  @property
  def dim(self) -> int:
    return self.embed_dim

  def param_inits(self) -> dict[str, Callable[[jax.Array], jax.Array]]:
    return {
      "codebook": lambda key: init_frozen_codebook(key, self.num_codes, self.embed_dim),
      "codebook_transform": lambda key: init_transform(key, self.embed_dim),
    }

  def frozen_params(self) -> tuple[str, ...]:
    return ("codebook",)

  def implicit(self, params: Params) -> jax.Array:
    return implicit_codebook(params["codebook"], params["codebook_transform"])

  def search(self, codes: jax.Array, z: jax.Array, mesh: Any) -> jax.Array:
    return nearest_code(
      z,
      codes,
      self.distance,
      search_impl=self.search_impl,
      codebook_axis=self.codebook_axis,
      mesh=mesh,
    )

  def quantize(
    self, params: Params, z: jax.Array, step: jax.Array, *, mesh: Any = None
  ) -> Quantized:
    """z: (N, D) float32 -> the decoder's input and indices (eq. 45), loss (eq. 46).
    W's gradient comes from the codebook term only (the decoder's path passes none to it)."""
    del step
    codes = self.implicit(params)
    indices = self.search(codes, z, mesh)
    z_q = jnp.take(codes, indices, axis=0)
    loss = vqm.vq_loss(z, z_q, self.beta, legacy=self.legacy_beta)
    return Quantized(
      z_ste=decoder_input(z, z_q, self.gradient),
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
    del z, indices, key
    norms = jnp.linalg.norm(self.implicit(params), axis=-1)
    return (
      params,
      stats,
      usage,
      dict(codebook_norm_mean=jnp.mean(norms), codebook_norm_max=jnp.max(norms)),
    )

  def tokens(self, params: Params, z: jax.Array, *, mesh: Any = None) -> jax.Array:
    return self.search(self.implicit(params), z, mesh)

  def lookup(self, params: Params, indices: jax.Array) -> jax.Array:
    """Rows of C W, computed as `quantize` computes them: with gradient 'ste', exactly its
    z_ste; with 'rotation', z_ste up to the rotation's rounding."""
    return jnp.take(self.implicit(params), indices, axis=0)

  def codebook(self, params: Params) -> jax.Array:
    """The implicit codebook C W (K, D): the rows the tokens index."""
    return self.implicit(params)
