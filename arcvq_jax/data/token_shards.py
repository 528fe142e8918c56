"""Token shards: one split of images encoded once by a frozen tokenizer, kept as ArrayRecord
files that grain reads back (docs/priors.md, "Token shards"). `python -m arcvq_jax.tokenize`
writes them; the PixelCNN prior trains from them (`config.data.token_shards`).

A directory of token shards holds

  spec.json                             what the shards hold: written first, so that a
                                        restarted run, or another process, checks it is
                                        making the same thing
  tokens-SSSSS-of-NNNNN.array_record    shard s: images [s * S, min((s + 1) * S, N)) of the
                                        split, one record per image, in order
  tokens-SSSSS-of-NNNNN.json            its sidecar (count, bytes, sha256), written once the
                                        shard is complete: a shard without one is unfinished
  index.json                            the spec, every shard's entry and the command that
                                        made them; written last

A record is one image in a fixed little-endian layout that the index describes ('record'):
image_id int64 (the image's index in the split), label int32 (-1 where the split has no
labels) and tokens (V, h, w) in the smallest unsigned type that holds the vocabulary, V = 2
when the horizontal mirror of each image was encoded too (--flip). No pickle: the records of
a batch, concatenated, are one `np.frombuffer` with the structured dtype. Since the shards
cover the split in order, record k of the shards (grain's global record key) is image k.

Reading back: `open(DIR)` checks the index and every shard file (present, its size, and by
default its sha256), `TokenShards.check_tokenizer` refuses shards of another tokenizer by
name, and `TokenShards.train_iterator` is the priors' batch stream: an endless grain
iterator over step numbers with the precomputed arrays' order (train/prior_common.py:
epoch e is `default_rng([seed, e]).permutation(N)`, process p keeps rows p::P of each global
batch) and their resume state ({'next_index': step}). With V = 2 the view of each example
(original or mirror) is drawn from (seed, step, position in the global batch).
"""

from __future__ import annotations

import builtins
import dataclasses
import hashlib
import json
import os
import shlex
from collections.abc import Mapping, Sequence
from typing import Any

import grain
import jax
import numpy as np
from array_record.python import array_record_module

from arcvq_jax.data.idx import DataError

FORMAT = "arcvq_jax.token_shards"
VERSION = 1
INDEX_FILE = "index.json"
SPEC_FILE = "spec.json"
# Byte s of this file is locked (POSIX record lock) while a run writes shard s.
LOCK_FILE = ".shard_locks"
SHARD_PREFIX = "tokens-"
# One record per chunk: grain's random access then reads (and decompresses) one image's
# record, not a group (ArrayRecordDataSource warns on anything else). Records are zstd
# compressed, the library's default.
WRITER_OPTIONS = "group_size:1"
# Entropy word that keeps the flip-view draws, default_rng([seed, FLIP_STREAM, step]), apart
# from the epoch permutations, default_rng([seed, epoch]).
FLIP_STREAM = 2
# The config sections that define what a tokenizer's encoder computes (the autoencoder, the
# quantizer and its ArcVQ settings); the rest (steps, learning rate, data, logging) may change
# when a run is resumed without changing a token.
FINGERPRINT_SECTIONS = ("model", "quantizer", "arc")
# Record fields and the dtypes a layout may name (little-endian, no pickle, no objects).
_FIELDS = ("image_id", "label", "tokens")
_FIELD_DTYPES = {"image_id": ("<i8",), "label": ("<i4",), "tokens": ("|u1", "<u2", "<u4")}
_HASH_CHUNK = 1 << 22
GENERIC_COMMAND = "python -m arcvq_jax.tokenize --workdir=TOKENIZER_WORKDIR --out={out}"


class TokenShardsError(DataError):
  """Token shards that are missing, damaged, unfinished or of another tokenizer; the message
  names the file and the command that makes the right ones."""


# --------------------------------------------------------------------------- the record


