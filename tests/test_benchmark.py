"""The benchmark on the trainer's pieces: FLOP counting, the PyTorch reference's math, the
command's JSON on the tiny workload (timed and compile_only), and the accelerator sweep's loop."""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import benchmark as benchmark_config
from mmap_jax import heads
from mmap_jax.apps import benchmark, measure
from mmap_jax.models import clip
from mmap_jax.prompts import multitask
from tests import train_fixtures as fx

REPO = pathlib.Path(__file__).resolve().parents[1]


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def tiny_workload(bpe_path, **overrides):
  config = benchmark_config.get_config("tiny")
  config.vocab = str(bpe_path)
  for k, v in overrides.items():
    config[k] = v
  return config, benchmark.build_workload(config)


def numpy_params(cfg, seed=0):
  """Random CLIP params with non-trivial layer norms and biases (numpy: no compile)."""
  rng = np.random.default_rng(seed)

  def leaf(path, s):
    name = "/".join(getattr(k, "key", "") for k in path)
    if name == "logit_scale":
      return np.asarray(np.log(1 / 0.07), np.float32)
    if name.endswith("/scale"):
      return (1 + 0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if name.endswith(("/bias", "class_embedding", "positional_embedding")):
      return (0.1 * rng.standard_normal(s.shape)).astype(np.float32)
    if name.endswith("embedding"):
      return (0.02 * rng.standard_normal(s.shape)).astype(np.float32)
    fan_in = int(np.prod(s.shape[:-1]))
    return (rng.standard_normal(s.shape) / np.sqrt(fan_in)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, clip.param_shapes(cfg))


def learned_params(w, seed=1):
  """An mmap_mt learned pytree with non-trivial scaling matrices (not all ones)."""
  rng = np.random.default_rng(seed)
  shapes = jax.eval_shape(lambda: multitask.init_learned(
      jax.random.key(0, impl="rbg"), w.clip_cfg, w.spec, w.num_tasks, w.groups))
  return jax.tree.map(lambda s: (0.5 * rng.standard_normal(s.shape) + (0.0 if len(s.shape) == 4
                                                                       else 1.0)).astype(np.float32),
                      shapes)


def batch_of(w, seed=2):
  rng = np.random.default_rng(seed)
  size = w.clip_cfg.vision.image_size
  images = rng.standard_normal((w.num_tasks, w.batch_size, size, size, 3)).astype(np.float32)
  n = np.asarray(w.class_tokens.class_mask).sum(-1)
  labels = np.stack([rng.integers(0, k, w.batch_size) for k in n]).astype(np.int32)
  return images, labels


# ----------------------------------------------------------------------------- measurement

def test_flop_count_of_one_matmul():
  m, k, n = 96, 80, 112
  a, b = jnp.ones((m, k), jnp.float32), jnp.ones((k, n), jnp.float32)
  compiled = jax.jit(jnp.dot).lower(a, b).compile()
  assert measure.cost_flops(compiled) == 2 * m * n * k
  assert measure.costs(compiled)["flops_per_device"] == 2 * m * n * k


def test_benchmark_uses_the_trainers_optimizer_and_loss(bpe_path, monkeypatch):
  """The step benchmarked is the trainer's: its recipe's optimizer, its loss with the workload's
  settings (dtype, remat, share_prefix, text sharding over the 8 devices)."""
  from mmap_jax.train import optim, recipes, step as train_step
  config, w = tiny_workload(bpe_path, dtype="bfloat16", share_prefix=False)
  got = benchmark.optimizer(w.spec).init({"x": jnp.ones(3)})
  want = optim.make_optimizer(recipes.resolve("mmap").recipe, 1000).init({"x": jnp.ones(3)})
  assert jax.tree.structure(got) == jax.tree.structure(want)
  seen = {}
  monkeypatch.setattr(train_step, "make_loss_fn",
                      lambda *a, **kw: seen.update(args=a, **kw) or "loss")
  assert benchmark.train_loss_fn(w) == "loss"
  assert seen["args"] == (w.clip_cfg, w.spec, w.groups)
  assert seen["dtype"] == jnp.bfloat16 and seen["share_prefix"] is False
  assert seen["text_sharding"].shards == 8 == w.text_sharding.shards


# ----------------------------------------------------------------------------- torch reference

@pytest.mark.slow   # a long compile: full suite only
def test_torch_reference_matches_jax_loss_and_gradients(bpe_path):
  torch = pytest.importorskip("torch")
  sys.path.insert(0, str(REPO))
  from benchmarks import torch_reference as ref
  _, w = tiny_workload(bpe_path)
  params = numpy_params(w.clip_cfg)
  learned = learned_params(w)
  images, labels = batch_of(w)

  def loss_fn(l, p, ims, labs):
    loss, aux = heads.multitask_loss(l, p, w.clip_cfg, w.spec, w.groups, w.class_tokens,
                                     {"images": ims, "labels": labs})
    return loss, aux["per_task_loss"]
  (loss, per_task), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(
      learned, params, images, labels)       # the default XLA pipeline (YNNPACK fusions on)

  arch = w.clip_cfg.to_dict()
  torch.manual_seed(0)
  model = ref.MmapMT(ref.hf_config(arch, "eager"), w.num_tasks, w.groups, length=w.spec.length,
                     depth=w.spec.depth, source_length=w.spec.source_length,
                     source_dim=w.spec.source_dim)
  ref.load_weights(model, params, arch, learned)
  full = benchmark.class_tokens_for(dataclasses.replace(w, truncate=False), w.spec)
  t_loss, t_per_task = model(torch.from_numpy(full.ids.astype(np.int64)),
                             torch.from_numpy(full.eot.astype(np.int64)),
                             torch.from_numpy(full.class_mask),
                             torch.from_numpy(images.transpose(0, 1, 4, 2, 3).copy()),
                             torch.from_numpy(labels.astype(np.int64)))
  t_loss.backward()
  assert abs(float(t_loss) - float(loss)) <= 1e-5 * abs(float(loss))
  np.testing.assert_allclose(t_per_task.detach().numpy(), np.asarray(per_task), rtol=1e-5)
  for unit in ("group", "task"):
    for name in ("source", "scale_text", "scale_visual"):
      g_torch = getattr(model, unit)[name].grad.numpy()
      g_jax = np.asarray(grads[unit][name])
      assert rel(g_jax, g_torch) <= 1e-4, (unit, name, rel(g_jax, g_torch))


# ----------------------------------------------------------------------------- the command

def _launch(args, tmp_path, devices=1, timeout=600):
  out = tmp_path / "bench.json"
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=fx.xla_flags(devices))
  cmd = [sys.executable, "-m", "launch.benchmark", f"--config=configs/benchmark.py:tiny,{args}",
         f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert json.loads(proc.stdout) == result
  return result


@pytest.mark.slow
def test_benchmark_command_writes_json(tmp_path):
  """Timed run with the PyTorch reference: K=2 steps per call, 2 micro-batches each."""
  pytest.importorskip("torch")
  result = _launch("vs_torch,steps_per_call=2,accum_steps=2", tmp_path)
  for key in benchmark.RESULT_KEYS + benchmark.TORCH_KEYS:
    assert key in result, key
  train = result["train_step"]
  assert result["devices"] == 1 and not result["compile_only"]
  assert 0 < train["s_min"] <= train["s_median"] <= train["s_max"] and train["finite"]
  assert train["steps_per_call"] == 2 and len(train["all_s"]) == 2
  assert result["flops_per_step"] == train["flops_per_device"] > 0
  assert result["images_per_s"] == pytest.approx(24 / train["s_median"])
  assert result["peak_memory_bytes"] > 0 and result["torch_peak_memory_bytes"] > 0
  assert result["speedup_vs_torch"] == pytest.approx(
      result["torch_step_s_median"] / result["step_s_median"])
  assert result["workload"]["accum_steps"] == 2


@pytest.mark.slow
def test_compile_only_writes_per_device_costs_of_both_steps():
  """compile_only on the session's 8 fake devices (in process: the command line itself is
  test_benchmark_command_writes_json's): per-device FLOPs / temp bytes of the train and grouping
  steps, nothing timed; the split text tower costs each device less than the replicated one (the
  grouping step's split: tests/test_text_sharding.py)."""
  assert jax.device_count() == 8
  run = lambda args: json.loads(json.dumps(benchmark.run(
      benchmark_config.get_config(f"tiny,{args}"), log=lambda s: None)))
  split = run("compile_only,grouping")
  replicated = run("compile_only,shard_text=false")
  for r in (split, replicated):
    assert r["devices"] == 8 and r["compile_only"] and "step_s_median" not in r
  for part in ("train_step", "grouping_step"):
    assert split[part]["flops_per_device"] > 0 and split[part]["temp_bytes_per_device"] > 0
  assert "grouping_step" not in replicated
  assert split["workload"]["shard_text"] and not replicated["workload"]["shard_text"]
  assert split["train_step"]["flops_per_device"] < replicated["train_step"]["flops_per_device"]


def test_vs_torch_says_the_reference_is_a_repository_tool(monkeypatch, tmp_path):
  monkeypatch.setattr(measure, "TORCH_REFERENCE", tmp_path / "missing.py")
  with pytest.raises(FileNotFoundError, match="repository tool"):
    measure.torch_reference_path()


# ----------------------------------------------------------------------------- accelerator sweep

@pytest.mark.slow
def test_accelerator_script_runs_the_tiny_sweep_on_cpu(tmp_path):
  """benchmarks/accelerator.sh on CPU: a remat x no-remat row per dtype (float32 only here: the
  dtype loop is test_accelerator_sweep_doubles_the_batch_until_out_of_memory's; no MFU: CPU is
  not a known device), the markdown table on stderr."""
  out = tmp_path / "accel.json"
  env = dict(os.environ, XLA_FLAGS=fx.xla_flags(1), JAX_PLATFORMS="cpu")
  proc = subprocess.run(["bash", "benchmarks/accelerator.sh", str(out),
                         "tiny,max_batch=8,sweep_dtypes=float32"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["backend"] == "cpu" and result["known_device"] is None
  assert [(r["dtype"], r["remat"], r["batch_size_per_task"]) for r in result["rows"]] == [
      ("float32", False, 8), ("float32", True, 8)]
  for r in result["rows"]:
    assert r["step_s_median"] > 0 and r["finite"] and r["flops_per_step"] > 0 and r["mfu"] is None
    assert r["images_per_s"] == pytest.approx(r["images_per_step"] / r["step_s_median"])
  assert "| dtype | remat | batch/task |" in proc.stderr


def test_accelerator_sweep_doubles_the_batch_until_out_of_memory(bpe_path):
  from mmap_jax.apps import accelerator
  config = benchmark_config.get_config("tiny,sweep_dtypes=float32,max_batch=64")
  config.vocab = str(bpe_path)
  seen = []

  def row_fn(w, c, peak, k):
    seen.append((c.dtype, c.remat, w.batch_size))
    if w.batch_size > 16 and not c.remat:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes")
    return {"mfu": 0.5 if c.remat else 0.25, "images_per_s": 1.0, "step_s_median": 1.0,
            "device_memory": {}, "temp_bytes_per_device": 1}

  result = accelerator.run_sweep(config, log=lambda s: None, row_fn=row_fn)
  assert seen == [("float32", False, 8), ("float32", False, 16), ("float32", False, 32)] + [
      ("float32", True, b) for b in (8, 16, 32, 64)]        # max_batch ends this one
  assert [r.get("oom", False) for r in result["rows"]][:3] == [False, False, True]
  assert result["best"]["float32"]["remat"] is True

  def other_failure(*args):
    raise ValueError("not a memory problem")
  with pytest.raises(ValueError, match="not a memory problem"):
    accelerator.run_sweep(config, log=lambda s: None, row_fn=other_failure)
