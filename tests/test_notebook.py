"""The Colab quickstart runs top to bottom on the demo (tiny settings), from a working directory
outside the clone, and shows the results."""
import importlib.metadata
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests import train_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_quickstart_notebook_executes(tmp_path, bpe_path, monkeypatch):
  clip_dir = fx.make_tiny_clip(tmp_path / "clip", bpe_path)
  nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  params = next(c for c in nb.cells if c.cell_type == "code")
  assert "WORKDIR" in params.source
  overrides = dict(f[len("--config."):].split("=", 1)
                   for f in fx.override_flags(str(tmp_path / "tfds")))
  params.source = (f"WORKDIR = {str(tmp_path / 'run')!r}\nHF_CLIP_DIR = None\n"
                   f"CONFIG = 'configs/demo.py:method=mmap_mt,runlocal,clip={clip_dir}'\n"
                   f"OVERRIDES = {overrides!r}\nREPO_URL = None\n")
  # Run from outside the clone (as after a Colab restart: package importable, cwd /content):
  # CONFIG's relative path resolves to the installed configs.
  elsewhere = tmp_path / "elsewhere"
  elsewhere.mkdir()
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(elsewhere)}})
  for k in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH"):  # The kernel inherits these.
    monkeypatch.setenv(k, fx.subprocess_env()[k])
  jax_before = importlib.metadata.version("jax")
  client.execute()
  assert importlib.metadata.version("jax") == jax_before   # nothing reinstalled
  install = [line.split("#")[0] for line in nb.cells[2].source.splitlines()]  # code, no comments
  pip_lines = [line for line in install if "'pip'" in line]
  assert pip_lines and not any("jax" in line for line in pip_lines)   # the runtime's jax is kept
  # Training ran in the kernel: its progress lines are the cell's own (live) output.
  train_cell = next(c for c in nb.cells if "train_and_evaluate" in c.get("source", ""))
  streamed = "".join(o.get("text", "") for o in train_cell.outputs if o.output_type == "stream")
  assert "step" in streamed and "subprocess" not in train_cell.source
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  texts = "".join(o.get("text", "") for o in outputs)
  assert "| **average** |" in texts or any(
      "| **average** |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
  assert any("image/png" in o.get("data", {}) for o in outputs)
  assert (tmp_path / "run" / "groups.json").is_file()
  assert list(elsewhere.iterdir()) == []   # nothing written to the working directory