def token_dtype(vocab_size: int) -> np.dtype:
  """The smallest unsigned integer type holding tokens 0 .. vocab_size - 1."""
  if vocab_size < 1:
    raise ValueError(f"vocab_size must be >= 1, got {vocab_size}")
  for dtype in (np.uint8, np.uint16, np.uint32):
    if vocab_size - 1 <= np.iinfo(dtype).max:
      return np.dtype(dtype)
  raise ValueError(f"a vocabulary of {vocab_size} tokens does not fit in 32 bits")


def record_dtype(views: int, grid: Sequence[int], tokens: np.dtype) -> np.dtype:
  """The packed structured dtype of one record: image_id <i8, label <i4, tokens (V, h, w)."""
  tokens = np.dtype(tokens).newbyteorder("<")
  return np.dtype([("image_id", "<i8"), ("label", "<i4"), ("tokens", tokens, (views, *grid))])


def record_layout(dtype: np.dtype) -> dict[str, Any]:
  """The JSON description of a record dtype (the index's 'record')."""
  fields = []
  for name in dtype.names:
    field = dtype.fields[name][0]
    fields.append(dict(name=name, dtype=field.base.str, shape=list(field.shape)))
  return dict(fields=fields, bytes=dtype.itemsize)


def dtype_from_layout(layout: Mapping[str, Any]) -> np.dtype:
  """The record dtype a layout describes; ValueError for anything but the three fields in
  their allowed little-endian types."""
  fields = layout.get("fields") if isinstance(layout, Mapping) else None
  if not isinstance(fields, list) or [f.get("name") for f in fields] != list(_FIELDS):
    raise ValueError(f"the record layout must list the fields {_FIELDS}, got {layout!r}")
  spec = []
  for field in fields:
    name, dtype, shape = field["name"], field.get("dtype"), field.get("shape")
    if dtype not in _FIELD_DTYPES[name]:
      raise ValueError(
        f"record field {name!r} has dtype {dtype!r}, not one of {_FIELD_DTYPES[name]}"
      )
    if not isinstance(shape, list) or not all(isinstance(s, int) and s > 0 for s in shape):
      raise ValueError(f"record field {name!r} has shape {shape!r}")
    if (name == "tokens") != (len(shape) == 3):
      raise ValueError(f"record field {name!r} has shape {shape!r}")
    spec.append((name, dtype, tuple(shape)))
  dtype = np.dtype(spec)
  if dtype.itemsize != layout.get("bytes"):
    raise ValueError(
      f"the record layout says {layout.get('bytes')} bytes, its fields make {dtype.itemsize}"
    )
  return dtype


def encode_records(
  image_ids: np.ndarray, labels: np.ndarray, tokens: np.ndarray, dtype: np.dtype
) -> list[bytes]:
  """(B,) ids, (B,) labels and (B, V, h, w) tokens -> B records of `dtype.itemsize` bytes."""
  rows = np.empty(len(image_ids), dtype)
  rows["image_id"] = image_ids
  rows["label"] = labels
  rows["tokens"] = tokens
  data, size = rows.tobytes(), dtype.itemsize
  return [data[i * size : (i + 1) * size] for i in range(len(rows))]


def decode_records(records: Sequence[bytes], dtype: np.dtype) -> np.ndarray:
  """B records -> a (B,) structured array of `dtype` (fields image_id, label, tokens)."""
  data = b"".join(records)
  if len(data) != len(records) * dtype.itemsize:
    sizes = sorted({len(r) for r in records})
    raise TokenShardsError(
      f"records of {sizes} bytes, but the index's layout has {dtype.itemsize}: the shards "
      "and their index.json do not belong together; make them again."
    )
  return np.frombuffer(data, dtype)


# --------------------------------------------------------------------------- the shards


def shard_ranges(num_images: int, images_per_shard: int) -> list[tuple[int, int]]:
  """[start, stop) of every shard: fixed ranges of the split's image ids."""
  return [
    (start, min(start + images_per_shard, num_images))
    for start in range(0, num_images, images_per_shard)
  ]


def owned_shards(num_shards: int, process_index: int, process_count: int) -> list[int]:
  """The shards process p of P writes: s with s % P == p."""
  return list(range(process_index, num_shards, process_count))


def shard_name(index: int, count: int) -> str:
  return f"{SHARD_PREFIX}{index:05d}-of-{count:05d}.array_record"


