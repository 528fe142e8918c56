"""The commands start with a malloc that keeps freed memory in huge pages (`host_memory`:
jemalloc where installed, else glibc's huge-page tunable): which one where, that the restart
keeps the process, its arguments and the user's own settings, that jemalloc reuses a freed
buffer without a page fault, and that the tunable gives a large buffer huge pages."""

import functools
import os
import platform
import subprocess
import sys
import textwrap

import pytest

from arcvq_jax import host_memory

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MALLOC_VARIABLES = ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")
START = host_memory.start_environment_for_this_host({})
needs_a_restart = pytest.mark.skipif(
  START is None, reason="needs jemalloc, or glibc >= 2.35 and the kernel's THP mode 'madvise'"
)
JEMALLOC = host_memory.find_jemalloc()
needs_jemalloc = pytest.mark.skipif(
  JEMALLOC is None, reason="needs libjemalloc.so.2 (libjemalloc2)"
)
GLIBC_HUGE_PAGES = host_memory.start_environment(
  {}, host_memory.glibc_version(), host_memory.thp_mode(), jemalloc=None
)
needs_thp_on_request = pytest.mark.skipif(
  GLIBC_HUGE_PAGES is None, reason="needs glibc >= 2.35 and the kernel's THP mode 'madvise'"
)
JE = "/usr/lib/libjemalloc.so.2"
CONF = host_memory.JEMALLOC_CONF


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
    ({"LD_PRELOAD": "/opt/libtcmalloc.so.4"}, (2, 36), "madvise", None),
    ({}, (2, 34), "madvise", None),  # the tunable does not exist yet
    ({}, None, "madvise", None),  # musl, macOS
    ({}, (2, 36), "always", None),  # huge pages without asking
    ({}, (2, 36), "never", None),
    ({}, (2, 36), None, None),  # no THP at all
  ],
)  # fmt: skip
def test_without_jemalloc_glibc_huge_pages_where_they_help(environ, glibc, mode, expected):
  got = host_memory.start_environment(environ, glibc, mode, None)
  assert got == (None if expected is None else {"GLIBC_TUNABLES": expected})


@pytest.mark.parametrize(
  ("environ", "expected"),
  [
    ({}, {"LD_PRELOAD": JE, "MALLOC_CONF": CONF, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}),
    # other preloads and tunables kept, the user's jemalloc settings too
    ({"LD_PRELOAD": "/opt/libprof.so", "MALLOC_CONF": "narenas:2",
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2"},
     {"LD_PRELOAD": f"{JE}:/opt/libprof.so", "MALLOC_CONF": "narenas:2",
      "GLIBC_TUNABLES": "glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1"}),
    # the user's choice (=0: glibc as it comes, =1: glibc's huge pages), or already restarted
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, None),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, None),
    ({"LD_PRELOAD": JE}, None),
    ({"LD_PRELOAD": "libmimalloc.so"}, None),
  ],
)  # fmt: skip
def test_jemalloc_first_wherever_it_is_installed(environ, expected):
  # whatever the glibc and THP mode: jemalloc keeps freed memory on any kernel
  for glibc, mode in (((2, 36), "madvise"), ((2, 31), "never"), (None, None)):
    assert host_memory.start_environment(environ, glibc, mode, JE) == expected


def test_jemalloc_is_found_only_for_this_architecture(tmp_path):
  def elf(path, machine):
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(b"\x7fELF\x02\x01" + bytes(12) + machine.to_bytes(2, "little") + bytes(40))

  other, mine = tmp_path / "other", tmp_path / "mine"
  elf(other / host_memory.JEMALLOC, 183)  # aarch64
  elf(mine / host_memory.JEMALLOC, 62)  # x86_64
  dirs = [str(tmp_path / "missing"), str(other), str(mine)]
  if sys.platform.startswith("linux"):
    assert host_memory.find_jemalloc(dirs, "x86_64") == str(mine / host_memory.JEMALLOC)
    assert host_memory.find_jemalloc(dirs, "aarch64") == str(other / host_memory.JEMALLOC)
  assert host_memory.find_jemalloc(dirs[:2], "x86_64") is None
  assert host_memory.find_jemalloc(dirs, "riscv64") is None
  (mine / host_memory.JEMALLOC).write_text("INPUT(libjemalloc.so.2)\n")  # a linker script
  assert host_memory.find_jemalloc(dirs[::2], "x86_64") is None


