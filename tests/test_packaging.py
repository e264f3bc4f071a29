"""`pip install .` gives a working package: data files, configs and console scripts, no clone needed."""
from __future__ import annotations

import ast
import gzip
import hashlib
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import tomllib

import pytest

from launch import entry
from mmap_jax import resources
from tests import train_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED_BPE = REPO.parent / "shared" / "clip_bpe" / "bpe_simple_vocab_16e6.txt.gz"


def test_packaged_vocabulary_is_openais():
  data = resources.clip_bpe_path().read_bytes()
  assert hashlib.sha256(data).hexdigest() == resources.BPE_SHA256
  lines = gzip.decompress(data).decode("utf-8").split("\n")
  assert lines[0].startswith("\"bpe_simple_vocab_16e6.txt#version")
  assert len(lines) > 49152 - 256 - 2   # the merges CLIP uses, plus more the file carries
  if SHARED_BPE.exists():                # the copy beside the checkout, where there is one
    assert SHARED_BPE.read_bytes() == data


def test_demo_clip_is_package_data():
  d = resources.demo_clip_dir()
  for f in ("clip.json", "model.safetensors", "bpe_simple_vocab_16e6.txt.gz"):
    assert (d / f).is_file(), f
  assert d.is_relative_to(REPO / "mmap_jax")


def _pins(lines):
  out = {}
  for line in lines:
    line = line.split("#")[0].strip()
    if not line or line.startswith("-"):
      continue
    out[re.split(r"[=<>\[ ]", line, maxsplit=1)[0].lower().replace("_", "-")] = line
  return out


def test_pyproject_dependencies_match_requirements():
  """One set of pins: pyproject's dependencies are requirements.txt except jax, which is only a
  lower bound there (the pinned runtimes are the cpu / cuda12 / tpu extras, so an accelerator host
  keeps its own jax and jaxlib plugins)."""
  project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
  req = _pins((REPO / "requirements.txt").read_text().splitlines())
  dep = _pins(project["dependencies"])
  jax = re.fullmatch(r"jax\[cpu\]==(\S+)", req.pop("jax"))   # requirements.txt: CPU wheels
  assert jax, "requirements.txt pins jax as jax[cpu]==<version>"
  version = jax.group(1)
  assert dep.pop("jax") == f"jax>={version}"
  assert req == dep
  assert project["optional-dependencies"] == {
      **{k: [f"jax[{k}]=={version}"] for k in ("cpu", "cuda12", "tpu")},
      "gcs": [_pins((REPO / "requirements-test.txt").read_text().splitlines())["gcsfs"]]}
  # launch/tpu_pod.sh installs the same gcsfs for gs:// workdirs.
  gcs = project["optional-dependencies"]["gcs"][0]
  assert f"'{gcs}'" in (REPO / "launch/tpu_pod.sh").read_text()
  for name, target in project["scripts"].items():   # each launcher defines the function named
    module, func = target.split(":")               # (read, not imported: their absl flags clash)
    assert name == "mmap-" + module.split(".")[-1]
    tree = ast.parse((REPO / (module.replace(".", "/") + ".py")).read_text())
    assert func in {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}, target


def test_config_paths_resolve_to_the_installed_configs(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)          # no configs/ here
  configs_dir = entry.packaged_configs_dir()
  assert entry.resolve_config_path("configs/demo.py:runlocal") == f"{configs_dir}/demo.py:runlocal"
  assert entry.resolve_config_path("configs/demo.py") == f"{configs_dir}/demo.py"
  assert entry.resolve_config_path("configs/nope.py:x") == "configs/nope.py:x"   # reported later
  assert entry.resolve_config_path("other/demo.py") == "other/demo.py"
  from mmap_jax.apps import sweep   # launch.sweep and the notebook resolve through the same function
  assert sweep.make_settings("configs/demo.py:runlocal", "method=coop_mt", {})[0].config.method == (
      "coop_mt")
  (tmp_path / "configs").mkdir()
  (tmp_path / "configs" / "demo.py").write_text("")
  assert entry.resolve_config_path("configs/demo.py:a=1") == "configs/demo.py:a=1"  # local wins
  argv = ["prog", "--config", "configs/office_home.py:runlocal", "--config.seed=3", "--workdir=x"]
  assert entry.resolve_config_args(argv) == [
      "prog", "--config", f"{configs_dir}/office_home.py:runlocal", "--config.seed=3",
      "--workdir=x"]


@pytest.mark.slow
def test_pip_install_then_console_script_trains(tmp_path, bpe_path):
  """A fresh venv outside the repo, `pip install <repo>` (no network: the pinned dependencies
  come from the system site-packages that the README's install filled), then `mmap-train` run
  from another directory trains the demo config into a workdir."""
  venv = tmp_path / "venv"
  # --without-pip: the venv runs the system's pip and setuptools (a fresh venv's bundled setuptools
  # cannot build a wheel offline); what gets installed still lands in the venv.
  subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
  py = venv / "bin" / "python"
  # Install from a copy of the tree without build outputs: pip builds in-tree, and a stale
  # build/lib (modules since moved or deleted) would otherwise be packaged too.
  src = tmp_path / "src"
  shutil.copytree(REPO, src, ignore=shutil.ignore_patterns(
      ".git", "build", "*.egg-info", "__pycache__", ".pytest_cache", "benchmarks", "notebooks"))
  pip = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-index",
                        "--no-build-isolation", str(src)], capture_output=True, text=True,
                       env={**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1"})
  assert pip.returncode == 0, pip.stdout + pip.stderr
  cwd = tmp_path / "elsewhere"
  cwd.mkdir()
  env = {k: v for k, v in fx.subprocess_env().items() if k != "PYTHONPATH"}
  env["MMAP_JAX_ALLOCATOR"] = "system"
  where = subprocess.run(
      [str(py), "-c", "import configs, launch, mmap_jax.resources as r; "
       "print(configs.__file__); print(r.demo_clip_dir()); print(r.clip_bpe_path().is_file())"],
      cwd=cwd, env=env, capture_output=True, text=True, check=True).stdout.split()
  assert all(str(venv) in p for p in where[:2]), where
  assert where[2] == "True"
  clip_dir = fx.make_tiny_clip(tmp_path / "clip", bpe_path)
  workdir = tmp_path / "run"
  run = subprocess.run(
      [str(venv / "bin" / "mmap-train"), f"--config=configs/demo.py:method=coop_mt,runlocal,clip={clip_dir}",
       *fx.override_flags(str(tmp_path / "tfds")), f"--workdir={workdir}"],
      cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
  assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
  results = json.loads((workdir / "results.json").read_text())
  assert results["method"] == "coop_mt" and set(results["tasks"]) == {
      "photo", "clipart", "sketch", "painting"}