def sidecar_name(index: int, count: int) -> str:
  return f"{SHARD_PREFIX}{index:05d}-of-{count:05d}.json"


def is_own_file(name: str) -> bool:
  """Whether a file name is one a token-shard directory holds (shards, sidecars, their
  temporary files, the spec, the index)."""
  return (
    name in (INDEX_FILE, SPEC_FILE, LOCK_FILE)
    or name.startswith(SHARD_PREFIX)
    or name.endswith(".tmp")
  )


# --------------------------------------------------------------------------- identities


def canonical_json(value: Any) -> str:
  """JSON with sorted keys and no spaces: equal values give equal text (tuples as lists)."""
  return json.dumps(value, sort_keys=True, separators=(",", ":"), default=str)


def fingerprint(config: Any, params: Any) -> str:
  """sha256 (hex) of a tokenizer: the canonical JSON of its config's FINGERPRINT_SECTIONS and
  every parameter's path, dtype, shape and bytes."""
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  digest = hashlib.sha256()
  digest.update(
    canonical_json({k: config[k] for k in FINGERPRINT_SECTIONS if k in config}).encode()
  )
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    array = np.ascontiguousarray(np.asarray(jax.device_get(leaf)))
    digest.update(f"{jax.tree_util.keystr(path)}|{array.dtype.str}|{array.shape}".encode())
    digest.update(array.tobytes())
  return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class TokenizerIdentity:
  """Which tokenizer made (or reads) the tokens: its workdir as given, checkpoint step and
  `fingerprint`. Two identities are the same tokenizer when step and fingerprint agree (a
  moved workdir is still the same tokenizer)."""

  workdir: str
  step: int
  fingerprint: str

  def same_as(self, other: TokenizerIdentity) -> bool:
    return self.step == other.step and self.fingerprint == other.fingerprint

  def describe(self) -> str:
    return f"tokenizer {self.workdir} step {self.step} (fingerprint {self.fingerprint[:12]})"

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


def identity_of(tokenizer: Any, workdir: str, step: int) -> TokenizerIdentity:
  """The identity of an `api.Tokenizer` loaded from `workdir` at checkpoint `step`."""
  return TokenizerIdentity(str(workdir), int(step), fingerprint(tokenizer.config, tokenizer.params))


def spec_digest(spec: Mapping[str, Any]) -> str:
  """sha256 of a spec, leaving out the tokenizer's workdir path (see TokenizerIdentity)."""
  tokenizer = {k: v for k, v in spec["tokenizer"].items() if k != "workdir"}
  return hashlib.sha256(canonical_json({**spec, "tokenizer": tokenizer}).encode()).hexdigest()


# Spec keys that follow from others (the layout from views and vocabulary, the shard count
# from the split's size): named in a difference only when nothing else differs.
_DERIVED_KEYS = ("record", "dtype", "num_shards")


def spec_differences(have: Mapping[str, Any], want: Mapping[str, Any]) -> list[str]:
  """'key: have -> want' for every key in which two specs differ (tokenizer.workdir aside)."""
  out, derived = [], []
  for key in sorted(set(have) | set(want)):
    a, b = have.get(key), want.get(key)
    if key == "tokenizer" and isinstance(a, Mapping) and isinstance(b, Mapping):
      a = {k: v for k, v in a.items() if k != "workdir"}
      b = {k: v for k, v in b.items() if k != "workdir"}
    if canonical_json(a) != canonical_json(b):
      line = f"{key}: {canonical_json(a)} -> {canonical_json(b)}"
      if key == "tokenizer" and isinstance(a, Mapping) and isinstance(b, Mapping):
        a, b = (
          f"step {t.get('step')} (fingerprint {str(t.get('fingerprint'))[:12]})" for t in (a, b)
        )
        line = f"tokenizer: {a} -> {b}"
      (derived if key in _DERIVED_KEYS else out).append(line)
  return out or derived


