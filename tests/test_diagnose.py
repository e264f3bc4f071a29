"""The diagnostics command: zero-shot and linear-probe accuracy of a frozen CLIP, per domain."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from mmap_jax import diagnostics, predict
from mmap_jax.train import setup
from mmap_jax.train import run_spec
from tests import train_fixtures as fx


@pytest.fixture(scope="module")
def env(tmp_path_factory, bpe_path):
  root = tmp_path_factory.mktemp("diagnose")
  clip_dir = fx.make_tiny_clip(root / "clip", bpe_path)
  return {"root": root, "clip": clip_dir, "data": str(root / "tfds")}


def _blobs(rng, n_per_class, centres, noise):
  x = np.concatenate([c + noise * rng.standard_normal((n_per_class, centres.shape[1]))
                      for c in centres]).astype(np.float32)
  y = np.repeat(np.arange(len(centres)), n_per_class).astype(np.int32)
  return x, y


def test_probe_separates_separable_classes_and_is_chance_on_noise():
  rng = np.random.default_rng(0)
  centres = rng.standard_normal((5, 16)) * 2
  train, val, test = (_blobs(rng, n, centres, 0.5) for n in (20, 8, 40))
  probe = diagnostics.linear_probe(train, val, test, 5)
  assert probe["accuracy"] > 0.95
  assert probe["l2"] in diagnostics.L2_GRID and set(probe["val_accuracy"]) == {
      f"{l2:g}" for l2 in diagnostics.L2_GRID}
  # Labels independent of the features: the test accuracy is near chance (0.2), and the probe
  # does not score test by what it fitted (train accuracy would be ~1 at the smallest l2).
  noise = lambda n: (rng.standard_normal((n, 16)).astype(np.float32),
                     rng.integers(0, 5, n).astype(np.int32))
  chance = diagnostics.linear_probe(noise(100), noise(40), noise(2000), 5)
  assert 0.12 < chance["accuracy"] < 0.28
  # Without validation images the default penalty is used and said so.
  no_val = diagnostics.linear_probe(train, (val[0][:0], val[1][:0]), test, 5)
  assert no_val["l2"] == diagnostics.DEFAULT_L2 and no_val["val_accuracy"] == {}


@pytest.mark.slow
def test_diagnose_on_the_tiny_config(env):
  config = fx.tiny_config(env["clip"], env["data"], "mmap_mt")
  config.data.shots = 2   # Ignored: the probe trains on the full train pool.
  result = diagnostics.diagnose(config)
  tasks = setup.build_tasks(run_spec.resolve(fx.tiny_config(env["clip"], env["data"], "zeroshot")).data)
  names = [t.info.name for t in tasks]
  assert list(result["zero_shot"]) == list(result["linear_probe"]) == names
  assert result["num_classes"] == tasks[0].info.num_classes
  assert result["train_images"] == {t.info.name: t.info.num_train for t in tasks}
  assert result["test_images"] == {t.info.name: t.info.num_test for t in tasks}
  assert all(0.0 <= a <= 1.0 for k in ("zero_shot", "linear_probe")
             for a in result[k].values())
  assert result["template"] == "a photo of a {}."
  # Zero-shot agrees with predict.classify on the same test images (the user-facing path).
  clip = setup.load_clip(config.clip.path)
  for t in tasks:
    classifier = predict.build_classifier(clip.params, clip.cfg, clip.tokenizer,
                                          t.info.class_names)
    want = fx.predicted_accuracy(classifier, t, clip.cfg.vision.image_size)
    assert result["zero_shot"][t.info.name] == pytest.approx(want, abs=1e-9)
  table = diagnostics.format_table(result)
  assert all(n in table for n in names) and "average" in table
  json.dumps(result)   # Serialisable as written.


@pytest.mark.slow
def test_launcher_writes_the_json_and_prints_the_table(env, tmp_path):
  out = tmp_path / "diag.json"
  flags = fx.override_flags(env["data"])
  proc = subprocess.run(
      [sys.executable, "-m", "launch.diagnose", f"--config=configs/demo.py:clip={env['clip']}",
       f"--out={out}", *flags], capture_output=True, text=True, env=fx.subprocess_env(),
      timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert set(result) >= {"zero_shot", "linear_probe", "num_classes", "test_images",
                         "train_images"}
  assert "average" in proc.stdout and all(d in proc.stdout for d in result["zero_shot"])
