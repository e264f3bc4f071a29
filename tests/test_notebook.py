"""The Colab quickstart runs top to bottom on the demo (tiny settings) and shows the results."""
import pathlib

import nbformat
import pytest
from nbclient import NotebookClient

from tests import train_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_quickstart_notebook_executes(tmp_path, bpe_path, monkeypatch):
  clip_dir = fx.make_tiny_clip(tmp_path / "clip", bpe_path)
  nb = nbformat.read(REPO / "notebooks" / "quickstart.ipynb", as_version=4)
  params = next(c for c in nb.cells if c.cell_type == "code")
  assert "WORKDIR" in params.source
  overrides = fx.override_flags(str(tmp_path / "tfds"))
  params.source = (f"WORKDIR = {str(tmp_path / 'run')!r}\nHF_CLIP_DIR = None\n"
                   f"CONFIG = 'configs/demo.py:method=mmap_mt,runlocal,clip={clip_dir}'\n"
                   f"OVERRIDES = {overrides!r}\n")
  client = NotebookClient(nb, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}})
  for k in ("XLA_FLAGS", "JAX_PLATFORMS", "PYTHONPATH"):  # The kernel inherits these.
    monkeypatch.setenv(k, fx.subprocess_env()[k])
  client.execute()
  outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
  texts = "".join(o.get("text", "") for o in outputs)
  assert "| **average** |" in texts or any(
      "| **average** |" in o.get("data", {}).get("text/markdown", "") for o in outputs)
  assert any("image/png" in o.get("data", {}) for o in outputs)
  assert (tmp_path / "run" / "groups.json").is_file()