def make_spec(
  *,
  split: str,
  num_images: int,
  image_shape: Sequence[int],
  grid: Sequence[int],
  views: int,
  vocab_size: int,
  has_labels: bool,
  images_per_shard: int,
  tokenizer: TokenizerIdentity,
  data: Mapping[str, Any],
) -> dict[str, Any]:
  """What a directory of shards holds (index.json without the shard list and the command)."""
  dtype = record_dtype(views, grid, token_dtype(vocab_size))
  return dict(
    format=FORMAT,
    version=VERSION,
    split=split,
    num_images=int(num_images),
    image_shape=[int(s) for s in image_shape],
    grid=[int(s) for s in grid],
    views=int(views),
    dtype=token_dtype(vocab_size).name,
    vocab_size=int(vocab_size),
    has_labels=bool(has_labels),
    record=record_layout(dtype),
    images_per_shard=int(images_per_shard),
    num_shards=len(shard_ranges(num_images, images_per_shard)),
    tokenizer=tokenizer.to_json(),
    data=dict(data),
  )


# --------------------------------------------------------------------------- files


def file_sha256(path: str) -> str:
  digest = hashlib.sha256()
  with builtins.open(path, "rb") as f:
    while chunk := f.read(_HASH_CHUNK):
      digest.update(chunk)
  return digest.hexdigest()


def write_json_atomic(path: str, value: Any) -> None:
  """`value` as JSON at `path`, through a temporary file (fsynced) and a rename."""
  tmp = f"{path}.{os.getpid()}.tmp"
  with builtins.open(tmp, "w") as f:
    json.dump(value, f, indent=2)
    f.write("\n")
    f.flush()
    os.fsync(f.fileno())
  os.replace(tmp, path)


def read_json(path: str) -> Any:
  """The JSON at `path`; TokenShardsError naming the file when it is not valid JSON."""
  try:
    with builtins.open(path) as f:
      return json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise TokenShardsError(f"{path} is damaged (not valid JSON: {e})") from e


def read_sidecar(directory: str, index: int, count: int) -> dict[str, Any] | None:
  """Shard `index`'s sidecar, or None where it is missing or unreadable (an unfinished shard)."""
  path = os.path.join(directory, sidecar_name(index, count))
  if not os.path.exists(path):
    return None
  try:
    side = read_json(path)
  except (TokenShardsError, OSError):
    return None
  return side if isinstance(side, dict) else None


def shard_problem(directory: str, entry: Mapping[str, Any], checksum: bool) -> str | None:
  """What is wrong with the shard file of an index or sidecar `entry` (missing, another size,
  with `checksum` another sha256), or None when it matches."""
  path = os.path.join(directory, entry["file"])
  if not os.path.isfile(path):
    return f"{path} is missing"
  size = os.path.getsize(path)
  if size != entry["bytes"]:
    return f"{path} has {size} bytes, its entry says {entry['bytes']} (truncated or overwritten)"
  if checksum and file_sha256(path) != entry["sha256"]:
    return f"{path} does not match its sha256 (its bytes changed after it was written)"
  return None


class ShardWriter:
  """Writes one shard: records go to a temporary file, `commit` makes it the shard (closed,
  fsynced, renamed) and then writes its sidecar, the mark of a finished shard."""

  def __init__(self, directory: str, index: int, count: int, start: int, stop: int, digest: str):
    self.directory, self.start, self.stop, self.digest = directory, start, stop, digest
    self.name, self.sidecar = shard_name(index, count), sidecar_name(index, count)
    self.path = os.path.join(directory, self.name)
    self.tmp = self.path + ".tmp"
    self.count = 0
    self.labels: list[int] = []  # [min, max] of the labels written so far
    self._writer = array_record_module.ArrayRecordWriter(self.tmp, WRITER_OPTIONS)

  def write(self, records: Sequence[bytes], labels: np.ndarray) -> None:
    for record in records:
      self._writer.write(record)
    self.count += len(records)
    if len(labels):
      lo, hi = int(np.min(labels)), int(np.max(labels))
      self.labels = [min(self.labels[0], lo), max(self.labels[1], hi)] if self.labels else [lo, hi]

  def commit(self) -> dict[str, Any]:
    """Finishes the shard; returns its entry {file, start, stop, count, bytes, sha256, labels}."""
    if self.count != self.stop - self.start:
      raise RuntimeError(f"{self.name}: wrote {self.count} records of {self.stop - self.start}")
    self._writer.close()
    with builtins.open(self.tmp, "rb") as f:
      os.fsync(f.fileno())
    os.replace(self.tmp, self.path)
    entry = dict(
      file=self.name,
      start=self.start,
      stop=self.stop,
      count=self.count,
      bytes=os.path.getsize(self.path),
      sha256=file_sha256(self.path),
      labels=self.labels or None,
    )
    write_json_atomic(os.path.join(self.directory, self.sidecar), {**entry, "spec": self.digest})
    return entry

  def abort(self) -> None:
    """Drops the temporary file (a later run writes the shard again)."""
    if self._writer.is_open():
      self._writer.close()
    if os.path.exists(self.tmp):
      os.remove(self.tmp)


