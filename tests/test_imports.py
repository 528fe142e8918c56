"""The package's import graph: no cycles, every module imports on its own in a fresh
interpreter, and the light entry points stay light (the tokenizer API pulls in no grain,
clu or TensorFlow; the step library no loop, data pipeline or metric writer)."""

from __future__ import annotations

import ast
import importlib
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PACKAGE = os.path.join(ROOT, "arcvq_jax")


def modules() -> dict[str, str]:
  """{dotted module name: file path} of every module of the package."""
  out = {}
  for root, _, files in os.walk(PACKAGE):
    for f in sorted(files):
      if f.endswith(".py"):
        path = os.path.join(root, f)
        name = os.path.relpath(path, ROOT)[:-3].replace(os.sep, ".")
        out[name.removesuffix(".__init__")] = path
  return out


def import_graph() -> dict[str, set[str]]:
  """module -> the package modules it imports anywhere in its body (functions included: an
  import moved into a function to dodge a cycle is still one)."""
  mods = modules()
  graph: dict[str, set[str]] = {m: set() for m in mods}
  for m, path in mods.items():
    with open(path) as f:
      tree = ast.parse(f.read())
    for node in ast.walk(tree):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
      else:
        continue
      for t in targets:
        while t and t not in mods:
          t = t.rpartition(".")[0]
        if t and t != m:
          graph[m].add(t)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """The strongly connected components of more than one module (Tarjan)."""
  index: dict[str, int] = {}
  low: dict[str, int] = {}
  stack: list[str] = []
  on_stack: set[str] = set()
  out: list[list[str]] = []

  def visit(v: str) -> None:
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in sorted(graph[v]):
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_cycle_finder_finds_a_cycle():
  graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
  assert cycles(graph) == [["a", "b", "c"]]
  assert cycles({"a": {"b"}, "b": set()}) == []


def test_no_import_cycles_in_the_package():
  graph = import_graph()
  assert len(graph) > 40 and "arcvq_jax.train.loop" in graph
  assert cycles(graph) == []


def _fresh(code: str) -> str:
  proc = subprocess.run(
    [sys.executable, "-c", code],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
    env=dict(os.environ, JAX_PLATFORMS="cpu"),
  )
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stdout


def test_every_module_imports():
  """In this process (the fast tier's touch of every module; the next test imports each
  alone, which also catches a module that works only after another was imported)."""
  for name in sorted(m for m in modules() if not m.endswith("__main__")):
    importlib.import_module(name)


@pytest.mark.slow
def test_every_module_imports_alone_in_a_fresh_interpreter():
  # One interpreter per module would take minutes; instead each import runs in a child of
  # one process that has imported nothing of the package (fork keeps the interpreter clean).
  names = sorted(m for m in modules() if not m.endswith("__main__"))
  code = (
    "import importlib, json, multiprocessing as mp, sys\n"
    "def one(name):\n"
    "  try:\n"
    "    importlib.import_module(name)\n"
    "    return ''\n"
    "  except Exception as e:\n"
    "    return f'{type(e).__name__}: {e}'\n"
    f"names = {names!r}\n"
    "with mp.get_context('fork').Pool(2) as pool:\n"
    "  print(json.dumps(dict(zip(names, pool.map(one, names, chunksize=1)))))\n"
  )
  errors = {k: v for k, v in json.loads(_fresh(code)).items() if v}
  assert errors == {}


@pytest.mark.slow
@pytest.mark.parametrize(
  "module,forbidden",
  [
    ("arcvq_jax.api", ("grain", "clu", "tensorflow", "arcvq_jax.data.pipeline")),
    (
      "arcvq_jax.train.tokenizer_steps",
      ("grain", "clu", "tensorflow", "arcvq_jax.train.loop", "arcvq_jax.data.pipeline"),
    ),
    (
      "arcvq_jax.train.gan_steps",
      ("grain", "clu", "tensorflow", "arcvq_jax.train.loop", "arcvq_jax.data.pipeline"),
    ),
  ],
)
def test_light_modules_stay_light(module, forbidden):
  loaded = json.loads(_fresh(f"import json, sys, {module}; print(json.dumps(sorted(sys.modules)))"))
  assert module in loaded
  assert [m for m in forbidden if m in loaded] == []
