"""The performance benchmark: the trainer's own step on a fixed workload, costed and timed.

Built from the trainer's pieces, as Flax's examples benchmark their `main`: the loss of
`train.step.make_loss_fn`, the method family's optimiser recipe (`train.recipes` +
`train.optim`), `train.step.init_state` / `make_train_step(s)` over the ("data",) mesh with the
run's text sharding (`parallel.TextSharding`), and `train.grouping_run`'s grouping step. The
workload (configs/benchmark.py) is fixed so numbers compare across versions: CLIP ViT-B/16 with
random weights, MmAP-MT, T tasks x B images of 224 px, Office-Home's class names (cycled with a
suffix beyond 65), float32.

Per-device FLOPs and temp bytes come from XLA's cost and memory analysis of the compiled
programs. `compile_only` stops there (abstract arguments: nothing is allocated, so N fake CPU
devices cost only compile time); otherwise the step is timed. `vs_torch` also runs the PyTorch
reference, benchmarks/torch_reference.py (a repository tool), in a subprocess.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from mmap_jax import grouping, heads, parallel, resources
from mmap_jax.apps import measure
from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig, get_variant
from mmap_jax.prompts import multitask
from mmap_jax.prompts.spec import PromptSpec
from mmap_jax.tokenizer import ClipTokenizer
from mmap_jax.train import grouping_run, optim, recipes, step as train_step

RESULT_KEYS = ("devices", "train_step", "workload", "environment", "step_s_median",
               "images_per_s", "flops_per_step", "peak_memory_bytes")
TORCH_KEYS = ("torch_step_s_median", "torch_peak_memory_bytes", "speedup_vs_torch")

@dataclasses.dataclass(frozen=True)
class Workload:
  """Everything static about the benchmarked step."""
  clip_cfg: ClipConfig
  spec: PromptSpec
  groups: Optional[tuple[tuple[int, ...], ...]]
  num_tasks: int
  batch_size: int                 # images per task per step
  class_names: tuple[tuple[str, ...], ...]
  class_tokens: heads.ClassTokens
  tokenizer: ClipTokenizer
  truncate: bool
  dtype: Any
  remat: bool
  share_prefix: bool
  mesh: Any
  text_sharding: parallel.TextSharding

  @property
  def images_per_step(self) -> int:
    return self.num_tasks * self.batch_size


def class_names(config: mlc.ConfigDict) -> tuple[tuple[str, ...], ...]:
  """`num_classes` names per task: config.class_names, cycled with a suffix beyond their count."""
  base, n = tuple(config.class_names), int(config.num_classes)
  names = tuple(base[i % len(base)] + (f"_{i // len(base)}" if i >= len(base) else "")
                for i in range(n))
  return (names,) * int(config.num_tasks)


def class_tokens_for(w: Workload, spec: PromptSpec) -> heads.ClassTokens:
  """The workload's class tokens for a prompt spec (mmap_shared has fewer placeholders)."""
  ct = heads.build_class_tokens(w.tokenizer, w.class_names, spec.text_prompt_tokens,
                                spec.zeroshot_template, w.clip_cfg.text.context_length)
  if w.truncate:
    return ct
  pad = w.clip_cfg.text.context_length - ct.ids.shape[-1]   # back to 77 columns, as CLIP's
  return ct._replace(ids=np.pad(ct.ids, [(0, 0), (0, 0), (0, pad)]))


