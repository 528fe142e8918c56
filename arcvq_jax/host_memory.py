"""Transparent huge pages for the host's large buffers: the commands ask glibc's malloc for them.

XLA:CPU allocates a step's temporaries afresh at every step. glibc's malloc serves blocks
above its mmap threshold (at most 32 MiB) with a fresh mmap and returns them with munmap, so
every step page-faults its whole working set in again, 4 KiB at a time, zeroed by the kernel
(the VQ-VAE step at batch 1024: ~190k faults and ~0.3 s of system time per step). Where the
kernel backs memory with transparent huge pages only on request (THP mode 'madvise', the
default of most distributions), glibc 2.35 and later requests them for its large blocks when
the process starts with GLIBC_TUNABLES=glibc.malloc.hugetlb=1: a 2 MiB page per fault
instead of a 4 KiB one. Measured on a 2-core CPU (README, Performance, "Huge pages"): the
bare VQ-VAE step at batch 1024 1020 -> 850 ms; `python -m arcvq_jax.main` 996 -> 872 ms per
step at batch 1024 and 115 -> 96 ms at 128, with the same peak resident set.

glibc reads its tunables once, when the process starts, so `cli.run` re-executes the command
with the tunable added (`reexec_with_huge_pages`) before it parses a flag: the same
interpreter, arguments and process id. Nothing happens where it cannot help (not Linux with
glibc >= 2.35, THP 'never' or 'always'), where the user chose (any glibc.malloc.hugetlb in
GLIBC_TUNABLES: GLIBC_TUNABLES=glibc.malloc.hugetlb=0 opts out), under a debugger, for
--help, or where `cli.run` is called from Python rather than as the command.
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping

TUNABLE = "glibc.malloc.hugetlb"
# glibc 2.35 added the tunable; older ones ignore it, so re-executing would buy nothing.
MIN_GLIBC = (2, 35)
THP_ENABLED = "/sys/kernel/mm/transparent_hugepage/enabled"


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


def tunables_with_huge_pages(
  environ: Mapping[str, str], glibc: tuple[int, ...] | None, mode: str | None
) -> str | None:
  """The GLIBC_TUNABLES value to start the process with, or None where the process should run
  as it is: glibc too old or absent, THP not given on request (mode 'never': none at all;
  'always': the kernel gives them without asking), or GLIBC_TUNABLES already naming the
  tunable (the user's choice, or this process was already re-executed)."""
  if glibc is None or glibc < MIN_GLIBC or mode != "madvise":
    return None
  current = environ.get("GLIBC_TUNABLES", "")
  if TUNABLE in current:
    return None
  return f"{current}:{TUNABLE}=1" if current else f"{TUNABLE}=1"


def tunables_for_this_host(environ: Mapping[str, str]) -> str | None:
  """`tunables_with_huge_pages` for this machine's glibc and THP mode."""
  return tunables_with_huge_pages(environ, glibc_version(), thp_mode())


def reexec_with_huge_pages() -> None:
  """Re-executes this process's command line (sys.orig_argv: same interpreter options and
  arguments; same process id) with glibc's huge-page tunable set, where
  `tunables_with_huge_pages` says it helps; returns otherwise (also if the exec fails: the
  command then runs as it is)."""
  # A debugger would start over in the new image; keep the session the user is in.
  # (absl imports pdb in every command, so pdb is told by the command line).
  run_under = sys.orig_argv[sys.orig_argv.index("-m") + 1] if "-m" in sys.orig_argv else None
  if sys.gettrace() is not None or run_under == "pdb" or {"debugpy", "pydevd"} & set(sys.modules):
    return
  tunables = tunables_for_this_host(os.environ)
  if tunables is None:
    return
  env = dict(os.environ, GLIBC_TUNABLES=tunables)
  for stream in (sys.stdout, sys.stderr):
    stream.flush()
  try:
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError:
    return
