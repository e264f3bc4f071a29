"""The performance benchmark: one fixed MmAP-MT workload, timed, FLOP-counted, memory-profiled.

The workload (configs/benchmark.py; the default is the one every result is compared on): a frozen
CLIP with random weights, MmAP-MT with G groups + T tasks, T x B images per step, C classes per
task whose text features are recomputed every step. `run(config)` compiles each jitted function
once, then times

  train step       the real jitted step of `mmap_jax.train.step` (loss + grads w.r.t. the prompts
                   only, SGD update, NaN guard, donated state), batches prefetched to the device
                   while the previous step computes, no host round-trip inside the loop; with
                   `steps_per_call` K > 1 the trainer's K-step call (`make_train_steps`), per-step
                   time = call time / K, next to the single step timed in the same invocation;
  parts            grouping_step (vmapped per-task gradients, `train.grouping_run`), text_encoder
                   (all tasks' class features, forward), image_encoder (the step's T x B images,
                   forward), eval (the evaluator's per-batch function: images/s);

and reports XLA's FLOP count of each compiled executable, the achieved FLOP/s, the machine's
measured float32 matmul peak (`measure_matmul_peak`: several sizes x both XLA:CPU dots, warmed
up, interleaved, before and after the steps, every sample kept; the step's fraction of the best
and of the best median) and the peak memory (host RSS high-water mark on CPU, device memory stats
on GPU/TPU). With `vs_torch` the PyTorch reference (benchmarks/torch_reference.py) runs the same
step in a subprocess of the same invocation and the speedup is reported.

The JSON's top-level keys are stable across versions (RESULT_KEYS, TORCH_KEYS).
"""
from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from mmap_jax import heads
from mmap_jax import resources
from mmap_jax.apps import host_runtime
from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig, get_variant
from mmap_jax.prompts import multitask
from mmap_jax.prompts.spec import PromptSpec

RESULT_KEYS = ("step_s_median", "step_s_min", "step_s_max", "images_per_s", "compile_s",
               "flops_per_step", "achieved_flops_per_s", "peak_flops_per_s", "peak_memory_bytes",
               "backend", "devices", "parts")
TORCH_KEYS = ("torch_step_s_median", "torch_peak_memory_bytes", "speedup_vs_torch")

REPO_ROOT = pathlib.Path(__file__).resolve().parents[2]
DEFAULT_VOCAB = resources.clip_bpe_path()
TORCH_REFERENCE = REPO_ROOT / "benchmarks" / "torch_reference.py"

# Office-Home's 65 classes (the workload's class names; the order of the official release).
OFFICE_HOME_CLASSES = (
    "Alarm_Clock", "Backpack", "Batteries", "Bed", "Bike", "Bottle", "Bucket", "Calculator",
    "Calendar", "Candles", "Chair", "Clipboards", "Computer", "Couch", "Curtains", "Desk_Lamp",
    "Drill", "Eraser", "Exit_Sign", "Fan", "File_Cabinet", "Flipflops", "Flowers", "Folder",
    "Fork", "Glasses", "Hammer", "Helmet", "Kettle", "Keyboard", "Knives", "Lamp_Shade", "Laptop",
    "Marker", "Monitor", "Mop", "Mouse", "Mug", "Notebook", "Oven", "Pan", "Paper_Clip", "Pen",
    "Pencil", "Postit_Notes", "Printer", "Push_Pin", "Radio", "Refrigerator", "Ruler", "Scissors",
    "Screwdriver", "Shelf", "Sink", "Sneakers", "Soda", "Speaker", "Spoon", "TV", "Table",
    "Telephone", "ToothBrush", "Toys", "Trash_Can", "Webcam")


# ----------------------------------------------------------------------------- XLA settings

