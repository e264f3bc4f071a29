"""The benchmark: FLOP counting, exactness of the text savings, the PyTorch reference's math, and a
smoke run of `launch.benchmark` on the tiny workload writing the JSON the results files use."""
from __future__ import annotations

import functools
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
from mmap_jax.apps import benchmark, host_runtime
from mmap_jax.models import clip
from mmap_jax.prompts import multitask

REPO = pathlib.Path(__file__).resolve().parents[1]
jit0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


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
  assert benchmark.cost_flops(compiled) == 2 * m * n * k


def test_matmul_peak_and_memory_helpers():
  peak = benchmark.measure_matmul_peak(sizes=(96, 128), runs=3, warmup_s=0.05)
  # Every size x both XLA:CPU dots, each with all its samples; best >= median per variant.
  assert set(peak["variants"]) == {f"{n}/{impl}" for n in (96, 128)
                                   for impl in ("xla_dot", "ynnpack_dot")}
  for v in peak["variants"].values():
    assert v["flops"] == 2 * v["n"] ** 3 and len(v["all_s"]) == 3
    assert v["flops_per_s_best"] == pytest.approx(v["flops"] / min(v["all_s"]))
    assert v["flops_per_s_best"] >= v["flops_per_s_median"] > 0
  assert peak["flops_per_s_best"] == max(v["flops_per_s_best"] for v in peak["variants"].values())
  assert peak["flops_per_s_median"] == max(v["flops_per_s_median"]
                                           for v in peak["variants"].values())
  assert peak["flops_per_s_best"] >= peak["flops_per_s_median"] and peak["warmup_calls"] >= 4
  assert set(peak["best_by_implementation"]) == {"xla_dot", "ynnpack_dot"}
  with benchmark.PeakMemory() as mem:
    x = np.ones((64, 1024, 1024), np.uint8)      # 64 MiB touched inside the window
    inside = benchmark.rss_bytes()
    del x
  # The peak covers what was resident inside the window (the kernel's RSS counters are
  # per-thread caches, exact to a few MiB).
  assert mem.kind == "host_rss" and mem.scope == "during the timed calls"
  assert mem.bytes >= max(inside, mem.baseline_bytes) - 8 * 2 ** 20


# ----------------------------------------------------------------------------- exactness

@jit0
def _logits(params, prompts, ct_short, ct_full, images):
  fast = heads.task_logits(params, CFG_TINY, prompts, ct_short, images, share_prefix=True)
  plain = heads.task_logits(params, CFG_TINY, prompts, ct_full, images, share_prefix=False)
  return fast, plain


CFG_TINY = benchmark.get_variant("tiny")


def test_truncation_and_prefix_sharing_are_exact(bpe_path):
  """Truncated + shared-prefix logits == all-77-tokens, unshared logits (<= 1e-6 relative)."""
  _, w = tiny_workload(bpe_path)
  assert w.class_tokens.ids.shape[-1] < 77 and w.class_tokens_full.ids.shape[-1] == 77
  params = jax.tree.map(jnp.asarray, numpy_params(w.clip_cfg))
  learned = learned_params(w)
  prompts = multitask.task_prompts(learned, w.clip_cfg, w.spec, w.groups)
  images, _ = batch_of(w)
  fast, plain = _logits(params, prompts, w.class_tokens, w.class_tokens_full, images)
  assert rel(fast, plain) <= 1e-6


def test_image_prompt_blocks_compute_only_prompt_keys_values_exactly(monkeypatch):
  """Blocks whose prompt outputs are replaced compute only the prompts' keys/values, once per
  call (`residual_block(..., shared_tail=L)`): same features and prompt gradients as the full
  blocks."""
  cfg = CFG_TINY
  params = jax.tree.map(jnp.asarray, numpy_params(cfg))
  rng = np.random.default_rng(3)
  images = jnp.asarray(rng.standard_normal((3, 32, 32, 3)), jnp.float32)
  prompts = jnp.asarray(0.5 * rng.standard_normal((3, 4, cfg.vision.width)), jnp.float32)

  def features_and_grad(pooled_only_last):
    f = lambda vp: clip.encode_image(params, cfg, images, vp, pooled_only_last=pooled_only_last)
    return f(prompts), jax.grad(lambda vp: jnp.sum(jnp.sin(f(vp))))(prompts)

  fast = {pol: features_and_grad(pol) for pol in (True, False)}
  original = clip.residual_block
  monkeypatch.setattr(clip, "residual_block",
                      lambda x, p, h, m, a, shared_tail=0: original(x, p, h, m, a, 0))
  for pol in (True, False):
    (f0, g0), (f1, g1) = fast[pol], features_and_grad(pol)
    assert rel(f0, f1) <= 1e-6 and rel(g0, g1) <= 1e-5


