"""The commands start with glibc's malloc asked for transparent huge pages (`host_memory`):
when they re-execute, that they keep the process, its arguments and the user's own tunables,
and that the tunable gives a large buffer huge pages on this kernel."""

import os
import platform
import subprocess
import sys
import textwrap

import pytest

from arcvq_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUALIFIES = host_memory.tunables_for_this_host({}) is not None
needs_thp_on_request = pytest.mark.skipif(
  not QUALIFIES, reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'"
)


@pytest.mark.parametrize(
  ("environ", "glibc", "mode", "expected"),
  [
    ({}, (2, 36), "madvise", "glibc.malloc.hugetlb=1"),
    ({}, (2, 35), "madvise", "glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": "glibc.malloc.arena_max=2"}, (2, 36), "madvise",
     "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"),
    ({"GLIBC_TUNABLES": ""}, (2, 36), "madvise", "glibc.malloc.hugetlb=1"),
    # the user's choice, or a process already re-executed
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, (2, 36), "madvise", None),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, (2, 36), "madvise", None),
    ({}, (2, 34), "madvise", None),  # the tunable does not exist yet
    ({}, None, "madvise", None),  # musl, macOS
    ({}, (2, 36), "always", None),  # huge pages without asking
    ({}, (2, 36), "never", None),
    ({}, (2, 36), None, None),  # no THP at all
  ],
)  # fmt: skip
def test_tunables_only_where_they_help_and_the_user_left_them(environ, glibc, mode, expected):
  assert host_memory.tunables_with_huge_pages(environ, glibc, mode) == expected


def test_thp_mode_is_the_bracketed_word(tmp_path):
  path = tmp_path / "enabled"
  path.write_text("always [madvise] never\n")
  assert host_memory.thp_mode(str(path)) == "madvise"
  path.write_text("[always] madvise never\n")
  assert host_memory.thp_mode(str(path)) == "always"
  assert host_memory.thp_mode(str(tmp_path / "missing")) is None


def test_glibc_version_is_the_running_library():
  name, needed = platform.libc_ver()  # the newest glibc symbol the interpreter's binary uses
  if name != "glibc":
    assert host_memory.glibc_version() is None
    return
  try:
    ldd = subprocess.run(["ldd", "--version"], capture_output=True, text=True, check=True)
  except (OSError, subprocess.CalledProcessError):
    pytest.skip("no ldd to read the system's glibc version from")
  system = tuple(int(p) for p in ldd.stdout.splitlines()[0].split()[-1].split(".")[:2])
  assert host_memory.glibc_version() == system
  assert system >= tuple(int(p) for p in needed.split(".")[:2])


COMMAND = textwrap.dedent(
  """
  import os, sys
  from arcvq_jax import cli

  def main(argv):
    tunables = os.environ.get("GLIBC_TUNABLES")
    print(f"main|{os.getpid()}|{tunables}|{argv[1:]}|utf8={sys.flags.utf8_mode}", flush=True)

  if __name__ == "__main__":
    print(f"start|{os.getpid()}", flush=True)
    if sys.argv[1:2] == ["--from-python"]:
      cli.run(main, argv=[sys.argv[0]])
    elif sys.argv[1:2] == ["--as-converter"]:
      del sys.argv[1]
      cli.run(main, huge_pages=False)
    else:
      cli.run(main)
  """
)


def _environ(tunables: str | None) -> dict[str, str]:
  """This process's environment with GLIBC_TUNABLES (which conftest sets) replaced."""
  env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  return env


def _command(tmp_path, *args, tunables=None) -> list[list[str]]:
  """Runs COMMAND with args; its output lines, split into fields."""
  script = tmp_path / "command.py"
  script.write_text(COMMAND)
  proc = subprocess.run(
    [sys.executable, "-X", "utf8", str(script), *args],
    cwd=ROOT,
    env=_environ(tunables),
    capture_output=True,
    text=True,
    timeout=120,
  )
  assert proc.returncode == 0, proc.stderr[-2000:]
  return [line.split("|") for line in proc.stdout.splitlines()]


@needs_thp_on_request
def test_command_starts_over_in_place_with_the_tunable(tmp_path):
  lines = _command(tmp_path, "--debug", tunables="glibc.malloc.arena_max=4")
  # the same process (execve keeps the pid), its module code run twice, main once
  assert [line[0] for line in lines] == ["start", "start", "main"]
  assert len({line[1] for line in lines}) == 1
  # the user's tunables kept, the interpreter's options (-X utf8) and the flags too
  assert lines[2][2:] == ["glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1", "[]", "utf8=1"]


def test_command_runs_as_it_is_where_the_user_chose_or_from_python(tmp_path):
  for args, tunables in (
    ((), "glibc.malloc.hugetlb=0"),  # the opt-out
    (("--from-python",), None),  # cli.run(main, argv) called by a program, not the command
    (("--as-converter",), None),  # a command that leaves it out: cli.run(huge_pages=False)
  ):
    lines = _command(tmp_path, *args, tunables=tunables)
    assert [line[0] for line in lines] == ["start", "main"], (args, lines)
    assert lines[1][2] == str(tunables)


@needs_thp_on_request
def test_help_does_not_start_over(tmp_path):
  lines = _command(tmp_path, "--help")
  assert [line[0] for line in lines].count("start") == 1


# malloc itself (numpy asks the kernel for huge pages on its own), 256 MiB: far above glibc's
# mmap threshold, as XLA's step buffers are
HUGE_PAGES_OF_A_BUFFER = textwrap.dedent(
  """
  import ctypes
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  size = 256 * 2**20
  buffer = libc.malloc(ctypes.c_size_t(size))
  ctypes.memset(buffer, 1, size)
  with open("/proc/self/smaps_rollup") as f:
    print(next(int(l.split()[1]) for l in f if l.startswith("AnonHugePages:")) // 1024)
  """
)


@needs_thp_on_request
def test_the_tunable_gives_a_large_buffer_huge_pages():
  def huge_mib(tunables):
    out = subprocess.run(
      [sys.executable, "-c", HUGE_PAGES_OF_A_BUFFER],
      env=_environ(tunables),
      capture_output=True,
      text=True,
      check=True,
      timeout=60,
    )
    return int(out.stdout)

  assert huge_mib(None) == 0  # THP 'madvise': nothing asked, nothing given
  # most of the buffer; the kernel may fall back to small pages where memory is fragmented
  assert huge_mib("glibc.malloc.hugetlb=1") >= 128
