"""launch.sweep: a tiny 2-setting x 2-seed sweep, its table vs the per-run JSONs, resume, CLI,
errors; seed statistics, table and plot on fake per-run results (no training)."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmap_jax.apps import stats, sweep
from mmap_jax.demo import world_v2
from mmap_jax.train import loop
from mmap_jax.train import run_spec
from tests import train_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]
DEMO = "configs/demo.py"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _overrides(data_dir: str) -> dict[str, str]:
  """The tiny fixture overrides as {field: string}, exactly what --config.* flags carry."""
  return dict(a[len("--config."):].split("=", 1) for a in fx.override_flags(data_dir))


@pytest.fixture(scope="module")
def env(tmp_path_factory, bpe_path):
  root = tmp_path_factory.mktemp("sweep")
  clip_dir = fx.make_tiny_clip(root / "clip", bpe_path)
  return {"root": root, "clip": clip_dir, "data": str(root / "tfds"),
          "ref": f"{DEMO}:clip={clip_dir},runlocal"}


class _Recorder:
  """run_fn that records which sub-workdirs actually ran."""

  def __init__(self):
    self.ran: list[str] = []

  def __call__(self, config, workdir):
    self.ran.append("/".join(pathlib.Path(workdir).parts[-2:]))  # '<setting>/seed=<s>'
    return loop.train_and_evaluate(config, workdir)


SEEDS = (0, 1)
REF = "method=zeroshot"   # the swept fixture's reference (no mmap_mt setting in it)
RUNS = ["method=zeroshot/seed=0", "method=coop_mt/seed=0",
        "method=zeroshot/seed=1", "method=coop_mt/seed=1"]   # seed-major


@pytest.fixture(scope="module")
def swept(env):
  """zeroshot (evaluation only) and coop_mt (6 tiny steps), seeds 0 and 1, in process."""
  settings = sweep.make_settings(env["ref"], "method=zeroshot,coop_mt", _overrides(env["data"]),
                                 seeds=SEEDS)
  workdir = env["root"] / "cmp"
  rec = _Recorder()
  summary = sweep.run(settings, str(workdir), run_fn=rec, log=lambda s: None, reference=REF)
  return {"settings": settings, "workdir": workdir, "summary": summary, "ran": rec.ran}


def _per_run(workdir: pathlib.Path, name: str) -> dict:
  return json.loads((workdir / name / "results.json").read_text())


def _cells(md_line: str) -> list[str]:
  return [c.strip() for c in md_line.strip().strip("|").split("|")]


@pytest.mark.slow
def test_table_matches_per_run_results(swept):
  workdir, summary = swept["workdir"], swept["summary"]
  assert swept["ran"] == RUNS
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(summary))
  assert saved["seeds"] == [0, 1] and saved["missing"] == []
  assert [r["setting"] for r in saved["rows"]] == [{"method": "zeroshot"}, {"method": "coop_mt"}]
  names = ["photo", "clipart", "sketch", "painting"]
  n = len(world_v2.OBJECTS)   # the demo config's world 2
  assert saved["tasks"] == {t: {"num_classes": n} for t in names}
  md_rows = [l for l in (workdir / "results.md").read_text().splitlines() if l.startswith("| ")]
  assert _cells(md_rows[0])[:3] == ["method", "seeds", f"photo ({n})"]
  assert "val average" in md_rows[0]   # every run reports its validation accuracy
  for row, md in zip(saved["rows"], md_rows[1:]):
    runs = [_per_run(workdir, w) for w in row["workdirs"]]
    assert row["workdirs"] == [f"method={row['setting']['method']}/seed={s}" for s in SEEDS]
    assert row["seeds"] == [0, 1] and row["n_seeds"] == 2
    assert [r["method"] for r in runs] == [row["setting"]["method"]] * 2
    for t in names:
      per_seed = [r["tasks"][t]["accuracy"] for r in runs]
      assert row["accuracy"][t]["per_seed"] == per_seed
      assert row["accuracy"][t]["mean"] == pytest.approx(np.mean(per_seed))
      assert row["accuracy"][t]["std"] == pytest.approx(np.std(per_seed, ddof=1))
    assert row["average"]["per_seed"] == [r["average"] for r in runs]
    assert row["val_average"]["per_seed"] == [r["val_average"] for r in runs]  # never mixed
    assert row["trainable_params_per_seed"] == [r["trainable_params"] for r in runs]
    assert row["trainable_params"] == runs[0]["trainable_params"] == runs[1]["trainable_params"]
    assert row["trainable_percent"] == pytest.approx(runs[0]["trainable_percent"])
    cells = _cells(md)
    assert cells[:2] == [row["setting"]["method"], "2"]
    assert cells[2:6] == [sweep.format_stat(row["accuracy"][t]) for t in names]
    assert all(" ± " in c for c in cells[2:6])
    assert cells[6] == f"**{sweep.format_stat(row['average'])}**"
    assert cells[7] == sweep.format_stat(row["val_average"])
    assert cells[8] == ("reference" if row["setting"] == {"method": "zeroshot"}
                        else stats.format_ci(row["delta_ci"]))
    assert cells[9] == f"{row['trainable_params']:,}"
  assert "mean ± sample std (ddof=1) over each row's seeds" in (workdir / "results.md").read_text()
  assert saved["rows"][0]["trainable_params"] == 0 < saved["rows"][1]["trainable_params"]
  assert (workdir / "accuracy_vs_params.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_delta_ci_and_csv_come_from_the_runs_per_image_correctness(swept):
  """Each run's test_correct.npz reproduces its accuracies; coop_mt's delta_ci against the
  zero-shot reference is the mean over seeds of the average-accuracy difference, its interval
  the paired bootstrap of those files; accuracies.csv lists every (setting, seed, task)."""
  from mmap_jax.train import correctness
  workdir, summary = swept["workdir"], swept["summary"]
  zs, coop = summary["rows"]
  assert summary["reference"]["setting"] == {"method": "zeroshot"}
  assert zs["reference"] and zs["delta_ci"] is None
  files = {}
  for name in RUNS:
    c = correctness.read_correct(workdir / name)
    res = _per_run(workdir, name)
    assert list(c) == list(res["tasks"])
    for t, hits in c.items():
      assert hits.dtype == bool and hits.size > 0
      assert hits.mean() == pytest.approx(res["tasks"][t]["accuracy"], abs=1e-12)
    files[name] = c
  ci = coop["delta_ci"]
  want = np.mean([a - b for a, b in zip(coop["average"]["per_seed"], zs["average"]["per_seed"])])
  assert ci["mean"] == pytest.approx(want, abs=1e-9) and ci["seeds"] == [0, 1]
  again = stats.paired_delta_ci([files[f"method=coop_mt/seed={s}"] for s in SEEDS],
                                [files[f"method=zeroshot/seed={s}"] for s in SEEDS],
                                **sweep.BOOTSTRAP)
  assert {k: ci[k] for k in ("mean", "low", "high")} == {k: again[k] for k in ("mean", "low",
                                                                               "high")}
  assert ci["low"] <= ci["mean"] <= ci["high"]
  assert ci["excludes_zero"] == (ci["low"] > 0 or ci["high"] < 0)
  lines = (workdir / "accuracies.csv").read_text().splitlines()
  assert lines[0] == "setting,method,seed,task,test_accuracy,val_accuracy"
  assert len(lines) == 1 + 2 * 2 * 4
  first = lines[1].split(",")
  assert first[:4] == ["method=zeroshot", "zeroshot", "0", "photo"]
  assert float(first[4]) == zs["accuracy"]["photo"]["per_seed"][0]


@pytest.mark.slow
def test_seeds_change_the_learned_prompts_not_the_split(swept):
  """config.seed draws the prompt init and batches; the split comes from data.split_seed."""
  from mmap_jax.train import setup, trained
  workdir, settings = swept["workdir"], swept["settings"]
  coop = settings[1]
  assert [r.config.seed for r in coop.runs] == [0, 1]
  assert {r.config.data.split_seed for r in coop.runs} == {0}
  learned = [trained.load_trained(str(workdir / r.name)).learned for r in coop.runs]
  leaves = [np.concatenate([np.ravel(x) for x in jax.tree_util.tree_leaves(l)]) for l in learned]
  assert leaves[0].shape == leaves[1].shape and leaves[0].size > 0
  assert not np.allclose(leaves[0], leaves[1])
  splits = [[(t.info.name, t.info.num_train, t.info.num_test,
              [ex["file_name"] for ex in t.test]) for t in setup.build_tasks(run_spec.resolve(r.config).data)]
            for r in coop.runs]
  assert splits[0] == splits[1]
  assert all(n_train > 0 and n_test > 0 for _, n_train, n_test, _ in splits[0])
  # Zero-shot has nothing seeded: both seeds evaluate the same CLIP on the same test split.
  zs = swept["summary"]["rows"][0]
  assert all(len(set(a["per_seed"])) == 1 and a["std"] == 0.0 for a in zs["accuracy"].values())


@pytest.mark.slow
def test_resume_reruns_only_the_unfinished_run_from_its_own_checkpoints(swept):
  workdir, settings = swept["workdir"], swept["settings"]
  kept = workdir / "method=coop_mt" / "seed=0" / "results.json"
  mtime = kept.stat().st_mtime_ns
  redo = workdir / "method=coop_mt" / "seed=1"
  before = _per_run(workdir, "method=coop_mt/seed=1")
  steps = lambda: {p.name: p.stat().st_mtime_ns for p in (redo / "checkpoints").iterdir()
                   if p.name.isdigit()}
  saved_steps = steps()
  assert saved_steps
  (redo / "results.json").unlink()
  (workdir / "method=zeroshot" / "seed=0" / "results.json").unlink()
  rec = _Recorder()
  again = sweep.run(settings, str(workdir), run_fn=rec, log=lambda s: None, reference=REF)
  assert rec.ran == ["method=zeroshot/seed=0", "method=coop_mt/seed=1"]
  assert kept.stat().st_mtime_ns == mtime
  # Restored at its last step (no new checkpoint, no training) and evaluated the same state.
  assert steps() == saved_steps
  assert _per_run(workdir, "method=coop_mt/seed=1")["tasks"] == before["tasks"]
  # The same table but for the rerun's measured training cost (its wall time).
  drop = lambda s: {**s, "rows": [{k: v for k, v in r.items() if k != "cost"} for r in s["rows"]]}
  assert drop(again) == drop(swept["summary"])
  rec = _Recorder()
  sweep.run(settings, str(workdir), run_fn=rec, log=lambda s: None)
  assert rec.ran == []


@pytest.mark.slow
def test_a_preempted_run_stops_the_sweep_and_a_rerun_resumes_it(swept, tmp_path):
  ran = []

  def run_fn(config, workdir):
    name = os.path.relpath(workdir, tmp_path / "p")
    ran.append(name)
    if name == RUNS[1] and ran.count(name) == 1:
      return {"preempted": True, "step": 3, "exit_code": 130}   # a Ctrl-C'd run
    _fake_run(pathlib.Path(workdir), {"a": 0.5 + config.seed / 10})
    return {}
  out = sweep.run(swept["settings"], str(tmp_path / "p"), run_fn=run_fn, log=lambda s: None)
  assert ran == RUNS[:2] and out["preempted"] == RUNS[1] and out["exit_code"] == 130
  assert out["missing"] == RUNS[1:]
  assert "preempted" not in swept["summary"]
  out = sweep.run(swept["settings"], str(tmp_path / "p"), run_fn=run_fn, log=lambda s: None)
  assert ran == RUNS[:2] + RUNS[1:] and "preempted" not in out and out["missing"] == []


@pytest.mark.slow
def test_cli_print_only_runs_as_is_and_resume_only_tabulates(env, swept):
  """--print_only lines are runnable launch.train commands; a finished sweep only tabulates."""
  workdir = swept["workdir"]
  flags = [f"--config={env['ref']}", "--sweep=method=zeroshot,coop_mt", "--seeds=0,1",
           f"--reference={REF}", f"--workdir={workdir}", *fx.override_flags(env["data"])]
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", *flags, "--print_only"], cwd=REPO,
                        env=fx.subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 4 and all(l.startswith("# finished: python -m launch.train ") for l in lines)
  cmds = [shlex.split(l[len("# finished: "):]) for l in lines]
  assert [c[-1] for c in cmds] == [f"--workdir={workdir / r}" for r in RUNS]
  assert [[a for a in c if a.startswith("--config.seed=")] for c in cmds] == [
      ["--config.seed=0"], ["--config.seed=0"], ["--config.seed=1"], ["--config.seed=1"]]
  zeroshot = cmds[2]
  assert f"--config={env['ref']}" in zeroshot and "--config.method=zeroshot" in zeroshot
  assert f"--config.data.data_dir={env['data']}" in zeroshot
  before = _per_run(workdir, RUNS[2])
  (workdir / RUNS[2] / "results.json").unlink()
  train = subprocess.run([sys.executable, *zeroshot[1:]], cwd=REPO, env=fx.subprocess_env(),
                         capture_output=True, text=True, timeout=300)
  assert train.returncode == 0, train.stderr[-3000:]
  assert _per_run(workdir, RUNS[2])["tasks"] == before["tasks"]

  proc = subprocess.run([sys.executable, "-m", "launch.sweep", *flags], cwd=REPO,
                        env=fx.subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 settings x 2 seeds (0, 1) = 4 runs, 4 finished, 0 to run" in proc.stdout
  assert "| zeroshot | 2 |" in proc.stdout and "| coop_mt | 2 |" in proc.stdout
  assert f"delta_ci vs {REF} |" in proc.stdout   # the runlocal sweep prints the delta_ci column
  # The same table but for the rerun zeroshot's measured training cost (its wall time).
  drop = lambda s: {**s, "rows": [{k: v for k, v in r.items() if k != "cost"} for r in s["rows"]]}
  assert drop(json.loads((workdir / "results.json").read_text())) == drop(json.loads(
      json.dumps(swept["summary"])))


@pytest.mark.slow
def test_cli_rejects_a_seeds_value_that_is_not_an_int_list(env):
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", f"--config={env['ref']}",
                         "--seeds=0,one", "--workdir=/tmp/never", "--print_only"], cwd=REPO,
                        env=fx.subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0 and proc.stdout == ""
  assert "--seeds='0,one': 'one' is not an int" in proc.stderr


def test_grid_is_typed_and_method_is_a_plain_field(env):
  ov = _overrides(env["data"]) | {"optim.lr": "0.5"}
  settings = sweep.make_settings(env["ref"], "method=coop_mt,mmap_mt; optim.lr=0.01,0.02", ov)
  assert [s.name for s in settings] == [
      "method=coop_mt__optim.lr=0.01", "method=coop_mt__optim.lr=0.02",
      "method=mmap_mt__optim.lr=0.01", "method=mmap_mt__optim.lr=0.02"]
  assert [s.config.optim.lr for s in settings] == [0.01, 0.02, 0.01, 0.02]  # sweep beats --config
  assert all(isinstance(s.config.optim.lr, float) for s in settings)
  assert all(s.config.train.steps == 6 for s in settings)                  # overrides everywhere
  # No field depends on `method` at get_config time: it is overridden like any other field.
  assert [s.config.prompt.depth for s in settings] == [None, None, None, None]
  assert [s.config.method for s in settings] == ["coop_mt", "coop_mt", "mmap_mt", "mmap_mt"]
  assert all(s.config_ref == env["ref"] for s in settings)
  assert settings[2].values == {"method": "mmap_mt", "optim.lr": 0.01}
  cmd = shlex.split(settings[3].runs[0].command("/tmp/grid"))
  assert cmd[:4] == ["python", "-m", "launch.train", f"--config={settings[3].config_ref}"]
  assert "--config.optim.lr=0.02" in cmd and "--config.optim.lr=0.5" not in cmd
  assert "--config.method=mmap_mt" in cmd
  assert cmd[-2:] == ["--config.seed=0", "--workdir=/tmp/grid/method=mmap_mt__optim.lr=0.02/seed=0"]
  # Booleans, ints and a field the config file has no argument for.
  s = sweep.make_settings(env["ref"], "clip.remat=true,false;train.steps=3",
                          _overrides(env["data"]))
  assert [(x.config.clip.remat, x.config.train.steps) for x in s] == [(True, 3), (False, 3)]
  assert s[0].name == "clip.remat=true__train.steps=3"


@pytest.mark.parametrize("spec,overrides,needle", [
    ("optim.lrr=0.1", {}, "optim.lrr: no such config field"),
    ("optim=0.1", {}, "optim: is a group of fields"),
    ("train.steps=3,x", {}, "train.steps='x': not a valid int"),
    ("clip.remat=maybe", {}, "clip.remat='maybe': not a valid bool"),
    ("optim.lr=0.1,-1", {}, "optim.lr=-1.0 must be > 0"),
    ("method=coop_mt,nope", {}, "method='nope'"),
    ("method", {}, "not field=v1,v2"),
    ("method=coop_mt,,zeroshot", {}, "field method has an empty value"),
    ("method=coop_mt,coop_mt", {}, "field method repeats a value"),
    ("method=coop_mt;method=zeroshot", {}, "field method is given twice"),
    ("method=coop_mt", {"train.stepz": "1"}, "--config.train.stepz: no such config field"),
    ("method=coop_mt", {"input.batch_size": "0"}, "input.batch_size=0 must be >= 1"),
    ("seed=0,1", {}, "--sweep: seed cannot be swept; use --seeds=0,1,2"),
    ("config.seed=0,1", {}, "--sweep: seed cannot be swept; use --seeds"),
    ("method=coop_mt", {"seed": "-1"}, "seed=-1 must be >= 0"),
    ("method=coop_mt", {"seed": "x"}, "seed='x': not a valid int"),
])
def test_bad_sweeps_fail_naming_the_field(env, spec, overrides, needle):
  with pytest.raises(sweep.SweepError, match=needle.replace(".", r"\.").replace("(", r"\(")):
    sweep.make_settings(env["ref"], spec, _overrides(env["data"]) | overrides)


def test_setting_names_are_filesystem_safe_and_distinct():
  a = sweep.setting_name([("data.domains", "photo,sketch"), ("clip.path", "/ckpt/b16")])
  b = sweep.setting_name([("data.domains", "photo sketch"), ("clip.path", "/ckpt/b16")])
  assert a != b and "/" not in a and " " not in a and "," not in a
  assert sweep.setting_name([("x", "y" * 500)]).__len__() < 140
  assert sweep.setting_name([]) == "default"


def _fake_run(workdir: pathlib.Path, acc: dict, params: int = 100, percent: float = 0.01,
              val: dict | None = None, **extra) -> None:
  """A per-run results.json as train_and_evaluate writes it (optionally with val_accuracy)."""
  workdir.mkdir(parents=True, exist_ok=True)
  res = {"method": "m", "step": 6,
         "tasks": {t: {"num_classes": 3, "accuracy": a} for t, a in acc.items()},
         "average": float(np.mean(list(acc.values()))), "trainable_params": params,
         "trainable_percent": percent, "groups": None, **extra}
  if val is not None:
    res["val_accuracy"] = val
  (workdir / "results.json").write_text(json.dumps(res))


def _fake_correct(workdir: pathlib.Path, hits: dict) -> None:
  from mmap_jax.train import correctness
  correctness.write_correct(workdir, {t: np.asarray(h, bool) for t, h in hits.items()})


def test_delta_ci_marks_intervals_that_exclude_zero(env, tmp_path):
  """Fake per-image files with known answers: coop_mt is wrong on every image the reference
  mmap_mt gets right (all: delta exactly -1 on every draw, marked), vpt_mt equals the reference
  (exactly 0: not marked);
  --reference picks the row; the default picks method=mmap_mt."""
  settings = sweep.make_settings(env["ref"], "method=mmap_mt,coop_mt,vpt_mt",
                                 _overrides(env["data"]), seeds=[0, 1])
  hits = {"method=mmap_mt": [1, 1, 1, 1], "method=coop_mt": [0, 0, 0, 0],
          "method=vpt_mt": [1, 1, 1, 1]}
  for s in settings:
    for r in s.runs:
      _fake_run(tmp_path / r.name, {"a": float(np.mean(hits[s.name]))})
      _fake_correct(tmp_path / r.name, {"a": hits[s.name]})
  summary = sweep.write_outputs(settings, str(tmp_path), log=lambda s: None)
  mmap, coop, vpt = summary["rows"]
  assert summary["reference"]["setting"] == {"method": "mmap_mt"} and mmap["reference"]
  assert {k: coop["delta_ci"][k] for k in ("mean", "low", "high", "excludes_zero")} == {
      "mean": -1.0, "low": -1.0, "high": -1.0, "excludes_zero": True}
  assert (vpt["delta_ci"]["low"], vpt["delta_ci"]["high"]) == (0.0, 0.0)
  md = (tmp_path / "results.md").read_text().splitlines()
  assert _cells(md[0])[4] == "delta_ci vs method=mmap_mt"
  assert [_cells(l)[4] for l in md[2:5]] == ["reference", "-100.00 [-100.00, -100.00] *",
                                             "+0.00 [+0.00, +0.00]"]
  assert "'*' = the interval excludes 0" in md[-1]
  other = sweep.write_outputs(settings, str(tmp_path), log=lambda s: None,
                              reference="method=coop_mt")
  assert other["rows"][0]["delta_ci"]["mean"] == 1.0 and other["rows"][1]["reference"]
  # A run without test_correct.npz (an older run): no interval, with the reason.
  (tmp_path / "method=vpt_mt/seed=0/test_correct.npz").unlink()
  (tmp_path / "method=vpt_mt/seed=1/test_correct.npz").unlink()
  vpt = sweep.write_outputs(settings, str(tmp_path), log=lambda s: None)["rows"][2]
  assert vpt["delta_ci"] is None and "test_correct.npz" in vpt["delta_ci_note"]


def test_reference_must_name_one_setting(env):
  settings = sweep.make_settings(env["ref"], "method=coop_mt,mmap_mt;optim.lr=0.01,0.02",
                                 _overrides(env["data"]))
  refs, note = sweep.resolve_references(settings, None)     # default: ambiguous here, no CI
  assert refs == {} and "matches 2 settings" in note
  with pytest.raises(sweep.SweepError, match="matches 2 settings"):
    sweep.resolve_references(settings, "method=mmap_mt")
  refs, _ = sweep.resolve_references(settings, "method=mmap_mt;optim.lr=0.02")
  assert {s.name for s in refs.values()} == {"method=mmap_mt__optim.lr=0.02"} and len(refs) == 4
  with pytest.raises(sweep.SweepError, match="--reference optim.lrr: no such config field"):
    sweep.resolve_references(settings, "optim.lrr=1")
  with pytest.raises(sweep.SweepError, match="matches 0 settings"):
    sweep.resolve_references(settings, "method=vpt_mt")
  assert sweep.resolve_references(settings, "none")[0] == {}
  with pytest.raises(sweep.SweepError, match="matches 0 settings"):
    sweep.run(settings, "/tmp/never-run", run_fn=lambda c, w: None, reference="method=vpt_mt")


def test_reference_star_pairs_each_row_with_its_own_value(env, tmp_path):
  """'field=*': each row's reference has the row's own value of that swept field (a shots curve
  pairs MmAP-MT and a method at equal shots); '*' on an unswept field is an error."""
  settings = sweep.make_settings(env["ref"], "method=coop_mt,mmap_mt;optim.lr=0.01,0.02",
                                 _overrides(env["data"]))
  refs, note = sweep.resolve_references(settings, "method=mmap_mt;optim.lr=*")
  assert {k: v.name for k, v in refs.items()} == {
      "method=coop_mt__optim.lr=0.01": "method=mmap_mt__optim.lr=0.01",
      "method=coop_mt__optim.lr=0.02": "method=mmap_mt__optim.lr=0.02",
      "method=mmap_mt__optim.lr=0.01": "method=mmap_mt__optim.lr=0.01",
      "method=mmap_mt__optim.lr=0.02": "method=mmap_mt__optim.lr=0.02"}
  assert "at each row's optim.lr" in note
  with pytest.raises(sweep.SweepError, match=r"seed=\*: '\*' .* needs a swept field"):
    sweep.resolve_references(settings, "method=mmap_mt;seed=*")
  # Known answers: coop_mt at lr 0.01 is right where mmap_mt at 0.01 is (delta 0); at 0.02 it is
  # wrong where mmap_mt at 0.02 is right (delta -1). A single reference could not give both.
  hits = {"method=mmap_mt__optim.lr=0.01": [1, 0, 1, 0],
          "method=coop_mt__optim.lr=0.01": [1, 0, 1, 0],
          "method=mmap_mt__optim.lr=0.02": [1, 1, 1, 1],
          "method=coop_mt__optim.lr=0.02": [0, 0, 0, 0]}
  for s in settings:
    for r in s.runs:
      _fake_run(tmp_path / r.name, {"a": float(np.mean(hits[s.name]))})
      _fake_correct(tmp_path / r.name, {"a": hits[s.name]})
  summary = sweep.write_outputs(settings, str(tmp_path), log=lambda s: None,
                                reference="method=mmap_mt;optim.lr=*")
  rows = {sweep.setting_name(tuple(r["setting"].items())): r for r in summary["rows"]}
  assert rows["method=coop_mt__optim.lr=0.01"]["delta_ci"]["mean"] == 0.0
  assert rows["method=coop_mt__optim.lr=0.02"]["delta_ci"]["mean"] == -1.0
  assert rows["method=coop_mt__optim.lr=0.02"]["reference_setting"] == {
      "method": "mmap_mt", "optim.lr": 0.02}
  assert rows["method=mmap_mt__optim.lr=0.01"]["reference"]
  assert rows["method=mmap_mt__optim.lr=0.02"]["reference"]
  assert summary["reference"]["setting"] is None and len(summary["reference"]["settings"]) == 2
  assert "'field=*' in the reference" in (tmp_path / "results.md").read_text()


def test_seed_expansion_names_configs_and_commands(env):
  ov = _overrides(env["data"])
  settings = sweep.make_settings(env["ref"], "method=coop_mt,mmap_mt", ov, seeds=[3, 1, 2])
  assert [s.seeds for s in settings] == [(3, 1, 2)] * 2
  assert [r.name for r in sweep.ordered_runs(settings)] == [
      "method=coop_mt/seed=3", "method=mmap_mt/seed=3", "method=coop_mt/seed=1",
      "method=mmap_mt/seed=1", "method=coop_mt/seed=2", "method=mmap_mt/seed=2"]
  assert [r.config.seed for r in settings[1].runs] == [3, 1, 2]
  assert all(r.config.method == "mmap_mt" for r in settings[1].runs)
  assert all(r.config.train.steps == 6 for s in settings for r in s.runs)
  lines = sweep.commands(settings, "/w")
  assert len(lines) == 6 and not any(l.startswith("#") for l in lines)
  last = shlex.split(lines[-1])
  assert last[-2:] == ["--config.seed=2", "--workdir=/w/method=mmap_mt/seed=2"]
  assert sum(a.startswith("--config.seed=") for a in last) == 1
  # Default: one run with the config's own seed, or with --config.seed.
  assert [s.seeds for s in sweep.make_settings(env["ref"], "method=coop_mt", ov)] == [(0,)]
  one = sweep.make_settings(env["ref"], "method=coop_mt", ov | {"seed": "7"})
  assert one[0].seeds == (7,) and one[0].runs[0].name == "method=coop_mt/seed=7"
  assert shlex.split(one[0].runs[0].command("/w")).count("--config.seed=7") == 1
  with pytest.raises(sweep.SweepError, match="--config.seed and --seeds are both given"):
    sweep.make_settings(env["ref"], "method=coop_mt", ov | {"seed": "7"}, seeds=[0, 1])


@pytest.mark.parametrize("raw,needle", [
    ("0,x", "'x' is not an int"), ("1.5", "'1.5' is not an int"), ("0,,1", "'' is not an int"),
    ("0,-1", "seeds must be >= 0"), ("2,2", "repeats a seed")])
def test_bad_seeds_fail_naming_the_flag(raw, needle):
  with pytest.raises(sweep.SweepError, match=f"^--seeds={raw!r}: .*" + needle.replace(".", r"\.")):
    sweep.parse_seeds(raw)


def test_parse_seeds():
  assert sweep.parse_seeds("0, 1,2") == [0, 1, 2] and sweep.parse_seeds("5") == [5]
  assert sweep.parse_seeds(None) is None and sweep.parse_seeds("") is None


# Known per-seed accuracies (fractions) of two tasks; seed 2 of coop_mt is unfinished.
FAKE = {("method=mmap_mt", 0): {"a": 0.50, "b": 0.40},
        ("method=mmap_mt", 1): {"a": 0.52, "b": 0.46},
        ("method=mmap_mt", 2): {"a": 0.56, "b": 0.43},
        ("method=coop_mt", 0): {"a": 0.30, "b": 0.20},
        ("method=coop_mt", 1): {"a": 0.34, "b": 0.26}}


@pytest.fixture()
def fake_sweep(env, tmp_path):
  """A 2-setting x 3-seed sweep whose runs are fake per-run files (run_fn writes them)."""
  settings = sweep.make_settings(env["ref"], "method=mmap_mt,coop_mt", _overrides(env["data"]),
                                 seeds=[0, 1, 2])
  ran = []

  def run_fn(config, workdir):
    name = os.path.basename(os.path.dirname(workdir))
    ran.append((name, config.seed))
    if (name, config.seed) not in FAKE:
      raise RuntimeError("diverged")
    _fake_run(pathlib.Path(workdir), FAKE[name, config.seed], params=10_000, percent=0.1,
              val={"a": 0.6 + config.seed / 100, "b": 0.5} if name == "method=mmap_mt" else None,
              selection={"step": 6, "by": "val_average"} if name == "method=mmap_mt" else {})
    return {}
  return settings, run_fn, ran, tmp_path


def test_mean_std_table_and_json_on_known_numbers(fake_sweep):
  settings, run_fn, ran, workdir = fake_sweep
  with pytest.raises(sweep.SweepError, match=r"runs failed: method=coop_mt/seed=2 \(RuntimeError"):
    sweep.run(settings, str(workdir), run_fn=run_fn, log=lambda s: None)
  assert ran == [("method=mmap_mt", 0), ("method=coop_mt", 0), ("method=mmap_mt", 1),
                 ("method=coop_mt", 1), ("method=mmap_mt", 2), ("method=coop_mt", 2)]
  saved = json.loads((workdir / "results.json").read_text())
  assert saved["seeds"] == [0, 1, 2] and saved["missing"] == ["method=coop_mt/seed=2"]
  mmap, coop = saved["rows"]
  assert mmap["seeds"] == [0, 1, 2] and coop["seeds"] == [0, 1]
  assert [mmap["n_seeds"], coop["n_seeds"]] == [3, 2]
  assert coop["workdirs"] == ["method=coop_mt/seed=0", "method=coop_mt/seed=1"]
  for row, name in ((mmap, "method=mmap_mt"), (coop, "method=coop_mt")):
    seeds = row["seeds"]
    for t in "ab":
      x = [FAKE[name, s][t] for s in seeds]
      assert row["accuracy"][t]["per_seed"] == x
      assert row["accuracy"][t]["mean"] == pytest.approx(np.mean(x), abs=1e-12)
      assert row["accuracy"][t]["std"] == pytest.approx(np.std(x, ddof=1), abs=1e-12)
    avg = [np.mean(list(FAKE[name, s].values())) for s in seeds]
    assert row["average"]["per_seed"] == pytest.approx(avg)
    assert row["average"]["mean"] == pytest.approx(np.mean(avg))
    assert row["average"]["std"] == pytest.approx(np.std(avg, ddof=1))
  # Validation numbers only where the runs have them; test numbers untouched by them.
  val = [[0.6 + s / 100, 0.5] for s in (0, 1, 2)]
  assert mmap["val_accuracy"]["a"]["per_seed"] == pytest.approx([v[0] for v in val])
  assert mmap["val_average"]["mean"] == pytest.approx(np.mean(val))
  assert mmap["val_average"]["std"] == pytest.approx(np.std(np.mean(val, axis=1), ddof=1))
  assert mmap["selection"] == [{"step": 6, "by": "val_average"}] * 3
  assert "val_average" not in coop and "val_accuracy" not in coop
  assert mmap["trainable_params"] == 10 ** 4 and mmap["trainable_params_per_seed"] == [10 ** 4] * 3
  md = (workdir / "results.md").read_text().splitlines()
  assert _cells(md[0]) == ["method", "seeds", "a (3)", "b (3)", "average", "val average",
                           "trainable params", "trainable (%)"]
  # a: 50, 52, 56 -> 52.67 ± 3.06; b: 40, 46, 43 -> 43.00 ± 3.00; averages 45, 49, 49.5.
  assert _cells(md[2]) == ["mmap_mt", "3", "52.67 ± 3.06", "43.00 ± 3.00", "**47.83 ± 2.47**",
                           "55.50 ± 0.50", "10,000", "0.1"]
  assert _cells(md[3]) == ["coop_mt", "2 of 3", "32.00 ± 2.83", "23.00 ± 4.24",
                           "**27.50 ± 3.54**", "-", "10,000", "0.1"]
  assert "mean ± sample std (ddof=1) over each row's seeds" in md[-1] and "seeds 0, 1, 2" in md[-1]
  assert "val average: the same over the validation split" in md[-1]


def test_one_seed_shows_the_value_and_a_partial_val_row_is_not_mixed(env, tmp_path):
  settings = sweep.make_settings(env["ref"], "method=mmap_mt", _overrides(env["data"]),
                                 seeds=[0, 1])
  _fake_run(tmp_path / "method=mmap_mt/seed=0", {"a": 0.5}, val={"a": 0.7})
  summary = sweep.write_outputs(settings, str(tmp_path), log=lambda s: None)
  row = summary["rows"][0]
  assert row["average"] == {"per_seed": [0.5], "mean": 0.5, "std": None}
  assert row["val_average"] == {"per_seed": [0.7], "mean": 0.7, "std": None}
  md = (tmp_path / "results.md").read_text().splitlines()
  assert _cells(md[2])[:5] == ["mmap_mt", "1 of 2", "50.00", "**50.00**", "70.00"]
  _fake_run(tmp_path / "method=mmap_mt/seed=1", {"a": 0.6})   # no val_accuracy
  row = sweep.write_outputs(settings, str(tmp_path), log=lambda s: None)["rows"][0]
  assert row["average"]["per_seed"] == [0.5, 0.6] and "val_average" not in row
  assert "val average" not in (tmp_path / "results.md").read_text()


def test_seeds_of_a_setting_with_different_tasks_are_refused(env, tmp_path):
  settings = sweep.make_settings(env["ref"], None, _overrides(env["data"]), seeds=[0, 1])
  _fake_run(tmp_path / "default/seed=0", {"a": 0.5})
  _fake_run(tmp_path / "default/seed=1", {"b": 0.5})
  with pytest.raises(sweep.SweepError, match=r"default/seed=1: tasks \['b'\] differ from \['a'\]"):
    sweep.collect(settings, str(tmp_path))


def test_plot_draws_std_error_bars(fake_sweep, monkeypatch):
  settings, run_fn, _, workdir = fake_sweep
  for (name, seed), acc in FAKE.items():
    _fake_run(workdir / name / f"seed={seed}", acc, percent=0.1 if "mmap" in name else 0.0)
  drawn = []
  real = sweep.plot_accuracy_vs_params
  monkeypatch.setattr(sweep, "plot_accuracy_vs_params",
                      lambda path, points: drawn.append(real(path, list(points))))
  summary = sweep.write_outputs(settings, str(workdir), log=lambda s: None)
  assert (workdir / "accuracy_vs_params.png").read_bytes()[:8] == PNG_MAGIC
  fig = drawn[0]
  ax = fig.axes[0]
  bars = [c for c in ax.containers if c.has_yerr]
  assert len(bars) == 1                       # the zero-parameter setting is a line + band
  mean, std = summary["rows"][0]["average"]["mean"], summary["rows"][0]["average"]["std"]
  (x0, lo), (x1, hi) = bars[0].lines[2][0].get_segments()[0]
  assert x0 == x1 == pytest.approx(0.1)
  assert (lo, hi) == pytest.approx((100 * (mean - std), 100 * (mean + std)))
  coop = summary["rows"][1]["average"]
  band = list(ax.patches)                     # axhspan: x in axes, y in data coordinates
  assert len(band) == 1
  ys = band[0].get_path().transformed(band[0].get_patch_transform()).vertices[:, 1]
  assert (min(ys), max(ys)) == pytest.approx((100 * (coop["mean"] - coop["std"]),
                                              100 * (coop["mean"] + coop["std"])))


def test_shots_sweep_draws_one_curve_per_method(env, tmp_path):
  """A sweep over data.shots writes accuracy_vs_shots.png: one line per method, x = shots with
  'all' (0) last, y = the rows' mean test accuracy with their std as error bars."""
  settings = sweep.make_settings(env["ref"], "method=coop_mt,mmap_mt;data.shots=0,4,16",
                                 _overrides(env["data"]), seeds=[0, 1])
  acc = {("coop_mt", 4): 0.3, ("coop_mt", 16): 0.4, ("coop_mt", 0): 0.5,
         ("mmap_mt", 4): 0.35, ("mmap_mt", 16): 0.45, ("mmap_mt", 0): 0.6}
  for s in settings:
    key = (s.values["method"], s.values["data.shots"])
    for r in s.runs:
      _fake_run(tmp_path / r.name, {"a": acc[key] + r.seed / 10})
  drawn = []
  real = sweep.plot_accuracy_vs_shots
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(sweep, "plot_accuracy_vs_shots",
               lambda path, curves: drawn.append((curves, real(path, curves))))
    sweep.write_outputs(settings, str(tmp_path), log=lambda s: None)
  assert (tmp_path / "accuracy_vs_shots.png").read_bytes()[:8] == PNG_MAGIC
  (curves, fig), = drawn
  assert set(curves) == {"coop_mt", "mmap_mt"}
  assert curves["mmap_mt"][0][0] == pytest.approx(0.65)            # mean of 0.6 and 0.7
  assert curves["mmap_mt"][0][1] == pytest.approx(np.std([0.6, 0.7], ddof=1))
  ax = fig.axes[0]
  assert [t.get_text() for t in ax.get_xticklabels()] == ["4", "16", "all"]
  lines = {c.get_label(): c.lines[0] for c in ax.containers}       # errorbar: data line first
  np.testing.assert_allclose(np.asarray(lines["coop_mt"].get_ydata(), float), [35, 45, 55])
  np.testing.assert_allclose(np.asarray(lines["coop_mt"].get_xdata(), float), [0, 1, 2])
  # Without a swept data.shots field there is no curve.
  other = tmp_path / "no_shots"
  settings = sweep.make_settings(env["ref"], "method=coop_mt", _overrides(env["data"]), seeds=[0])
  _fake_run(other / settings[0].runs[0].name, {"a": 0.5})
  sweep.write_outputs(settings, str(other), log=lambda s: None)
  assert not (other / "accuracy_vs_shots.png").exists()