def try_write_index(directory: str, spec: Mapping[str, Any], command: str) -> dict | None:
  """index.json from the spec and every shard's sidecar, where all of them exist (any process
  may call it; they write the same text); None while a shard is unfinished."""
  digest, count = spec_digest(spec), spec["num_shards"]
  entries = []
  for s in range(count):
    side = read_sidecar(directory, s, count)
    if side is None or side.get("spec") != digest:
      return None
    entries.append({k: v for k, v in side.items() if k != "spec"})
  ranges = [e["labels"] for e in entries if e.get("labels")]
  index = dict(
    spec,
    label_range=[min(r[0] for r in ranges), max(r[1] for r in ranges)] if ranges else None,
    shards=entries,
    command=command,
  )
  path = os.path.join(directory, INDEX_FILE)
  try:
    unchanged = os.path.exists(path) and read_json(path) == index
  except TokenShardsError:
    unchanged = False
  if not unchanged:
    write_json_atomic(path, index)
  return index


# --------------------------------------------------------------------------- reading back


def _command_for(index: Mapping[str, Any] | None, directory: str, **replace: Any) -> str:
  """The command that made the shards (from the index), with --workdir / --step / --out
  replaced where given; a generic one without an index."""
  command = index.get("command") if isinstance(index, Mapping) else None
  if not isinstance(command, str) or not command.startswith("python -m arcvq_jax.tokenize"):
    command = GENERIC_COMMAND.format(out=shlex.quote(directory))
  args = shlex.split(command)
  for flag, value in replace.items():
    new = f"--{flag}={value}"
    at = [i for i, a in enumerate(args) if a.startswith(f"--{flag}=")]
    args = (
      [new if i == at[0] else a for i, a in enumerate(args) if i not in at[1:]]
      if at
      else [*args, new]
    )
  return shlex.join(args)


def _check_index(index: Any, path: str, directory: str) -> np.dtype:
  """Validates index.json's keys and types; returns the record dtype."""
  remake = f"make them again: {_command_for(index, directory)}"
  if not isinstance(index, dict) or index.get("format") != FORMAT:
    raise TokenShardsError(f"{path} is not a token-shard index (no format {FORMAT!r}); {remake}")
  if index.get("version") != VERSION:
    raise TokenShardsError(
      f"{path} is of token-shard format version {index.get('version')}, this code reads "
      f"version {VERSION}; {remake}"
    )
  try:
    dtype = dtype_from_layout(index["record"])
    n, shards = int(index["num_images"]), index["shards"]
    views, grid = int(index["views"]), [int(s) for s in index["grid"]]
    missing = [k for k in ("split", "vocab_size", "image_shape", "label_range") if k not in index]
    if missing:
      raise KeyError(missing[0])
    TokenizerIdentity(**index["tokenizer"])
    expect = shard_ranges(n, int(index["images_per_shard"]))
    got = [(int(e["start"]), int(e["stop"])) for e in shards]
    if not all(
      isinstance(e["file"], str) and isinstance(e["sha256"], str) and int(e["bytes"]) >= 0
      for e in shards
    ):
      raise TypeError("a shard entry's file, bytes or sha256 has the wrong type")
  except (KeyError, TypeError, ValueError) as e:
    raise TokenShardsError(f"{path} is damaged ({type(e).__name__}: {e}); {remake}") from e
  if got != expect or any(e["count"] != e["stop"] - e["start"] for e in shards):
    raise TokenShardsError(
      f"{path} is damaged: its shards do not cover the {n} images in ranges of "
      f"{index['images_per_shard']}; {remake}"
    )
  if dtype["tokens"].shape != (views, *grid):
    raise TokenShardsError(
      f"{path} is damaged: its record layout does not match views and grid; {remake}"
    )
  return dtype


