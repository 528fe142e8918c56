"""What every command line of the project shares: quiet libraries, short lines, and errors
without tracebacks.

The entry points (main, evaluate, sample, evaluate_samples, the converters) end in

  if __name__ == "__main__":
    define_flags()
    cli.run(main)

`run(main)` is absl's `app.run(main)` plus:
  - library chatter off: INFO lines of jax (backend probing), orbax (several per checkpoint),
    grain, TFDS, and TensorFlow's C++ start-up notices, unless --verbosity=1 or more asks for
    them; console lines are wrapped at MAX_WIDTH characters.
  - errors a user can fix (`is_user_error`: a missing or damaged data or weights file, an
    unknown config key, a wrong config path, a config file that fails to load, a flag out of
    its range, a workdir that cannot be written, ...) print one message, "error: what, where,
    the fix", and exit with status 2; --debug (or ARCVQ_DEBUG=1) shows their traceback too.
    Any other exception is a bug and keeps its traceback.
  - --help exits 0 (absl's exits 1).
  - run as the command itself (`python -m ...`), it first re-executes the command once with
    a malloc that keeps freed memory in transparent huge pages (jemalloc where installed,
    else glibc's huge pages), where that helps (`host_memory`; `fast_malloc=False` for the
    converters, which gain nothing from it).
"""

from __future__ import annotations

import difflib
import importlib.metadata
import logging as logging_std
import os
import re
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging

from arcvq_jax import host_memory

# Console lines longer than this are wrapped (the log prefix included).
MAX_WIDTH = 150
USER_ERROR_STATUS = 2
HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull")

# The project's exceptions whose messages say what went wrong and how to fix it, by
# "module.Class", matched against the names of an error's class and its bases: this module
# imports none of them (no import cycles, no cost).
USER_ERRORS = (
  "arcvq_jax.data.idx.DataError",
  "arcvq_jax.checkpoint_files.CheckpointError",
  "arcvq_jax.checkpoint.CheckpointError",
  "arcvq_jax.api.TokenizerLoadError",
  "arcvq_jax.api.TokenizerInputError",
  "arcvq_jax.losses.lpips.LPIPSWeightsError",
  "arcvq_jax.evaluation.inception.InceptionWeightsError",
  "arcvq_jax.evaluation.fid.StatisticsError",
  "arcvq_jax.evaluate_samples.ImageSetError",
  "arcvq_jax.sample.SampleError",
  "arcvq_jax.train.prior_common.PriorSetupError",
  "arcvq_jax.train.loop.NonFiniteLossError",
  "arcvq_jax.distributed.DistributedSetupError",
  "arcvq_jax.convert.torch_load.UnsafeCheckpointError",
  "arcvq_jax.convert.torch_load.CheckpointReadError",
  "arcvq_jax.convert.torch_checkpoint.ConversionError",
  "arcvq_jax.convert.workdir.WorkdirError",
  "arcvq_jax.workdir.WorkdirError",
)


class UserError(Exception):
  """An error the user can fix (a path, a flag, a file); the message says what, where and
  how to fix it. Raise it (or one of USER_ERRORS) and `run` prints the message alone."""


def _argv_verbosity(argv: Sequence[str]) -> int:
  """--verbosity / -v as given on the command line (0 if absent), before flags are parsed."""
  for i, arg in enumerate(argv):
    for name in ("--verbosity", "-verbosity", "--v", "-v"):
      value = None
      if arg.startswith(name + "="):
        value = arg.split("=", 1)[1]
      elif arg == name and i + 1 < len(argv):
        value = argv[i + 1]
      if value is not None:
        try:
          return int(value)
        except ValueError:
          return 0
  return 0


def quiet_native_libraries(argv: Sequence[str] | None = None) -> None:
  """TensorFlow's C++ start-up notices off (oneDNN, absl::InitializeLog), unless the command
  line asks for --verbosity >= 1. Takes effect only before TensorFlow is imported; values
  already in the environment are kept. TF_ENABLE_ONEDNN_OPTS=0 touches TensorFlow's own ops
  only (TFDS preparation here), not JAX's."""
  if _argv_verbosity(sys.argv if argv is None else argv) > 0:
    return
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "1")
  os.environ.setdefault("TF_ENABLE_ONEDNN_OPTS", "0")


