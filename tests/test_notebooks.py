"""The notebooks in experiments/ run top to bottom (on CPU, a tiny model and small settings
injected after each one's parameters cell) and check their own key outputs."""

import inspect
import json
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


def printed(nb) -> str:
  """Everything the notebook's code cells printed."""
  return "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)


def test_notebooks_are_saved_without_large_outputs():
  for path in NOTEBOOKS.glob("*.ipynb"):
    nb = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") for c in nb.cells if c.cell_type == "code"), path.name


def test_quickstart_notebook(tmp_path, tiny_model_dir):
  data = tmp_path / "data.txt"
  data.write_text("def add(a, b):\n    return a + b\n\n" * 200)
  nb = execute("quickstart.ipynb", dict(
      MODEL=str(tiny_model_dir), NUM_PROMPTS=4, MAX_NEW_TOKENS=12, TRAIN_STEPS=10, SEQ_LEN=32,
      SELF_DISTILL=8, DATA=str(data), WORKDIR=str(tmp_path / "run"), MESH="data:1"), tmp_path)
  text = printed(nb)
  assert "plain decoding:" in text and "medusa: tau" in text and "hydra: tau" in text
  assert (tmp_path / "run" / "speedup.png").stat().st_size > 0  # the plot


def test_long_context_notebook(tmp_path, tiny_model_dir):
  data = tmp_path / "heldout.py"  # ~20k tokens of the tiny model's tokenizer
  data.write_text(inspect.getsource(json.decoder) + inspect.getsource(json.encoder))
  patterns = ["dense", "sinks_window:4,64", "block_topk:2,32", "vertical_slash:32,32,32"]
  nb = execute("long_context.ipynb", dict(
      MODEL=str(tiny_model_dir), DATA=str(data), TRAIN_LEN=128, SEQ_LEN=512, NUM_SEQS=1,
      PATTERNS=patterns, GENERATE_SPARSITY="sinks_window:4,64", MAX_NEW_TOKENS=8,
      MESH="data:1", WORKDIR=str(tmp_path / "run")), tmp_path)
  text = printed(nb)
  assert "dense: density 1.000" in text
  assert all(f"{p}: density " in text for p in patterns)
  assert text.count("kernel vs reference") == len(patterns) - 1
  assert "generated 8 tokens after a 512-token prompt under sinks_window:4,64" in text
  for plot in ("long_context.png", "masks.png"):
    assert (tmp_path / "run" / plot).stat().st_size > 0


def test_quantization_notebook(tmp_path, tiny_model_dir):
  data = tmp_path / "data.txt"  # ~29k tokens, the last 5% held out
  data.write_text("def add(a, b):\n    return a + b\n\n\nclass Point:\n"
                  "    def __init__(self, x, y):\n        self.x = x\n        self.y = y\n\n"
                  * 600)
  nb = execute("quantization.ipynb", dict(
      MODEL=str(tiny_model_dir), DATA=str(data), FORMATS=["int8", "int4:g16", "ternary"],
      QAT_FORMAT="ternary", STEPS=20, BATCH_SIZE=4, SEQ_LEN=32, EVAL_EVERY=10,
      EVAL_BATCHES=2, MAX_NEW_TOKENS=8, MESH="data:1", WORKDIR=str(tmp_path / "run")),
      tmp_path)
  text = printed(nb)
  assert all(f"PTQ {f}: held-out loss" in text for f in ("int8", "int4:g16", "ternary"))
  assert "QAT ternary: held-out loss" in text and "served ternary from" in text
  assert (tmp_path / "run" / "served" / "quantization.json").exists()
  assert (tmp_path / "run" / "quantization.png").stat().st_size > 0