def test_plot_handles_only_zero_parameter_settings(tmp_path):
  path = tmp_path / "p.png"
  fig = sweep.plot_accuracy_vs_params(str(path), [("zeroshot", 0.0, 0.5, None)])
  assert path.read_bytes()[:8] == PNG_MAGIC
  assert not fig.axes[0].containers and not fig.axes[0].patches


def test_outputs_copy_affinity_heatmaps(env, tmp_path):
  """Without training: fake per-run files are enough for the table, plots and heatmap copies."""
  settings = sweep.make_settings(env["ref"], "method=coop_mt,mmap_mt", _overrides(env["data"]),
                                 seeds=[0, 1])
  for i, s in enumerate(settings):
    for r in s.runs:
      _fake_run(tmp_path / r.name, {"a": 0.5 + i / 4}, params=10 ** (i + 2),
                percent=0.01 * 10 ** i)
  (tmp_path / "method=mmap_mt" / "seed=1" / "affinity.png").write_bytes(PNG_MAGIC + b"x")
  summary = sweep.write_outputs(settings, str(tmp_path), log=lambda s: None)
  assert [r["average"]["mean"] for r in summary["rows"]] == [0.5, 0.75]
  assert (tmp_path / "affinity_method=mmap_mt__seed=1.png").read_bytes() == PNG_MAGIC + b"x"
  assert sorted(p.name for p in tmp_path.glob("affinity_*")) == [
      "affinity_method=mmap_mt__seed=1.png"]
  assert (tmp_path / "accuracy_vs_params.png").read_bytes()[:8] == PNG_MAGIC