# The matmul-peak probe compiles the dot with the process's settings and with YNNPACK's dot
# (per-compile options), and reports the faster: the best matmul this machine can do, whatever
# flags the benchmarked code runs with (see host_runtime.CPU_FAST_XLA_FLAGS).
YNN_DOT = {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT"}


# ----------------------------------------------------------------------------- measurement

def cost_flops(compiled: Any) -> float:
  """FLOPs of one execution of a compiled executable, from XLA's cost analysis (0 if unknown)."""
  analysis = compiled.cost_analysis()
  if isinstance(analysis, (list, tuple)):          # older jax: one dict per program
    analysis = analysis[0] if analysis else {}
  return float((analysis or {}).get("flops", 0.0))


def summarize(times: Sequence[float]) -> dict[str, Any]:
  times = [float(t) for t in times]
  return {"s_median": statistics.median(times), "s_min": min(times), "s_max": max(times),
          "runs": len(times), "all_s": [round(t, 4) for t in times]}


def time_calls(fn: Callable[[], Any], runs: int, warmup: int = 0) -> list[float]:
  """Wall seconds of `runs` calls of fn() (each blocked until its result is ready)."""
  for _ in range(warmup):
    jax.block_until_ready(fn())
  times = []
  for _ in range(runs):
    t0 = time.perf_counter()
    jax.block_until_ready(fn())
    times.append(time.perf_counter() - t0)
  return times


def _dot_implementations() -> dict[str, Optional[dict[str, str]]]:
  """Per-compile XLA options of each matmul implementation the probe measures.

  CPU: XLA's own dot (YNNPACK fusions off, what host_runtime.CPU_FAST_XLA_FLAGS selects) and
  YNNPACK's dot, both set per compile so the process's flags do not matter. Else: XLA's default.
  """
  if jax.default_backend() != "cpu":
    return {"default": None}
  return {"xla_dot": {"xla_cpu_experimental_ynn_fusion_type": ""}, "ynnpack_dot": YNN_DOT}


def measure_matmul_peak(sizes: Sequence[int] = (1024, 2048, 3072), runs: int = 7,
                        warmup_s: float = 2.0, dtype=jnp.float32) -> dict[str, Any]:
  """The machine's measured matmul FLOP/s: n^3 dots of several sizes and implementations.

  Every (size, implementation) is compiled, called twice, then all are called round-robin for
  `warmup_s` seconds (threads spun up, clocks settled) before `runs` timed rounds, each timing
  every variant once (interleaved, so drift hits all alike). Reported: per variant the best and
  median FLOP/s and every sample; overall `flops_per_s_best` (the fastest single call of any
  variant) and `flops_per_s_median` (the variant with the highest median): the best matmul this
  machine can do, whatever flags the benchmarked code runs with.
  """
  rng = np.random.default_rng(0)
  variants: dict[str, dict[str, Any]] = {}
  for n in sorted(set(int(x) for x in sizes)):
    a = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype)
    b = jnp.asarray(rng.standard_normal((n, n), np.float32), dtype)
    for impl, options in _dot_implementations().items():
      compiled = jax.jit(jnp.dot).lower(a, b).compile(compiler_options=options)
      call = (lambda c, x, y: lambda: c(x, y))(compiled, a, b)
      variants[f"{n}/{impl}"] = {"n": n, "implementation": impl, "call": call,
                                 "flops": cost_flops(compiled) or 2.0 * n ** 3, "all_s": []}
  for v in variants.values():
    time_calls(v["call"], 0, warmup=2)
  t_end, warm_calls = time.perf_counter() + float(warmup_s), 0
  while time.perf_counter() < t_end:
    for v in variants.values():
      jax.block_until_ready(v["call"]())
      warm_calls += 1
  for _ in range(int(runs)):
    for v in variants.values():
      v["all_s"] += time_calls(v["call"], 1)
  out_variants = {}
  for key, v in variants.items():
    out_variants[key] = {"n": v["n"], "implementation": v["implementation"], "flops": v["flops"],
                         "flops_per_s_best": v["flops"] / min(v["all_s"]),
                         "flops_per_s_median": v["flops"] / statistics.median(v["all_s"]),
                         "all_s": list(v["all_s"])}
  best = max(out_variants, key=lambda k: out_variants[k]["flops_per_s_best"])
  median = max(out_variants, key=lambda k: out_variants[k]["flops_per_s_median"])
  by_impl: dict[str, float] = {}
  for v in out_variants.values():
    by_impl[v["implementation"]] = max(by_impl.get(v["implementation"], 0.0),
                                       v["flops_per_s_best"])
  return {"dtype": jnp.dtype(dtype).name, "sizes": sorted(set(int(x) for x in sizes)),
          "runs": int(runs), "warmup_s": float(warmup_s), "warmup_calls": warm_calls,
          "flops_per_s_best": out_variants[best]["flops_per_s_best"], "best_variant": best,
          "flops_per_s_median": out_variants[median]["flops_per_s_median"],
          "median_variant": median,
          "n": out_variants[best]["n"], "flops": out_variants[best]["flops"],
          "implementation": out_variants[best]["implementation"],
          "best_by_implementation": by_impl, "variants": out_variants}


def _proc_status(field: str) -> Optional[int]:
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith(field + ":"):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return None


def rss_bytes() -> Optional[int]:
  return _proc_status("VmRSS")


def _reset_rss_peak() -> bool:
  """Reset the kernel's RSS high-water mark (Linux >= 4.0); False where not possible."""
  try:
    with open("/proc/self/clear_refs", "w") as f:
      f.write("5")
    return True
  except OSError:
    return False


class PeakMemory:
  """Peak memory while the `with` body runs.

  CPU: the process's RSS high-water mark (VmHWM), reset on entry (`reset=False` where the kernel
  does not allow it: then it is the process's lifetime peak, said by `scope`). GPU/TPU: the
  device's `peak_bytes_in_use` (the allocator's lifetime peak; XLA has no reset).
  """

  def __init__(self):
    self.bytes: Optional[int] = None
    self.baseline_bytes: Optional[int] = None
    self.kind = ""
    self.scope = ""

  def __enter__(self):
    gc.collect()
    self.baseline_bytes = rss_bytes()
    self._reset = _reset_rss_peak()
    return self

  def __exit__(self, *exc):
    dev = jax.devices()[0]
    if dev.platform == "cpu":
      self.kind = "host_rss"
      hwm = _proc_status("VmHWM")
      if hwm is None:  # not Linux: ru_maxrss is KiB on Linux, bytes on macOS
        scale = 1 if sys.platform == "darwin" else 1024
        hwm = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * scale
        self._reset = False
      self.bytes = hwm
      self.scope = "during the timed calls" if self._reset else "process lifetime"
    else:
      stats = [d.memory_stats() or {} for d in jax.local_devices()]
      self.kind = "device_peak_bytes_in_use"
      self.bytes = max(int(s.get("peak_bytes_in_use", 0)) for s in stats)
      self.scope = "device allocator lifetime (max over local devices)"
    return False

  def as_dict(self) -> dict[str, Any]:
    return {"bytes": self.bytes, "kind": self.kind, "scope": self.scope,
            "rss_before_bytes": self.baseline_bytes}


