"""The tuning protocol (mmap_jax/apps/tune.py, launch.tune): grids extended until the best value
is interior (capped, recorded), averaged over 2 tuning seeds, resumable, and `launch.sweep
--tuned` applying the values on disjoint seeds. Fake runs with a known validation curve; one
slow test runs the real trainer on the tiny config."""
from __future__ import annotations

import json
import math
import os
import pathlib

import numpy as np
import pytest

from mmap_jax.apps import sweep, tune
from tests import test_sweep as ts
from tests import train_fixtures as fx


@pytest.fixture(scope="module")
def env(tmp_path_factory, bpe_path):
  root = tmp_path_factory.mktemp("tune")
  clip_dir = fx.make_tiny_clip(root / "clip", bpe_path)
  return {"root": root, "data": str(root / "tfds"),
          "ref": f"configs/demo.py:clip={clip_dir},runlocal"}


def _overrides(env):
  return ts._overrides(env["data"]) | {"train.eval_every": "1"}   # 6 validations


def _val(lr: float, seed: int) -> float:
  """A validation curve peaked at lr = 0.08 (log scale), slightly different per seed."""
  return 0.6 - 0.02 * (math.log2(lr) - math.log2(0.08)) ** 2 + 0.001 * (seed - 100)


class _FakeRuns:
  def __init__(self, diverge_at: float = math.inf):
    self.ran, self.diverge_at = [], diverge_at

  def __call__(self, config, workdir):
    lr = config.optim.lr
    self.ran.append((config.method, lr, config.seed))
    if lr >= self.diverge_at and config.seed == 101:
      return {"diverged": True}          # what tune's wrapper returns for a NaN run
    v = _val(lr, config.seed)
    ts._fake_run(pathlib.Path(workdir), {"a": v - 0.05}, val={"a": v})
    return {}


def test_grid_is_extended_until_the_best_is_interior_and_resumes(env, tmp_path):
  runs = _FakeRuns(diverge_at=0.32)
  out = tune.tune(env["ref"], str(tmp_path), plan={"coop_mt": [0.01, 0.02]},
                  overrides=_overrides(env), max_extensions=1, run_fn=runs, log=lambda s: None)
  m = out["methods"]["coop_mt"]
  # 0.02 best at the high edge -> 0.04 (one extension allowed): still at the edge, capped.
  assert m["grid"] == [0.01, 0.02, 0.04] and m["best"] == 0.04
  assert m["extensions"] == [{"side": "high", "value": 0.04, "because": 0.02}]
  assert (m["interior"], m["capped"]) == (False, True)
  assert sorted(runs.ran) == sorted(("coop_mt", lr, s) for lr in (0.01, 0.02, 0.04)
                                    for s in (100, 101))
  # Rerun with a larger cap: finished runs are skipped; 0.08 is best, 0.16 makes it interior.
  runs.ran.clear()
  out = tune.tune(env["ref"], str(tmp_path), plan={"coop_mt": [0.01, 0.02]},
                  overrides=_overrides(env), max_extensions=3, run_fn=runs, log=lambda s: None)
  m = out["methods"]["coop_mt"]
  assert sorted(runs.ran) == sorted(("coop_mt", lr, s) for lr in (0.08, 0.16) for s in (100, 101))
  assert m["grid"] == [0.01, 0.02, 0.04, 0.08, 0.16] and m["best"] == 0.08
  assert (m["interior"], m["capped"]) == (True, False)
  assert [e["value"] for e in m["extensions"]] == [0.04, 0.08, 0.16]
  s = m["scores"]["0.08"]
  assert s["per_seed"] == pytest.approx([_val(0.08, 100), _val(0.08, 101)])
  assert s["mean"] == pytest.approx(np.mean(s["per_seed"]))
  saved = json.loads((tmp_path / "tuning.json").read_text())
  assert saved["tuning_seeds"] == [100, 101] and saved["methods"]["coop_mt"]["best"] == 0.08
  assert json.loads((tmp_path / "tuned.json").read_text()) == {
      "field": "optim.lr", "tuning_seeds": [100, 101], "values": {"coop_mt": 0.08}}
  md = (tmp_path / "tuning.md").read_text()
  assert "| coop_mt |" in md and "**0.08: 60.05**" in md and "| yes | high 0.04, high 0.08" in md
  # A finished tuning only re-tabulates.
  runs.ran.clear()
  tune.tune(env["ref"], str(tmp_path), plan={"coop_mt": [0.01, 0.02]}, overrides=_overrides(env),
            max_extensions=3, run_fn=runs, log=lambda s: None)
  assert runs.ran == []


