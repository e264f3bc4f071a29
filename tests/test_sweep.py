"""launch.sweep: a tiny two-setting sweep, its table vs the per-run JSONs, resume, CLI, errors."""
from __future__ import annotations

import json
import os
import pathlib
import shlex
import subprocess
import sys

import numpy as np
import pytest

from mmap_jax import sweep
from mmap_jax.train import loop
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
    self.ran.append(os.path.basename(workdir))
    return loop.train_and_evaluate(config, workdir)


@pytest.fixture(scope="module")
def swept(env):
  """zeroshot (evaluation only) and coop_mt (6 tiny steps), in process."""
  settings = sweep.make_settings(env["ref"], "method=zeroshot,coop_mt", _overrides(env["data"]))
  workdir = env["root"] / "cmp"
  rec = _Recorder()
  summary = sweep.run(settings, str(workdir), run_fn=rec, log=lambda s: None)
  return {"settings": settings, "workdir": workdir, "summary": summary, "ran": rec.ran}


def _per_run(workdir: pathlib.Path, name: str) -> dict:
  return json.loads((workdir / name / "results.json").read_text())


def test_table_matches_per_run_results(swept):
  workdir, summary = swept["workdir"], swept["summary"]
  assert swept["ran"] == ["method=zeroshot", "method=coop_mt"]
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(summary))
  assert [r["setting"] for r in saved["rows"]] == [{"method": "zeroshot"}, {"method": "coop_mt"}]
  names = ["photo", "clipart", "sketch", "painting"]
  assert saved["tasks"] == {t: {"num_classes": 10} for t in names}
  md_rows = [l for l in (workdir / "results.md").read_text().splitlines() if l.startswith("| ")]
  assert md_rows[0].split(" | ")[:2] == ["| method", "photo (10)"]
  for row, md in zip(saved["rows"], md_rows[1:]):
    run = _per_run(workdir, row["workdir"])
    assert run["method"] == row["setting"]["method"]
    assert row["accuracy"] == {t: run["tasks"][t]["accuracy"] for t in names}
    assert all(0.0 <= a <= 1.0 for a in row["accuracy"].values())
    assert row["average"] == pytest.approx(np.mean(list(row["accuracy"].values())))
    assert row["average"] == run["average"]
    assert row["trainable_params"] == run["trainable_params"]
    assert row["trainable_percent"] == run["trainable_percent"]
    cells = [c.strip() for c in md.strip("|").split("|")]
    assert cells[0] == row["setting"]["method"]
    assert cells[1:5] == [f"{100 * row['accuracy'][t]:.2f}" for t in names]
    assert cells[5] == f"**{100 * row['average']:.2f}**"
    assert cells[6] == f"{row['trainable_params']:,}"
  assert saved["rows"][0]["trainable_params"] == 0 < saved["rows"][1]["trainable_params"]
  assert (workdir / "accuracy_vs_params.png").read_bytes()[:8] == PNG_MAGIC


def test_resume_reruns_only_the_unfinished_setting(swept):
  workdir, settings = swept["workdir"], swept["settings"]
  kept = workdir / "method=coop_mt" / "results.json"
  mtime = kept.stat().st_mtime_ns
  (workdir / "method=zeroshot" / "results.json").unlink()
  rec = _Recorder()
  again = sweep.run(settings, str(workdir), run_fn=rec, log=lambda s: None)
  assert rec.ran == ["method=zeroshot"]
  assert kept.stat().st_mtime_ns == mtime
  assert again == swept["summary"]
  rec = _Recorder()
  sweep.run(settings, str(workdir), run_fn=rec, log=lambda s: None)
  assert rec.ran == []


def test_a_preempted_setting_stops_the_sweep_and_is_reported(swept, tmp_path):
  ran = []

  def preempted_run(config, workdir):
    ran.append(os.path.basename(workdir))
    return {"preempted": True, "step": 3}
  out = sweep.run(swept["settings"], str(tmp_path / "p"), run_fn=preempted_run, log=lambda s: None)
  assert ran == ["method=zeroshot"] and out["preempted"] == "method=zeroshot"
  assert "preempted" not in swept["summary"]