quiet_native_libraries()

_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__)) + os.sep


class _ProjectInfoOnly(logging_std.Filter):
  """Keeps warnings and errors of everyone, INFO and DEBUG lines of this project only."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    if record.levelno >= logging_std.WARNING:
      return True
    path = os.path.abspath(record.pathname)
    return path.startswith(_PACKAGE_DIR) or record.name == "__main__"


class _NotReturnedNone(logging_std.Filter):
  """Drops ml_collections' warning that get_config() returned None: `run` reports that as
  the error it is (one line), and the warning would come before it."""

  def filter(self, record: logging_std.LogRecord) -> bool:
    return "get_config() returned None" not in str(record.msg)


def wrap(text: str, width: int = MAX_WIDTH, indent: str = "    ") -> str:
  """`text` in lines of at most `width` characters, broken between sentences where that
  suffices, else between words (never inside `...` or '...' quotes, which usually hold a
  command); further lines are indented. Lines of an unbreakable word stay long."""
  out: list[str] = []
  for paragraph in text.split("\n"):
    first = not out
    lead = "" if first else indent
    if len(lead) + len(paragraph) <= width:
      out.append(lead + paragraph)
      continue
    # Split into breakable units: quoted spans are glued to their neighbours.
    units = re.findall(r"(?:`[^`]{0,100}`|(?<!\w)'[^']{0,100}'|\S)+", paragraph)
    line = lead
    for unit in units:
      if line.strip() and len(line) + 1 + len(unit) > width:
        out.append(line)
        line = indent
      line += ("" if not line.strip() else " ") + unit
    if line.strip():
      out.append(line)
  return "\n".join(out)


class _ShortFormatter(logging_std.Formatter):
  """absl's prefix without microseconds and thread id ("I1126 10:43:47 tokenizer.py:66] "),
  the message wrapped at MAX_WIDTH."""

  def format(self, record: logging_std.LogRecord) -> str:
    t = time.localtime(record.created)
    level = record.levelname[:1] if record.levelname else "I"
    prefix = f"{level}{t.tm_mon:02d}{t.tm_mday:02d} {time.strftime('%H:%M:%S', t)} "
    prefix += f"{record.filename}:{record.lineno}] "
    message = super().format(record)
    return wrap(prefix + message)


def setup_logging(verbosity: int | None = None) -> None:
  """Library chatter off and short lines for verbosity <= 0 (default: --verbosity);
  absl's own full format and every library's INFO lines otherwise."""
  if verbosity is None:
    verbosity = flags.FLAGS["verbosity"].value if "verbosity" in flags.FLAGS else 0
  handler = logging.get_absl_handler()
  if verbosity > 0:
    return
  if not any(isinstance(f, _ProjectInfoOnly) for f in handler.filters):
    handler.addFilter(_ProjectInfoOnly())
  handler.python_handler.setFormatter(_ShortFormatter())


def is_user_error(error: BaseException) -> bool:
  """Whether `error` is one the user can fix from its message (see USER_ERRORS), including
  config.validate's ValueErrors, which name the key ('config.arc.top_k: ...')."""
  if isinstance(error, UserError | app.UsageError):
    return True
  # By name, the error's class and its bases: a command run as `python -m arcvq_jax.X` is
  # the module __main__, so its own errors are __main__.Class, not arcvq_jax.X.Class.
  main_spec = getattr(sys.modules.get("__main__"), "__spec__", None)
  for cls in type(error).__mro__:
    module = cls.__module__
    if module == "__main__" and main_spec is not None:
      module = main_spec.name
    if f"{module}.{cls.__qualname__}" in USER_ERRORS:
      return True
  return isinstance(error, ValueError) and str(error).startswith("config.")


def _debug() -> bool:
  if os.environ.get("ARCVQ_DEBUG", "") not in ("", "0"):
    return True
  return "debug" in flags.FLAGS and flags.FLAGS["debug"].value


