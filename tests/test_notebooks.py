"""The notebooks in experiments/ run top to bottom (on CPU, a tiny model and small settings
injected after each one's parameters cell) and check their own key outputs."""

from pathlib import Path

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).parent.parent / "experiments"


def execute(name: str, parameters: dict, cwd: Path):
  nb = nbformat.read(NOTEBOOKS / name, as_version=4)
  at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
  injected = "\n".join(f"{k} = {v!r}" for k, v in parameters.items())
  nb.cells.insert(at + 1, nbformat.v4.new_code_cell(injected))
  nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(cwd)}}).execute()
  return nb


def test_notebooks_are_saved_without_large_outputs():
  for path in NOTEBOOKS.glob("*.ipynb"):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


def test_quickstart_notebook(tmp_path, tiny_model_dir):
  data = tmp_path / "data.txt"
  data.write_text("def add(a, b):\n    return a + b\n\n" * 200)
  nb = execute("quickstart.ipynb", dict(
      MODEL=str(tiny_model_dir), NUM_PROMPTS=4, MAX_NEW_TOKENS=12, TRAIN_STEPS=10, SEQ_LEN=32,
      SELF_DISTILL=8, DATA=str(data), WORKDIR=str(tmp_path / "run")), tmp_path)
  text = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                 for o in c.outputs)
  assert "plain decoding:" in text and "medusa: tau" in text and "hydra: tau" in text
  assert (tmp_path / "run" / "speedup.png").stat().st_size > 0  # the plot