def test_a_diverged_value_scores_minus_infinity(env, tmp_path):
  runs = _FakeRuns(diverge_at=0.05)
  out = tune.tune(env["ref"], str(tmp_path), plan={"mmap_st": [0.02, 0.04, 0.08]},
                  overrides=_overrides(env), run_fn=runs, log=lambda s: None)
  m = out["methods"]["mmap_st"]
  assert m["best"] == 0.04 and m["interior"] and m["extensions"] == []
  assert m["scores"]["0.08"]["mean"] == -math.inf
  assert json.loads((tmp_path / "tuning.json").read_text())[
      "methods"]["mmap_st"]["scores"]["0.08"]["mean"] is None
  assert "0.08: -" in (tmp_path / "tuning.md").read_text()


def test_a_default_grid_is_centred_on_the_methods_resolved_lr(env, tmp_path):
  """The runs of a default grid are the method's own resolved lr times the factors (not a
  placeholder value of the tuned field)."""
  runs = _FakeRuns()
  overrides = _overrides(env)
  resolved = sweep.make_settings(env["ref"], "method=coop_mt", overrides)[0].config
  from mmap_jax.train import setup
  lr = setup.recipe(resolved).recipe.lr
  tune.tune(env["ref"], str(tmp_path), plan={"coop_mt": None}, overrides=overrides,
            max_extensions=0, factors=(0.5, 1, 2), run_fn=runs, log=lambda s: None)
  assert sorted({r[1] for r in runs.ran}) == pytest.approx([lr / 2, lr, 2 * lr])


def test_default_grid_is_the_resolved_lr_times_factors(env):
  settings = sweep.make_settings(env["ref"], "method=mmap_st", _overrides(env))
  from mmap_jax.train import setup
  lr = setup.recipe(settings[0].config).recipe.lr
  assert tune.default_grid(settings[0].config) == pytest.approx([lr * f for f in tune.FACTORS])
  assert tune.default_grid(settings[0].config, (2, 0.5, 1)) == pytest.approx(
      [lr / 2, lr, lr * 2])
  assert tune.parse_plan(None) == {m: None for m in tune.DEFAULT_METHODS}
  assert tune.parse_plan("coop_mt=0.1,0.01;mmap_st") == {"coop_mt": [0.01, 0.1], "mmap_st": None}


@pytest.mark.parametrize("kwargs,needle", [
    ({"overrides": {}}, r"train\.eval_every=2 validates 3 times; tuning needs >= 5"),
    ({"tuning_seeds": [100]}, r"at least 2 tuning seeds"),
    ({"overrides": {"optim.lr": "0.1", "train.eval_every": "1"}}, r"--config\.optim\.lr is set"),
    ({"plan": {"nope_mt": [0.1, 0.2]}}, r"method='nope_mt'"),
    ({"factors": (1.0,)}, r"--factors=\[1\.0\]: give at least 2"),
])
def test_bad_plans_fail_before_any_run(env, tmp_path, kwargs, needle):
  args = {"plan": {"coop_mt": [0.01, 0.02]}, "overrides": _overrides(env)} | kwargs
  args["overrides"] = ts._overrides(env["data"]) | args["overrides"]
  with pytest.raises(sweep.SweepError, match=needle):
    tune.tune(env["ref"], str(tmp_path), run_fn=lambda c, w: pytest.fail("ran"),
              log=lambda s: None, **args)
  with pytest.raises(tune.TuneError, match="values must be numbers"):
    tune.parse_plan("coop_mt=a,b")


