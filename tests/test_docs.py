"""The front door stays true: README.md and docs/ link only to what exists, the README's
commands name real configs and modules, its Python snippet runs as written, and it stays short
and free of history (docs/contributing.md, "Documentation")."""

from __future__ import annotations

import glob
import importlib.util
import os
import re
import unicodedata

import jax
import numpy as np
import pytest
from model_fixtures import init_params

from arcvq_jax import api
from arcvq_jax import config as config_lib
from arcvq_jax.train import state as state_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(ROOT, "README.md")
PAGES = [README, *sorted(glob.glob(os.path.join(ROOT, "docs", "**", "*.md"), recursive=True))]
FASHION = "/usr/share/datasets/fashion-mnist"
MAX_README_LINES = 250

FENCE = re.compile(r"^(```|~~~).*?^\1[ \t]*$", re.M | re.S)
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HTML_REF = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)
HTML_ANCHOR = re.compile(r"""<a\b[^>]*?\b(?:id|name)\s*=\s*["']([^"']+)["']""", re.I)
HEADING = re.compile(r"^(#{1,6})[ \t]+(.+?)[ \t#]*$", re.M)


def read(path: str) -> str:
  with open(path, encoding="utf-8") as f:
    return f.read()


def prose(text: str) -> str:
  """The text without fenced code blocks and inline code (links there are examples)."""
  return re.sub(r"`[^`\n]*`", "", FENCE.sub("", text))


def code_blocks(text: str, language: str | None = None) -> list[str]:
  blocks = re.findall(r"^```([\w+-]*)[ \t]*\n(.*?)^```[ \t]*$", text, re.M | re.S)
  return [body for lang, body in blocks if language is None or lang == language]


def github_slug(heading: str) -> str:
  """The anchor GitHub gives a heading: markup dropped, lowercase, punctuation removed
  (letters, digits, '-', '_' and spaces kept), spaces to '-'."""
  text = re.sub(r"`([^`]*)`", r"\1", heading)
  text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # a link keeps its text
  text = re.sub(r"<[^>]+>", "", text).strip().lower()
  kept = "".join(ch for ch in text if ch in " -_" or unicodedata.category(ch)[0] in ("L", "N"))
  return kept.replace(" ", "-")


def anchors(path: str) -> set[str]:
  """Every anchor a link into `path` may name: its headings' slugs (repeats numbered -1, -2,
  as GitHub numbers them) and explicit <a id/name> anchors."""
  text = read(path)
  seen: dict[str, int] = {}
  out = set(HTML_ANCHOR.findall(text))
  for _, heading in HEADING.findall(FENCE.sub("", text)):
    slug = github_slug(heading)
    n = seen.get(slug, 0)
    seen[slug] = n + 1
    out.add(slug if n == 0 else f"{slug}-{n}")
  return out


def relative_links(path: str) -> list[str]:
  text = prose(read(path))
  targets = LINK.findall(text) + HTML_REF.findall(text)
  return [t for t in targets if not re.match(r"^[a-z][a-z0-9+.-]*:", t, re.I)]


def test_the_slug_rule_by_hand():
  assert github_slug("VQGAN on ImageNet") == "vqgan-on-imagenet"
  assert github_slug('8.4 SimVQ (`quantizer.name = "simvq"`, `quantizers/simvq.py`)') == (
    "84-simvq-quantizername--simvq-quantizerssimvqpy"  # GitHub keeps both hyphens
  )
  assert github_slug("Errors and resuming") == "errors-and-resuming"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: os.path.relpath(p, ROOT))
def test_every_relative_link_and_anchor_resolves(page):
  broken = []
  for target in relative_links(page):
    file_part, _, anchor = target.partition("#")
    dest = (
      page if not file_part else os.path.normpath(os.path.join(os.path.dirname(page), file_part))
    )
    if not os.path.exists(dest):
      broken.append(f"{target}: no such file")
    elif anchor and dest.endswith(".md") and anchor not in anchors(dest):
      broken.append(f"{target}: no heading or anchor #{anchor} in {os.path.relpath(dest, ROOT)}")
  assert not broken, f"{os.path.relpath(page, ROOT)}: " + "; ".join(broken)


