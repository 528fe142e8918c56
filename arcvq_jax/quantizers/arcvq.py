"""`arcvq`: the paper's quantizer (docs/math.md, sections 2-7).

The `vq` quantizer with cosine matching and a spherical init by default, plus the two
parts of the paper: the codebook projected into a ball of radius M(t) = exp(alpha t) before
every step (BBNR, eq. 3-4; 'fixed': M = 1, 'off'), and ArcLoss, the angular-margin loss
between each codebook row and its nearest latents of the global batch, weighted by
gamma(t) = gamma0 exp(-lambda t) (eq. 8-12). ArcLoss takes the plain K x N form for small
problems and the blocked one (blockwise.py) for large ones; on a mesh of several devices
the codebook rows are split over the devices and the tokens gathered.

The paper's ablations are settings of this quantizer (config.VARIANTS): 'cosine' (no BBNR,
no ArcLoss, normal init), 'bbnr' (no ArcLoss), 'bbnr_arc_fixed' (M = 1).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from arcvq_jax import blockwise, sharding
from arcvq_jax import quantization as vqm
from arcvq_jax.quantizers.base import Params, Quantized, config_error
from arcvq_jax.quantizers.vq import VQ, mesh_or_context, use_blocked


@dataclasses.dataclass(frozen=True)
class ArcVQ(VQ):
  """VQ + BBNR + ArcLoss. Defaults are the paper's (Table 7, MNIST / CIFAR-10)."""

  distance: str = "cosine"
  init: str = "spherical"
  bbnr: str = "growing"
  bbnr_alpha: float = 3e-4
  arc: bool = True
  arc_s: float = 10.0
  arc_m: float = 0.1
  arc_top_k: int = 3
  arc_gamma0: float = 1.0
  arc_decay: float = 5e-4
  arc_impl: str = "auto"

  name = "arcvq"

  @classmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> ArcVQ:
    q = config.quantizer
    a = config.get("arc") or ml_collections.ConfigDict()
    d = {f.name: f.default for f in dataclasses.fields(cls)}
    bbnr = q.get("bbnr", d["bbnr"])
    if bbnr not in vqm.BBNR_MODES:
      raise config_error(
        "quantizer.bbnr", f"{bbnr!r} is not supported", f"Use one of {list(vqm.BBNR_MODES)}."
      )
    return cls(
      **cls.settings(config),
      bbnr=bbnr,
      bbnr_alpha=float(q.get("bbnr_alpha", d["bbnr_alpha"])),
      arc=bool(a.get("enabled", d["arc"])),
      arc_s=float(a.get("s", d["arc_s"])),
      arc_m=float(a.get("m", d["arc_m"])),
      arc_top_k=int(a.get("top_k", d["arc_top_k"])),
      arc_gamma0=float(a.get("gamma0", d["arc_gamma0"])),
      arc_decay=float(a.get("decay", d["arc_decay"])),
      arc_impl=a.get("impl", d["arc_impl"]),
    )

  def before_step(self, params: Params, step: jax.Array) -> tuple[Params, dict[str, jax.Array]]:
    """BBNR (eq. 3-4): the codebook projected into the ball of radius M(t) before it is used
    at step t; the projected rows are what the optimizer updates and stores."""
    if self.bbnr == "off":  # M(t) = inf: nothing to project or plot
      return params, {}
    radius = vqm.bbnr_radius(step, self.bbnr_alpha, self.bbnr)
    params = dict(params)
    params["codebook"] = vqm.bbnr_project(params["codebook"], radius)
    return params, dict(bbnr_radius=radius)

  def arc_loss(self, z: jax.Array, codebook: jax.Array, mesh: Any) -> jax.Array:
    """L_arc (eq. 8-10) of the global batch's latents z (N, D) against the codebook (K, D)."""
    s, m, k = self.arc_s, self.arc_m, self.arc_top_k
    if not use_blocked(self.arc_impl, self.num_codes, z.shape[0]):
      return vqm.arc_loss(z, codebook, s, m, k)
    mesh = mesh_or_context(mesh)
    if mesh is None or mesh.size == 1:
      return blockwise.arc_loss_blocked(z, codebook, s, m, k)
    # The rows of the loss split over the devices (the codebook's shard along codebook_axis,
    # if set), the tokens gathered: explicit collectives in a shard_map.
    return blockwise.arc_loss_sharded(
      z,
      codebook,
      s,
      m,
      k,
      mesh=mesh,
      batch_axes=sharding.batch_sharding(mesh).spec[0],
      codebook_axis=self.codebook_axis,
    )

  def search_in_arc_loss(self, num_tokens: int, mesh: Any) -> bool:
    """Whether the nearest-code search comes out of the blocked ArcLoss's forward pass
    (blockwise.arc_loss_and_nearest_blocked): on one device, with cosine matching, when both
    the search and the ArcLoss take their blocked form, for codebooks of up to
    blockwise.SEARCH_IN_ARC_MAX_CODES rows (where it was measured faster). The indices are the
    search's; the K x N cosines are computed once instead of twice (K 512, D 64: 1.1 ms less
    at N 6272, 10.7 ms at N 50176; the VQ-VAE's train step at batch 128 2.7-3.7 ms less)."""
    mesh = mesh_or_context(mesh)
    return (
      self.distance == "cosine"
      and self.num_codes <= blockwise.SEARCH_IN_ARC_MAX_CODES
      and (mesh is None or mesh.size == 1)
      and use_blocked(self.search_impl, self.num_codes, num_tokens)
      and use_blocked(self.arc_impl, self.num_codes, num_tokens)
    )

  def quantize(
    self, params: Params, z: jax.Array, step: jax.Array, *, mesh: Any = None
  ) -> Quantized:
    if not self.arc:
      out = super().quantize(params, z, step, mesh=mesh)
      zero = jnp.zeros((), jnp.float32)
      return out._replace(terms=dict(out.terms, loss_arc=zero, arc_weight=zero))
    codebook = params["codebook"].astype(jnp.float32)
    if self.search_in_arc_loss(z.shape[0], mesh):
      loss_arc, indices = blockwise.arc_loss_and_nearest_blocked(
        z, codebook, self.arc_s, self.arc_m, self.arc_top_k
      )
      out = self.quantized_at(codebook, z, indices)
    else:
      out = super().quantize(params, z, step, mesh=mesh)
      loss_arc = self.arc_loss(z, codebook, mesh)
    weight = vqm.arc_weight(step, self.arc_gamma0, self.arc_decay)
    return out._replace(
      loss=out.loss + weight * loss_arc,
      terms=dict(out.terms, loss_arc=loss_arc, arc_weight=weight),
    )