def open(directory: str, *, verify: bool = True) -> TokenShards:
  """The token shards in `directory`, checked: index.json readable and whole, every shard
  file present with its size, and with `verify` its sha256 (one read of every file). Raises
  TokenShardsError with one message per problem: no index (unfinished or not shards), a
  damaged index, a missing or damaged shard."""
  directory = os.fspath(directory)
  path = os.path.join(directory, INDEX_FILE)
  if not os.path.isdir(directory):
    raise TokenShardsError(
      f"{directory} does not exist or is not a directory: make the token shards with: "
      f"{_command_for(None, directory)}"
    )
  if not os.path.exists(path):
    spec_path = os.path.join(directory, SPEC_FILE)
    if os.path.exists(spec_path):
      spec = read_json(spec_path)
      count = int(spec.get("num_shards", 0)) if isinstance(spec, dict) else 0
      done = sum(read_sidecar(directory, s, count) is not None for s in range(count))
      raise TokenShardsError(
        f"{directory} is unfinished: {done} of {count} shards are written and {INDEX_FILE} is "
        "not (the tokenize run stopped, or another process is still writing). Run the same "
        "tokenize command again: it continues where it stopped."
      )
    raise TokenShardsError(
      f"{directory} holds no token shards ({INDEX_FILE} not found): make them with: "
      f"{_command_for(None, directory)}"
    )
  index = read_json(path) if os.path.getsize(path) else None
  if index is None:
    raise TokenShardsError(
      f"{path} is empty (damaged); make the shards again: {_command_for(None, directory)}"
    )
  dtype = _check_index(index, path, directory)
  for entry in index["shards"]:
    problem = shard_problem(directory, entry, checksum=verify)
    if problem:
      raise TokenShardsError(
        f"{problem}. Run the tokenize command again: it rewrites missing and damaged shards "
        f"and keeps the others: {_command_for(index, directory)}"
      )
  return TokenShards(directory, index, dtype)


class TokenShards:
  """An opened directory of token shards (see `open`)."""

  def __init__(self, directory: str, index: dict[str, Any], dtype: np.dtype):
    self.directory, self.index, self.dtype = directory, index, dtype
    self.num_images = int(index["num_images"])
    self.views = int(index["views"])
    self.grid = tuple(index["grid"])
    self.vocab_size = int(index["vocab_size"])
    self.image_shape = tuple(index["image_shape"])
    self.label_range = index["label_range"]
    self.tokenizer = TokenizerIdentity(**index["tokenizer"])

  def check_tokenizer(self, reader: TokenizerIdentity, who: str = "this prior") -> None:
    """Refuses, by name, shards that another tokenizer (another step or fingerprint) made."""
    if self.tokenizer.same_as(reader):
      return
    out = f"{self.directory.rstrip('/')}_step{reader.step}"
    fix = _command_for(
      self.index, self.directory, workdir=reader.workdir, step=reader.step, out=out
    )
    raise TokenShardsError(
      f"{self.directory} was made by {self.tokenizer.describe()}, {who} uses "
      f"{reader.describe()}; make the right ones with: {fix}"
    )

  def paths(self) -> list[str]:
    """The shard files, in order, as grain's file instructions ('path[0:count]': the record
    counts are known, so no file is opened to count them)."""
    return [
      f"{os.path.join(self.directory, e['file'])}[0:{e['count']}]" for e in self.index["shards"]
    ]

  def source(self) -> grain.sources.ArrayRecordDataSource:
    """grain's random-access source over the shards: key k -> image k's record (bytes)."""
    return grain.sources.ArrayRecordDataSource(self.paths())

  def read(self, image_ids: Sequence[int]) -> np.ndarray:
    """The (B,) structured records of the given image ids (fields image_id, label, tokens)."""
    return decode_records(self.source().__getitems__([int(i) for i in image_ids]), self.dtype)

  def dataset(self) -> grain.MapDataset:
    """Image k -> {'image_id' (), 'label' (), 'tokens' (V, h, w)}: a grain MapDataset to
    shuffle, batch or map as any other."""
    return grain.MapDataset.source(self.source()).map(_DecodeOne(self.dtype))

  def train_iterator(
    self,
    global_batch_size: int,
    seed: int,
    process_index: int | None = None,
    process_count: int | None = None,
  ) -> grain.DatasetIterator:
    """An endless, checkpointable iterator of this process's rows of shuffled global batches:
    {'tokens': (B, h, w) int32, 'label': (B,) int32} (see the module docstring)."""
    if self.num_images < global_batch_size:
      raise ValueError(
        f"config.batch_size: {global_batch_size} is more than the {self.num_images} images "
        f"of the token shards in {self.directory}. Lower it."
      )
    p = jax.process_index() if process_index is None else process_index
    num_p = jax.process_count() if process_count is None else process_count
    reader = _ReadShardBatch(
      self.source(), self.dtype, self.num_images, global_batch_size, seed, p, num_p
    )
    dataset = (
      grain.MapDataset.range(reader.steps_per_epoch)
      .repeat(None)
      .map_with_index(reader)
      .to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=4))
    )
    return iter(dataset)