def fail(message: str) -> NoReturn:
  """Prints "error: message" (wrapped) to stderr and exits with USER_ERROR_STATUS."""
  logging.flush()
  print(wrap(f"error: {message}"), file=sys.stderr, flush=True)
  sys.exit(USER_ERROR_STATUS)


def _error_message(error: BaseException) -> str:
  if isinstance(error, app.UsageError):
    return f"{error} (see --help)"
  text = str(error).strip() or type(error).__name__
  return text


# ---------------------------------------------------------------------------- config flags


def _overrides(argv: Sequence[str], name: str) -> list[str]:
  return [a for a in argv[1:] if a.startswith((f"--{name}.", f"-{name}."))]


def _config_error(error: BaseException, argv: Sequence[str], name: str) -> str | None:
  """A one-line message for the errors ml_collections raises for --NAME.KEY=VALUE overrides
  of a loaded config, or None for an error that is not about them."""
  text = str(error)
  path = _given(argv, name) or ""
  # "Attribute <class 'int'>.x does not exist ... Attempting to lookup: model.hidden.x"
  into_value = re.search(r"<class '(\w+)'>\.(\w+) does not exist.*lookup: ([\w.]+)", text)
  if isinstance(error, AttributeError | KeyError) and into_value:
    kind, key, lookup = into_value.groups()
    parent = lookup[: -len(key) - 1]
    return (
      f"--{name}.{lookup}: {parent} of the config {path} is a value ({kind}), not a group of "
      f"keys, so it has no key {key!r}. Give the key path of a value, e.g. --{name}.{parent}=VALUE."
    )
  suggestion = re.search(r'Did you mean "([^"]+)" instead of "([^"]+)"', text)
  missing = re.match(r"""\W*'?([\w.]+)'?""", text.splitlines()[0] if text else "")
  if isinstance(error, AttributeError | KeyError) and (suggestion or missing):
    key = suggestion.group(2) if suggestion else missing.group(1)
    arg = next(
      (a for a in _overrides(argv, name) if key in re.split(r"[.=]", a.split("=")[0])), None
    )
    where = arg.split("=")[0] if arg else f"a --{name}.KEY override"
    hint = f" Did you mean {suggestion.group(1)!r}?" if suggestion else ""
    return (
      f"{where}: the config {path} has no key {key!r}.{hint} Overrides can only set keys "
      f"the config file defines (--{name}.KEY=VALUE)."
    )
  if isinstance(error, TypeError | AttributeError | KeyError) and _overrides(argv, name):
    names = [a.split("=")[0] for a in _overrides(argv, name)]
    which = names[0] if len(names) == 1 else f"one of {' '.join(names)}"
    return (
      f"{which} cannot be applied to the config {path} ({text}): a key path must lead "
      "through groups of keys to a value."
    )
  return None


def _config_flag_names() -> list[str]:
  """The flags of ml_collections' DEFINE_config_file (--config, --sweep, ...) of the command."""
  return sorted(
    {flags.FLAGS[n].name for n in flags.FLAGS if type(flags.FLAGS[n]).__name__ == "_ConfigFlag"}
  )


def _given(argv: Sequence[str], name: str) -> str | None:
  """The value of --NAME=VALUE on the command line (the last one), or None."""
  given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith((f"--{name}=", f"-{name}="))]
  return given[-1] if given else None


def _example(name: str) -> str:
  return "configs/sweeps/zoo.py" if name == "sweep" else "configs/demo.py"


def _model_file(name: str) -> str:
  """A small config file of the kind --NAME takes, to copy from."""
  return "configs/sweeps/tiny.py" if name == "sweep" else "configs/tiny.py"


def _where_in(error: BaseException, path: str) -> str:
  """' (FILE, line N)' of the deepest place inside the file `path` that `error` passed."""
  real = os.path.realpath(path)
  if isinstance(error, SyntaxError) and os.path.realpath(error.filename or "") == real:
    return f" ({path}, line {error.lineno})"
  frames = traceback.extract_tb(error.__traceback__)
  lines = [f.lineno for f in frames if os.path.realpath(f.filename) == real]
  return f" ({path}, line {lines[-1]})" if lines else ""


