"""Shared fixtures of the trainer tests: a tiny converted CLIP and a tiny demo config."""
from __future__ import annotations

import contextlib
import os
import pathlib

import jax
import ml_collections as mlc

from configs import demo
from mmap_jax.checkpoints import store
from mmap_jax.models import clip, config as clip_config
from mmap_jax.tokenizer import ClipTokenizer


def make_tiny_clip(directory: pathlib.Path, bpe_path: pathlib.Path, seed: int = 0) -> str:
  """A random-init 'tiny' CLIP in the project's own format (what launch.convert writes)."""
  if not store.is_store(directory):
    cfg = clip_config.get_variant("tiny")
    params = jax.device_get(clip.init_params(jax.random.key(seed), cfg))
    store.save(directory, cfg, params, ClipTokenizer.from_bpe_file(bpe_path))
  return str(directory)


def tiny_overrides(c: mlc.ConfigDict, data_dir: str) -> mlc.ConfigDict:
  """Shrink the demo config to the tiny CLIP (3 layers, widths 64/48) and 32 px images."""
  c.data.data_dir = data_dir
  c.data.demo_images_per_class = 6
  c.data.demo_image_size = 32
  c.data.shots = 0         # the whole (tiny) train pool: 6 images per class leave 2 after val
  c.prompt.source_dim = 16
  c.prompt.length = 2
  c.input.batch_size = 8
  c.input.eval_batch_size = 16
  c.train.steps = 6
  c.train.log_every = 2
  c.train.eval_every = 2   # validation at steps 2, 4, 6: the selection has a choice
  c.train.ckpt_every = 2
  c.optim.warmup_steps = 1
  c.groups.warmup_steps = 2
  return c


def tiny_config(clip_dir: str, data_dir: str, method: str = "mmap_mt") -> mlc.ConfigDict:
  return tiny_overrides(demo.get_config(f"method={method},clip={clip_dir},runlocal"), data_dir)


def override_flags(data_dir: str) -> list[str]:
  """The same overrides as `tiny_overrides`, as --config.* flags for a subprocess."""
  c = tiny_overrides(demo.get_config("runlocal"), data_dir)
  keys = ["data.data_dir", "data.demo_images_per_class", "data.demo_image_size", "data.shots",
          "prompt.source_dim", "prompt.length", "input.batch_size", "input.eval_batch_size",
          "train.steps", "train.log_every", "train.eval_every", "train.ckpt_every",
          "optim.warmup_steps", "groups.warmup_steps"]
  out = []
  for k in keys:
    v = c
    for part in k.split("."):
      v = v[part]
    out.append(f"--config.{k}={v}")
  return out


def xla_flags(devices: int = 8) -> str:
  """This test session's XLA_FLAGS (tests/conftest.py) with `devices` fake CPU devices."""
  _DEVICES = "--xla_force_host_platform_device_count="
  rest = [f for f in os.environ.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICES)]
  return " ".join([f"{_DEVICES}{devices}", *rest])


@contextlib.contextmanager
def xla_default_codegen():
  """Programs compiled inside use XLA:CPU's default (MLIR) fusion emitters, as launches do.

  tests/conftest.py compiles with the older emitters, which compile faster but do not give
  differently structured programs (K steps scanned vs single steps, remat vs plain jit, vmap vs a
  loop) the bit-identical results that the default emitters give. Tests of those claims run
  their compiles in here. jax has no public switch for the options of compiles it starts itself
  (jit's `compiler_options` reaches only the test's own jit calls), so this wraps its
  `get_compile_options` (a missing attribute fails the test loudly) to add the option the way
  `compiler_options` does. Everything the test jits itself, and every function traced anew,
  compiles with it (the option is part of the persistent cache's key); a jitted function that
  already holds an executable for the same arguments in memory keeps it, which is why the
  exactness tests build their steps inside (the trainer builds its own per run).
  """
  from jax._src import compiler
  original = compiler.get_compile_options

  def with_default_emitters(*args, **kwargs):
    options = original(*args, **kwargs)
    options.env_option_overrides = [*options.env_option_overrides,
                                    ("xla_cpu_use_fusion_emitters", True)]
    return options

  compiler.get_compile_options = with_default_emitters
  try:
    yield
  finally:
    compiler.get_compile_options = original


def subprocess_env() -> dict:
  env = dict(os.environ)
  env["XLA_FLAGS"] = xla_flags(8)
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONPATH"] = str(pathlib.Path(__file__).resolve().parents[1])
  return env


def predicted_accuracy(classifier, task, image_size: int) -> float:
  """Accuracy of `predict.classify` over a task's test split (what the evaluator reports)."""
  import numpy as np
  from mmap_jax import predict
  from mmap_jax.data import pipeline
  images, labels = [], []
  for b in pipeline.eval_batches(task, batch_size=16, image_size=image_size):
    m = np.asarray(b["mask"])
    images.append(np.asarray(b["image"])[m])
    labels.append(np.asarray(b["label"])[m])
  probs = predict.classify(classifier, np.concatenate(images))
  np.testing.assert_allclose(probs.sum(-1), 1.0, rtol=1e-5)
  return float((probs.argmax(-1) == np.concatenate(labels)).mean())


def event_scalar_steps(data: bytes) -> dict[str, list[int]]:
  """{tag: [steps]} of one tensorboardX event file's bytes (TFRecord framing, no TensorFlow)."""
  import collections
  import struct
  from tensorboardX.proto import event_pb2
  out, pos = collections.defaultdict(list), 0
  while pos < len(data):
    (n,) = struct.unpack("<Q", data[pos:pos + 8])
    event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
    pos += 12 + n + 4
    for v in event.summary.value:
      out[v.tag].append(int(event.step))
  return out


def scalar_steps(logdir: pathlib.Path) -> dict[str, list[int]]:
  """{tag: [steps]} over every tensorboardX event file in `logdir`."""
  out: dict[str, list[int]] = {}
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    for tag, steps in event_scalar_steps(path.read_bytes()).items():
      out.setdefault(tag, []).extend(steps)
  return out


def tensorboard_scalar_steps(logdir: pathlib.Path) -> dict[str, list[int]]:
  """{tag: [steps]} as TensorBoard shows them: event files in order, a file that opens with a
  SessionLog.START at step S (a resumed run's purge_step) hides the earlier files' events at
  steps >= S."""
  import struct
  from tensorboardX.proto import event_pb2
  out: dict[str, list[int]] = {}
  for path in sorted(pathlib.Path(logdir).glob("events.out.tfevents.*")):
    data, pos = path.read_bytes(), 0
    while pos < len(data):
      (n,) = struct.unpack("<Q", data[pos:pos + 8])
      event = event_pb2.Event.FromString(data[pos + 12:pos + 12 + n])
      pos += 12 + n + 4
      if event.HasField("session_log") and event.session_log.status == event.session_log.START:
        out = {tag: [s for s in steps if s < event.step] for tag, steps in out.items()}
      for v in event.summary.value:
        out.setdefault(v.tag, []).append(int(event.step))
  return out