# ----------------------------------------------------------------------------- torch reference

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
  full = w.class_tokens_full
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

@pytest.mark.slow
def test_benchmark_command_writes_json(bpe_path, tmp_path):
  out = tmp_path / "bench.json"
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""                     # one CPU device, not the suite's simulated pod
  env["JAX_PLATFORMS"] = "cpu"
  cmd = [sys.executable, "-m", "launch.benchmark",
         f"--config=configs/benchmark.py:tiny,vocab={bpe_path},vs_torch,steps_per_call=2",
         "--config.xla_opt_level=0", f"--out={out}"]
  proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert json.loads(proc.stdout) == result
  for key in benchmark.RESULT_KEYS + benchmark.TORCH_KEYS:
    assert key in result, key
  assert result["backend"] == "cpu" and result["devices"] >= 1
  assert 0 < result["step_s_min"] <= result["step_s_median"] <= result["step_s_max"]
  assert result["flops_per_step"] > 0 and result["peak_flops_per_s"] > 0
  assert result["achieved_flops_per_s"] == pytest.approx(
      result["flops_per_step"] / result["step_s_median"])
  assert result["peak_memory_bytes"] > 0 and result["torch_peak_memory_bytes"] > 0
  assert result["speedup_vs_torch"] == pytest.approx(
      result["torch_step_s_median"] / result["step_s_median"])
  assert set(result["parts"]) == {"grouping_step", "text_encoder", "image_encoder", "eval"}
  for name, part in result["parts"].items():
    assert part["s_median"] > 0
    assert (part["program_flops_cost_analysis"] if name == "grouping_step" else part["flops"]) > 0
  grouping = result["parts"]["grouping_step"]        # also K steps per call, per step = call / K
  assert grouping["steps_per_call"] == 2
  assert grouping["all_s"] == pytest.approx([t / 2 for t in grouping["call_s"]], abs=1e-3)
  assert grouping["ratio_to_train_step"] == pytest.approx(
      grouping["s_median"] / result["step_s_median"])
  assert result["workload"]["class_tokens"].startswith("bpe:")
  # The launcher's host settings are applied and recorded: the XLA flags, and the allocator as
  # the process found it (no re-exec unless MMAP_JAX_ALLOCATOR asks for one).
  assert result["environment"]["xla_flags"].split() == list(host_runtime.CPU_FAST_XLA_FLAGS)
  assert result["environment"]["allocator"] == host_runtime.allocator_in_use()
  # steps_per_call=2: the top-level step is the scanned one (per step = per call / 2), with the
  # single step timed in the same invocation; FLOPs per step are the single step's.
  train, single = result["train_step"], result["train_step_single"]
  assert result["steps_per_call"] == train["steps_per_call"] == 2 and single["steps_per_call"] == 1
  assert train["steps_timed"] == 2 * train["runs"] == 2 * len(train["call_s"])
  assert train["all_s"] == pytest.approx([t / 2 for t in train["call_s"]], abs=1e-3)
  assert train["flops"] == single["flops"] == result["flops_per_step"]
  assert result["steps_per_call_speedup"] == pytest.approx(single["s_median"] / train["s_median"])
  for t in (train, single):
    assert len(t["page_faults"]) == t["runs"] and min(t["page_faults"]) >= 0
    assert t["temp_bytes"] > 0 and t["finite"]
  assert train["page_faults"] == [f / 2 for f in train["page_faults_per_call"]]
  # The peak probe ran before and after the steps, every sample kept; fractions against both.
  for when in ("before", "after"):
    probe = result["matmul_peak"][when]
    assert probe["sizes"] == [128, 256] and len(probe["variants"]) == 4
  assert result["peak_flops_per_s"] == max(result["matmul_peak"][w]["flops_per_s_best"]
                                           for w in ("before", "after"))
  assert result["fraction_of_peak"] == pytest.approx(
      result["achieved_flops_per_s"] / result["peak_flops_per_s"])
  assert result["fraction_of_peak_median"] == pytest.approx(
      result["achieved_flops_per_s"] / result["peak_flops_per_s_median"])


