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
    unknown config key, a wrong config path, a workdir that cannot be written, ...) print one
    message, "error: what, where, the fix", and exit with status 2; --debug (or ARCVQ_DEBUG=1)
    shows their traceback too. Any other exception is a bug and keeps its traceback.
  - --help exits 0 (absl's exits 1).
  - run as the command itself (`python -m ...`), it first re-executes the command once with
    a malloc that keeps freed memory in transparent huge pages (jemalloc where installed,
    else glibc's huge pages), where that helps (`host_memory`; `fast_malloc=False` for the
    converters, which gain nothing from it).
"""

from __future__ import annotations

import importlib.metadata
import logging as logging_std
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from absl import app, flags, logging

from arcvq_jax import host_memory

# Console lines longer than this are wrapped (the log prefix included).
MAX_WIDTH = 150
USER_ERROR_STATUS = 2
HELP_FLAGS = ("--help", "-help", "-?", "--helpshort", "-helpshort", "--helpfull", "-helpfull")

# The project's exceptions whose messages say what went wrong and how to fix it, by
# "module.Class". Looked up in sys.modules only: an error of a module that was never imported
# cannot have been raised, and this module imports none of them (no import cycles, no cost).
USER_ERRORS = (
  "arcvq_jax.data.idx.DataError",
  "arcvq_jax.checkpoint_files.CheckpointError",
  "arcvq_jax.checkpoint.CheckpointError",
  "arcvq_jax.api.TokenizerLoadError",
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
  for name in USER_ERRORS:
    module_name, cls_name = name.rsplit(".", 1)
    cls = getattr(sys.modules.get(module_name), cls_name, None)
    if isinstance(cls, type) and isinstance(error, cls):
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
  """A one-line message for the errors ml_collections raises for --NAME=FILE and
  --NAME.KEY=VALUE, or None for an error that is not about them."""
  text = str(error)
  given = [a.split("=", 1)[1] for a in argv[1:] if a.startswith((f"--{name}=", f"-{name}="))]
  path = given[-1] if given else ""
  if "Failed loading config file" in text:
    file = path.split(":", 1)[0]
    if file and not os.path.exists(file):
      return (
        f"--{name}={path}: no such config file (relative to {os.getcwd()}). Give a file "
        "under configs/, e.g. --config=configs/demo.py (':variant' after it picks a variant)."
      )
    cause = [ln.strip() for ln in text.splitlines() if re.match(r"\s*\w*(Error|Exception):", ln)]
    return f"--{name}={path}: the config file failed to load: {cause[-1] if cause else text}"
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


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, with config files loaded here (ml_collections loads them lazily),
  so that a wrong path or key ends in one message."""
  config_flags = [
    name
    for name in ("config", "reference_config", "base_config")
    if name in flags.FLAGS and type(flags.FLAGS[name]).__name__ == "_ConfigFlag"
  ]
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    text = str(e)
    cause = [ln.strip() for ln in text.splitlines() if re.match(r"\s*\w*Error: ", ln)]
    if cause:  # an exception raised inside the config file, e.g. an unknown variant
      text = f"{text.splitlines()[0].split(':')[0]}: {cause[-1].split(': ', 1)[1]}"
    fail(text)
  except (AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    for name in config_flags:
      message = _config_error(e, argv, name)
      if message:
        fail(message)
    raise
  for name in config_flags:
    if flags.FLAGS[name].present:
      try:
        # A file that failed to load gives a stand-in that raises on any attribute.
        getattr(flags.FLAGS[name].value, "keys", None)
      except (OSError, ValueError, AttributeError, KeyError, TypeError) as e:
        message = _config_error(e, argv, name)
        if message is None:
          raise
        fail(message)
  return rest


# ------------------------------------------------------------------------------- workdirs


def check_workdir(workdir: str, flag: str = "--workdir") -> None:
  """Creates a local `workdir` if needed and checks that files can be written there; a
  UserError naming the directory and the fix otherwise. Remote paths (gs://) are left to the
  first write."""
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
  try:
    app.run(_guarded(main), argv=argv, flags_parser=_parse_flags)
  except SystemExit as e:
    if wants_help and e.code == 1:  # absl exits 1 after printing the help
      sys.exit(0)
    raise
