"""The linter and the formatter (configured in pyproject.toml) pass on the whole repository."""

import pathlib
import subprocess
import sys

ROOT = pathlib.Path(__file__).resolve().parents[1]


def ruff(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run(
    [sys.executable, "-m", "ruff", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
  )


def test_ruff_check_finds_nothing():
  result = ruff("check", "--no-cache", ".")
  assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]


def test_ruff_format_changes_nothing():
  result = ruff("format", "--no-cache", "--check", ".")
  assert result.returncode == 0, (
    "run `ruff format .`:\n" + result.stdout[-4000:] + result.stderr[-2000:]
  )
