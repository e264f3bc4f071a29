"""The package's one-way layering, checked on the source: the core never imports the
applications (`mmap_jax.apps`) or the demo (`mmap_jax.demo`, whose dataset builder registers
itself with the core's registry), at module level or inside functions."""
from __future__ import annotations

import ast
import pathlib

PKG = pathlib.Path(__file__).resolve().parents[1] / "mmap_jax"


def _imports(path: pathlib.Path) -> set[str]:
  """Every module an import statement in `path` names (`from a import b` gives a and a.b)."""
  names = set()
  for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
    if isinstance(node, ast.Import):
      names.update(a.name for a in node.names)
    elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
      names.add(node.module)
      names.update(f"{node.module}.{a.name}" for a in node.names)
  return names


def _violations(pkg: pathlib.Path = PKG) -> list[str]:
  bad = []
  for path in sorted(pkg.rglob("*.py")):
    rel = path.relative_to(pkg).as_posix()
    if rel.startswith(("apps/", "demo/")):
      continue
    for name in sorted(_imports(path)):
      upward = (name in ("mmap_jax.apps", "mmap_jax.demo", "tests")
                or name.startswith(("mmap_jax.apps.", "mmap_jax.demo.", "tests.")))
      if upward:
        bad.append(f"mmap_jax/{rel} imports {name}")
  return bad


def test_core_never_imports_applications_or_pretraining():
  assert _violations() == []


def test_the_check_sees_function_level_imports(tmp_path):
  """The check itself can fail: a deferred import inside a function of a core module counts."""
  fake = tmp_path / "mmap_jax"
  (fake / "train").mkdir(parents=True)
  (fake / "train" / "setup.py").write_text(
      "def load():\n  from mmap_jax.demo import pretrain\n  return pretrain\n")
  (fake / "data" / "builders").mkdir(parents=True)
  (fake / "data" / "builders" / "demo_domains.py").write_text(
      "from mmap_jax.demo import world as demo_world\n")
  (fake / "heads.py").write_text("import mmap_jax.apps.sweep\n")
  assert _violations(fake) == [
      "mmap_jax/data/builders/demo_domains.py imports mmap_jax.demo",
      "mmap_jax/data/builders/demo_domains.py imports mmap_jax.demo.world",
      "mmap_jax/heads.py imports mmap_jax.apps.sweep",
      "mmap_jax/train/setup.py imports mmap_jax.demo",
      "mmap_jax/train/setup.py imports mmap_jax.demo.pretrain"]
