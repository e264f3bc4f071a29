r"""The performance benchmark's workload (mmap_jax/apps/benchmark.py, launch/benchmark.py).

    python -m launch.benchmark --config=configs/benchmark.py --out=/tmp/bench.json
    python -m launch.benchmark --config=configs/benchmark.py --vs_torch      # + the PyTorch step
    python -m launch.benchmark --config=configs/benchmark.py:tiny            # seconds (tests)
    XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m launch.benchmark \
        --config=configs/benchmark.py:compile_only,num_classes=345,num_tasks=6   # per-device costs
    bash benchmarks/accelerator.sh                                           # GPU/TPU sweep

The default is THE fixed workload, so numbers compare across versions: CLIP ViT-B/16 with random
weights, MmAP-MT (2 groups + 4 tasks, MmAP's L=8 per unit -> 16 prompt tokens per layer, depth 11,
d_s=256), 4 tasks x 8 images of 224 px per step, Office-Home's 65 classes per task, text features
recomputed every step for every task's classes, float32, the trainer's optimiser recipe.

Arguments (after the colon, comma separated): tiny, model=, num_tasks=, num_groups=,
batch_size=, num_classes=, dtype=float32|bfloat16, remat, share_prefix=, truncate=,
shard_text=, text_chunk=, accum_steps=, steps_per_call=, runs=, warmup=, grouping (also compile
the grouping step), compile_only (costs only, no timed runs), vs_torch, torch_runs=,
torch_warmup=; accelerator (the sweep of benchmarks/accelerator.sh), sweep_dtypes=a|b,
sweep_remat=false|true, batch_start=, max_batch=. Anything else: --config.<field>=... flags.
"""
from __future__ import annotations

import ml_collections as mlc

from configs.common import parse_arg

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


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  a = parse_arg(arg, tiny=False, model="ViT-B/16", num_tasks=4, num_groups=2, batch_size=8,
                num_classes=65, dtype="float32", remat=False, share_prefix=True, truncate=True,
                shard_text=True, text_chunk=0, accum_steps=1, steps_per_call=1, runs=5,
                warmup=1, grouping=False, compile_only=False, vs_torch=False, torch_runs=3,
                torch_warmup=1, accelerator=False, sweep_dtypes="bfloat16|float32",
                sweep_remat="false|true", batch_start=0, max_batch=1024)
  c = mlc.ConfigDict()
  c.model = a.model                   # a key of mmap_jax.models.config.VARIANTS
  c.method = "mmap_mt"
  c.num_tasks = a.num_tasks
  c.num_groups = a.num_groups
  c.batch_size = a.batch_size         # images per task per step (all devices together)
  c.num_classes = a.num_classes       # per task (Office-Home's names, cycled beyond 65)
  c.class_names = OFFICE_HOME_CLASSES
  c.prompt = mlc.ConfigDict()         # PromptSpec fields; None = MmAP's published defaults
  c.prompt.length = mlc.FieldReference(None, field_type=int)
  c.prompt.depth = mlc.FieldReference(None, field_type=int)
  c.prompt.source_length = mlc.FieldReference(None, field_type=int)
  c.prompt.source_dim = 256
  c.dtype = a.dtype                   # compute dtype: float32 (CPU) | bfloat16 (accelerators)
  c.remat = a.remat                   # rematerialise encoder blocks (accelerator memory)
  c.share_prefix = a.share_prefix     # text: shared start+prompt prefix (exact)
  c.truncate = a.truncate             # text: drop columns after the last EOT (exact)
  c.shard_text = a.shard_text         # the trainer's parallel.shard_text
  c.text_chunk = a.text_chunk         # the trainer's parallel.text_chunk
  c.accum_steps = a.accum_steps       # the trainer's optim.accum_steps
  c.steps_per_call = a.steps_per_call # the trainer's train.steps_per_call (per-step = call / K)
  c.vocab = "auto"                    # the packaged CLIP BPE, or a bpe_simple_vocab_16e6 path
  c.seed = 0
  c.runs = a.runs                     # timed steps (K > 1: max(2, ceil(runs / K)) calls)
  c.warmup = a.warmup                 # untimed calls first
  c.grouping = a.grouping             # also compile the grouping step (costs in the JSON)
  c.compile_only = a.compile_only     # XLA's per-device FLOPs and temp bytes; no timed runs
  c.xla_opt_level = -1                # >= 0: XLA backend optimisation level (tests: 0)

  c.vs_torch = a.vs_torch             # also run benchmarks/torch_reference.py (subprocess)
  c.torch_runs = a.torch_runs
  c.torch_warmup = a.torch_warmup
  c.torch_threads = 0                 # 0: torch's default (the physical cores)

  c.accelerator = a.accelerator       # the GPU/TPU sweep (mmap_jax/apps/accelerator.py):
  c.sweep_dtypes = a.sweep_dtypes.replace("|", ",")   # these compute dtypes x
  c.sweep_remat = a.sweep_remat.replace("|", ",")     # these remat settings x per-task batches
  c.batch_start = a.batch_start or a.batch_size       # doubling from here until out of memory
  c.max_batch = a.max_batch                           # or past this

  if a.tiny:                          # the test suite's smoke workload: seconds, same code paths
    c.model = "tiny" if a.model == "ViT-B/16" else a.model
    c.num_tasks = min(a.num_tasks, 3)
    c.num_classes = min(a.num_classes, 5)
    c.prompt.length = 4
    c.prompt.source_length = 2
    c.prompt.depth = 2
    c.prompt.source_dim = 16
    c.runs = min(a.runs, 2)
    c.warmup = min(a.warmup, 1)
    c.torch_runs = min(a.torch_runs, 1)
    c.torch_warmup = 0
    c.xla_opt_level = 0
  return c
