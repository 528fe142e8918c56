"""The sweep file, its settings and runs, and each run's resolved config.

A sweep file is a plain ml_collections config (`get_config()`), e.g.

  c.variants = ["arcvq", "vq", "fsq"]         # config.VARIANTS names, each with the grid
  c.baselines = ["bbnr"]                       # VARIANTS run once each, without the grid
  c.grid = {"arc": {"s": [5.0, 10.0]}}         # a product over config keys (groups nest)
  c.seeds = [0, 1, 2]
  c.overrides = {"num_train_steps": 3000, "batch_size": 128}   # every run
  c.skip_metrics = ["rfid"]                    # left out of the evaluation on purpose
  c.note = "budget: 3000 steps at batch 128 (about 3 h for all runs on 2 CPU cores)"

Settings are `baselines` + `variants` x the grid product; runs are settings x seeds, in that
order (seeds innermost), and `--shard=i/n` takes the runs whose index mod n is i. A grid leaf
is a list of values; a list of dicts sets several keys together, e.g.
{"quantizer": [dict(levels=(8, 5, 5, 5), embed_dim=4), dict(levels=(8, 8, 8, 5, 5, 5),
embed_dim=6)]}.

One grid key is not a config key: `codebook_size` gives every quantizer a vocabulary of about
that many tokens, each its own way (quantizers/registry.vocabulary_keys: a codebook of K rows,
FSQ's levels whose product is closest to K, LFQ's log2 K bits), e.g.
c.grid = {"codebook_size": [512, 4096, 32768]}.

A run's config is what `python -m arcvq_jax.main --config=FILE:VARIANT` would train (the
config file's get_config(VARIANT); config.apply_variant on top where get_config takes no
argument), then the sweep's overrides, the setting's grid values, the seed, and last the
command line's --config.KEY=VALUE overrides (which may not name a grid key). Without variants
and baselines, the one setting is the config file as given.
"""

from __future__ import annotations

import dataclasses
import difflib
import hashlib
import importlib.util
import inspect
import itertools
import json
import os
import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import ml_collections

from arcvq_jax import cli
from arcvq_jax import config as config_lib
from arcvq_jax.quantizers import registry

FIELDS = ("name", "note", "variants", "baselines", "grid", "seeds", "overrides", "skip_metrics")
SKIPPABLE = ("lpips", "rfid")
# Keys that change how a run is kept or shown, not its numbers: a change of these in the
# sweep does not make a finished run stale.
BOOKKEEPING_KEYS = (
  "checkpoint_async",
  "keep_checkpoints",
  "checkpoint_every_steps",
  "image_every_steps",
  "data.num_workers",
)


# Grid keys that are no config key: each sets config keys per run, by the run's quantizer.
VIRTUAL_KEYS = {"codebook_size": registry.vocabulary_keys}


class SweepError(cli.UserError):
  """A sweep file (or its use with a config) that cannot give runs; the message says where."""


@dataclasses.dataclass(frozen=True)
class Setting:
  """One quantizer setting: a variant (None: the config file as given) and grid values."""

  variant: str | None
  values: tuple[tuple[str, Any], ...]  # (dotted config key, value), in grid order
  baseline: bool = False

  @property
  def id(self) -> str:
    parts = [self.variant or "base"]
    parts += [f"{key}={format_value(value)}" for key, value in self.values]
    return safe_name("__".join(parts))

  def describe(self) -> dict[str, Any]:
    return dict(
      id=self.id,
      variant=self.variant,
      values={k: to_json(v) for k, v in self.values},
      baseline=self.baseline,
    )


@dataclasses.dataclass(frozen=True)
class Run:
  index: int
  setting: Setting
  seed: int

  @property
  def relpath(self) -> str:
    return os.path.join("runs", self.setting.id, f"seed_{self.seed}")