class _DecodeOne(grain.transforms.Map):
  """One record (bytes) -> {'image_id', 'label', 'tokens' (V, h, w)}."""

  def __init__(self, dtype: np.dtype):
    self.dtype = dtype

  def map(self, element: bytes) -> dict[str, np.ndarray]:
    row = decode_records([element], self.dtype)[0]
    return {name: np.asarray(row[name]) for name in _FIELDS}


class _ReadShardBatch:
  """Step number -> this process's {'tokens': (B, h, w) int32, 'label': (B,) int32}.

  The rows are those of train/prior_common.py's array batches (the same permutation per
  epoch, the same positions p::P); one `__getitems__` reads them. With two views, example j
  of global batch `step` takes the mirror when default_rng([seed, FLIP_STREAM, step])
  .random(G)[j] < 0.5.
  """

  def __init__(
    self,
    source: Any,
    dtype: np.dtype,
    num_images: int,
    global_batch_size: int,
    seed: int,
    process_index: int,
    process_count: int,
  ):
    self.source, self.dtype, self.n, self.g = source, dtype, num_images, global_batch_size
    self.steps_per_epoch = num_images // global_batch_size
    self.seed, self.p, self.num_p = seed, process_index, process_count
    self.views = dtype["tokens"].shape[0]
    self._perm: tuple[int, np.ndarray] | None = None

  def __call__(self, step: int, unused_element: Any = None) -> dict[str, np.ndarray]:
    epoch, k = divmod(step, self.steps_per_epoch)
    memo = self._perm
    if memo is None or memo[0] != epoch:
      memo = (epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n))
      self._perm = memo
    rows = memo[1][k * self.g : (k + 1) * self.g][self.p :: self.num_p]
    order = np.argsort(rows)  # each file read in its own order; the rows put back after
    records = self.source.__getitems__([int(i) for i in rows[order]])
    decoded = decode_records(records, self.dtype)[np.argsort(order)]
    if not np.array_equal(decoded["image_id"], rows):
      bad = int(np.flatnonzero(decoded["image_id"] != rows)[0])
      raise TokenShardsError(
        f"record {int(rows[bad])} of the token shards holds image {int(decoded['image_id'][bad])}: "
        "the shards are damaged or out of order; make them again with the tokenize command."
      )
    view = np.zeros(len(rows), np.int64)
    if self.views > 1:
      draws = np.random.default_rng([self.seed, FLIP_STREAM, step]).random(self.g)
      view = (draws[self.p :: self.num_p] < 0.5).astype(np.int64)
    tokens = decoded["tokens"][np.arange(len(rows)), view]
    return {"tokens": tokens.astype(np.int32), "label": decoded["label"].astype(np.int32)}

  def __getstate__(self) -> dict[str, Any]:
    return {**self.__dict__, "_perm": None}