def test_sweep_applies_tuned_values_on_disjoint_seeds(env, tmp_path):
  tuned = {"field": "optim.lr", "tuning_seeds": [100, 101], "values": {"coop_mt": 0.08}}
  settings = sweep.make_settings(env["ref"], "method=coop_mt,mmap_mt", ts._overrides(env["data"]),
                                 seeds=[0, 1], tuned=tuned)
  assert [s.config.optim.lr for s in settings] == [0.08, None]
  # An MT ablation on mmap_mt's code path takes mmap_mt's tuned value; ST forms never inherit.
  tuned_mt = tuned | {"values": {"mmap_mt": 0.03}}
  ablations = sweep.make_settings(env["ref"], "method=mmap_indep_mt,mmap_task_mt,mmap_st",
                                  ts._overrides(env["data"]), seeds=[0], tuned=tuned_mt)
  assert [s.config.optim.lr for s in ablations] == [0.03, 0.03, None]
  assert "--config.optim.lr=0.08" in settings[0].runs[0].command("/tmp/x")
  swept = sweep.make_settings(env["ref"], "method=coop_mt;optim.lr=0.5",
                              ts._overrides(env["data"]), seeds=[0], tuned=tuned)
  assert swept[0].config.optim.lr == 0.5                  # a swept field wins
  with pytest.raises(sweep.SweepError, match=r"\[101\] were tuning seeds"):
    sweep.make_settings(env["ref"], "method=coop_mt", ts._overrides(env["data"]),
                        seeds=[0, 101], tuned=tuned)
  path = tmp_path / "tuned.json"
  path.write_text(json.dumps(tuned))
  assert tune.load_tuned(str(path)) == tuned
  # Merged files (e.g. values tuned at prompt.budget=equal): later values win, seeds are all.
  (tmp_path / "b.json").write_text(json.dumps(
      {"field": "optim.lr", "tuning_seeds": [102], "values": {"coop_mt": 0.5, "vpt_mt": 0.1}}))
  assert tune.load_tuned(f"{path},{tmp_path / 'b.json'}") == {
      "field": "optim.lr", "tuning_seeds": [100, 101, 102],
      "values": {"coop_mt": 0.5, "vpt_mt": 0.1}}
  (tmp_path / "c.json").write_text(json.dumps(
      {"field": "optim.weight_decay", "tuning_seeds": [100], "values": {}}))
  with pytest.raises(sweep.SweepError, match="same field"):
    tune.load_tuned(f"{path},{tmp_path / 'c.json'}")
  with pytest.raises(sweep.SweepError, match="no such file"):
    tune.load_tuned(str(tmp_path / "none.json"))


def test_demo_config_validates_five_times():
  from configs import demo
  tune.check_eval_cadence(demo.get_config(), "demo")


@pytest.mark.slow   # 6 real tiny runs (~2-3 min on 2 cores)
def test_real_tuning_on_the_tiny_config(env, tmp_path):
  """launch.tune's code path with the real trainer: coop_mt on the tiny runlocal config."""
  out = tune.tune(env["ref"], str(tmp_path), plan={"coop_mt": [0.002, 0.02]},
                  overrides=_overrides(env), max_extensions=0, log=lambda s: None)
  m = out["methods"]["coop_mt"]      # (extending the grid: the test above)
  assert m["grid"] == [0.002, 0.02] and m["best"] in m["grid"]
  for v in m["grid"]:
    for seed in (100, 101):
      res = json.loads((tmp_path / "coop_mt" / f"method=coop_mt__optim.lr={v!r}" /
                        f"seed={seed}" / "results.json").read_text())
      assert len(res["selection"]["history"]) == 6            # validated after every step
  assert m["scores"][repr(m["best"])]["mean"] == max(s["mean"] for s in m["scores"].values())
  assert os.path.isfile(tmp_path / "tuning.md")