# ----------------------------------------------------------------------------- accelerator sweep

@pytest.mark.slow
def test_accelerator_script_runs_the_tiny_sweep_on_cpu(bpe_path, tmp_path):
  """benchmarks/accelerator.sh unchanged on CPU: every dtype x remat row, MFU against the probe."""
  out = tmp_path / "accel.json"
  env = dict(os.environ)
  env["XLA_FLAGS"] = ""
  env["JAX_PLATFORMS"] = "cpu"
  proc = subprocess.run(["bash", "benchmarks/accelerator.sh", str(out),
                         f"tiny,max_batch=2,vocab={bpe_path}", "--config.xla_opt_level=0"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(out.read_text())
  assert result["backend"] == "cpu" and result["known_device"] is None
  assert [(r["dtype"], r["remat"], r["batch_size_per_task"]) for r in result["rows"]] == [
      ("bfloat16", False, 2), ("bfloat16", True, 2), ("float32", False, 2), ("float32", True, 2)]
  for dtype in ("bfloat16", "float32"):
    probe = result["matmul_probe"][dtype]
    assert probe["dtype"] == dtype and result["peaks"][dtype]["source"].startswith("probe")
    assert result["peaks"][dtype]["flops_per_s"] == probe["flops_per_s_best"] > 0
  for r in result["rows"]:
    assert r["step_s_median"] > 0 and r["finite"] and r["flops_per_step"] > 0
    assert r["images_per_s"] == pytest.approx(r["images_per_step"] / r["step_s_median"])
    assert r["mfu"] == pytest.approx(r["achieved_flops_per_s"]
                                     / (result["peaks"][r["dtype"]]["flops_per_s"] * r["devices"]))
    assert r["memory"]["bytes"] > 0 and r["temp_bytes"] > 0
  assert set(result["best"]) == {"bfloat16", "float32"}
  assert "| dtype | remat | batch/task |" in proc.stderr and "MFU" in proc.stderr


@pytest.mark.slow
def test_accelerator_sweep_doubles_the_batch_until_out_of_memory():
  from mmap_jax.apps import accelerator
  config = benchmark_config.get_config("tiny,vocab=none,sweep_dtypes=float32,max_batch=64")
  config.peak_sizes, config.peak_runs = "64", 1
  seen = []

  def row_fn(w, c, clip_params, device_ct, pl, peak, k):
    seen.append((c.dtype, c.remat, w.batch_size))
    if w.batch_size > 4 and not c.remat:
      raise RuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 1 bytes")
    return {"mfu": 0.5 if c.remat else 0.25, "images_per_s": 1.0, "step_s_median": 1.0,
            "device_memory": {}, "memory": {"bytes": 1}, "temp_bytes": 1}

  result = accelerator.run_sweep(config, log=lambda s: None, row_fn=row_fn)
  assert seen == [("float32", False, 2), ("float32", False, 4), ("float32", False, 8)] + [
      ("float32", True, b) for b in (2, 4, 8, 16, 32, 64)]        # max_batch ends this one
  assert [r.get("oom", False) for r in result["rows"]][:3] == [False, False, True]
  assert result["best"]["float32"]["remat"] is True

  def other_failure(*args):
    raise ValueError("not a memory problem")
  with pytest.raises(ValueError, match="not a memory problem"):
    accelerator.run_sweep(config, log=lambda s: None, row_fn=other_failure)
