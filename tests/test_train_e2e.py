"""End to end on 8 fake CPU devices: grouping + MmAP-MT training, checkpoints, resume, evaluate."""
from __future__ import annotations

import collections
import dataclasses
import json
import pathlib
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

from mmap_jax.train import checkpointing, correctness, loop, setup
from mmap_jax.train import run_spec
from tests import train_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, bpe_path):
  root = tmp_path_factory.mktemp("e2e")
  clip_dir = fx.make_tiny_clip(root / "clip", bpe_path)
  return {"root": root, "clip": clip_dir, "data": str(root / "tfds")}


class _Recorder:
  """A data source that logs every record read as (split, task, index, training steps done)."""

  def __init__(self, base, split, task_id, log, phase):
    self.base, self.split, self.task_id, self.log, self.phase = base, split, task_id, log, phase
    self.lock = threading.Lock()

  def __len__(self):
    return len(self.base)

  def _note(self, keys):
    with self.lock:
      for k in keys:
        self.log.append((self.split, self.task_id, int(k), self.phase["steps"], len(self.log)))

  def __getitem__(self, i):
    self._note([i])
    return self.base[i]

  def __getitems__(self, keys):
    self._note(keys)
    return self.base.__getitems__(keys)


@pytest.fixture(scope="module")
def finished(env):
  """One uninterrupted MmAP-MT run with automatic grouping (in process).

  Every val/test record read is logged with the number of training steps done at that moment
  (`reads`), for `test_test_split_is_read_once_and_only_after_training`.
  """
  from mmap_jax.train import step as train_step
  workdir = env["root"] / "uninterrupted"
  config = fx.tiny_config(env["clip"], env["data"])
  assert config.input.workers == 0  # Reads happen in this process, where they are logged.
  reads, phase = [], {"steps": 0}
  build, make_step = setup.build_tasks, train_step.make_train_step

  def recorded_tasks(c):
    return [dataclasses.replace(
        t, test=_Recorder(t.test, "test", t.task_id, reads, phase),
        val=_Recorder(t.val, "val", t.task_id, reads, phase)) for t in build(c)]

  def counting_step(*args, **kwargs):
    fn = make_step(*args, **kwargs)

    def step(*a):
      out = fn(*a)
      phase["steps"] += 1
      return out
    return step

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(setup, "build_tasks", recorded_tasks)
    mp.setattr(train_step, "make_train_step", counting_step)
    result = loop.train_and_evaluate(config, str(workdir))
  tasks = build(run_spec.resolve(config).data)
  return workdir, result, reads, tasks


def _selected(workdir: pathlib.Path) -> dict:
  import orbax.checkpoint as ocp
  return jax.device_get(ocp.StandardCheckpointer().restore(workdir / "checkpoints" / "6" /
                                                           "selected"))


_scalar_steps = fx.scalar_steps


@pytest.mark.slow
def test_test_split_is_read_once_and_only_after_training(finished):
  """No test record is read while training or validating; each is read once, at the end."""
  _, _, reads, tasks = finished
  test = [r for r in reads if r[0] == "test"]
  val = [r for r in reads if r[0] == "val"]
  assert test and val
  assert {r[3] for r in test} == {6}             # only after the last training step...
  assert min(r[4] for r in test) > max(r[4] for r in val)  # ...and after the last validation
  assert dict(collections.Counter((r[1], r[2]) for r in test)) == {
      (t.task_id, i): 1 for t in tasks for i in range(len(t.test))}
  # Validation ran at steps 2, 4, 6 (eval_every=2), each reading every val record once.
  assert dict(collections.Counter((r[1], r[2], r[3]) for r in val)) == {
      (t.task_id, i, s): 1 for t in tasks for i in range(len(t.val)) for s in (2, 4, 6)}