@dataclasses.dataclass(frozen=True)
class Sweep:
  name: str
  note: str
  variants: tuple[str, ...]
  baselines: tuple[str, ...]
  grid: tuple[tuple[dict[str, Any], ...], ...]  # axes; each entry sets one or more keys
  seeds: tuple[int, ...]
  overrides: tuple[tuple[str, Any], ...]
  skip_metrics: tuple[str, ...]

  def settings(self) -> list[Setting]:
    out = [Setting(v, (), baseline=True) for v in self.baselines]
    for variant in self.variants or ((None,) if not self.baselines else ()):
      for combo in itertools.product(*self.grid):
        values = tuple(item for entry in combo for item in entry.items())
        out.append(Setting(variant, values))
    seen: dict[str, Setting] = {}
    for s in out:
      if s.id in seen:
        raise SweepError(
          f"two settings of the sweep have the same id {s.id!r} ({seen[s.id].describe()} and "
          f"{s.describe()}): give distinct variants and grid values."
        )
      seen[s.id] = s
    return out

  def runs(self) -> list[Run]:
    pairs = itertools.product(self.settings(), self.seeds)
    return [Run(i, setting, seed) for i, (setting, seed) in enumerate(pairs)]

  def grid_keys(self) -> list[str]:
    return list(dict.fromkeys(k for axis in self.grid for entry in axis for k in entry))


# --------------------------------------------------------------------------- names, values


def format_value(value: Any) -> str:
  """A grid value as it appears in a setting id: 8-5-5-5 for (8, 5, 5, 5), 0.0005, True."""
  if isinstance(value, list | tuple):
    return "-".join(format_value(v) for v in value)
  if isinstance(value, float):
    text = repr(value)
    return text[:-2] if text.endswith(".0") else text
  return str(value)


def safe_name(text: str) -> str:
  """A folder name: characters other than letters, digits and ._=+- become '_'."""
  return re.sub(r"[^A-Za-z0-9._=+\-]", "_", text)[:200]


def to_json(value: Any) -> Any:
  if isinstance(value, tuple | list):
    return [to_json(v) for v in value]
  if isinstance(value, Mapping):
    return {k: to_json(v) for k, v in value.items()}
  return value


def parse_shard(text: str) -> tuple[int, int]:
  """'i/n' -> (i, n) with 0 <= i < n."""
  match = re.fullmatch(r"\s*(\d+)\s*/\s*(\d+)\s*", text or "")
  if not match or not int(match.group(2)) > int(match.group(1)) >= 0:
    raise cli.UserError(
      f"--shard={text}: expected i/n with 0 <= i < n, e.g. --shard=0/8 (a SLURM array: "
      "--shard=$SLURM_ARRAY_TASK_ID/8)."
    )
  return int(match.group(1)), int(match.group(2))


def shard(runs: Sequence[Run], index: int, count: int) -> list[Run]:
  """The runs of shard `index` of `count`: those whose index mod count is `index`."""
  return [r for r in runs if r.index % count == index]


# ------------------------------------------------------------------------- the sweep file


def _plain(value: Any) -> Any:
  """ConfigDicts as dicts (recursively); lists and tuples kept."""
  if isinstance(value, ml_collections.ConfigDict):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  if isinstance(value, list | tuple):
    return type(value)(_plain(v) for v in value)
  return value