def _loading_flag(error: BaseException) -> str | None:
  """The name of the config flag whose file was being loaded when `error` was raised (a
  frame of ml_collections' config file parser on its traceback), or None."""
  for frame, _ in traceback.walk_tb(error.__traceback__):
    parser = frame.f_locals.get("self")
    if type(parser).__name__ == "ConfigFileFlagParser":
      return getattr(parser, "name", None)
  return None


def _load_failure(name: str, spec: str, error: BaseException) -> str:
  """The message for a config file (--NAME=spec) whose loading raised `error`."""
  file = spec.split(":", 1)[0]
  if isinstance(error, AttributeError) and "get_config" in str(error):
    return (
      f"--{name}={spec}: the file defines no get_config() function. A config file defines "
      f"get_config() returning an ml_collections.ConfigDict (see {_model_file(name)})."
    )
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  if isinstance(error, SyntaxError):
    text = error.msg or text
  cause = f"{type(error).__name__}: {text}" if text else type(error).__name__
  return (
    f"--{name}={spec}: the file failed to load: {cause}{_where_in(error, file)}. Fix the file "
    f"(--debug shows the traceback), or give another one, e.g. --{name}={_example(name)}."
  )


_NO_CONFIG = object()


def _config_in_traceback(error: BaseException, name: str) -> Any:
  """The config that --NAME's file gave, where `error` was raised while the overrides were
  applied to it (ml_collections' flag had not stored it yet), else _NO_CONFIG."""
  for frame, _ in traceback.walk_tb(error.__traceback__):
    flag = frame.f_locals.get("self")
    if type(flag).__name__ == "_ConfigFlag" and flag.name == name and "config" in frame.f_locals:
      return frame.f_locals["config"]
  return _NO_CONFIG


def _config_value_problem(name: str, argv: Sequence[str], value: Any) -> str | None:
  """A message where --NAME=FILE was given but `value`, what loading it gave, is no config:
  the file failed to load (ml_collections keeps a stand-in that raises later), or
  get_config() returned None or something else than a ConfigDict."""
  spec = _given(argv, name)
  if spec is None:
    return None
  file = spec.split(":", 1)[0]
  if not file:
    return f"--{name}= is empty: give a config file, e.g. --{name}={_example(name)}."
  if type(value).__name__ == "_ErrorConfig":
    if not os.path.isfile(file):
      what = "is a directory, not a config file" if os.path.isdir(file) else "no such config file"
      return (
        f"--{name}={spec}: {what} (relative to {os.getcwd()}). Give a file "
        f"under configs/, e.g. --{name}={_example(name)} (':variant' after it picks a variant)."
      )
    return _load_failure(name, spec, object.__getattribute__(value, "_error"))
  if value is None or not hasattr(value, "keys"):
    got = "None (is its return statement missing?)" if value is None else type(value).__name__
    return (
      f"--{name}={spec}: get_config() returned {got}; it must return an "
      f"ml_collections.ConfigDict (see {_model_file(name)})."
    )
  return None


def _config_keys(config: Any, prefix: str = "") -> list[str]:
  """Every key path of a ConfigDict ('batch_size', 'optimizer.lr', ...)."""
  out = []
  for key in getattr(config, "keys", list)():
    path = f"{prefix}{key}"
    out.append(path)
    value = config[key]
    if hasattr(value, "keys") and not isinstance(value, dict):
      out += _config_keys(value, f"{path}.")
  return out


