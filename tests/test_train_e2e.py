"""End to end on 8 fake CPU devices: grouping + MmAP-MT training, checkpoints, resume, evaluate."""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

from mmap_jax.train import checkpointing, loop, setup
from tests import train_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def env(tmp_path_factory, bpe_path):
  root = tmp_path_factory.mktemp("e2e")
  clip_dir = fx.make_tiny_clip(root / "clip", bpe_path)
  return {"root": root, "clip": clip_dir, "data": str(root / "tfds")}


@pytest.fixture(scope="module")
def finished(env):
  """One uninterrupted MmAP-MT run with automatic grouping (in process)."""
  workdir = env["root"] / "uninterrupted"
  result = loop.train_and_evaluate(fx.tiny_config(env["clip"], env["data"]), str(workdir))
  return workdir, result


def _final_learned(workdir: pathlib.Path, config) -> dict:
  ckpt = checkpointing.Checkpointer(str(workdir / "checkpoints"))
  step = ckpt.latest_step()
  import orbax.checkpoint as ocp
  restored = ocp.StandardCheckpointer().restore(workdir / "checkpoints" / str(step) / "state")
  ckpt.close()
  return step, jax.device_get(restored["learned"])


def test_run_writes_everything(finished):
  workdir, result = finished
  names = ["photo", "clipart", "sketch", "painting"]
  for f in ("affinity.npy", "affinity.png", "groups.json", "results.json", "results.md"):
    assert (workdir / f).is_file(), f
  groups = json.loads((workdir / "groups.json").read_text())
  assert sorted(sum(groups["groups"], [])) == sorted(names)
  assert len(groups["groups"]) == 2
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(result))
  assert set(saved["tasks"]) == set(names)
  for t in names:
    assert 0.0 <= saved["tasks"][t]["accuracy"] <= 1.0
    assert saved["tasks"][t]["num_classes"] == 10
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
  """launch.train on the tiny demo; `signal_at` ("STEP:SIGNAL") injects a signal after a step."""
  cmd = [sys.executable, "-m", "launch.train",
         f"--config=configs/demo.py:method={method},clip={env['clip']},runlocal",
         f"--workdir={workdir}", *fx.override_flags(env["data"])]
  extra = {"MMAP_JAX_SIGNAL_AT_STEP": signal_at} if signal_at else {}
  return subprocess.run(cmd, cwd=REPO, env=fx.subprocess_env() | extra, capture_output=True,
                        text=True, timeout=600)


def test_kill_and_resume_is_bit_exact(env, finished):
  workdir_ref, _ = finished
  workdir = env["root"] / "killed"
  killed = _launch_train(env, "mmap_mt", workdir, "4:SIGKILL")
  assert killed.returncode == -9, killed.stderr[-3000:]
  assert not (workdir / "results.json").exists()
  resumed = _launch_train(env, "mmap_mt", workdir)
  assert resumed.returncode == 0, resumed.stderr[-3000:]
  assert "resumed from" in resumed.stderr
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


def test_evaluate_reproduces_final_accuracy(env, finished):
  workdir, result = finished
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


def test_predict_with_trained_prompts_matches_evaluation(env, finished, tmp_path):
  from mmap_jax import predict
  from mmap_jax.checkpoints import store
  from mmap_jax.data import pipeline
  from mmap_jax.train import trained as trained_lib
  workdir, result = finished
  trained = trained_lib.load_trained(str(workdir))
  assert trained.spec.method == "mmap_mt" and trained.step == 6
  cfg, params, tok = store.load(env["clip"])
  params, prompts, classes = trained_lib.task_model(trained, cfg, params, "sketch")
  assert prompts.text.shape[1] == 2 * trained.spec.length  # group-shared ++ task-specific
  classifier = predict.build_classifier(params, cfg, tok, classes, prompts)
  task = next(t for t in setup.build_tasks(fx.tiny_config(env["clip"], env["data"]))
              if t.info.name == "sketch")
  images, labels = [], []
  for b in pipeline.eval_batches(task, batch_size=16, image_size=cfg.vision.image_size):
    m = np.asarray(b["mask"])
    images.append(np.asarray(b["image"])[m])
    labels.append(np.asarray(b["label"])[m])
  probs = predict.classify(classifier, np.concatenate(images))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  accuracy = float((probs.argmax(-1) == np.concatenate(labels)).mean())
  assert accuracy == pytest.approx(result["tasks"]["sketch"]["accuracy"])
  # The CLI path: files in, the task's own class names out.
  from PIL import Image
  path = tmp_path / "x.png"
  Image.fromarray(np.full((40, 40, 3), 200, np.uint8)).save(path)
  out = predict.predict_files(None, None, [path], workdir=str(workdir), task="sketch")
  assert set(out[0]["probabilities"]) == set(classes)
  with pytest.raises(ValueError, match="not in this checkpoint"):
    predict.predict_files(None, None, [path], workdir=str(workdir), task="nope")


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
    result, writes = _recorded_run(mp, _spc_config(env, 1), workdir)
  finally:
    mp.undo()
  return workdir, result, writes


def test_steps_per_call_matches_single_steps_at_every_boundary(env, single_step_run, monkeypatch):
  """K=3 over 7 steps: the same logged losses, evaluations and checkpoints at the same steps,
  and bit-identical final prompts, as one step per call."""
  ref_dir, ref_result, ref_writes = single_step_run
  workdir = env["root"] / "spc3"
  result, writes = _recorded_run(monkeypatch, _spc_config(env, 3), workdir)
  assert [s for s, _ in ref_writes] == [5, 6, 7, 7]     # log 5, eval 6, log 7, final eval 7
  assert writes == ref_writes                           # exact floats, same steps, same order
  # The scanned grouping warm-up: the same affinity matrix, bit for bit, and the same groups.
  np.testing.assert_array_equal(np.load(workdir / "affinity.npy"), np.load(ref_dir / "affinity.npy"))
  assert (json.loads((workdir / "groups.json").read_text())["groups"]
          == json.loads((ref_dir / "groups.json").read_text())["groups"])
  assert _ckpt_steps(workdir) == _ckpt_steps(ref_dir) == [3, 6, 7]
  _assert_same_learned(ref_dir, workdir)
  assert result["tasks"] == ref_result["tasks"]


def test_steps_per_call_resumes_from_any_checkpoint(env, single_step_run, monkeypatch):
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
  tasks = setup.build_tasks(c)
  mesh = parallel.data_mesh()
  make = lambda: pipeline.train_iterator(tasks, batch_size=8, image_size=32, seed=0,
                                         augment=setup.augment_config(c), sharding=mesh)
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