def _flatten(tree: Mapping[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
  for key, value in tree.items():
    if isinstance(value, Mapping):
      yield from _flatten(value, f"{prefix}{key}.")
    else:
      yield f"{prefix}{key}", value


def _grid_axes(tree: Mapping[str, Any], where: str, prefix: str = "") -> list[tuple[dict, ...]]:
  axes = []
  for key, value in tree.items():
    path = f"{prefix}{key}"
    if isinstance(value, Mapping):
      axes += _grid_axes(value, where, f"{path}.")
      continue
    if not isinstance(value, list | tuple) or not value:
      raise SweepError(
        f"{where}: grid.{path} = {value!r}: a grid entry is a non-empty list of values, e.g. "
        f"grid.{path} = [a, b] (a single value belongs in overrides)."
      )
    if all(isinstance(v, Mapping) for v in value):
      axes.append(tuple({f"{path}.{k}": v for k, v in _flatten(entry)} for entry in value))
    elif any(isinstance(v, Mapping) for v in value):
      raise SweepError(
        f"{where}: grid.{path} mixes dicts (keys set together) and plain values; give one kind."
      )
    else:
      axes.append(tuple({path: v} for v in value))
  return axes


def _names(value: Any, field: str, where: str) -> tuple[str, ...]:
  if isinstance(value, str) or not isinstance(value, list | tuple):
    raise SweepError(f"{where}: {field} must be a list of names, got {value!r}.")
  unknown = [v for v in value if v not in config_lib.VARIANTS]
  if unknown:
    raise SweepError(
      f"{where}: {field} names unknown variant(s) {', '.join(map(repr, unknown))}: choose from "
      f"{', '.join(sorted(config_lib.VARIANTS))} (arcvq_jax/config.py, VARIANTS)."
    )
  if len(set(value)) != len(value):
    raise SweepError(f"{where}: {field} names a variant twice: {list(value)}.")
  return tuple(value)


def from_config(sweep: ml_collections.ConfigDict | Mapping[str, Any], where: str) -> Sweep:
  """Checks the sweep file's fields (`where` names it in the messages)."""
  raw = _plain(sweep)
  unknown = sorted(set(raw) - set(FIELDS))
  if unknown:
    raise SweepError(
      f"{where}: unknown field(s) {', '.join(unknown)}; a sweep has {', '.join(FIELDS)}."
    )
  seeds = raw.get("seeds", (0,))
  if (
    isinstance(seeds, str)
    or not isinstance(seeds, list | tuple)
    or not seeds
    or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)
    or len(set(seeds)) != len(seeds)
  ):
    raise SweepError(
      f"{where}: seeds must be a non-empty list of distinct integers, got {seeds!r}."
    )
  grid = raw.get("grid") or {}
  overrides = raw.get("overrides") or {}
  for field, value in (("grid", grid), ("overrides", overrides)):
    if not isinstance(value, Mapping):
      raise SweepError(f"{where}: {field} must be a dict of config keys, got {value!r}.")
  skip = tuple(raw.get("skip_metrics") or ())
  bad = [m for m in skip if m not in SKIPPABLE]
  if bad:
    raise SweepError(f"{where}: skip_metrics: {bad} (only {', '.join(SKIPPABLE)} can be skipped).")
  result = Sweep(
    name=str(raw.get("name") or ""),
    note=str(raw.get("note") or ""),
    variants=_names(raw.get("variants") or (), "variants", where),
    baselines=_names(raw.get("baselines") or (), "baselines", where),
    grid=tuple(_grid_axes(grid, where)),
    seeds=tuple(int(s) for s in seeds),
    overrides=tuple(_flatten(overrides)),
    skip_metrics=skip,
  )
  if result.grid and result.baselines and not result.variants:
    raise SweepError(
      f"{where}: a grid applies to the variants, and there are only baselines; name the "
      "variants to vary (the same name may be a baseline too)."
    )
  for axis in result.grid:
    for entry in axis:
      for key, value in entry.items():
        if key in VIRTUAL_KEYS and (
          not isinstance(value, int) or isinstance(value, bool) or value < 2
        ):
          raise SweepError(
            f"{where}: grid.{key} = {value!r}: a {key} is a whole number of codes >= 2, e.g. "
            f"grid.{key} = [512, 4096]."
          )
  both = set(result.grid_keys()) & {k for k, _ in result.overrides}
  if both:
    raise SweepError(f"{where}: {sorted(both)} are in both grid and overrides; keep one.")
  result.settings()  # distinct ids
  return result


# ---------------------------------------------------------------------- resolving configs


def _config_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key, value in config.items():
    if isinstance(value, ml_collections.ConfigDict):
      out += _config_keys(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def _check_key(config: ml_collections.ConfigDict, key: str, where: str, config_name: str) -> None:
  keys = _config_keys(config)
  if key in keys:
    return
  close = difflib.get_close_matches(key, keys, n=1)
  hint = f" Did you mean {close[0]!r}?" if close else ""
  raise SweepError(
    f"{where}: {key!r} is not a key of the config {config_name}.{hint} A sweep can only set "
    "keys the config file defines."
  )


def set_key(config: ml_collections.ConfigDict, key: str, value: Any, where: str) -> None:
  *parents, leaf = key.split(".")
  target = config
  for p in parents:
    target = target[p]
  current = target[leaf]
  if isinstance(current, tuple) and isinstance(value, list):
    value = tuple(value)
  try:
    target[leaf] = value
  except (TypeError, ValueError) as e:
    raise SweepError(
      f"{where}: {key}={value!r} cannot be set: the config holds a "
      f"{type(current).__name__} there ({e})."
    ) from e


class ConfigSource:
  """The base config file, per variant, with the command line's --config overrides."""

  def __init__(self, path: str, argument: str | None, cli_overrides: Mapping[str, Any]):
    self.path, self.argument = path, argument
    self.cli_overrides = dict(cli_overrides)
    spec = importlib.util.spec_from_file_location(
      f"_arcvq_sweep_config_{abs(hash(path))}", os.path.abspath(path)
    )
    if spec is None or spec.loader is None:
      raise SweepError(f"--config={path}: not a Python config file.")
    self.module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(self.module)
    params = inspect.signature(self.module.get_config).parameters
    self.takes_variant = len(params) > 0

  def get(self, variant: str | None) -> ml_collections.ConfigDict:
    if variant is None:
      config = self.module.get_config(*(() if self.argument is None else (self.argument,)))
    elif self.takes_variant:
      config = self.module.get_config(variant)
    else:
      config = config_lib.apply_variant(self.module.get_config(), variant)
    return config


def resolve(
  source: ConfigSource, sweep: Sweep, setting: Setting, seed: int, where: str
) -> ml_collections.ConfigDict:
  """The config one run trains (module docstring for the order)."""
  config = source.get(setting.variant)
  name = source.path + (f":{setting.variant}" if setting.variant else "")
  for key, value in sweep.overrides:
    _check_key(config, key, f"{where}: overrides", name)
    set_key(config, key, value, f"{where}: overrides")
  for key, value in setting.values:
    if key in VIRTUAL_KEYS:
      for real_key, real_value in VIRTUAL_KEYS[key](config, value).items():
        _check_key(config, real_key, f"{where}: grid {key}={value}", name)
        set_key(config, real_key, real_value, f"{where}: grid {key}={value}")
      continue
    _check_key(config, key, f"{where}: grid", name)
    set_key(config, key, value, f"{where}: grid")
  config.seed = seed
  for key, value in source.cli_overrides.items():
    set_key(config, key, value, "--config")
  return config


def check_cli_overrides(sweep: Sweep, cli_overrides: Mapping[str, Any]) -> None:
  both = sorted(set(sweep.grid_keys()) & set(cli_overrides))
  if both:
    raise SweepError(
      f"--config.{both[0]} is also a grid key of the sweep: the command line would set every "
      "run to the same value. Change the grid in the sweep file (or --sweep.grid...)."
    )
  if "seed" in cli_overrides:
    raise SweepError("--config.seed: the sweep's seeds set config.seed; use --sweep.seeds=...")


# ------------------------------------------------------------------------- fingerprints


def config_record(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """The config as flat {dotted key: JSON value}, without BOOKKEEPING_KEYS."""
  tree = json.loads(config.to_json_best_effort(sort_keys=True))
  return {k: v for k, v in _flatten(tree) if k not in BOOKKEEPING_KEYS}


def fingerprint(record: Mapping[str, Any]) -> str:
  text = json.dumps(record, sort_keys=True, separators=(",", ":"))
  return hashlib.sha256(text.encode()).hexdigest()[:16]


def differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
  """'key: old -> new' for every key that differs (or exists in one only)."""
  out = []
  for key in sorted(set(old) | set(new)):
    if old.get(key, "<absent>") != new.get(key, "<absent>"):
      out.append(f"{key}: {old.get(key, '<absent>')!r} -> {new.get(key, '<absent>')!r}")
  return out
