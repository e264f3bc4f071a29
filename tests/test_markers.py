"""The `slow` marker is where the quick loop (`pytest -m "not slow"`) needs it.

Read from the test sources (no test runs): a test that starts a process, a server (the GCS
emulator) or a notebook kernel, directly, through a helper of its module or through a fixture of
its module, must be marked slow. Only code counts, not strings or comments.
"""
from __future__ import annotations

import ast
import pathlib

import pytest

TESTS = pathlib.Path(__file__).resolve().parent
# Dotted names whose use starts a process, a server or a kernel.
STARTERS = ("subprocess", "sys.executable", "create_server", "NotebookClient", "Popen")


def _dotted(node: ast.expr) -> str:
  if isinstance(node, ast.Attribute):
    return f"{_dotted(node.value)}.{node.attr}"
  return node.id if isinstance(node, ast.Name) else ""


def _starts_directly(fn: ast.FunctionDef) -> bool:
  names = {_dotted(n) for n in ast.walk(fn) if isinstance(n, (ast.Attribute, ast.Name))}
  return any(n == s or n.startswith(s + ".") or n.endswith("." + s) for n in names
             for s in STARTERS)


def _is_slow(decorators: list[ast.expr]) -> bool:
  return any("mark.slow" in ast.unparse(d) for d in decorators)


def _module_is_slow(tree: ast.Module) -> bool:
  return any(isinstance(n, ast.Assign) and any(getattr(t, "id", "") == "pytestmark"
                                               for t in n.targets) and "slow" in ast.unparse(n)
             for n in tree.body)


def unmarked_process_tests(source: str) -> list[str]:
  """Tests in `source` that start a process, server or kernel without the `slow` mark."""
  tree = ast.parse(source)
  if _module_is_slow(tree):
    return []
  functions = {n.name: n for n in tree.body if isinstance(n, ast.FunctionDef)}
  memo: dict[str, bool] = {}

  def starts_process(name: str) -> bool:
    if name in memo:
      return memo[name]
    memo[name] = False                       # recursion guard
    fn = functions[name]
    called = {n.func.id for n in ast.walk(fn)
              if isinstance(n, ast.Call) and isinstance(n.func, ast.Name)}
    uses = called | {a.arg for a in fn.args.args}   # helpers it calls, fixtures it requests
    memo[name] = (_starts_directly(fn)
                  or any(starts_process(u) for u in uses if u in functions and u != name))
    return memo[name]

  return [name for name, fn in functions.items()
          if name.startswith("test_") and not _is_slow(fn.decorator_list) and starts_process(name)]


@pytest.mark.parametrize("path", sorted(TESTS.glob("test_*.py")), ids=lambda p: p.name)
def test_process_starting_tests_are_marked_slow(path):
  assert unmarked_process_tests(path.read_text()) == []


def test_the_check_finds_an_unmarked_launch():
  source = '''
import subprocess, sys, pytest

def _run(args):
  return subprocess.run([sys.executable, *args])

@pytest.fixture
def launched():
  return _run(["-c", "pass"])

def test_direct():
  subprocess.run(["true"])

def test_through_a_fixture(launched):
  pass

@pytest.mark.slow
def test_marked():
  _run([])

def test_in_process():
  assert "subprocess.run" != "a string, not a call"

def test_a_kernel():
  NotebookClient(None).execute()
'''
  assert unmarked_process_tests(source) == ["test_direct", "test_through_a_fixture",
                                            "test_a_kernel"]


def test_ci_runs_the_readme_test_command_on_two_workers():
  """`.ci/run` runs the README's test command verbatim, and that command spreads whole modules
  over 2 workers in conftest's order (module fixtures run once; slow modules start first)."""
  readme = (TESTS.parent / "README.md").read_text()
  command = readme.split("## Run the tests", 1)[1].split("```bash\n", 1)[1].split("\n```", 1)[0]
  assert command.strip() in (TESTS.parent / ".ci" / "run").read_text()
  for flag in ("-n 2", "--dist loadfile", "--no-loadscope-reorder", " tests"):
    assert flag in command, flag


def test_modules_with_more_slow_tests_come_first():
  from types import SimpleNamespace
  from tests.conftest import slow_first

  def item(module, test, slow):
    return SimpleNamespace(nodeid=f"tests/{module}.py::{test}",
                           get_closest_marker=lambda name: object() if slow else None)
  items = [item("a", "t1", False), item("b", "t1", True), item("a", "t2", False),
           item("c", "t1", True), item("c", "t2", True), item("b", "t2", False)]
  assert [i.nodeid for i in slow_first(items)] == [
      "tests/c.py::t1", "tests/c.py::t2", "tests/b.py::t1", "tests/b.py::t2", "tests/a.py::t1",
      "tests/a.py::t2"]
