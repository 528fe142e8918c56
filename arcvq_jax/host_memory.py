"""The commands' malloc: memory a step frees kept for the next, in transparent huge pages.

XLA:CPU allocates a step's temporaries afresh at every step. glibc's malloc serves blocks
above its mmap threshold (at most 32 MiB) with a fresh mmap and returns them with munmap, so
every step page-faults its whole working set in again, zeroed by the kernel (the VQ-VAE step
at batch 1024: ~190k faults and ~0.3 s of system time per step in 4 KiB pages; ~800 faults
and ~0.2 s in huge pages). glibc cannot keep such blocks (its mmap threshold stops at 32 MiB,
a thread's arena at 64 MiB; one arena for all threads makes XLA's threads queue on its lock).

So the commands start with, in this order of preference:
1. jemalloc, where the system has it (Debian / Ubuntu's `libjemalloc2`, which
   launch/setup.sh installs when it runs as root), preloaded with JEMALLOC_CONF: freed pages
   are never returned to the kernel (reused by the next step: no faults, no zeroing) and
   jemalloc asks for transparent huge pages. Preloading an allocator is how Intel's and
   PyTorch's CPU performance guides run training; it costs resident memory: the peak of
   the process stays mapped (the demo: 1.2-1.3 GB instead of 0.9 GB peak RSS).
2. else glibc's malloc asking for transparent huge pages (glibc >= 2.35, the kernel's THP
   mode 'madvise', the default of most distributions): GLIBC_TUNABLES=glibc.malloc.hugetlb=1,
   a 2 MiB page per fault instead of 4 KiB ones.
Measured on 2-core CPUs (docs/performance.md, "The malloc and the CPU libraries"): the VQ-VAE step
at batch 128 1.16-1.17x faster with jemalloc than with glibc's huge pages (Intel host), which
made `python -m arcvq_jax.main` 1.17x faster than glibc as it comes (AMD host).

Only for what was measured: training and evaluation on the CPU. A host where JAX runs on an
accelerator keeps the system malloc (`accelerator`): there the host only feeds the device, and
nobody measured a preloaded allocator there. It is told before jax is imported, from what JAX
itself decides by: JAX_PLATFORMS where set (any platform other than 'cpu' named: an
accelerator), else an accelerator plugin installed (a `jax_plugins` module such as
xla_cuda12, a jax_cuda*/jax_rocm* plugin, or libtpu) together with its device files
(/dev/nvidia0.. or WSL's /dev/dxg for CUDA, /dev/kfd for ROCm, /dev/accel0.. or /dev/vfio/N
for TPUs). A plugin without its device (JAX then falls back to the CPU) or a device without a
plugin counts as a CPU host.

The C library reads these variables once, when the process starts, so `cli.run` re-executes
the command with them (`reexec_with_fast_malloc`) before it parses a flag: the same
interpreter, arguments and process id. The restarted process then takes the variables it was
given back out of os.environ (RESTORE_VARIABLE records their earlier values), so that its
children (grain's data-loading workers, a compiler, any subprocess) start on the system
malloc while it keeps jemalloc; settings the user made stay. Nothing happens where the user
chose: GLIBC_TUNABLES naming glibc.malloc.hugetlb (=0: glibc as it comes; =1: glibc's huge
pages, no jemalloc), or an allocator already in LD_PRELOAD (children inherit those); nor
where nothing can help, under a debugger, for --help, or where `cli.run` is called from
Python rather than as the command.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import pkgutil
import platform
import re
import sys
from collections.abc import Iterable, Mapping, MutableMapping, Sequence

TUNABLE = "glibc.malloc.hugetlb"
JEMALLOC = "libjemalloc.so.2"
# Dirty and muzzy pages never purged: what a step frees stays mapped for the next one.
JEMALLOC_CONF = "thp:always,dirty_decay_ms:-1,muzzy_decay_ms:-1"
# Allocators a user may already preload (then the choice is theirs).
ALLOCATORS = ("jemalloc", "tcmalloc", "mimalloc")
# ELF e_machine of the architectures jemalloc is looked for on (a preload of another
# architecture's library is ignored with a message at every start).
ELF_MACHINES = {"x86_64": 62, "aarch64": 183}
# glibc 2.35 added the tunable; older ones ignore it, so re-executing would buy nothing.
MIN_GLIBC = (2, 35)
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"
# The variables the restart sets, and the one that records their values before it (JSON,
# {name: value or null}) for the restarted process to put back.
MALLOC_VARIABLES = ("LD_PRELOAD", "MALLOC_CONF", "GLIBC_TUNABLES")
RESTORE_VARIABLE = "ARCVQ_MALLOC_RESTORE"
# Accelerator kind -> the device files (globs under /dev) that its JAX plugin drives.
ACCELERATOR_DEVICES = {
  "cuda": ("nvidia[0-9]*", "dxg"),
  "rocm": ("kfd",),
  "tpu": ("accel[0-9]*", "vfio/[0-9]*"),
}


def plugin_kind(name: str) -> str | None:
  """The accelerator a JAX plugin module or package name is for ('cuda', 'rocm', 'tpu'), or
  None (e.g. 'xla_cuda12', 'jax_cuda12_plugin' -> 'cuda'; 'libtpu' -> 'tpu')."""
  name = name.lower()
  for kind in ACCELERATOR_DEVICES:
    if kind in name:
      return kind
  return None


def installed_jax_plugins() -> list[str]:
  """Names of the accelerator plugins JAX would load, found without importing jax: the
  modules of the `jax_plugins` namespace package, the jax_cuda*/jax_rocm* plugin packages and
  libtpu (importlib's finders only: nothing is imported)."""
  found: list[str] = []
  try:
    spec = importlib.util.find_spec("jax_plugins")
  except (ImportError, ValueError):
    spec = None
  if spec is not None and spec.submodule_search_locations:
    found += [m.name for m in pkgutil.iter_modules(list(spec.submodule_search_locations))]
  found += [
    m.name
    for m in pkgutil.iter_modules()
    if re.fullmatch(r"jax_(cuda|rocm)\d*_plugin|libtpu", m.name)
  ]
  return sorted(set(found))


def accelerator(
  environ: Mapping[str, str], plugins: Iterable[str], dev: str = "/dev"
) -> str | None:
  """The accelerator JAX would run this process on ('cuda', 'rocm', 'tpu', or the platform
  JAX_PLATFORMS names), or None for the CPU (module docstring).

  plugins: installed plugin names (`installed_jax_plugins`); dev: where device files are."""
  platforms = [
    p.strip().lower()
    for p in (environ.get("JAX_PLATFORMS") or environ.get("JAX_PLATFORM_NAME") or "").split(",")
    if p.strip()
  ]
  if platforms:  # JAX takes exactly these (the first that works): the user's choice
    return next((p for p in platforms if p != "cpu"), None)
  for kind in sorted({plugin_kind(p) for p in plugins} - {None}):
    if any(glob.glob(os.path.join(dev, pattern)) for pattern in ACCELERATOR_DEVICES[kind]):
      return kind
  return None


def thp_mode(path: str = THP_ENABLED) -> str | None:
  """The kernel's transparent-huge-page mode ('always', 'madvise' or 'never'; the bracketed
  word of `path`), or None where the file is missing (not Linux, or THP not built in)."""
  try:
    with open(path) as f:
      chosen = re.search(r"\[(\w+)\]", f.read())
  except OSError:
    return None
  return chosen.group(1) if chosen else None


def glibc_version() -> tuple[int, ...] | None:
  """The running C library's version if it is glibc, else None (musl, macOS, Windows)."""
  try:
    found = os.confstr("CS_GNU_LIBC_VERSION")  # "glibc 2.36": the library loaded, not a guess
  except (AttributeError, ValueError, OSError):
    return None
  chosen = re.fullmatch(r"glibc (\d+)\.(\d+).*", found or "")
  return (int(chosen.group(1)), int(chosen.group(2))) if chosen else None


def find_jemalloc(dirs: Sequence[str] | None = None, machine: str | None = None) -> str | None:
  """The path of a jemalloc for this machine (JEMALLOC in the C library's usual directories
  and this environment's lib/), or None. machine: platform.machine() by default."""
  machine = machine or platform.machine()
  if machine not in ELF_MACHINES or not sys.platform.startswith("linux"):
    return None
  if dirs is None:
    dirs = (
      f"/usr/lib/{machine}-linux-gnu",
      f"/lib/{machine}-linux-gnu",
      "/usr/lib64",
      "/usr/lib",
      "/usr/local/lib",
      os.path.join(sys.prefix, "lib"),
    )
  for d in dirs:
    path = os.path.join(d, JEMALLOC)
    if _is_elf_for(path, ELF_MACHINES[machine]):
      return path
  return None


def _is_elf_for(path: str, machine: int) -> bool:
  """Whether path is a 64-bit little-endian ELF file for the ELF machine `machine`."""
  try:
    with open(path, "rb") as f:
      head = f.read(20)
  except OSError:
    return False
  return (
    len(head) == 20
    and head[:6] == b"\x7fELF\x02\x01"
    and int.from_bytes(head[18:20], "little") == machine
  )


def start_environment(
  environ: Mapping[str, str],
  glibc: tuple[int, ...] | None,
  mode: str | None,
  jemalloc: str | None,
) -> dict[str, str] | None:
  """The variables to (re)start the process with, added to `environ`, or None where it should
  run as it is (module docstring): jemalloc preloaded where `jemalloc` (its path) is given,
  else glibc's huge-page tunable where glibc >= 2.35 and THP mode is 'madvise' ('never': none
  at all; 'always': the kernel gives them without asking). Nothing where GLIBC_TUNABLES
  already names the tunable (the user's choice, or this process was already restarted) or
  LD_PRELOAD already holds an allocator."""
  current = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in current:
    return None
  preload = environ.get("LD_PRELOAD", "")
  if any(name in preload for name in ALLOCATORS):
    return None
  tunables = f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"
  if jemalloc is not None:
    return {
      "LD_PRELOAD": f"{jemalloc}:{preload}" if preload else jemalloc,
      # the user's jemalloc settings, where given, win
      "MALLOC_CONF": environ.get("MALLOC_CONF") or JEMALLOC_CONF,
      # marks the restart; glibc's malloc serves nothing once jemalloc is preloaded
      "GLIBC_TUNABLES": tunables,
    }
  if glibc is None or glibc < MIN_GLIBC or mode != "madvise":
    return None
  return {"GLIBC_TUNABLES": tunables}


def start_environment_for_this_host(environ: Mapping[str, str]) -> dict[str, str] | None:
  """`start_environment` for this machine's glibc, THP mode and jemalloc; None on a host
  whose JAX runs on an accelerator (`accelerator`), where none of it was measured."""
  if accelerator(environ, installed_jax_plugins()) is not None:
    return None
  return start_environment(environ, glibc_version(), thp_mode(), find_jemalloc())


def restore_record(environ: Mapping[str, str], changes: Mapping[str, str]) -> str:
  """RESTORE_VARIABLE's value for a restart with `changes`: the earlier value of each changed
  variable (null where it was unset), as JSON."""
  return json.dumps({k: environ.get(k) for k in changes}, sort_keys=True)


def restore_environment(environ: MutableMapping[str, str]) -> bool:
  """Puts back in `environ` the values that RESTORE_VARIABLE recorded before the restart
  (unsetting those that were unset) and removes it; whether there was a record. A record that
  cannot be read is dropped, leaving the variables as they are."""
  record = environ.pop(RESTORE_VARIABLE, None)
  if record is None:
    return False
  try:
    earlier = json.loads(record)
  except ValueError:
    return True
  if not isinstance(earlier, dict):
    return True
  for name, value in earlier.items():
    if name not in MALLOC_VARIABLES:  # only ever the malloc's variables
      continue
    if value is None:
      environ.pop(name, None)
    elif isinstance(value, str):
      environ[name] = value
  return True


def malloc_of(environ: Mapping[str, str]) -> str:
  """Which malloc a process started with `environ` runs: 'jemalloc', 'glibc huge pages' or
  'glibc'."""
  if "jemalloc" in environ.get("LD_PRELOAD", ""):
    return "jemalloc"
  if f"{TUNABLE}=1" in environ.get("GLIBC_TUNABLES", ""):
    return "glibc huge pages"
  return "glibc"


def reexec_with_fast_malloc() -> str:
  """Re-executes this process's command line (sys.orig_argv: same interpreter options and
  arguments; same process id) with `start_environment_for_this_host`'s variables, where it
  gives any; returns otherwise (also if the exec fails: the command then runs as it is).

  In the restarted process it returns at once, after taking the variables it added back out
  of os.environ (`restore_environment`). Returns the malloc this process runs (`malloc_of`
  of the environment it started with)."""
  running = malloc_of(os.environ)
  if restore_environment(os.environ):  # the restarted process: children get the system's
    return running
  # A debugger would start over in the new image; keep the session the user is in.
  # (absl imports pdb in every command, so pdb is told by the command line).
  run_under = sys.orig_argv[sys.orig_argv.index("-m") + 1] if "-m" in sys.orig_argv else None
  if sys.gettrace() is not None or run_under == "pdb" or {"debugpy", "pydevd"} & set(sys.modules):
    return running
  changes = start_environment_for_this_host(os.environ)
  if changes is None:
    return running
  env = dict(os.environ, **changes, **{RESTORE_VARIABLE: restore_record(os.environ, changes)})
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:
    return running