def _unknown_flag_message(error: flags.Error, names: Sequence[str]) -> str | None:
  """Where an unknown flag (--batch_size) names a key of a loaded config: the message that
  says so and gives the override (--config.batch_size=VALUE); None otherwise."""
  unknown = getattr(error, "flagname", None)
  if not isinstance(error, flags.UnrecognizedFlagError) or not unknown:
    return None
  for name in names:
    value = flags.FLAGS[name].value
    if value is None or type(value).__name__ == "_ErrorConfig" or not hasattr(value, "keys"):
      continue
    keys = _config_keys(value)
    matches = [k for k in keys if k == unknown or k.endswith(f".{unknown}")]
    if matches:
      sets = " or ".join(f"--{name}.{k}=VALUE" for k in matches[:3])
      return (
        f"unknown flag --{unknown}: {unknown!r} is a key of the --{name} file; set it with "
        f"{sets} (see --help for the flags)."
      )
    leaves = {k.rsplit(".", 1)[-1]: k for k in reversed(keys)}
    close = difflib.get_close_matches(unknown, list(leaves), n=1, cutoff=0.8)
    if close:
      override = f"the config key --{name}.{leaves[close[0]]}=VALUE?"
      if "Did you mean" in str(error):  # absl's own suggestions, of flags
        return f"{error} Or {override}"
      return f"unknown flag --{unknown}: did you mean {override} (see --help for the flags)"
  return None


def _override_type_message(text: str, names: Sequence[str]) -> str | None:
  """For absl's "flag --config.KEY=VALUE: <parse error>": the message that names the key's
  type and its value in the config; None for any other flag."""
  for name in names:
    match = re.match(rf"flag --{re.escape(name)}\.([\w.]+)=(.*?): (.*)", text, re.S)
    value = flags.FLAGS[name].value
    if not match or value is None or type(value).__name__ == "_ErrorConfig":
      continue
    key, given, detail = match.groups()
    try:
      current = value
      for part in key.split("."):
        current = current[part]
    except (KeyError, TypeError, AttributeError):
      return None
    kind = type(current).__name__
    kind = f"{'an' if kind[0] in 'aeiou' else 'a'} {kind}"
    return (
      f"--{name}.{key}={given}: config.{key} takes {kind} ({current!r} in the config), and "
      f"{given!r} is not one ({detail.splitlines()[0]}). Give {kind}."
    )
  return None