def test_cli_print_only_runs_as_is_and_resume_only_tabulates(env, swept):
  """--print_only lines are runnable launch.train commands; a finished sweep only tabulates."""
  workdir = swept["workdir"]
  flags = [f"--config={env['ref']}", "--sweep=method=zeroshot,coop_mt", f"--workdir={workdir}",
           *fx.override_flags(env["data"])]
  proc = subprocess.run([sys.executable, "-m", "launch.sweep", *flags, "--print_only"], cwd=REPO,
                        env=fx.subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  assert len(lines) == 2 and all(l.startswith("# finished: python -m launch.train ") for l in lines)
  zeroshot = shlex.split(lines[0][len("# finished: "):])
  assert f"--config={env['ref']}" in zeroshot and "--config.method=zeroshot" in zeroshot
  assert f"--workdir={workdir / 'method=zeroshot'}" in zeroshot
  assert f"--config.data.data_dir={env['data']}" in zeroshot
  before = _per_run(workdir, "method=zeroshot")
  (workdir / "method=zeroshot" / "results.json").unlink()
  train = subprocess.run([sys.executable, *zeroshot[1:]], cwd=REPO, env=fx.subprocess_env(),
                         capture_output=True, text=True, timeout=300)
  assert train.returncode == 0, train.stderr[-3000:]
  assert _per_run(workdir, "method=zeroshot")["tasks"] == before["tasks"]

  proc = subprocess.run([sys.executable, "-m", "launch.sweep", *flags], cwd=REPO,
                        env=fx.subprocess_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "2 finished, 0 to run" in proc.stdout
  assert "| zeroshot |" in proc.stdout and "| coop_mt |" in proc.stdout
  assert json.loads((workdir / "results.json").read_text()) == json.loads(
      json.dumps(swept["summary"]))


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
  cmd = shlex.split(settings[3].command("/tmp/grid"))
  assert cmd[:4] == ["python", "-m", "launch.train", f"--config={settings[3].config_ref}"]
  assert "--config.optim.lr=0.02" in cmd and "--config.optim.lr=0.5" not in cmd
  assert "--config.method=mmap_mt" in cmd
  assert cmd[-1] == "--workdir=/tmp/grid/method=mmap_mt__optim.lr=0.02"
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


def test_plot_handles_only_zero_parameter_settings(tmp_path):
  path = tmp_path / "p.png"
  sweep.plot_accuracy_vs_params(str(path), [("zeroshot", 0.0, 0.5)])
  assert path.read_bytes()[:8] == PNG_MAGIC


def test_outputs_copy_affinity_heatmaps(env, tmp_path):
  """Without training: fake per-run files are enough for the table, plots and heatmap copies."""
  settings = sweep.make_settings(env["ref"], "method=coop_mt,mmap_mt", _overrides(env["data"]))
  for i, s in enumerate(settings):
    (tmp_path / s.name).mkdir()
    (tmp_path / s.name / "results.json").write_text(json.dumps({
        "method": s.values["method"], "tasks": {"a": {"num_classes": 3, "accuracy": 0.5 + i / 4}},
        "average": 0.5 + i / 4, "trainable_params": 10 ** (i + 2),
        "trainable_percent": 0.01 * 10 ** i}))
  (tmp_path / "method=mmap_mt" / "affinity.png").write_bytes(PNG_MAGIC + b"x")
  summary = sweep.write_outputs(settings, str(tmp_path), log=lambda s: None)
  assert [r["average"] for r in summary["rows"]] == [0.5, 0.75]
  assert (tmp_path / "affinity_method=mmap_mt.png").read_bytes() == PNG_MAGIC + b"x"
  assert not (tmp_path / "affinity_method=coop_mt.png").exists()
  assert (tmp_path / "accuracy_vs_params.png").read_bytes()[:8] == PNG_MAGIC