# ----------------------------------------------------------------------------- workload

@dataclasses.dataclass(frozen=True)
class Workload:
  """Everything static about the benchmarked step."""
  clip_cfg: ClipConfig
  spec: PromptSpec
  groups: tuple[tuple[int, ...], ...]
  num_tasks: int
  batch_size: int
  class_tokens: heads.ClassTokens     # truncated (or full context when truncate=False)
  class_tokens_full: heads.ClassTokens  # padded to the context length (the torch reference's)
  class_tokens_source: str
  class_names: tuple[tuple[str, ...], ...]
  vocab: Optional[pathlib.Path]
  truncate: bool
  dtype: Any
  remat: bool
  share_prefix: bool

  @property
  def images_per_step(self) -> int:
    return self.num_tasks * self.batch_size


def class_names(config: mlc.ConfigDict) -> list[list[str]]:
  """Each task's class names: Office-Home's (first `num_classes`, cycled if more)."""
  n = int(config.num_classes)
  names = [OFFICE_HOME_CLASSES[i % len(OFFICE_HOME_CLASSES)]
           + ("" if i < len(OFFICE_HOME_CLASSES) else f"_{i // len(OFFICE_HOME_CLASSES)}")
           for i in range(n)]
  return [names for _ in range(int(config.num_tasks))]


def resolve_vocab(vocab: Optional[str]) -> Optional[pathlib.Path]:
  """'auto' -> the packaged CLIP BPE file; '' / 'none' / None -> synthetic class tokens."""
  if vocab in (None, "", "none", "synthetic"):
    return None
  path = DEFAULT_VOCAB if vocab == "auto" else pathlib.Path(vocab)
  if vocab == "auto" and not path.exists():
    return None
  if not path.exists():
    raise FileNotFoundError(f"vocab={vocab!r}: no such file")
  return path


def synthetic_class_tokens(names_per_task: Sequence[Sequence[str]], num_prompt_tokens: int,
                           context_length: int, vocab_size: int) -> heads.ClassTokens:
  """<SOS> X*L name. <EOT> with made-up name ids and Office-Home-like lengths (1-3 name tokens,
  like the real BPE of its class names: most are one token, a few two or three)."""
  sot, eot, x, dot = vocab_size - 2, vocab_size - 1, min(343, vocab_size - 3), min(269, vocab_size - 4)
  c_max = max(len(n) for n in names_per_task)
  ids = np.zeros((len(names_per_task), c_max, context_length), np.int32)
  for t, names in enumerate(names_per_task):
    for c in range(c_max):
      n_name = 3 if c == 0 else (2 if c % 5 == 1 else 1)
      body = [1000 + (7 * c + k) % max(vocab_size - 1100, 1) for k in range(n_name)]
      seq = [sot] + [x] * num_prompt_tokens + body + [dot, eot]
      ids[t, c, :len(seq)] = seq
  mask = np.stack([np.arange(c_max) < len(n) for n in names_per_task])
  ids = clip.truncate_to_longest(ids, eot)
  return heads.ClassTokens(ids=ids, eot=clip.eot_positions(ids, eot), class_mask=mask)


def pad_to_context(ct: heads.ClassTokens, context_length: int) -> heads.ClassTokens:
  """Truncated class tokens padded back to the full context (zeros after EOT, as CLIP's)."""
  ids = np.asarray(ct.ids)
  pad = context_length - ids.shape[-1]
  return ct._replace(ids=np.pad(ids, [(0, 0)] * (ids.ndim - 1) + [(0, pad)]))


_TOKENIZERS: dict = {}


def make_class_tokens(clip_cfg: ClipConfig, spec: PromptSpec, names: Sequence[Sequence[str]],
                      vocab: Optional[pathlib.Path]) -> tuple[heads.ClassTokens, str]:
  """(class tokens truncated to the longest sequence, where they came from)."""
  ctx = clip_cfg.text.context_length
  if vocab is None:
    return (synthetic_class_tokens(names, spec.text_prompt_tokens, ctx, clip_cfg.text.vocab_size),
            "synthetic (Office-Home-like lengths)")
  if vocab not in _TOKENIZERS:
    from mmap_jax.tokenizer import ClipTokenizer
    _TOKENIZERS[vocab] = ClipTokenizer.from_bpe_file(vocab)
  ct = heads.build_class_tokens(_TOKENIZERS[vocab], names, spec.text_prompt_tokens,
                                spec.zeroshot_template, ctx)
  return ct, f"bpe:{vocab}"