@pytest.mark.slow
def test_selection_is_best_validation_and_recorded(finished):
  workdir, result, *_ = finished
  sel = result["selection"]
  assert sel["rule"] == "best_val" and "ties go to the earlier step" in sel["reason"]
  history = sel["history"]
  assert [h["step"] for h in history] == [2, 4, 6]
  for h in history:
    assert set(h["val"]) == set(result["tasks"])
    assert h["average"] == pytest.approx(np.mean(list(h["val"].values())))
  averages = [h["average"] for h in history]
  best = history[averages.index(max(averages))]   # the first maximum: ties -> earlier step
  assert sel["step"] == best["step"] == result["step"]
  assert result["val_accuracy"] == best["val"]
  assert result["val_average"] == sel["val_average"] == best["average"]
  assert result["split"] == "test" and result["trained_steps"] == 6
  # The final checkpoint carries the selected state: the learned state of the selected step.
  import orbax.checkpoint as ocp
  at_step = ocp.StandardCheckpointer().restore(
      workdir / "checkpoints" / str(best["step"]) / "state")["learned"]
  for x, y in zip(jax.tree.leaves(jax.device_get(at_step)), jax.tree.leaves(_selected(workdir))):
    np.testing.assert_array_equal(x, y)
  tags = _scalar_steps(workdir / "tensorboard")
  for t in result["tasks"]:
    assert sorted(tags[f"eval/val_accuracy/{t}"]) == [2, 4, 6]
    assert tags[f"final/test_accuracy/{t}"] == [6]
  assert not [k for k in tags if k.startswith("eval/") and "val" not in k]
  assert "selection:" in (workdir / "results.md").read_text()


def test_zeroshot_evaluates_val_and_test_once(env, tmp_path):
  reads, phase = [], {"steps": 0}
  build = setup.build_tasks

  def recorded_tasks(c):
    return [dataclasses.replace(
        t, test=_Recorder(t.test, "test", t.task_id, reads, phase),
        val=_Recorder(t.val, "val", t.task_id, reads, phase)) for t in build(c)]

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(setup, "build_tasks", recorded_tasks)
    result = loop.train_and_evaluate(fx.tiny_config(env["clip"], env["data"], "zeroshot"),
                                     str(tmp_path / "zs"))
  tasks = build(run_spec.resolve(fx.tiny_config(env["clip"], env["data"], "zeroshot")).data)
  assert result["selection"]["reason"] == "zeroshot (no training)"
  assert result["selection"]["step"] == result["step"] == result["trained_steps"] == 0
  assert set(result["val_accuracy"]) == set(result["tasks"])
  # results.json identifies the examples: each task's split-list checksums (data.shots protocol).
  assert {n: r["sha256"] for n, r in result["splits"]["tasks"].items()} == {
      t.info.name: t.info.split_checksums for t in tasks}
  for split in ("val", "test"):
    assert dict(collections.Counter((r[1], r[2]) for r in reads if r[0] == split)) == {
        (t.task_id, i): 1 for t in tasks for i in range(len(getattr(t, split)))}
  assert max(r[4] for r in reads if r[0] == "val") < min(r[4] for r in reads if r[0] == "test")


@pytest.mark.slow
def test_evaluate_val_split_of_the_selected_state(env, finished, tmp_path):
  workdir, result, *_ = finished
  out = loop.evaluate_workdir(fx.tiny_config(env["clip"], env["data"]), str(workdir),
                              out=str(tmp_path), split="val")
  assert out["split"] == "val" and out["evaluated_state"] == "selected"
  assert out["step"] == result["step"] and out["checkpoint_step"] == 6
  assert {t: v["accuracy"] for t, v in out["tasks"].items()} == result["val_accuracy"]


def _final_learned(workdir: pathlib.Path, config) -> dict:
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  step = ckpt.latest_step()
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  ckpt.close()
  return step, jax.device_get(restored["learned"])


@pytest.mark.slow
def test_run_writes_everything(finished):
  workdir, result, *_ = finished
  names = ["photo", "clipart", "sketch", "painting"]
  for f in ("affinity.npy", "affinity.png", "groups.json", "results.json", "results.md",
            "affinity_history.npy", "grouping_warmup.safetensors"):
    assert (workdir / f).is_file(), f
  groups = json.loads((workdir / "groups.json").read_text())
  assert groups["mode"] == "gradient" and groups["alternatives"][0]["groups"] == groups["groups"]
  assert sorted(sum(groups["groups"], [])) == sorted(names)
  assert len(groups["groups"]) == 2
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(result))
  assert set(saved["tasks"]) == set(names)
  for t in names:
    assert 0.0 <= saved["tasks"][t]["accuracy"] <= 1.0
    assert saved["tasks"][t]["num_classes"] == 24   # the demo config's world 2
  assert saved["average"] == pytest.approx(np.mean([saved["tasks"][t]["accuracy"] for t in names]))
  assert saved["trainable_params"] > 0 and 0 < saved["trainable_percent"] < 100
  md = (workdir / "results.md").read_text()
  assert "| **average** |" in md and "trainable parameters" in md
  steps = sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())
  assert steps[-1] == 6 and len(steps) <= 3
  events = list((workdir / "tensorboard").glob("events.out.tfevents.*"))
  assert events and events[0].stat().st_size > 0
  # A prompt checkpoint holds no CLIP weights: kilobytes, not the encoder.
  size = sum(p.stat().st_size for p in (workdir / "checkpoints" / "6").rglob("*") if p.is_file())
  assert size < 2_000_000


