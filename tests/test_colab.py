"""colab/arcvq_demo.ipynb runs top to bottom on CPU with a tiny setting, on the local
Fashion-MNIST files, and is committed without outputs."""

import os

import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "colab", "arcvq_demo.ipynb")
FASHION = "/usr/share/datasets/fashion-mnist"


def test_committed_without_outputs():
  nb = nbformat.read(NOTEBOOK, as_version=4)
  nbformat.validate(nb)
  for cell in nb.cells:
    if cell.cell_type == "code":
      assert cell.outputs == [] and cell.execution_count is None, cell.source[:80]


def set_parameters(nb, **values):
  """Papermill's convention: the cell tagged 'parameters' holds the settings; a cell with
  the new values goes right after it."""
  index = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  names = [
    line.split("=")[0].strip()
    for line in nb.cells[index].source.splitlines()
    if "=" in line and not line.startswith("#")
  ]
  assert set(values) <= set(names), set(values) - set(names)
  source = "\n".join(f"{k} = {v!r}" for k, v in values.items())
  nb.cells.insert(index + 1, nbformat.v4.new_code_cell(source))


@pytest.mark.slow
@pytest.mark.skipif(
  not os.path.exists(os.path.join(FASHION, "train-images-idx3-ubyte.gz")),
  reason="needs Debian's dataset-fashion-mnist (apt-get install dataset-fashion-mnist)",
)
def test_runs_top_to_bottom(tmp_path):
  from nbclient import NotebookClient  # noqa: PLC0415

  nb = nbformat.read(NOTEBOOK, as_version=4)
  set_parameters(
    nb, STEPS=20, BATCH=32, EVAL_IMAGES=300, DATA_DIR=FASHION, RUNS_DIR=str(tmp_path / "runs")
  )
  client = NotebookClient(
    nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
  )
  client.execute(env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=ROOT))
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
  assert "JAX " in text and "on CPU" in text
  assert "vanilla: test-set codebook usage" in text and "arcvq: test-set codebook usage" in text
  assert "tokens:" in text
  pngs = sum(
    "image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code" for o in c.outputs
  )
  assert pngs == 4  # usage curves, reconstructions, codebook figures, your image
  assert os.path.isdir(tmp_path / "runs" / "arcvq" / "checkpoints" / "20")
