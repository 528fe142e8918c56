"""The one interface every quantizer implements (docs/contributing.md, "Adding a quantizer").

A quantizer is a frozen dataclass built from the config (`from_config`), holding only
settings; everything it computes is a pure function of (params, stats, latents, step).

Where its parts live in a run:
- `params`: entries of the autoencoder's parameter tree (e.g. 'codebook' (K, D)), created
  by the model from `param_inits()`; the optimizer updates them, except `frozen_params()`
  (an EMA-updated or a fixed random codebook).
- `stats`: statistics updated outside the gradient (EMA k-means sums), held by the train
  state (`TrainState.ema`); None where a quantizer has none.
- the usage EMA over the vocabulary (`TrainState.usage`, diagnostics and dead-code restart)
  is kept by the train step for every quantizer, from the indices it returns.

One train step calls, in order: `before_step` (outside the gradient: e.g. the BBNR
projection), `quantize` (inside the gradient: the latents the decoder sees, the indices and
the loss terms), the optimizer, then `after_step` (outside the gradient: EMA k-means,
dead-code restart). Inference uses `tokens` (latents -> indices) and `lookup` (indices ->
the vectors the decoder takes).
"""

from __future__ import annotations

import abc
import dataclasses
from collections.abc import Callable
from typing import Any, ClassVar, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections

Params = dict[str, jax.Array]


class Quantized(NamedTuple):
  """What `quantize` gives the train step (N latents of the global batch)."""

  z_ste: jax.Array  # (N, D) float32: what the decoder sees, carrying the encoder's gradient
  indices: jax.Array  # (N,) int32 tokens in [0, vocab_size)
  loss: jax.Array  # () float32: the quantizer's share of the loss, weights applied
  terms: dict[str, jax.Array]  # () float32 terms and weights to log (e.g. loss_vq)


class QuantizerConfigError(ValueError):
  """A quantizer setting that cannot work; the message names the key and the fix."""


def config_error(key: str, problem: str, fix: str) -> QuantizerConfigError:
  return QuantizerConfigError(f"config.{key}: {problem}. {fix}")


@dataclasses.dataclass(frozen=True)
class Quantizer(abc.ABC):
  """The interface. Subclasses implement the abstract methods and override the others where
  they need them (defaults: no params, no stats, nothing to do outside the gradient)."""

  name: ClassVar[str] = ""
  # Whether its tokens index rows of a codebook (K, D): diagnostics plot those rows.
  has_codebook: ClassVar[bool] = False

  @classmethod
  @abc.abstractmethod
  def from_config(cls, config: ml_collections.ConfigDict) -> Quantizer:
    """The quantizer config.quantizer (and config.arc, for ArcVQ) describe. Raises
    QuantizerConfigError naming the key of a setting that cannot work."""

  @classmethod
  def vocabulary_keys(cls, vocab_size: int) -> dict[str, Any]:
    """The config.quantizer keys (without the prefix) that give this quantizer a vocabulary
    of `vocab_size` tokens, or the nearest it can make, set its own way: a codebook of that
    many rows unless a subclass says otherwise (what a sweep's `codebook_size` sets)."""
    return {"num_codes": int(vocab_size)}

  @property
  @abc.abstractmethod
  def vocab_size(self) -> int:
    """How many distinct tokens it produces."""

  @property
  @abc.abstractmethod
  def dim(self) -> int:
    """D, the latent dimension it quantizes (the encoder's output channels)."""

  def param_inits(self) -> dict[str, Callable[[jax.Array], jax.Array]]:
    """{name: key -> initial array}: its entries of the model's parameter tree."""
    return {}

  def frozen_params(self) -> tuple[str, ...]:
    """Names in param_inits the optimizer must leave alone."""
    return ()

  def init_stats(self, params: Params) -> Any:
    """Its statistics outside the gradient at step 0 (a pytree), or None."""
    del params
    return None

  def before_step(self, params: Params, step: jax.Array) -> tuple[Params, dict[str, jax.Array]]:
    """Outside the gradient, before the params are used at `step`: (params, metrics)."""
    del step
    return params, {}

  @abc.abstractmethod
  def quantize(
    self, params: Params, z: jax.Array, step: jax.Array, *, mesh: Any = None
  ) -> Quantized:
    """Inside the gradient. z: (N, D) float32, the global batch's latents; mesh: the
    step's device Mesh (for searches split over it), or None."""

  def after_step(
    self,
    params: Params,
    stats: Any,
    usage: jax.Array,
    z: jax.Array,
    indices: jax.Array,
    key: jax.Array,
  ) -> tuple[Params, Any, jax.Array, dict[str, jax.Array]]:
    """Outside the gradient, after the optimizer: (params, stats, usage, metrics).

    z: (N, D) the step's latents (no gradient), indices: (N,) its tokens, usage: (V,) the
    usage EMA including this step, key: a PRNG key of this step."""
    del z, indices, key
    return params, stats, usage, {}

  def tokens(self, params: Params, z: jax.Array, *, mesh: Any = None) -> jax.Array:
    """z: (N, D) float32 -> (N,) int32 tokens, as `quantize` picks them."""
    return self.quantize(params, z, jnp.zeros((), jnp.int32), mesh=mesh).indices

  @abc.abstractmethod
  def lookup(self, params: Params, indices: jax.Array) -> jax.Array:
    """Tokens (...) int -> the vectors (..., D) float32 the decoder takes for them."""

  def codebook(self, params: Params) -> jax.Array | None:
    """The (vocab_size, D) rows its tokens index (for the diagnostics), or None."""
    del params
    return None