def class_tokens_for(w: "Workload", spec: PromptSpec) -> heads.ClassTokens:
  """The workload's class tokens for another prompt spec (e.g. mmap_shared's L placeholders)."""
  ct, _ = make_class_tokens(w.clip_cfg, spec, w.class_names, w.vocab)
  return ct if w.truncate else pad_to_context(ct, w.clip_cfg.text.context_length)


def build_workload(config: mlc.ConfigDict) -> Workload:
  clip_cfg = get_variant(config.model)
  prompt = {k: v for k, v in config.prompt.to_dict().items() if v is not None}
  spec = PromptSpec(method=config.method, **prompt).validate(clip_cfg)
  t = int(config.num_tasks)
  g = max(1, min(int(config.num_groups), t))
  groups = tuple(tuple(range(t))[i::g] for i in range(g)) if spec.method == "mmap_mt" else None
  names = tuple(tuple(n) for n in class_names(config))
  vocab = resolve_vocab(config.vocab)
  ct, source = make_class_tokens(clip_cfg, spec, names, vocab)
  full = pad_to_context(ct, clip_cfg.text.context_length)
  return Workload(clip_cfg=clip_cfg, spec=spec, groups=groups, num_tasks=t,
                  batch_size=int(config.batch_size),
                  class_tokens=ct if config.truncate else full, class_tokens_full=full,
                  class_tokens_source=source, class_names=names, vocab=vocab,
                  truncate=bool(config.truncate),
                  dtype={"float32": jnp.float32, "bfloat16": jnp.bfloat16}[config.dtype],
                  remat=bool(config.remat), share_prefix=bool(config.share_prefix))


def random_clip_params(clip_cfg: ClipConfig, seed: int = 0) -> Any:
  """`clip.init_params` (OpenAI's scales), jitted with the cheap-to-compile RBG generator."""
  key = jax.random.key(seed, impl="rbg")
  return jax.jit(clip.init_params, static_argnums=1)(key, clip_cfg)