def test_malloc_of_names_what_a_process_runs():
  assert (
    host_memory.malloc_of({"LD_PRELOAD": JE, "GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    == "jemalloc"
  )
  assert host_memory.malloc_of({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}) == "glibc huge pages"
  assert host_memory.malloc_of({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}) == "glibc"


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
    env = [os.environ.get(k) for k in ("GLIBC_TUNABLES", "LD_PRELOAD", "MALLOC_CONF")]
    print(f"main|{os.getpid()}|{env}|{argv[1:]}|utf8={sys.flags.utf8_mode}", flush=True)

  if __name__ == "__main__":
    print(f"start|{os.getpid()}", flush=True)
    if sys.argv[1:2] == ["--from-python"]:
      cli.run(main, argv=[sys.argv[0]])
    elif sys.argv[1:2] == ["--as-converter"]:
      del sys.argv[1]
      cli.run(main, fast_malloc=False)
    else:
      cli.run(main)
  """
)


def _environ(tunables: str | None, **more: str) -> dict[str, str]:
  """This process's environment with the malloc's variables (which conftest sets) replaced:
  GLIBC_TUNABLES=tunables where given, and `more`."""
  env = {k: v for k, v in os.environ.items() if k not in MALLOC_VARIABLES}
  if tunables is not None:
    env["GLIBC_TUNABLES"] = tunables
  return dict(env, **more)


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


@needs_a_restart
def test_command_starts_over_in_place_with_the_malloc(tmp_path):
  lines = _command(tmp_path, "--debug", tunables="glibc.malloc.arena_max=4")
  # the same process (execve keeps the pid), its module code run twice, main once
  assert [line[0] for line in lines] == ["start", "start", "main"]
  assert len({line[1] for line in lines}) == 1
  # the user's tunables kept, the interpreter's options (-X utf8) and the flags too; what
  # the restart added is taken back out of the environment its children get
  start = host_memory.start_environment_for_this_host(
    {"GLIBC_TUNABLES": "glibc.malloc.arena_max=4"}
  )
  assert start["GLIBC_TUNABLES"] == "glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1"
  assert lines[2][2:] == [str(["glibc.malloc.arena_max=4", None, None]), "[]", "utf8=1"]


def test_command_runs_as_it_is_where_the_user_chose_or_from_python(tmp_path):
  for args, tunables in (
    ((), "glibc.malloc.hugetlb=0"),  # the opt-out
    (("--from-python",), None),  # cli.run(main, argv) called by a program, not the command
    (("--as-converter",), None),  # a command that leaves it out: cli.run(fast_malloc=False)
  ):
    lines = _command(tmp_path, *args, tunables=tunables)
    assert [line[0] for line in lines] == ["start", "main"], (args, lines)
    assert lines[1][2] == str([tunables, None, None])


@needs_a_restart
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
  huge_mib = functools.partial(_number_printed_by, HUGE_PAGES_OF_A_BUFFER)
  assert huge_mib(_environ(None)) == 0  # THP 'madvise': nothing asked, nothing given
  # most of the buffer; the kernel may fall back to small pages where memory is fragmented
  assert huge_mib(_environ("glibc.malloc.hugetlb=1")) >= 128


def _number_printed_by(script: str, env: dict[str, str]) -> int:
  """Runs `python -c script` in `env`; the integer it prints."""
  out = subprocess.run(
    [sys.executable, "-c", script], env=env, capture_output=True, text=True, check=True, timeout=60
  )
  return int(out.stdout)


# A step's temporaries, freed and allocated again: 256 MiB touched twice. The page faults of
# the second touch (glibc: the block is unmapped when freed, so 65,536 4 KiB faults, or 128
# with huge pages; jemalloc keeps it).
FAULTS_OF_A_REUSED_BUFFER = textwrap.dedent(
  """
  import ctypes, resource
  libc = ctypes.CDLL(None)
  libc.malloc.restype = ctypes.c_void_p
  size = 256 * 2**20
  for touch in range(2):
    buffer = libc.malloc(ctypes.c_size_t(size))
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    ctypes.memset(buffer, 1, size)
    faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults
    libc.free(ctypes.c_void_p(buffer))
  print(faults)
  """
)


@needs_jemalloc
def test_jemalloc_reuses_a_freed_buffer_without_faults():
  faults = functools.partial(_number_printed_by, FAULTS_OF_A_REUSED_BUFFER)
  assert faults(_environ("glibc.malloc.hugetlb=0")) >= 128  # unmapped, faulted in again
  start = host_memory.start_environment_for_this_host(_environ(None))
  assert start["LD_PRELOAD"] == JEMALLOC
  assert faults(dict(_environ(None), **start)) < 16
