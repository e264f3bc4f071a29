r"""The performance benchmark's workload (see mmap_jax/apps/benchmark.py and launch/benchmark.py).

    python -m launch.benchmark --config=configs/benchmark.py --out=/tmp/bench.json
    python -m launch.benchmark --config=configs/benchmark.py --vs_torch      # + the PyTorch step
    python -m launch.benchmark --config=configs/benchmark.py:tiny            # seconds (tests)
    python -m launch.benchmark --config=configs/benchmark.py:runs=3,parts=grouping_step

The default is THE fixed workload, so numbers compare across versions: CLIP ViT-B/16 with random
weights, MmAP-MT (2 groups + 4 tasks, MmAP's L=8 per unit -> 16 prompt tokens per layer, depth 11,
d_s=256), 4 tasks x 8 images of 224 px per step, Office-Home's 65 classes per task, text features
recomputed every step for every task's classes, float32.

Arguments (after the colon, comma separated): tiny (a seconds-long smoke workload), model=,
num_tasks=, num_groups=, batch_size=, num_classes=, dtype=float32|bfloat16, remat, runs=,
warmup=, part_runs=, parts=all|none|a|b (a subset of grouping_step|text_encoder|image_encoder|eval
separated by '|'; none: the train step only), vocab=auto|none|<bpe.txt.gz>, share_prefix=, truncate=, vs_torch,
torch_runs=, torch_warmup=, steps_per_call= (K train steps per jitted call: max(2, ceil(runs/K))
timed calls), single= (with K > 1 also time K = 1; default true), peak_sizes=1024|2048|3072,
peak_runs=, peak_warmup_s=; accelerator (the GPU/TPU sweep of benchmarks/accelerator.sh),
sweep_dtypes=bfloat16|float32, sweep_remat=false|true, batch_start=, max_batch=. Anything else: --config.<field>=... on the command line.
"""
from __future__ import annotations

import ml_collections as mlc

from configs.common import parse_arg

ALL_PARTS = "grouping_step,text_encoder,image_encoder,eval"


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  a = parse_arg(arg, tiny=False, model="ViT-B/16", num_tasks=4, num_groups=2, batch_size=8,
                num_classes=65, dtype="float32", remat=False, runs=5, warmup=1, part_runs=2,
                parts="all", vocab="auto", share_prefix=True,
                truncate=True, vs_torch=False, torch_runs=3, torch_warmup=1, steps_per_call=1,
                single=True, peak_sizes="1024|2048|3072", peak_runs=7, peak_warmup_s=2.0,
                accelerator=False, sweep_dtypes="bfloat16|float32", sweep_remat="false|true",
                batch_start=0, max_batch=1024)
  c = mlc.ConfigDict()
  c.model = a.model                   # a key of mmap_jax.models.config.VARIANTS
  c.method = "mmap_mt"
  c.num_tasks = a.num_tasks
  c.num_groups = a.num_groups
  c.batch_size = a.batch_size         # images per task per step
  c.num_classes = a.num_classes       # per task (Office-Home's names, cycled beyond 65)
  c.prompt = mlc.ConfigDict()         # PromptSpec fields; None = MmAP's published defaults
  c.prompt.length = mlc.FieldReference(None, field_type=int)
  c.prompt.depth = mlc.FieldReference(None, field_type=int)
  c.prompt.source_length = mlc.FieldReference(None, field_type=int)
  c.prompt.source_dim = 256
  c.dtype = a.dtype                   # compute dtype: float32 (CPU) | bfloat16 (accelerators)
  c.remat = a.remat                   # rematerialise encoder blocks (accelerator memory)
  c.share_prefix = a.share_prefix     # text: shared start+prompt prefix (exact; ablation knob)
  c.truncate = a.truncate             # text: drop columns after the last EOT (exact; ablation)
  c.vocab = a.vocab                   # auto: ../shared BPE if present, else synthetic token ids
  c.seed = 0

  c.runs = a.runs                     # measured train steps (after `warmup` unmeasured calls;
                                      # steps_per_call=K: max(2, ceil(runs / K)) calls)
  c.warmup = a.warmup
  c.steps_per_call = a.steps_per_call # K steps per jitted call (train.steps_per_call): the
                                      # per-step figures are per call / K
  c.single = a.single                 # with K > 1, also time K = 1 in the same invocation
  c.parts = {"all": ALL_PARTS, "none": ""}.get(a.parts, a.parts.replace("|", ","))
  c.part_runs = a.part_runs           # measured calls per part
  c.part_warmup = 1
  c.grouping_runs = a.part_runs
  c.eval_batch_size = 32              # images per evaluator call
  c.xla_opt_level = -1                # >= 0: XLA backend optimisation level (tests use 0); -1: XLA's
  c.peak_sizes = a.peak_sizes.replace("|", ",")  # matmul-peak probe: n^3 float32 dots of these
  c.peak_runs = a.peak_runs           # sizes x both XLA:CPU dots, interleaved rounds (best, median)
  c.peak_warmup_s = a.peak_warmup_s   # round-robin warm-up of all variants before timing

  c.accelerator = a.accelerator       # the GPU/TPU sweep (mmap_jax/apps/accelerator.py) instead:
  c.sweep_dtypes = a.sweep_dtypes.replace("|", ",")   # these compute dtypes x
  c.sweep_remat = a.sweep_remat.replace("|", ",")     # these remat settings x per-task batches
  c.batch_start = a.batch_start or a.batch_size       # doubling from here until out of memory
  c.max_batch = a.max_batch                           # or past this
  if a.accelerator and a.peak_sizes == "1024|2048|3072":
    c.peak_sizes = "2048,4096,8192"   # accelerators reach their peak only on large products

  c.vs_torch = a.vs_torch             # also run benchmarks/torch_reference.py (subprocess)
  c.torch_runs = a.torch_runs
  c.torch_warmup = a.torch_warmup
  c.torch_threads = 0                 # 0: torch's default (the physical cores)
  c.torch_attn = "sdpa"               # transformers' attention implementation: sdpa | eager

  if a.tiny:                          # the test suite's smoke workload: seconds, same code paths
    c.model = "tiny" if a.model == "ViT-B/16" else a.model
    c.num_tasks = min(a.num_tasks, 3)
    c.batch_size = min(a.batch_size, 2)
    c.num_classes = min(a.num_classes, 5)
    c.prompt.length = 4
    c.prompt.source_length = 2
    c.prompt.depth = 2
    c.prompt.source_dim = 16
    c.runs = min(a.runs, 2)
    c.warmup = min(a.warmup, 1)
    c.part_runs = 1
    c.grouping_runs = 1
    c.part_warmup = 0
    c.eval_batch_size = 4
    c.peak_sizes = "128,256"
    c.batch_start = a.batch_start or c.batch_size
    c.peak_runs = 3
    c.peak_warmup_s = 0.05
    c.torch_runs = min(a.torch_runs, 1)
    c.torch_warmup = 0
  return c