def host_batches(w: Workload, count: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
  """`count` random [T, B, H, W, 3] image batches (CLIP-normalised scale) with labels."""
  rng = np.random.default_rng(seed)
  size = w.clip_cfg.vision.image_size
  num_classes = np.asarray(w.class_tokens.class_mask).sum(-1)
  out = []
  for _ in range(count):
    images = rng.standard_normal((w.num_tasks, w.batch_size, size, size, 3), np.float32)
    labels = np.stack([rng.integers(0, n, w.batch_size) for n in num_classes]).astype(np.int32)
    out.append({"image": images, "label": labels})
  return out


def timed_loop(step_fn: Callable[[Any, dict], tuple[Any, Any]], carry: Any,
               host_batches_: Sequence[dict], steps: int, warmup: int,
               sharding: Any = None, faults: Optional[list[int]] = None
               ) -> tuple[Any, Any, list[float]]:
  """Runs warmup + steps calls `carry, out = step_fn(carry, batch)`; seconds of the timed ones.

  Input is overlapped with compute: step i is dispatched (asynchronously) first, then batch i+1
  is transferred to the device while step i runs; only then does the loop wait for step i. No
  value is read back to the host inside the loop. `faults`, if given, receives the host's minor
  page faults of each timed step.
  """
  put = lambda i: jax.device_put(host_batches_[i % len(host_batches_)], sharding)
  minflt = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  times, out = [], None
  batch = put(0)
  for i in range(warmup + steps):
    t0, f0 = time.perf_counter(), minflt()
    carry, out = step_fn(carry, batch)               # dispatch
    if i + 1 < warmup + steps:
      batch = put(i + 1)                             # transfer while the step computes
    jax.block_until_ready((carry, out))
    if i >= warmup:
      times.append(time.perf_counter() - t0)
      if faults is not None:
        faults.append(minflt() - f0)
  return carry, out, times


@dataclasses.dataclass(frozen=True)
class Placement:
  """Where arrays go: replicated weights/state, batches split along the per-task batch axis over
  a 1-D data mesh (all devices when the batch divides evenly, else the default device alone)."""
  replicated: Any
  batch: Any          # sharding of [T, B, ...] arrays
  rows: Any           # sharding of [B, ...] arrays (evaluation batches)
  devices: int

  @classmethod
  def for_workload(cls, w: "Workload", eval_batch: int) -> "Placement":
    from mmap_jax import parallel
    devs = jax.devices()
    if len(devs) == 1 or w.batch_size % len(devs) or eval_batch % len(devs):
      return cls(None, None, None, 1)
    mesh = parallel.data_mesh(devs)
    from jax.sharding import NamedSharding, PartitionSpec as P
    return cls(parallel.replicated(mesh), parallel.task_batch_sharding(mesh),
               NamedSharding(mesh, P(parallel.DATA_AXIS)), len(devs))

  def put(self, tree: Any, kind: str = "replicated") -> Any:
    return jax.device_put(tree, getattr(self, kind))


def train_loss_fn(w: Workload):
  def loss_fn(learned, frozen, batch):
    loss, aux = heads.multitask_loss(
        learned, frozen["clip"], w.clip_cfg, w.spec, w.groups, frozen["class_tokens"],
        {"images": batch["image"], "labels": batch["label"]}, dtype=w.dtype, remat=w.remat,
        share_prefix=w.share_prefix)
    return loss, {"per_task_loss": aux["per_task_loss"]}
  return loss_fn


def _optimizer(config: mlc.ConfigDict):
  from mmap_jax.train import optim
  oc = mlc.ConfigDict({"name": "sgd", "lr": 0.0035, "momentum": 0.9, "weight_decay": 5e-4,
                       "warmup_steps": 0, "grad_clip": 0.0})
  return optim.make_optimizer(oc, 1000)


_COMPILER_OPTIONS: dict[str, Any] = {}


def _compile(fn, *args):
  """AOT lower + compile (the one compile of `fn`); seconds taken."""
  t0 = time.perf_counter()
  compiled = fn.lower(*args).compile(compiler_options=dict(_COMPILER_OPTIONS) or None)
  return compiled, time.perf_counter() - t0


# ----------------------------------------------------------------------------- timed pieces

def _stack(batches: Sequence[dict]) -> dict:
  return {k: np.stack([b[k] for b in batches]) for k in batches[0]}


def _train_state_and_step(w: Workload, config, donate: bool, steps_per_call: int = 1):
  """The optimizer state the benchmark starts from (seed `config.seed`) and the trainer's step
  (K = `steps_per_call` steps per call), not yet placed or compiled."""
  from mmap_jax.train import step as train_step
  optimizer = _optimizer(config)
  learned = multitask.init_learned(jax.random.key(config.seed, impl="rbg"), w.clip_cfg, w.spec,
                                   w.num_tasks, w.groups)
  make = train_step.make_train_step if steps_per_call == 1 else train_step.make_train_steps
  return train_step.init_state(learned, optimizer), make(train_loss_fn(w), optimizer,
                                                         donate=donate)


def bench_train_step(w: Workload, config, clip_params, device_ct, pl: Placement,
                     steps_per_call: int = 1, single_flops: Optional[float] = None
                     ) -> dict[str, Any]:
  """The training step timed as the trainer runs it: `steps_per_call` steps per jitted call.

  K = 1: `train.step.make_train_step`, one step per timed call. K > 1: `make_train_steps`
  (a lax.scan over K stacked batches); max(2, ceil(runs / K)) timed calls (`config.warmup`
  untimed ones first), and every per-step figure
  (`all_s`, `s_median`, `page_faults`) is the call's divided by K (`call_s`,
  `page_faults_per_call` keep the raw ones). FLOPs per step come from the single-step program
  (`single_flops`): XLA's cost analysis counts a while loop's body once, whatever its trip count.
  """
  k = int(steps_per_call)
  state, step = _train_state_and_step(w, config, donate=True, steps_per_call=k)
  state = pl.put(state)
  frozen = {"clip": clip_params, "class_tokens": device_ct}
  batches = host_batches(w, 2 * k, config.seed)
  sharding = pl.batch
  if k > 1:
    batches = [_stack(batches[:k]), _stack(batches[k:])]
    if pl.batch is not None:
      from jax.sharding import NamedSharding, PartitionSpec as P
      sharding = NamedSharding(pl.batch.mesh, P(None, *pl.batch.spec))
  compiled, compile_s = _compile(step, state, frozen, jax.device_put(batches[0], sharding))
  program_flops = cost_flops(compiled)
  flops = program_flops if k == 1 else single_flops
  analysis = compiled.memory_analysis()           # XLA's per-execution scratch (None if unknown)
  temp_bytes = int(analysis.temp_size_in_bytes) if analysis is not None else None
  faults: list[int] = []
  with PeakMemory() as mem:
    calls = int(config.runs) if k == 1 else max(2, -(-int(config.runs) // k))
    state, metrics, call_times = timed_loop(lambda st, bt: compiled(st, frozen, bt), state,
                                            batches, calls, int(config.warmup), sharding, faults)
  metrics = jax.device_get(metrics)               # the only host read, after the loop
  losses = np.asarray(metrics["loss"]).reshape(-1)
  s = summarize([t / k for t in call_times])
  return {**s, "steps_per_call": k, "steps_timed": k * len(call_times),
          "call_s": [round(t, 4) for t in call_times], "compile_s": compile_s, "flops": flops,
          "program_flops_cost_analysis": program_flops, "memory": mem.as_dict(),
          "page_faults": [f / k for f in faults], "page_faults_per_call": faults,
          "temp_bytes": temp_bytes, "final_loss": float(losses[-1]),
          "finite": bool(np.all(metrics["finite"]))}


def bench_grouping_step(w: Workload, config, clip_params, pl: Placement,
                        steps_per_call: int = 1) -> dict[str, Any]:
  """The grouping warm-up step of `train.grouping_run` (mmap_shared, per-task grads in a vmap),
  `steps_per_call` steps per call as the warm-up runs it (per-step time = call time / K)."""
  from mmap_jax import grouping
  from mmap_jax.train import grouping_run
  k = int(steps_per_call)
  spec = dataclasses.replace(w.spec, method="mmap_shared").validate(w.clip_cfg)
  device_ct_shared = pl.put(class_tokens_for(w, spec))
  optimizer = _optimizer(config)
  learned = multitask.init_learned(jax.random.key(config.seed + 7, impl="rbg"), w.clip_cfg, spec,
                                   w.num_tasks)
  gstate = pl.put({"params": learned, "opt_state": optimizer.init(learned),
                   "affinity": grouping.AffinityState.zeros(w.num_tasks)})
  make = grouping_run.make_grouping_step if k == 1 else grouping_run.make_grouping_steps
  step = make(w.clip_cfg, spec, optimizer, dtype=w.dtype, remat=w.remat)
  batches = host_batches(w, 2 * k, config.seed + 1)
  sharding = pl.batch
  record = pl.put(jnp.asarray(True))
  if k > 1:
    batches = [_stack(batches[:k]), _stack(batches[k:])]
    record = pl.put(jnp.ones((k,), bool))
    if pl.batch is not None:
      from jax.sharding import NamedSharding, PartitionSpec as P
      sharding = NamedSharding(pl.batch.mesh, P(None, *pl.batch.spec))
  compiled, compile_s = _compile(step, gstate, clip_params, device_ct_shared,
                                 jax.device_put(batches[0], sharding), record)
  calls = int(config.grouping_runs) if k == 1 else max(2, -(-int(config.grouping_runs) // k))
  with PeakMemory() as mem:
    gstate, _, times = timed_loop(
        lambda gs, bt: compiled(gs, clip_params, device_ct_shared, bt, record), gstate, batches,
        calls, int(config.part_warmup), sharding)
  flops = cost_flops(compiled)
  return {**summarize([t / k for t in times]), "steps_per_call": k,
          "call_s": [round(t, 4) for t in times], "compile_s": compile_s,
          "flops": flops if k == 1 else None, "program_flops_cost_analysis": flops,
          "memory": mem.as_dict()}


def _learned_prompts(w: Workload, config, pl: Placement):
  learned = multitask.init_learned(jax.random.key(config.seed, impl="rbg"), w.clip_cfg, w.spec,
                                   w.num_tasks, w.groups)
  prompts = multitask.task_prompts(learned, w.clip_cfg, w.spec, w.groups, num_tasks=w.num_tasks)
  return pl.put(learned), pl.put(prompts)


def _timed_part(compiled, args, config, compile_s, items: int) -> dict[str, Any]:
  times = time_calls(lambda: compiled(*args), int(config.part_runs), int(config.part_warmup))
  s = summarize(times)
  flops = cost_flops(compiled)
  return {**s, "compile_s": compile_s, "flops": flops, "items": items,
          "items_per_s": items / s["s_median"],
          "achieved_flops_per_s": flops / s["s_median"] if flops else None}


def bench_text_encoder(w: Workload, config, clip_params, device_ct, pl: Placement) -> dict[str, Any]:
  _, prompts = _learned_prompts(w, config, pl)
  fn = jax.jit(lambda p, tp, ct: heads.text_features(
      p, w.clip_cfg, tp, ct, dtype=w.dtype, share_prefix=w.share_prefix))
  args = (clip_params, prompts.text, device_ct)
  compiled, compile_s = _compile(fn, *args)
  n = int(np.asarray(w.class_tokens.class_mask).size)
  return {**_timed_part(compiled, args, config, compile_s, n), "unit": "class prompts",
          "seq_len": int(np.asarray(w.class_tokens.ids).shape[-1])}


def bench_image_encoder(w: Workload, config, clip_params, pl: Placement) -> dict[str, Any]:
  _, prompts = _learned_prompts(w, config, pl)
  fn = jax.jit(lambda p, vp, im: heads.image_features(p, w.clip_cfg, vp, im, dtype=w.dtype))
  images = pl.put(host_batches(w, 1, config.seed + 2)[0]["image"], "batch")
  args = (clip_params, prompts.visual, images)
  compiled, compile_s = _compile(fn, *args)
  return {**_timed_part(compiled, args, config, compile_s, w.images_per_step), "unit": "images"}


def bench_eval(w: Workload, config, clip_params, device_ct, pl: Placement) -> dict[str, Any]:
  """The evaluator's per-batch function (image features of one task + logits + argmax)."""
  from mmap_jax.train import evaluate
  learned, _ = _learned_prompts(w, config, pl)
  text_fn, batch_fn = evaluate.make_eval_fns(w.clip_cfg, w.spec, w.groups, w.num_tasks,
                                             dtype=w.dtype)
  feats = text_fn(learned, clip_params, device_ct)
  size = w.clip_cfg.vision.image_size
  rng = np.random.default_rng(config.seed + 3)
  images = pl.put(rng.standard_normal((int(config.eval_batch_size), size, size, 3), np.float32),
                  "rows")
  mask = pl.put(jnp.asarray(w.class_tokens.class_mask))
  args = (learned, clip_params, feats, mask, images, pl.put(jnp.asarray(0, jnp.int32)))
  compiled, compile_s = _compile(batch_fn, *args)
  out = _timed_part(compiled, args, config, compile_s, int(config.eval_batch_size))
  return {**out, "unit": "images", "images_per_s": out["items_per_s"]}


# ----------------------------------------------------------------------------- torch reference

def torch_reference_args(w: Workload, config, tokens_file: str, out_file: str) -> list[str]:
  v, t = w.clip_cfg.vision, w.clip_cfg.text
  arch = json.dumps(w.clip_cfg.to_dict())
  return [sys.executable, str(TORCH_REFERENCE), "--arch", arch,
          "--tokens", tokens_file, "--groups", json.dumps([list(g) for g in w.groups]),
          "--length", str(w.spec.length), "--depth", str(w.spec.depth_for(w.clip_cfg)),
          "--source_length", str(w.spec.source_length), "--source_dim", str(w.spec.source_dim_for(w.clip_cfg)),
          "--batch_size", str(w.batch_size), "--runs", str(config.torch_runs),
          "--warmup", str(config.torch_warmup), "--threads", str(config.torch_threads),
          "--attn", str(config.torch_attn), "--seed", str(config.seed), "--out", out_file]


def run_torch_reference(w: Workload, config) -> dict[str, Any]:
  """The PyTorch step in a subprocess (its own RSS; same machine state as this invocation)."""
  if w.spec.method != "mmap_mt":
    raise ValueError("the PyTorch reference implements the mmap_mt step only")
  with tempfile.TemporaryDirectory() as d:
    tokens = os.path.join(d, "tokens.npz")
    ct = w.class_tokens_full
    np.savez(tokens, ids=ct.ids, eot=ct.eot, class_mask=ct.class_mask)
    out = os.path.join(d, "torch.json")
    cmd = torch_reference_args(w, config, tokens, out)
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
      raise RuntimeError(f"the PyTorch reference failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    with open(out) as f:
      return json.load(f)


# ----------------------------------------------------------------------------- the run

def _load_average() -> Optional[list[float]]:
  try:
    return [round(x, 2) for x in os.getloadavg()]
  except OSError:
    return None


def set_compiler_options(config: mlc.ConfigDict) -> None:
  """The per-compile XLA options of this benchmark's programs (tests: a fast opt level)."""
  _COMPILER_OPTIONS.clear()
  if int(config.get("xla_opt_level", -1)) >= 0:   # tests: fast compiles of the tiny workload
    _COMPILER_OPTIONS["xla_backend_optimization_level"] = int(config.xla_opt_level)


def environment() -> dict[str, Any]:
  """Versions, device, flags and allocator of this process (recorded with every result)."""
  return {"jax": jax.__version__, "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "device_kind": jax.devices()[0].device_kind,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "allocator": host_runtime.allocator_in_use(),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def _peak_probe(config, log, when: str) -> dict[str, Any]:
  sizes = [int(x) for x in str(config.peak_sizes).replace("|", ",").split(",") if x.strip()]
  peak = measure_matmul_peak(sizes, int(config.peak_runs), float(config.peak_warmup_s))
  log(f"matmul peak ({when}): best {peak['flops_per_s_best'] / 1e9:.1f} GFLOP/s "
      f"({peak['best_variant']}), best median {peak['flops_per_s_median'] / 1e9:.1f} GFLOP/s "
      f"({peak['median_variant']}); {peak['runs']} rounds over sizes {peak['sizes']} float32")
  return peak


def _log_train(log, t: dict[str, Any]) -> None:
  log(f"train step (steps_per_call={t['steps_per_call']}): median {t['s_median']:.3f}s per step "
      f"(min {t['s_min']:.3f}, max {t['s_max']:.3f}), compile {t['compile_s']:.1f}s, "
      f"{t['flops'] / 1e9:.1f} GFLOP/step, {t['flops'] / t['s_median'] / 1e9:.1f} GFLOP/s, "
      f"{statistics.median(t['page_faults']):.0f} host page faults/step "
      f"(allocator: {host_runtime.allocator_in_use()})")


def single_step_flops(w: Workload, config, clip_params, device_ct, pl: Placement) -> float:
  """FLOPs of one training step (the single-step program's cost analysis; compiled, not run)."""
  state, step = _train_state_and_step(w, config, donate=True)
  batch = pl.put(host_batches(w, 1, config.seed)[0], "batch")
  compiled, _ = _compile(step, pl.put(state), {"clip": clip_params, "class_tokens": device_ct},
                         batch)
  return cost_flops(compiled)


def run(config: mlc.ConfigDict, *, log: Callable[[str], None] = print) -> dict[str, Any]:
  """Runs the benchmark described by `config` (configs/benchmark.py); returns the JSON dict."""
  t_start = time.perf_counter()
  set_compiler_options(config)
  w = build_workload(config)
  devices = jax.devices()
  backend = jax.default_backend()
  log(f"backend {backend} ({len(devices)} devices); model {config.model}; {w.spec.method} "
      f"{w.num_tasks} tasks / {len(w.groups or ())} groups; {w.batch_size} images per task; "
      f"class tokens {tuple(np.asarray(w.class_tokens.ids).shape)} ({w.class_tokens_source})")
  load_before = _load_average()
  peak = _peak_probe(config, log, "before the steps")
  ref = None
  if config.vs_torch:   # first, while this process is small: both fit in memory side by side
    log("running the PyTorch reference (subprocess) ...")
    ref = run_torch_reference(w, config)
    log(f"torch step: median {ref['step_s_median']:.3f}s (min {ref['step_s_min']:.3f}, max "
        f"{ref['step_s_max']:.3f}), peak RSS {ref['peak_memory_bytes'] / 2**30:.2f} GiB")
  pl = Placement.for_workload(w, int(config.eval_batch_size))
  clip_params = pl.put(random_clip_params(w.clip_cfg, int(config.seed)))
  device_ct = pl.put(w.class_tokens)

  k = int(config.get("steps_per_call", 1))
  if k < 1:
    raise ValueError(f"steps_per_call={k} must be >= 1")
  single = None
  if k == 1 or config.get("single", True):
    single = bench_train_step(w, config, clip_params, device_ct, pl)
    _log_train(log, single)
  if k == 1:
    train = single
  else:
    flops = single["flops"] if single else single_step_flops(w, config, clip_params, device_ct, pl)
    train = bench_train_step(w, config, clip_params, device_ct, pl, k, flops)
    _log_train(log, train)

  parts: dict[str, Any] = {}
  wanted = [p.strip() for p in str(config.parts).split(",") if p.strip()]
  for name in wanted:
    if name == "grouping_step":
      parts[name] = bench_grouping_step(w, config, clip_params, pl, k)
      parts[name]["ratio_to_train_step"] = parts[name]["s_median"] / train["s_median"]
      if single is not None and single is not train:
        parts[name]["ratio_to_single_train_step"] = parts[name]["s_median"] / single["s_median"]
    elif name == "text_encoder":
      parts[name] = bench_text_encoder(w, config, clip_params, device_ct, pl)
    elif name == "image_encoder":
      parts[name] = bench_image_encoder(w, config, clip_params, pl)
    elif name == "eval":
      parts[name] = bench_eval(w, config, clip_params, device_ct, pl)
    else:
      raise ValueError(f"parts: unknown part {name!r}; known: grouping_step, text_encoder, "
                       "image_encoder, eval")
    log(f"{name}: median {parts[name]['s_median']:.3f}s "
        f"(compile {parts[name]['compile_s']:.1f}s)")
  peak_after = _peak_probe(config, log, "after the steps")
  peak_best = max(peak["flops_per_s_best"], peak_after["flops_per_s_best"])
  peak_median = max(peak["flops_per_s_median"], peak_after["flops_per_s_median"])

  achieved = train["flops"] / train["s_median"] if train["flops"] else None
  result: dict[str, Any] = {
      "step_s_median": train["s_median"],
      "step_s_min": train["s_min"],
      "step_s_max": train["s_max"],
      "images_per_s": w.images_per_step / train["s_median"],
      "compile_s": train["compile_s"],
      "flops_per_step": train["flops"],
      "achieved_flops_per_s": achieved,
      "peak_flops_per_s": peak_best,
      "fraction_of_peak": achieved / peak_best if achieved else None,
      "peak_flops_per_s_median": peak_median,
      "fraction_of_peak_median": achieved / peak_median if achieved else None,
      "steps_per_call": k,
      "peak_memory_bytes": train["memory"]["bytes"],
      "backend": backend,
      "devices": pl.devices,
      "parts": parts,
      "train_step": train,
      "matmul_peak": {"before": peak, "after": peak_after,
                      "after_over_before_best": peak_after["flops_per_s_best"]
                      / peak["flops_per_s_best"]},
      "workload": {
          "model": config.model, "method": w.spec.method, "num_tasks": w.num_tasks,
          "groups": [list(g) for g in w.groups or ()], "batch_size_per_task": w.batch_size,
          "images_per_step": w.images_per_step, "num_classes": int(config.num_classes),
          "prompt_tokens_per_layer": w.spec.tokens_per_layer,
          "prompt_depth": w.spec.depth_for(w.clip_cfg),
          "class_tokens": w.class_tokens_source,
          "text_seq_len": int(np.asarray(w.class_tokens.ids).shape[-1]),
          "dtype": config.dtype, "remat": w.remat, "share_prefix": w.share_prefix,
          "truncate": bool(config.truncate), "weights": "random",
      },
      "environment": {**environment(), "load_average_before": load_before,
                      "load_average_after": _load_average()},
  }
  if k > 1 and single is not None:
    result["train_step_single"] = single
    result["steps_per_call_speedup"] = single["s_median"] / train["s_median"]
    log(f"steps_per_call={k}: {result['steps_per_call_speedup']:.3f}x the single-step median")
  if ref is not None:
    result["torch_step_s_median"] = ref["step_s_median"]
    result["torch_peak_memory_bytes"] = ref["peak_memory_bytes"]
    result["speedup_vs_torch"] = ref["step_s_median"] / train["s_median"]
    result["torch_reference"] = ref
    if ref.get("peak_memory_bytes") and train["memory"]["bytes"]:
      result["memory_ratio_vs_torch"] = train["memory"]["bytes"] / ref["peak_memory_bytes"]
    log(f"speedup vs torch {result['speedup_vs_torch']:.2f}x; peak memory "
        f"{train['memory']['bytes'] / 2**30:.2f} GiB vs torch's "
        f"{ref['peak_memory_bytes'] / 2**30:.2f} GiB")
  result["environment"]["load_average_end"] = _load_average()
  result["total_s"] = time.perf_counter() - t_start
  return result


def write_json(result: dict[str, Any], path: Optional[str]) -> str:
  text = json.dumps(result, indent=2, sort_keys=False, default=float)
  if path:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(text + "\n")
  return text