@pytest.mark.slow
def test_demo_evidence_pieces_are_valid_sweeps(tmp_path):
  """benchmarks/demo_evidence.sh (issue 29's final evidence): every sweep piece validates every
  run of its grid (--print_only) with a tuned.json, and has the run count the budget assumes."""
  tuned = {"field": "optim.lr", "tuning_seeds": [100, 101],
           "values": {m: 0.01 for m in ("coop_mt", "vpt_mt", "maple_mt", "ivlp_mt", "mmap_mt",
                                        "clipadapter_mt", "bitfit_mt", "lora_mt", "fullft_mt",
                                        "mmap_st")}}
  for tune_dir in ("tune", "tune_budget"):   # budget merges both
    (tmp_path / tune_dir).mkdir()
    (tmp_path / tune_dir / "tuned.json").write_text(json.dumps(tuned))
  env = fx.subprocess_env() | {"EVIDENCE_ROOT": str(tmp_path), "EVIDENCE_PRINT_ONLY": "1"}
  expected = {"table": 14 * 5, "budget": 4 * 5, "grouping": 2 * 5, "affinity": 2 * 5,
              "shots": 7 * 4 * 3}
  procs = {piece: subprocess.Popen(["bash", "benchmarks/demo_evidence.sh", piece], cwd=REPO,
                                   env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                   text=True) for piece in expected}   # concurrently: mostly imports
  for piece, runs in expected.items():
    stdout, stderr = procs[piece].communicate(timeout=300)
    assert procs[piece].returncode == 0, (piece, stderr[-3000:])
    lines = [l for l in stdout.splitlines() if "launch.train" in l]
    assert len(lines) == runs, (piece, len(lines))
    assert all(str(tmp_path / piece) in l for l in lines), piece
  bad = subprocess.run(["bash", "benchmarks/demo_evidence.sh", "nope"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=60)
  assert bad.returncode == 2 and "unknown piece" in bad.stderr


def test_run_key_is_the_resolved_run_a_default_valued_swept_field_changes_nothing(env):
  """--reuse's identity: `groups.affinity=cosine` (the default) is the same run as leaving it
  unset; another seed or lr is not."""
  ov = _overrides(env["data"])
  plain, = sweep.make_settings(env["ref"], "method=mmap_mt", ov, seeds=[0, 1])
  cosine, tag = sweep.make_settings(env["ref"], "method=mmap_mt;groups.affinity=cosine,tag", ov,
                                    seeds=[0, 1])
  lr, = sweep.make_settings(env["ref"], "method=mmap_mt;optim.lr=0.123", ov, seeds=[0])
  key = lambda s, i: sweep.run_key(s.runs[i].config)
  assert key(plain, 0) == key(cosine, 0) and key(plain, 1) == key(cosine, 1)
  assert len({key(plain, 0), key(plain, 1), key(tag, 0), key(lr, 0)}) == 4


def test_reuse_copies_only_runs_another_sweep_finished_with_the_same_run_spec(env, tmp_path):
  """A run whose RunSpec another sweep finished is copied (files, not checkpoints; results.json
  names it finished; reused_from.json names the source), the others run; a missing --reuse
  directory is an error naming it."""
  settings = sweep.make_settings(env["ref"], "method=coop_mt", _overrides(env["data"]),
                                 seeds=[0, 1])
  specs = [run_spec.resolve(r.config, jax.device_count()).to_dict() for r in settings[0].runs]
  source = tmp_path / "table" / "method=coop_mt__x" / "seed=0"
  _fake_run(source, {"a": 0.75}, run_spec=specs[0])
  _fake_correct(source, {"a": [True, True, False, True]})
  (source / "checkpoints").mkdir()
  (source / "checkpoints" / "big").write_bytes(b"x")
  other = tmp_path / "table" / "method=coop_mt__y" / "seed=1"   # seed 1, another lr: not ours
  _fake_run(other, {"a": 0.1}, run_spec={**specs[1], "recipe": {"lr": 9.0}})
  ran, lines = [], []

  def run_fn(config, workdir):
    ran.append(config.seed)
    _fake_run(pathlib.Path(workdir), {"a": 0.5})
    return {}

  out = tmp_path / "shots"
  summary = sweep.run(settings, str(out), run_fn=run_fn, log=lines.append,
                      reuse=[str(tmp_path / "table")])
  assert ran == [1]
  copied = out / "method=coop_mt" / "seed=0"
  assert sorted(p.name for p in copied.iterdir()) == [
      "results.json", "reused_from.json", "test_correct.npz"]
  assert json.loads((copied / "reused_from.json").read_text()) == {
      "sweep": str(tmp_path / "table"), "run": "method=coop_mt__x/seed=0"}
  assert (copied / "results.json").read_text() == (source / "results.json").read_text()
  assert summary["rows"][0]["average"]["per_seed"] == [0.75, 0.5]
  assert any("seed=0: reused" in l for l in lines)
  with pytest.raises(sweep.SweepError, match="nowhere"):
    sweep.run(settings, str(tmp_path / "again"), run_fn=run_fn, log=lambda s: None,
              reuse=[str(tmp_path / "nowhere")])


def test_a_finished_run_made_with_another_config_is_an_error_naming_it_and_the_field(env,
                                                                                    tmp_path):
  """A sweep re-run with another lr (e.g. a new --tuned) must not keep the old runs: the run and
  the differing field are named before anything runs; a run recorded without run_spec (older
  results) is not checked."""
  ov = _overrides(env["data"])
  old, = sweep.make_settings(env["ref"], "method=coop_mt", ov | {"optim.lr": "0.01"}, seeds=[0, 1])
  new, = sweep.make_settings(env["ref"], "method=coop_mt", ov | {"optim.lr": "0.02"}, seeds=[0, 1])
  spec = run_spec.resolve(old.runs[0].config, jax.device_count()).to_dict()
  _fake_run(tmp_path / old.runs[0].name, {"a": 0.5}, run_spec=spec)
  _fake_run(tmp_path / old.runs[1].name, {"a": 0.5})   # no run_spec recorded
  ran = []
  run_fn = lambda config, workdir: ran.append(workdir)
  with pytest.raises(sweep.SweepError, match=r"method=coop_mt/seed=0 \(recipe\.recipe\.lr\)"):
    sweep.run([new], str(tmp_path), run_fn=run_fn, log=lambda s: None)
  assert ran == []
  summary = sweep.run([old], str(tmp_path), run_fn=run_fn, log=lambda s: None)
  assert ran == [] and summary["rows"][0]["n_seeds"] == 2


def test_identical_runs_of_two_evidence_sweeps_agree_per_test_image():
  """What --reuse rests on, on the committed evidence: MmAP-MT trained again in the budget sweep
  (`prompt.budget=equal` changes nothing for it) matches the table's runs image for image."""
  from mmap_jax.train import correctness
  root = REPO / "benchmarks" / "results" / "demo_world2" / "evidence"
  for seed in range(5):
    a = correctness.read_correct(root / "table" / "method=mmap_mt" / f"seed={seed}")
    b = correctness.read_correct(root / "budget" / "method=mmap_mt__prompt.budget=equal" /
                                 f"seed={seed}")
    assert list(a) == ["photo", "clipart", "sketch", "painting"] and list(b) == list(a)
    assert all(a[t].size == 1920 and np.array_equal(a[t], b[t]) for t in a), seed
    ga, gb = (json.loads((root / piece / name / f"seed={seed}" / "groups.json").read_text())
              for piece, name in (("table", "method=mmap_mt"),
                                  ("budget", "method=mmap_mt__prompt.budget=equal")))
    assert ga["affinity"] == gb["affinity"] and ga["groups"] == gb["groups"], seed


@pytest.mark.slow
def test_evidence_cost_counts_trained_runs_not_reused_ones(tmp_path):
  """`demo_evidence.sh cost` (sweep.trained_cost): per piece, runs trained there and their wall
  seconds; a --reuse copy, an unfinished run and a run without cost are not trained compute."""
  def fake(path, wall=None, reused=False):
    path.mkdir(parents=True)
    res = {"average": 0.5} | ({"cost": {"wall_seconds": wall}} if wall is not None else {})
    (path / "results.json").write_text(json.dumps(res))
    if reused:
      (path / sweep.REUSED_FILE).write_text("{}")
  fake(tmp_path / "table" / "method=a" / "seed=0", 100.0)
  fake(tmp_path / "table" / "method=a" / "seed=1", 260.0)
  fake(tmp_path / "shots" / "method=a__data.shots=4" / "seed=0", 40.0)
  fake(tmp_path / "shots" / "method=a__data.shots=16" / "seed=0", 100.0, reused=True)
  fake(tmp_path / "tune" / "mmap_mt" / "method=mmap_mt__optim.lr=0.1" / "seed=100", 20.0)
  fake(tmp_path / "tune" / "zeroshot" / "method=zeroshot" / "seed=100")    # no cost recorded
  (tmp_path / "shots" / "method=b" / "seed=0").mkdir(parents=True)        # unfinished
  env = fx.subprocess_env() | {"EVIDENCE_ROOT": str(tmp_path)}
  out = subprocess.run(["bash", "benchmarks/demo_evidence.sh", "cost"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=120)
  assert out.returncode == 0, out.stderr[-3000:]
  cost = json.loads((tmp_path / "cost.json").read_text())
  assert cost["parts"] == {
      "shots": {"trained": 1, "reused": 1, "wall_seconds": 40.0},
      "table": {"trained": 2, "reused": 0, "wall_seconds": 360.0},
      "tune": {"trained": 1, "reused": 0, "wall_seconds": 20.0}}
  assert cost["total"] == {"trained": 4, "reused": 1, "wall_seconds": 420.0,
                           "hours": 0.12}