def build_workload(config: mlc.ConfigDict) -> Workload:
  clip_cfg = get_variant(config.model)
  prompt = {k: v for k, v in config.prompt.to_dict().items() if v is not None}
  spec = PromptSpec(method=config.method, **prompt).validate(clip_cfg)
  t = int(config.num_tasks)
  g = max(1, min(int(config.num_groups), t))
  groups = tuple(tuple(range(t))[i::g] for i in range(g)) if spec.method == "mmap_mt" else None
  vocab = resources.clip_bpe_path() if config.vocab == "auto" else pathlib.Path(config.vocab)
  if config.batch_size % jax.device_count():
    raise ValueError(f"batch_size={config.batch_size} must be a multiple of the "
                     f"{jax.device_count()} devices (each gets the same share of every task)")
  mesh = parallel.data_mesh()
  w = Workload(clip_cfg=clip_cfg, spec=spec, groups=groups, num_tasks=t,
               batch_size=int(config.batch_size),
               class_names=class_names(config), class_tokens=None,
               tokenizer=ClipTokenizer.from_bpe_file(vocab), truncate=bool(config.truncate),
               dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype],
               remat=bool(config.remat), share_prefix=bool(config.share_prefix), mesh=mesh,
               text_sharding=parallel.text_sharding(mesh, bool(config.shard_text),
                                                    int(config.text_chunk)))
  return dataclasses.replace(w, class_tokens=class_tokens_for(w, spec))


def random_clip_params(clip_cfg: ClipConfig, seed: int = 0) -> Any:
  """`clip.init_params` (OpenAI's scales), jitted with the cheap-to-compile RBG generator."""
  return jax.jit(clip.init_params, static_argnums=1)(jax.random.key(seed, impl="rbg"), clip_cfg)


def host_batches(w: Workload, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """`count` random {"image": [T, B, H, W, 3], "label": [T, B]} batches."""
  rng = np.random.default_rng(seed)
  size = w.clip_cfg.vision.image_size
  n = np.asarray(w.class_tokens.class_mask).sum(-1)
  return [{"image": rng.standard_normal((w.num_tasks, w.batch_size, size, size, 3), np.float32),
           "label": np.stack([rng.integers(0, k, w.batch_size) for k in n]).astype(np.int32)}
          for _ in range(count)]


def optimizer(spec: PromptSpec, total_steps: int = 1000):
  """The method family's published recipe, as the trainer builds it (`train.recipes`)."""
  return optim.make_optimizer(recipes.resolve(spec.family).recipe, total_steps)


def train_loss_fn(w: Workload):
  """The trainer's loss (`train.step.make_loss_fn`) with the workload's settings."""
  return train_step.make_loss_fn(w.clip_cfg, w.spec, w.groups, dtype=w.dtype, remat=w.remat,
                                 share_prefix=w.share_prefix, text_sharding=w.text_sharding)


def _placed(tree: Any, sharding: Any, abstract: bool) -> Any:
  """Arrays on the mesh, or (compile_only) shape/dtype/sharding stand-ins that allocate nothing."""
  if abstract:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding),
                        tree)
  return jax.device_put(tree, sharding)


def _compile(fn, args, config) -> tuple[Any, float]:
  opts = {"xla_backend_optimization_level": int(config.xla_opt_level)} \
      if int(config.xla_opt_level) >= 0 else None
  t0 = time.perf_counter()
  return fn.lower(*args).compile(compiler_options=opts), time.perf_counter() - t0


def train_step_program(w: Workload, config, k: int, abstract: bool):
  """(compiled trainer step, its arguments, batches for timing, compile seconds)."""
  rep, batch_sharding = parallel.replicated(w.mesh), parallel.task_batch_sharding(w.mesh)
  opt = optimizer(w.spec)
  make = train_step.make_train_step if k == 1 else train_step.make_train_steps
  step = make(train_loss_fn(w), opt, accum_steps=int(config.accum_steps))
  init = lambda: train_step.init_state(multitask.init_learned(
      jax.random.key(int(config.seed), impl="rbg"), w.clip_cfg, w.spec, w.num_tasks, w.groups),
                                       opt)
  state = jax.eval_shape(init) if abstract else jax.jit(init)()
  params = (clip.param_shapes(w.clip_cfg) if abstract
            else random_clip_params(w.clip_cfg, int(config.seed)))
  frozen = _placed({"clip": params, "class_tokens": w.class_tokens}, rep, abstract)
  if k > 1:   # K stacked batches per call: [K, T, B, ...]
    batch_sharding = NamedSharding(w.mesh, P(None, *batch_sharding.spec))
  hb = host_batches(w, 2 * k, int(config.seed))
  stack = lambda bs: bs[0] if k == 1 else jax.tree.map(lambda *x: np.stack(x), *bs)
  batches = [_placed(stack(hb[i * k:(i + 1) * k]), batch_sharding, abstract) for i in (0, 1)]
  args = (_placed(state, rep, abstract), frozen, batches[0])
  compiled, seconds = _compile(step, args, config)
  return compiled, args, batches, seconds