def _launch_train(env, method: str, workdir, signal_at: str | None = None
                  ) -> subprocess.CompletedProcess:
  """launch.train on the tiny demo; `signal_at` ("STEP:SIGNAL") injects a signal after a step
  (through the test-only wrapper tests/faults.py: the loop itself has no fault injection)."""
  launcher = ["-m", "tests.faults", signal_at] if signal_at else ["-m"]
  cmd = [sys.executable, *launcher, "launch.train",
         f"--config=configs/demo.py:method={method},clip={env['clip']},runlocal",
         f"--workdir={workdir}", *fx.override_flags(env["data"])]
  return subprocess.run(cmd, cwd=REPO, env=fx.subprocess_env(), capture_output=True,
                        text=True, timeout=600)


@pytest.mark.slow
def test_cli_user_errors_are_one_block_with_exit_status_2(env, tmp_path):
  """What a user sees: no traceback, exit 2, the field or file named (a missing checkpoint in
  one line, without orbax's cleanup thread dying at interpreter exit)."""
  empty = tmp_path / "grouping_only"
  empty.mkdir()
  runs = {
      "evaluate": ["launch.evaluate", f"--workdir={empty}"],
      "predict": ["launch.predict", f"--workdir={empty}", "--task=photo", str(tmp_path / "x.png")],
      "train": ["launch.train", "--config=configs/demo.py:runlocal", "--config.method=mmap_mtt",
                "--config.seed=-1", f"--workdir={tmp_path / 'w'}"],
      "file_workdir": ["launch.train", f"--config=configs/demo.py:clip={env['clip']},runlocal",
                       f"--workdir={tmp_path / 'a_file'}", *fx.override_flags(env["data"])],
  }
  (tmp_path / "a_file").write_text("x")
  for name, args in runs.items():
    proc = subprocess.run([sys.executable, "-m", *args], cwd=REPO, env=fx.subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    lines = [l for l in proc.stderr.splitlines() if l.startswith("error:")]
    assert proc.returncode == 2 and len(lines) == 1, (name, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr and "futures" not in proc.stderr, (name, proc.stderr)
    if name in ("evaluate", "predict"):
      assert "no checkpoint in" in lines[0] and not (empty / "checkpoints").exists()
    elif name == "train":   # every bad field in the one block
      assert "method='mmap_mtt'" in proc.stderr and "seed=-1" in proc.stderr
    else:
      assert f"workdir {tmp_path / 'a_file'} is a file" in lines[0]


@pytest.mark.slow
def test_evaluate_reproduces_final_accuracy(env, finished):
  workdir, result, *_ = finished
  out = env["root"] / "reeval"
  proc = subprocess.run(
      [sys.executable, "-m", "launch.evaluate",
       f"--config=configs/demo.py:method=mmap_mt,clip={env['clip']},runlocal",
       f"--workdir={workdir}", f"--out={out}", *fx.override_flags(env["data"])],
      cwd=REPO, env=fx.subprocess_env(), capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  again = json.loads((out / "results.json").read_text())
  assert again["tasks"] == json.loads(json.dumps(result))["tasks"]
  assert "| **average** |" in proc.stdout


def _fake_grouping_step(affinity):
  """A stand-in for the compiled warm-up step (no CLIP compile): params += 0.25 per step and a
  fixed affinity, so the host loop, the files and the init can be checked in seconds."""
  import jax.numpy as jnp

  def make(clip_cfg, spec, optimizer, **kwargs):
    def step(gstate, clip_params, class_tokens, batch, record):
      a = jnp.asarray(affinity, jnp.float32)
      new = dict(gstate, params=jax.tree.map(lambda x: x + 0.25, gstate["params"]),
                 affinity=gstate["affinity"].update(a, record))
      return new, {"loss": jnp.float32(1.0), "mean_pairwise_affinity": jnp.float32(0.5),
                   "affinity": a}
    return step
  return make


@pytest.mark.slow
def test_init_from_warmup_and_restart_before_first_checkpoint(env, tmp_path, monkeypatch):
  """groups.init_from_warmup: every group-shared MmAP starts as the warm-up's shared MmAP (not
  the task-specific ones). A restart before the first checkpoint reads the groups and the
  warm-up MmAP back from the workdir (no second warm-up) and gets the identical init."""
  from mmap_jax import grouping
  from mmap_jax.prompts import multitask
  from mmap_jax.train import grouping_run
  from safetensors.numpy import load_file
  planted = np.array([[1, .1, .2, .9], [.1, 1, .8, 0], [.2, .8, 1, .1], [.9, 0, .1, 1]])
  monkeypatch.setattr(grouping_run, "make_grouping_step", _fake_grouping_step(planted))
  c = fx.tiny_config(env["clip"], env["data"])
  c.groups.init_from_warmup = True
  workdir = tmp_path / "init"
  first = loop._prepare(loop.resolve(c), str(workdir))
  first.ckpt.close()
  assert first.groups == ((0, 3), (1, 2))
  record = grouping.load_grouping(workdir)
  assert record["mode"] == "gradient" and record["settings"]["affinity_params"] == "source"
  assert np.load(workdir / grouping.HISTORY_FILE).shape == (2, 4, 4)
  warm = load_file(workdir / grouping_run.WARMUP_FILE)
  learned = jax.device_get(first.state["learned"])
  fresh = multitask.init_learned(jax.random.key(c.seed), first.clip.cfg, first.spec, 4,
                                 first.groups)
  for name, leaf in learned["group"].items():
    for g in range(2):
      np.testing.assert_array_equal(leaf[g], warm[f"shared/{name}"])
    assert not np.allclose(leaf[0], fresh["group"][name][0])
  for name, leaf in learned["task"].items():
    np.testing.assert_array_equal(leaf, fresh["task"][name])
  # restart (no checkpoint yet): no warm-up may run; same groups, bit-identical init
  monkeypatch.setattr(grouping_run, "make_grouping_step", None)
  again = loop._prepare(loop.resolve(c), str(workdir))
  again.ckpt.close()
  assert again.groups == first.groups
  restarted = jax.device_get(again.state["learned"])
  for x, y in zip(jax.tree.leaves(learned), jax.tree.leaves(restarted)):
    np.testing.assert_array_equal(x, y)
  # a grouping made with other settings is never reused silently
  c.groups.affinity_params = "all"
  with pytest.raises(setup.ConfigError, match="affinity_params: file 'source' vs config 'all'"):
    loop._prepare(loop.resolve(c), str(workdir))


@pytest.mark.slow
def test_ablation_mode_trains_without_a_warmup(env, tmp_path, monkeypatch):
  """groups.mode=random: a seeded balanced partition, groups.json with the mode, no warm-up."""
  from mmap_jax import grouping
  from mmap_jax.train import grouping_run

  def no_warmup(*args, **kwargs):
    raise AssertionError("groups.mode=random must not run the grouping warm-up")
  monkeypatch.setattr(grouping_run, "run_grouping", no_warmup)
  c = fx.tiny_config(env["clip"], env["data"])
  c.groups.mode, c.groups.seed = "random", 5
  c.train.steps = c.train.ckpt_every = c.train.eval_every = 2
  workdir = tmp_path / "random"
  result = loop.train_and_evaluate(c, str(workdir))
  names = ["photo", "clipart", "sketch", "painting"]
  expected = grouping.random_groups(4, 2, 5)
  record = grouping.load_grouping(workdir)
  assert record["mode"] == "random" and record["settings"] == {"mode": "random", "num_groups": 2,
                                                               "seed": 5}
  assert grouping.load_groups(workdir, names) == expected and record["affinity"] is None
  assert not (workdir / "affinity.npy").exists()
  assert not (workdir / grouping_run.WARMUP_FILE).exists()
  assert result["groups"] == [[names[i] for i in g] for g in expected]
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  meta = ckpt.read_meta()
  ckpt.close()
  assert meta["groups"] == [list(g) for g in expected]


@pytest.mark.parametrize("field,value,needle", [
    ("method", "mmap_xx", "method="),
    ("prompt.source_dim", 7, "prompt.source_dim"),
    ("input.batch_size", 12, "input.batch_size"),
    ("groups.mode", "magic", "groups.mode"),
])
def test_invalid_config_is_rejected_naming_the_field(env, tmp_path, field, value, needle):
  c = fx.tiny_config(env["clip"], env["data"])
  node = c
  *parents, leaf = field.split(".")
  for p in parents:
    node = node[p]
  with node.ignore_type():
    node[leaf] = value
  with pytest.raises(setup.ConfigError, match=needle.replace(".", r"\.")):
    loop.train_and_evaluate(c, str(tmp_path / "bad"))
  assert not (tmp_path / "bad" / "checkpoints").exists()


def test_half_written_checkpoint_is_never_latest(tmp_path):
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"), async_save=False)
  state = {"learned": {"w": np.ones(3, np.float32)}, "step": np.asarray(2)}
  ckpt.save(2, state, {"pos": 1}, {"groups": None})
  ckpt.close()
  # What an interrupted orbax save leaves behind: a temporary directory for a later step.
  tmp = tmp_path / "ck" / "4.orbax-checkpoint-tmp-1234567"
  (tmp / "state").mkdir(parents=True)
  (tmp / "state" / "partial").write_bytes(b"\0" * 10)
  ckpt = checkpointing.Checkpointer(str(tmp_path / "ck"))
  assert ckpt.latest_step() == 2
  assert ckpt.restore(state).data_state == {"pos": 1}
  ckpt.close()


def _tree_bytes(root: pathlib.Path) -> dict[str, bytes | None]:
  """Every file (its bytes) and directory (None) under `root`, by relative path."""
  return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
          for p in sorted(root.rglob("*"))}


@pytest.mark.slow
def test_read_only_tools_never_touch_a_run(env, finished, tmp_path):
  """Prediction and evaluation of a run that is still being written (a temporary step dir
  orbax is filling, an unfinished later step) create, clean and delete nothing there."""
  import shutil
  from mmap_jax import predict
  from PIL import Image
  workdir_ref, result, *_ = finished
  workdir = tmp_path / "run"
  shutil.copytree(workdir_ref, workdir)
  ckpts = workdir / "checkpoints"
  planted = ckpts / "999.orbax-checkpoint-tmp-123" / "state"
  planted.mkdir(parents=True)
  (planted / "partial").write_bytes(b"\1" * 10)
  unfinished = ckpts / "8.orbax-checkpoint-tmp-456"
  shutil.copytree(ckpts / "6", unfinished)
  (unfinished / "state" / "_METADATA").unlink(missing_ok=True)
  before = _tree_bytes(workdir)
  image = tmp_path / "x.png"
  Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(image)
  out = predict.predict_files(None, None, [image], workdir=str(workdir), task="sketch")
  assert out[0]["top"]
  # No config given: the one the run recorded in its checkpoint.
  again = loop.evaluate_workdir(None, str(workdir), out=str(tmp_path / "eval"))
  assert again["tasks"] == json.loads(json.dumps(result))["tasks"]
  # The test evaluation writes the per-image correctness the paired bootstrap reads, as training.
  got, want = correctness.read_correct(tmp_path / "eval"), correctness.read_correct(workdir)
  assert want is not None and got.keys() == want.keys()
  for name in want:
    np.testing.assert_array_equal(got[name], want[name], err_msg=name)
  assert _tree_bytes(workdir) == before
  # A workdir with no checkpoint (e.g. grouping only) is not given a checkpoints/ directory.
  empty = tmp_path / "grouping_only"
  empty.mkdir()
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    loop.evaluate_workdir(fx.tiny_config(env["clip"], env["data"]), str(empty))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    predict.predict_files(None, None, [image], workdir=str(empty), task="sketch")
  assert list(empty.iterdir()) == []


@pytest.mark.slow
def test_predict_with_trained_prompts_matches_evaluation(env, finished, tmp_path):
  from mmap_jax import predict
  from mmap_jax.checkpoints import store
  from mmap_jax.train import trained as trained_lib
  workdir, result, *_ = finished
  trained = trained_lib.load_trained(str(workdir))
  # The selected state: the one whose test accuracy results.json reports.
  assert trained.spec.method == "mmap_mt" and trained.step == result["step"]
  cfg, params, tok = store.load(env["clip"])
  params, prompts, classes = trained_lib.task_model(trained, cfg, params, "sketch")
  assert prompts.text.shape[1] == 2 * trained.spec.length  # group-shared ++ task-specific
  classifier = predict.build_classifier(params, cfg, tok, classes, prompts)
  task = next(t for t in setup.build_tasks(run_spec.resolve(fx.tiny_config(env["clip"], env["data"])).data)
              if t.info.name == "sketch")
  accuracy = fx.predicted_accuracy(classifier, task, cfg.vision.image_size)
  assert accuracy == pytest.approx(result["tasks"]["sketch"]["accuracy"])
  # The CLI path: files in, the task's own class names out.
  from PIL import Image
  path = tmp_path / "x.png"
  Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(path)
  out = predict.predict_files(None, None, [path], workdir=str(workdir), task="sketch")
  assert set(out[0]["probabilities"]) == set(classes)
  with pytest.raises(ValueError, match="not in this checkpoint"):
    predict.predict_files(None, None, [path], workdir=str(workdir), task="nope")


@pytest.mark.slow
def test_sigterm_saves_a_checkpoint_and_exits(env):
  workdir = env["root"] / "preempted"
  proc = _launch_train(env, "coop_mt", workdir, "3:SIGTERM")
  # Non-zero, so a restarting scheduler reruns it (0 would read as finished).
  assert proc.returncode == loop.PREEMPTED_EXIT_CODE == 143, proc.stderr[-3000:]
  assert "SIGTERM received" in proc.stderr
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  assert ckpt.latest_step() == 3  # ckpt_every=2: step 3 exists only because of the SIGTERM
  ckpt.close()
  assert not (workdir / "results.json").exists()


@pytest.mark.slow
def test_ctrl_c_then_kill_then_resume_is_bit_exact_with_each_step_logged_once(env, finished):
  """One run, interrupted twice:
  1. SIGINT after step 3 (not a checkpoint step): the state of step 3 is saved, one line says
     where and how to resume, exit 130, no traceback.
  2. The same command resumes at step 3 and is SIGKILLed after step 5 (a checkpoint step is 4;
     its asynchronous write may be cut).
  3. The same command resumes from the latest complete checkpoint and ends bit-identical to the
     uninterrupted run: learned pytree, accuracies, validation record and selected state; every
     step shows once in TensorBoard.
  """
  workdir_ref, *_ = finished
  workdir = env["root"] / "interrupted"
  proc = _launch_train(env, "mmap_mt", workdir, "3:SIGINT")
  assert proc.returncode == 130, proc.stderr[-3000:]
  assert "KeyboardInterrupt" not in proc.stderr and "Traceback" not in proc.stderr
  line = f"stopped: checkpoint of step 3 saved in {workdir / 'checkpoints'}; run the same command"
  assert line in proc.stderr, proc.stderr[-3000:]
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"), read_only=True)
  assert ckpt.latest_step() == 3   # ckpt_every=2: step 3 exists only because of the Ctrl-C
  ckpt.close()
  killed = _launch_train(env, "mmap_mt", workdir, "5:SIGKILL")
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert "at step 3" in killed.stderr and not (workdir / "results.json").exists()
  resumed = _launch_train(env, "mmap_mt", workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  # From step 4's checkpoint, or step 3's if the kill came before step 4's asynchronous write
  # was complete.
  assert "resumed from" in resumed.stderr
  assert "at step 4" in resumed.stderr or "at step 3" in resumed.stderr, resumed.stderr[-3000:]
  step_a, a = _final_learned(workdir_ref, None)
  step_b, b = _final_learned(workdir, None)
  assert step_a == step_b == 6
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b) > 0
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y)
  ref = json.loads((workdir_ref / "results.json").read_text())
  got = json.loads((workdir / "results.json").read_text())
  assert got["tasks"] == ref["tasks"]
  # The validation record and the selected state survive both interruptions exactly.
  assert got["selection"] == ref["selection"] and got["val_accuracy"] == ref["val_accuracy"]
  for x, y in zip(jax.tree.leaves(_selected(workdir_ref)), jax.tree.leaves(_selected(workdir))):
    np.testing.assert_array_equal(x, y)
  steps = fx.tensorboard_scalar_steps(workdir / "tensorboard")
  assert steps["train/loss"] == [2, 4, 6]
  for tag, logged in steps.items():
    assert len(logged) == len(set(logged)), (tag, logged)


def test_a_second_ctrl_c_exits_at_once(monkeypatch):
  """In-process: the handler the loop installs (one process). The first SIGINT asks for a
  save (exit 130), SIGTERM alone means 143; a second SIGINT exits immediately, unsaved."""
  import os
  import signal
  from mmap_jax.train import cadence
  exits = []
  monkeypatch.setattr(cadence.os, "_exit", exits.append)
  before = signal.getsignal(signal.SIGINT)   # default, or SIG_IGN in a backgrounded shell job
  with cadence.Preemption(lambda c: False, coordinated=False) as p:
    assert not p.check() and p.exit_code == 143
    os.kill(os.getpid(), signal.SIGINT)   # delivered to the handler before the next bytecode
    assert p.check() and p.exit_code == 130 == cadence.INTERRUPTED_EXIT_CODE and not exits
    os.kill(os.getpid(), signal.SIGINT)
    assert exits == [130]
  assert signal.getsignal(signal.SIGINT) is before   # restored
  with cadence.Preemption(lambda c: False, coordinated=False) as p:
    os.kill(os.getpid(), signal.SIGTERM)
    assert p.check() and p.exit_code == 143


def test_the_first_progress_line_gives_the_compile_time_not_a_rate(monkeypatch):
  """The first interval holds the compilation: its line says how long it took (no "nan img/s");
  the lines after it time the steps since."""
  from mmap_jax.train import report
  clock = iter([100.0, 112.5, 122.5])
  monkeypatch.setattr(report.time, "perf_counter", lambda: next(clock))
  progress = report.Progress(total_steps=10, images_per_step=4)   # created at t=100
  first = progress.line(2, 2.5, 1e-3)                               # t=112.5
  assert first == "step 2/10  loss 2.5000  lr 1.00e-03  compile + first steps 12.5s"
  assert progress.line(4, 2.0, 1e-3).endswith("  0.8 img/s  ETA 0m30s")   # 2 steps in 10 s


def test_non_finite_step_keeps_the_previous_state():
  import jax.numpy as jnp
  import optax
  from mmap_jax.train import step as train_step

  def loss_fn(learned, frozen, batch):
    loss = jnp.sum((learned["w"] * batch["x"]) ** 2) * frozen["scale"]
    return loss, {"per_task_loss": loss[None]}

  opt = optax.sgd(0.1, momentum=0.9)
  state = train_step.init_state({"w": jnp.ones(3)}, opt)
  fn = train_step.make_train_step(loss_fn, opt, donate=False)
  good, m = fn(state, {"scale": 1.0}, {"x": jnp.ones(3)})
  assert bool(m["finite"]) and not np.allclose(good["learned"]["w"], 1.0)
  bad, m = fn(good, {"scale": jnp.inf}, {"x": jnp.ones(3)})
  assert not bool(m["finite"])
  jax.tree.map(np.testing.assert_array_equal, bad["learned"], good["learned"])
  jax.tree.map(np.testing.assert_array_equal, bad["opt_state"], good["opt_state"])


# ------------------------------------------------------------------ train.steps_per_call

def _spc_config(env, steps_per_call: int):
  """7 steps, boundaries at 3 (ckpt), 5 (log), 6 (ckpt + eval), 7 (end): K=3 calls [3, 2, 1, 1];
  the automatic grouping's 2 warm-up steps run as one call of 2."""
  c = fx.tiny_config(env["clip"], env["data"])
  c.train.steps, c.train.log_every, c.train.ckpt_every, c.train.eval_every = 7, 5, 3, 6
  c.train.steps_per_call = steps_per_call
  # Bit-identity of K steps per call holds for the replicated text tower. With the text split over
  # the mesh (the default) XLA partitions the scanned step's body on its own and orders some
  # reductions differently: equal to ~1e-7 relative, which tests/test_text_sharding.py checks
  # (steps_per_call with remat and accumulation against the replicated path).
  c.parallel.shard_text = False
  return c


def _recorded_run(monkeypatch, config, workdir):
  """train_and_evaluate, recording every TensorBoard write (step, tag -> value) in order."""
  from mmap_jax.train import report
  writes = []
  original = report.ScalarWriter.scalars

  def record(self, step, values):
    writes.append((int(step), dict(values)))
    return original(self, step, values)
  monkeypatch.setattr(report.ScalarWriter, "scalars", record)
  result = loop.train_and_evaluate(config, str(workdir))
  return result, writes


def _ckpt_steps(workdir) -> list[int]:
  return sorted(int(p.name) for p in (workdir / "checkpoints").iterdir() if p.name.isdigit())


def _assert_same_learned(workdir_a, workdir_b):
  step_a, a = _final_learned(workdir_a, None)
  step_b, b = _final_learned(workdir_b, None)
  assert step_a == step_b
  flat_a, flat_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(flat_a) == len(flat_b) > 0
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_array_equal(x, y)


@pytest.fixture(scope="module")
def single_step_run(env):
  from _pytest.monkeypatch import MonkeyPatch
  mp = MonkeyPatch()
  try:
    workdir = env["root"] / "spc1"
    with fx.xla_default_codegen():     # the K=3 runs compared with it compile the same way
      result, writes = _recorded_run(mp, _spc_config(env, 1), workdir)
  finally:
    mp.undo()
  return workdir, result, writes


@pytest.mark.slow
def test_steps_per_call_matches_single_steps_at_every_boundary(env, single_step_run, monkeypatch,
                                                               xla_default_codegen):
  """K=3 over 7 steps: the same logged losses, evaluations and checkpoints at the same steps,
  and bit-identical final prompts, as one step per call."""
  ref_dir, ref_result, ref_writes = single_step_run
  workdir = env["root"] / "spc3"
  result, writes = _recorded_run(monkeypatch, _spc_config(env, 3), workdir)
  # log 5, validation 6, log 7, validation 7, the final test (and val record) 7.
  assert [s for s, _ in ref_writes] == [5, 6, 7, 7, 7, 7]
  assert writes == ref_writes                           # exact floats, same steps, same order
  # The scanned grouping warm-up: the same affinity matrix, bit for bit, and the same groups.
  np.testing.assert_array_equal(np.load(workdir / "affinity.npy"), np.load(ref_dir / "affinity.npy"))
  assert (json.loads((workdir / "groups.json").read_text())["groups"]
          == json.loads((ref_dir / "groups.json").read_text())["groups"])
  assert _ckpt_steps(workdir) == _ckpt_steps(ref_dir) == [3, 6, 7]
  _assert_same_learned(ref_dir, workdir)
  assert result["tasks"] == ref_result["tasks"]


@pytest.mark.slow
def test_steps_per_call_resumes_from_any_checkpoint(env, single_step_run, monkeypatch,
                                                     xla_default_codegen):
  """A K=3 run resumed from the K=1 run's step-3 checkpoint ends with the same state."""
  import shutil
  ref_dir, ref_result, ref_writes = single_step_run
  workdir = env["root"] / "spc3_resumed"
  shutil.copytree(ref_dir / "checkpoints", workdir / "checkpoints")
  for step in (6, 7):
    shutil.rmtree(workdir / "checkpoints" / str(step))
  result, writes = _recorded_run(monkeypatch, _spc_config(env, 3), workdir)
  assert writes == ref_writes                           # steps 4..7: calls [2, 1, 1]
  assert _ckpt_steps(workdir) == [3, 6, 7]
  _assert_same_learned(ref_dir, workdir)
  assert result["tasks"] == ref_result["tasks"]


def test_stacked_batches_equal_single_batches_and_keep_the_sharding(env):
  from jax.sharding import PartitionSpec as P
  from mmap_jax import parallel
  from mmap_jax.data import pipeline
  c = _spc_config(env, 3)
  tasks = setup.build_tasks(run_spec.resolve(c).data)
  mesh = parallel.data_mesh()
  make = lambda: pipeline.train_iterator(tasks, batch_size=8, image_size=32, seed=0,
                                         augment=run_spec.resolve(c).input.augment, sharding=mesh)
  with make() as single, make() as stacked:
    first = [next(single) for _ in range(3)]
    got = stacked.next_steps(3)
    assert stacked.get_state() == single.get_state()
    assert got["image"].sharding.spec == P(None, None, parallel.DATA_AXIS)
    assert got["image"].shape[:3] == (3, len(tasks), 8) and got["task"].shape == (3, len(tasks))
    for i, b in enumerate(first):
      for key in b:
        np.testing.assert_array_equal(np.asarray(got[key][i]), np.asarray(b[key]))
    np.testing.assert_array_equal(np.asarray(stacked.next_steps(1)["label"][0]),
                                  np.asarray(next(single)["label"]))


def test_invalid_steps_per_call_is_rejected(env, tmp_path):
  c = _spc_config(env, 0)
  with pytest.raises(setup.ConfigError, match=r"train\.steps_per_call"):
    loop.train_and_evaluate(c, str(tmp_path / "bad"))


@pytest.mark.slow
def test_tensorboard_writer_does_not_load_torch(tmp_path):
  """tensorboardX would import an installed torch in every launch; the writer blocks that
  import while tensorboardX loads, and torch stays importable afterwards."""
  pytest.importorskip("torch")
  code = ("import sys\n"
          "from mmap_jax.train import report\n"
          f"w = report.ScalarWriter({str(tmp_path / 'tb')!r}); w.scalars(1, {{'x': 1.0}}); w.close()\n"
          "assert 'torch' not in sys.modules, 'torch was loaded'\n"
          "import torch\n"
          "print('ok', torch.__version__)\n")
  proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=fx.subprocess_env(),
                        capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0 and proc.stdout.startswith("ok"), proc.stderr[-3000:]
  assert list((tmp_path / "tb").glob("events.out.tfevents.*"))