def _debug_requested(argv: Sequence[str]) -> bool:
  """--debug on the command line or ARCVQ_DEBUG=1, before the flags are parsed."""
  if os.environ.get("ARCVQ_DEBUG", "") not in ("", "0"):
    return True
  return any(re.fullmatch(r"--?debug(=(1|[tT]rue))?", a) for a in argv[1:])


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config files loaded here (ml_collections loads them lazily),
  so that a wrong path or key, or a config file that fails to load, ends in one message
  (--debug: with the traceback of its cause)."""
  names = _config_flag_names()

  def stop(message: str) -> NoReturn:
    if _debug_requested(argv):
      raise UserError(message)  # chained to the error being handled, if any
    fail(message)

  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    for name in names:
      value = flags.FLAGS[name].value
      if value is not None or "must have a value other than None" in text:
        message = _config_value_problem(name, argv, value)
        if message:
          stop(message)
    cause = [ln.strip() for ln in text.splitlines() if re.match(r"\s*\w*Error: ", ln)]
    if cause:  # an exception raised inside the config file, e.g. an unknown variant
      text = f"{text.splitlines()[0].split(':')[0]}: {cause[-1].split(': ', 1)[1]}"
    elif isinstance(e, flags.IllegalFlagValueError):
      text = _override_type_message(text, names) or text
      if not text.endswith("."):
        text += " (see --help for its values)"  # e.g. "-5 is not a positive integer"
    stop(_unknown_flag_message(e, names) or text)
  except Exception as e:
    loading = _loading_flag(e)
    if loading is not None and _given(argv, loading) is not None:
      stop(_load_failure(loading, _given(argv, loading), e))
    for name in names:
      config = _config_in_traceback(e, name)
      value = flags.FLAGS[name].value if config is _NO_CONFIG else config
      message = _config_value_problem(name, argv, value) or _config_error(e, argv, name)
      if message:
        stop(message)
    raise
  for name in names:
    if flags.FLAGS[name].present:
      message = _config_value_problem(name, argv, flags.FLAGS[name].value)
      if message:
        stop(message)
  return rest


# ------------------------------------------------------------------------------- workdirs


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
  """Creates a local `workdir` if needed and checks that files can be written there; a
  UserError naming the directory and the fix otherwise. Remote paths (gs://) are left to the
  first write."""
  if not workdir.strip():
    raise UserError(f"{flag} is empty: give a directory, e.g. {flag}=/tmp/arcvq_run.")
  if "://" in workdir:
    return
  path = os.path.abspath(os.path.expanduser(workdir))
  if os.path.exists(path) and not os.path.isdir(path):
    raise UserError(f"{flag}={workdir} is a file, not a directory. Give a directory.")
  try:
    os.makedirs(path, exist_ok=True)
    probe = os.path.join(path, f".write_test.{os.getpid()}")
    with open(probe, "w") as f:
      f.write("")
    os.remove(probe)
  except OSError as e:
    raise UserError(
      f"{flag}={workdir} cannot be written ({e.strerror or e}). Give a directory you can "
      f"write to, e.g. {flag}=/tmp/arcvq_run."
    ) from e


# ------------------------------------------------------------------------------------ run


# The oldest jax the project runs on (pyproject.toml's floor; a test keeps the two equal):
# below it `threefry_batching` cannot re-bind jax's primitives (jax 0.9.1 and 0.8.3 failed
# on the first fresh state; 0.9.2 ran the demo, CI runs 0.10.2).
MIN_JAX_VERSION = "0.9.2"


def check_jax_version(installed: str | None = None) -> None:
  """Fails (one message, with the fix) where the installed jax is older than MIN_JAX_VERSION:
  a checkout run without `pip install` can meet an older jax, which fails deep inside."""
  if installed is None:
    try:
      installed = importlib.metadata.version("jax")
    except importlib.metadata.PackageNotFoundError:
      fail("jax is not installed. Run `bash launch/setup.sh` (or pip install -e .).")

  def parts(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])

  if parts(installed) < parts(MIN_JAX_VERSION):
    fail(
      f"jax {installed} is older than this project needs ({MIN_JAX_VERSION}). Upgrade it: "
      f"pip install -U 'jax>={MIN_JAX_VERSION}' (with its accelerator plugin, e.g. "
      "'jax[cuda12]', where you use one), or run `bash launch/setup.sh`."
    )


def _guarded(main: Callable[[list[str]], Any]) -> Callable[[list[str]], Any]:
  def guarded_main(argv: list[str]) -> Any:
    setup_logging()
    check_jax_version()
    try:
      return main(argv)
    except Exception as e:
      if not is_user_error(e) or _debug():
        raise
      fail(_error_message(e))

  return guarded_main


def run(
  main: Callable[[list[str]], Any], argv: list[str] | None = None, fast_malloc: bool = True
) -> None:
  """absl's app.run(main) with the project's logging and error handling (module docstring).

  fast_malloc: run as the command itself, start over once with the malloc of `host_memory`
  where that helps (jemalloc, else glibc's huge pages; it costs the command's imports again,
  ~1 s: the one-shot converters leave it out)."""
  if "debug" not in flags.FLAGS:
    flags.DEFINE_bool(
      "debug",
      False,
      "Show the Python traceback of every error (errors you can fix print one message).",
    )
  own_command_line = argv is None and getattr(main, "__module__", None) == "__main__"
  argv = list(sys.argv if argv is None else argv)
  wants_help = any(a in HELP_FLAGS for a in argv[1:])
  if fast_malloc and own_command_line and not wants_help:
    # Before any flag is parsed or file written: the command may start over once, in place.
    host_memory.reexec_with_fast_malloc()
  quiet_native_libraries(argv)
  absl_logger = logging.get_absl_logger()
  if not any(isinstance(f, _NotReturnedNone) for f in absl_logger.filters):
    absl_logger.addFilter(_NotReturnedNone())
  try:
    app.run(_guarded(main), argv=argv, flags_parser=_parse_flags)
  except SystemExit as e:
    if wants_help and e.code == 1:  # absl exits 1 after printing the help
      sys.exit(0)
    raise