def grouping_step_program(w: Workload, config):
  """(compiled grouping warm-up step: mmap_shared's per-task gradients, compile seconds); its
  arguments are abstract (compile only)."""
  spec = dataclasses.replace(w.spec, method="mmap_shared").validate(w.clip_cfg)
  rep, opt = parallel.replicated(w.mesh), optimizer(spec)
  step = grouping_run.make_grouping_step(w.clip_cfg, spec, opt, dtype=w.dtype, remat=w.remat,
                                         text_sharding=w.text_sharding)
  learned = jax.eval_shape(lambda: multitask.init_learned(
      jax.random.key(0, impl="rbg"), w.clip_cfg, spec, w.num_tasks))
  gstate = jax.eval_shape(lambda l: {"params": l, "opt_state": opt.init(l), "affinity":
                                     grouping.AffinityState.zeros(w.num_tasks)}, learned)
  args = (_placed(gstate, rep, True), _placed(clip.param_shapes(w.clip_cfg), rep, True),
          _placed(class_tokens_for(w, spec), rep, True),
          _placed(host_batches(w, 1)[0], parallel.task_batch_sharding(w.mesh), True),
          jax.ShapeDtypeStruct((), jnp.bool_, sharding=rep))
  compiled, seconds = _compile(step, args, config)
  return compiled, seconds


