"""config.quantizer.name -> the quantizer class. Adding a quantizer: its module, one line
here, its tests (docs/contributing.md, "Adding a quantizer")."""

from __future__ import annotations

from typing import Any

import ml_collections

from arcvq_jax.quantizers.arcvq import ArcVQ
from arcvq_jax.quantizers.base import Quantizer, config_error
from arcvq_jax.quantizers.fsq import FSQ
from arcvq_jax.quantizers.lfq import LFQ
from arcvq_jax.quantizers.simvq import SimVQ
from arcvq_jax.quantizers.vq import VQ

QUANTIZERS: dict[str, type[Quantizer]] = {
  "arcvq": ArcVQ,
  "fsq": FSQ,
  "lfq": LFQ,
  "simvq": SimVQ,
  "vq": VQ,
}
# Configs written before quantizers had names (workdirs of arcvq-jax 0.1) hold ArcVQ's keys;
# with its switches off ArcVQ computes what those runs did.
DEFAULT = "arcvq"


def from_config(config: ml_collections.ConfigDict) -> Quantizer:
  """The quantizer config.quantizer.name names, built from the config. Raises
  QuantizerConfigError (a ValueError) naming the key of a setting that cannot work."""
  name = config.quantizer.get("name", DEFAULT)
  if name not in QUANTIZERS:
    raise config_error(
      "quantizer.name",
      f"{name!r} is not a quantizer",
      f"Use one of {sorted(QUANTIZERS)} (e.g. --config.quantizer.name=fsq).",
    )
  return QUANTIZERS[name].from_config(config)


def vocabulary_keys(config: ml_collections.ConfigDict, vocab_size: int) -> dict[str, Any]:
  """{dotted config key: value} that give the quantizer config.quantizer.name names a
  vocabulary of about `vocab_size` tokens, its own way (a codebook's rows, FSQ's levels,
  LFQ's bits): what an ablation sweep's `codebook_size` grid sets."""
  name = config.quantizer.get("name", DEFAULT)
  if name not in QUANTIZERS:
    raise config_error(
      "quantizer.name", f"{name!r} is not a quantizer", f"Use one of {sorted(QUANTIZERS)}."
    )
  keys = QUANTIZERS[name].vocabulary_keys(vocab_size)
  return {f"quantizer.{k}": v for k, v in keys.items()}
