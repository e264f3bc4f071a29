"""The config is resolved once (train/run_spec.py): a frozen RunSpec, and nothing below re-reads
or re-resolves the ConfigDict (issue 27)."""
from __future__ import annotations

import ast
import dataclasses
import json
import pathlib

import pytest

from configs import demo
from mmap_jax.prompts import spec as spec_lib
from mmap_jax.train import loop, recipes, run_spec, setup
from tests import train_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]


def test_resolve_is_frozen_typed_and_detached_from_the_config():
  c = demo.get_config("method=mmap_mt,runlocal")
  rs = run_spec.resolve(c, num_devices=8)
  assert rs.recipe == setup.recipe(c)                       # the family's recipe, resolved
  assert rs.groups.warmup_recipe == setup.recipe(
      demo.get_config("method=mmap_shared,runlocal")).recipe   # the warm-up's own recipe
  assert rs.groups.warmup_prompt.method == "mmap_shared"
  assert rs.groups.warmup_total_steps == rs.groups.lr_warmup_steps + c.groups.warmup_steps
  assert rs.input.augment.scale == (c.input.crop_scale_min, 1.0)
  assert rs.data.shots == c.data.shots and rs.train.steps == c.train.steps
  with pytest.raises(dataclasses.FrozenInstanceError):
    rs.seed = 3
  c.train.steps, c.optim.lr = 999, 0.5                       # later edits of the config ...
  assert rs.train.steps != 999 and rs.recipe.recipe.lr != 0.5   # ... do not reach the run
  assert json.loads(rs.recorded_config)["train"]["steps"] != 999
  # No warm-up without a gradient grouping of a grouped method.
  assert run_spec.resolve(demo.get_config("method=coop_mt,runlocal")).groups.warmup_total_steps == 0
  json.dumps(rs.to_dict())                                  # JSON-ready, as results.json needs


def test_resolve_names_every_bad_field_at_once():
  c = demo.get_config("method=mmap_mt,runlocal")
  c.train.log_every, c.input.batch_size, c.groups.mode = 0, 0, "nope"
  with pytest.raises(setup.ConfigError) as e:
    run_spec.resolve(c)
  for field in ("train.log_every", "input.batch_size", "groups.mode"):
    assert field in str(e.value)


def test_nothing_below_the_entry_points_resolves_again(tmp_path, bpe_path, monkeypatch):
  """A gradient-grouped MmAP-MT run, trained and re-evaluated from its RunSpec, with every
  resolver of a ConfigDict made to fail: nothing below `resolve` calls them."""
  clip_dir = fx.make_tiny_clip(tmp_path / "clip", bpe_path)
  c = fx.tiny_config(clip_dir, str(tmp_path / "tfds"))
  c.train.steps = 4
  rs = loop.resolve(c)

  def forbidden(*args, **kwargs):
    raise AssertionError("a ConfigDict was resolved again below the entry point")
  monkeypatch.setattr(recipes, "resolve_config", forbidden)
  monkeypatch.setattr(setup, "validate", forbidden)
  monkeypatch.setattr(spec_lib.PromptSpec, "from_config", classmethod(forbidden))
  result = loop.train_resolved(rs, str(tmp_path / "run"))
  assert result["trained_steps"] == 4 and result["groups"]
  assert result["run_spec"]["groups"]["warmup_steps"] == c.groups.warmup_steps
  assert result["run_spec"]["recipe"] == rs.recipe.to_dict()


def test_only_the_top_reads_a_config_dict():
  """Below train/ nothing imports ml_collections; inside train/ only the resolution (run_spec,
  setup.validate), the entry points (loop) and the recorded-config reader (trained) do."""
  allowed = {"train/run_spec.py", "train/setup.py", "train/loop.py", "train/trained.py",
             "diagnostics.py"}
  readers = set()
  for path in (REPO / "mmap_jax").rglob("*.py"):
    rel = path.relative_to(REPO / "mmap_jax").as_posix()
    if rel.startswith(("apps/", "demo/")):
      continue
    for node in ast.walk(ast.parse(path.read_text())):
      names = ([a.name for a in node.names] if isinstance(node, ast.Import)
               else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
      if any(n.split(".")[0] == "ml_collections" for n in names):
        readers.add(rel)
  assert readers <= allowed, sorted(readers - allowed)
  assert "train/grouping_run.py" not in readers