def time_steps(compiled, args, batches, k: int, config) -> dict[str, Any]:
  """Seconds per optimizer step of `runs` timed calls (after `warmup` untimed ones)."""
  state, frozen = args[0], args[1]
  calls = int(config.runs) if k == 1 else max(2, -(-int(config.runs) // k))
  times, metrics = [], None
  for i in range(int(config.warmup) + calls):
    t0 = time.perf_counter()
    state, metrics = compiled(state, frozen, batches[i % 2])
    jax.block_until_ready((state, metrics))
    if i >= int(config.warmup):
      times.append((time.perf_counter() - t0) / k)
  metrics = jax.device_get(metrics)
  return {"s_median": statistics.median(times), "s_min": min(times), "s_max": max(times),
          "all_s": [round(t, 5) for t in times], "final_loss": float(np.ravel(metrics["loss"])[-1]),
          "finite": bool(np.all(metrics["finite"]))}


def run_torch_reference(w: Workload, config) -> dict[str, Any]:
  """The PyTorch step in a subprocess (its own memory; same machine state as this run)."""
  if w.spec.method != "mmap_mt":
    raise ValueError("the PyTorch reference implements the mmap_mt step only")
  script = measure.torch_reference_path()
  ct = class_tokens_for(dataclasses.replace(w, truncate=False), w.spec)   # all 77 columns
  with tempfile.TemporaryDirectory() as d:
    tokens, out = os.path.join(d, "tokens.npz"), os.path.join(d, "torch.json")
    np.savez(tokens, ids=ct.ids, eot=ct.eot, class_mask=ct.class_mask)
    s = w.spec
    cmd = [sys.executable, str(script), "--arch", json.dumps(w.clip_cfg.to_dict()),
           "--tokens", tokens, "--groups", json.dumps([list(g) for g in w.groups]),
           "--length", str(s.length), "--depth", str(s.depth_for(w.clip_cfg)),
           "--source_length", str(s.source_length),
           "--source_dim", str(s.source_dim_for(w.clip_cfg)), "--batch_size", str(w.batch_size),
           "--runs", str(config.torch_runs), "--warmup", str(config.torch_warmup),
           "--threads", str(config.torch_threads), "--seed", str(config.seed), "--out", out]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"the PyTorch reference failed ({proc.returncode}):\n"
                         f"{proc.stderr[-4000:]}")
    with open(out) as f:
      return json.load(f)


def workload_dict(w: Workload, config) -> dict[str, Any]:
  return {"model": config.model, "method": w.spec.method, "num_tasks": w.num_tasks,
          "groups": [list(g) for g in w.groups or ()], "batch_size_per_task": w.batch_size,
          "images_per_step": w.images_per_step, "num_classes": int(config.num_classes),
          "text_seq_len": int(w.class_tokens.ids.shape[-1]), "dtype": config.dtype,
          "remat": w.remat, "share_prefix": w.share_prefix, "truncate": w.truncate,
          "shard_text": w.text_sharding.mesh is not None, "text_chunk": w.text_sharding.chunk,
          "accum_steps": int(config.accum_steps), "weights": "random"}


def run(config: mlc.ConfigDict, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  """The benchmark of `config` (configs/benchmark.py); returns the JSON dict."""
  t_start = time.perf_counter()
  w = build_workload(config)
  k, only = int(config.steps_per_call), bool(config.compile_only)
  log(f"{jax.default_backend()} x {jax.device_count()}; {config.model} {w.spec.method}, "
      f"{w.num_tasks} tasks x {w.batch_size} images, class tokens {w.class_tokens.ids.shape}, "
      f"shard_text={w.text_sharding.mesh is not None}" + (" (compile only)" if only else ""))
  ref = None
  if config.vs_torch and not only:   # first, while this process is small
    ref = run_torch_reference(w, config)
    log(f"torch step: median {ref['step_s_median']:.3f}s, peak memory "
        f"{ref['peak_memory_bytes'] / 2**30:.2f} GiB")
  compiled, args, batches, compile_s = train_step_program(w, config, 1, abstract=only)
  train = {**measure.costs(compiled), "compile_s": compile_s, "steps_per_call": k}
  log(f"train step: {train['flops_per_device'] / 1e9:.1f} GFLOP and "
      f"{(train['temp_bytes_per_device'] or 0) / 2**30:.2f} GiB temp per device")
  result: dict[str, Any] = {"devices": jax.device_count(), "backend": jax.default_backend(),
                            "compile_only": only, "train_step": train}
  if config.grouping:
    g_compiled, g_seconds = grouping_step_program(w, config)
    result["grouping_step"] = {**measure.costs(g_compiled), "compile_s": g_seconds}
    del g_compiled
  if not only:
    if k > 1:
      compiled, args, batches, _ = train_step_program(w, config, k, abstract=False)
    train.update(time_steps(compiled, args, batches, k, config))
    flops = train["flops_per_device"] * jax.device_count()   # the whole step, all devices
    result.update(step_s_median=train["s_median"],
                  images_per_s=w.images_per_step / train["s_median"], flops_per_step=flops,
                  achieved_flops_per_s=flops / train["s_median"],
                  peak_memory_bytes=measure.peak_memory_bytes())
    log(f"train step: median {train['s_median']:.3f}s ({result['images_per_s']:.1f} images/s), "
        f"peak memory {result['peak_memory_bytes'] / 2**30:.2f} GiB")
  if ref is not None:
    result.update(torch_step_s_median=ref["step_s_median"], torch_reference=ref,
                  torch_peak_memory_bytes=ref["peak_memory_bytes"],
                  speedup_vs_torch=ref["step_s_median"] / train["s_median"],
                  memory_ratio_vs_torch=result["peak_memory_bytes"] / ref["peak_memory_bytes"])
    log(f"speedup vs torch {result['speedup_vs_torch']:.2f}x, memory ratio "
        f"{result['memory_ratio_vs_torch']:.2f}")
  result.update(workload=workload_dict(w, config), environment=measure.environment(),
                total_s=time.perf_counter() - t_start)
  return result