def test_the_link_checker_finds_a_broken_link(tmp_path):
  page = tmp_path / "page.md"
  (tmp_path / "other.md").write_text("# Title\n\n## A section\n")
  page.write_text(
    "[ok](other.md#a-section) [bad](other.md#nowhere) [gone](missing.md)\n"
    "```\n[in code](not_checked.md)\n```\n[web](https://example.com/x.md)\n"
  )
  targets = relative_links(str(page))
  assert targets == ["other.md#a-section", "other.md#nowhere", "missing.md"]
  assert "a-section" in anchors(str(tmp_path / "other.md"))
  assert "nowhere" not in anchors(str(tmp_path / "other.md"))


def test_readme_is_short_and_has_no_history():
  text = read(README)
  lines = text.splitlines()
  assert len(lines) <= MAX_README_LINES, f"README.md has {len(lines)} lines (at most 250)"
  # A commit hash: 7-40 hex digits with both digits and letters, outside web addresses.
  words = re.findall(r"\b[0-9a-f]{7,40}\b", re.sub(r"https?://\S+", "", text))
  hashes = [w for w in words if re.search(r"\d", w) and re.search(r"[a-f]", w)]
  assert not hashes, f"commit hashes in README.md: {hashes}"
  assert not re.search(r"^#+\s*Status\b", text, re.M), "README.md has a Status section"
  assert not re.search(r"\b20\d\d-\d\d-\d\d\b", text), "dated measurements in README.md"


def test_the_performance_page_stays_short():
  lines = read(os.path.join(ROOT, "docs", "performance.md")).splitlines()
  assert len(lines) <= 150, f"docs/performance.md has {len(lines)} lines (at most 150)"


def test_readme_commands_name_real_configs_and_modules():
  text = read(README)
  configs = set(re.findall(r"\bconfigs/[\w/]+\.py", text))
  assert configs, "the README names no config"
  assert not [c for c in configs if not os.path.exists(os.path.join(ROOT, c))]
  modules = set(re.findall(r"python -m (arcvq_jax(?:\.\w+)*)", text))
  assert "arcvq_jax.main" in modules
  assert not [m for m in modules if importlib.util.find_spec(m) is None]
  paths = set(
    re.findall(r"\b((?:bench|launch|colab|tests)/[\w/.-]+\.(?:py|sh|ipynb|sbatch))", text)
  )
  assert not [p for p in paths if not os.path.exists(os.path.join(ROOT, p))]


def test_ci_runs_exactly_the_readme_test_command():
  readme = read(README)
  ci = read(os.path.join(ROOT, ".ci", "run"))
  command = (
    "bash launch/setup.sh --test && .venv/bin/python -m pytest -q -n 2 --dist loadfile tests"
  )
  assert command in readme and command in ci


@pytest.fixture(scope="module")
def demo_workdir(tmp_path_factory):
  """A workdir of the demo's network and quantizer, written from freshly initialised params
  (what the snippet loads; the tokens are untrained, the shapes and dtypes are the demo's)."""
  from configs import demo  # noqa: PLC0415 (configs/ is not a package; ROOT is on sys.path)

  config = demo.get_config()
  model = state_lib.build_model(config, channels=1)
  params = init_params(model, np.zeros((1, 28, 28, 1), np.float32))
  workdir = str(tmp_path_factory.mktemp("demo"))
  api.write_workdir(workdir, config, jax.device_get(params), image_shape=(28, 28, 1))
  return workdir, config


@pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "t10k-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
def test_readme_snippet_runs_as_written(demo_workdir, capsys):
  workdir, config = demo_workdir
  (snippet,) = code_blocks(read(README), "python")
  assert 10 <= len(snippet.splitlines()) <= 20
  assert '"/tmp/arcvq_demo"' in snippet  # the demo command's --workdir
  namespace: dict = {}
  exec(compile(snippet.replace("/tmp/arcvq_demo", workdir), "README.md", "exec"), namespace)
  # What the snippet's comments promise.
  d = config.quantizer.embed_dim
  f = config_lib.downsample_factor(config)
  n = namespace["x"].shape[0]
  assert namespace["tokens"].shape == (n, 28 // f, 28 // f)
  assert namespace["tokens"].dtype == np.int32
  assert namespace["x_hat"].shape == (n, 28, 28, 1)
  assert namespace["z"].shape == (n, 28 // f, 28 // f, d)
  assert "PSNR" in capsys.readouterr().out
