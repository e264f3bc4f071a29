"""Shared pieces of the experiment configs: the argument string and the base config.

Each experiment file has `get_config(arg)`; `arg` is the big_vision-style string after the colon
in `--config=configs/office_home.py:method=mmap_mt,clip=/ckpt/vit_b16,runlocal`.
"""
from __future__ import annotations

from typing import Any

import ml_collections as mlc

import mmap_jax.demo  # noqa: F401  registers 'demo_domains', the base config's dataset


def parse_arg(arg: str | None, **defaults: Any) -> mlc.ConfigDict:
  """"a=1,b,c=x" -> ConfigDict(a=1, b=True, c="x"), typed like `defaults`; unknown keys are errors.

  A bare key is a flag (True). Values of keys whose default is None stay strings.
  """
  out = mlc.ConfigDict(dict(defaults))
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, has_value, value = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config argument {key!r} in {arg!r}; known: {sorted(defaults)}")
    default = defaults[key]
    if not has_value:
      if not isinstance(default, bool):
        raise ValueError(f"config argument {key!r} needs a value ({key}=...)")
      out[key] = True
    elif isinstance(default, bool):
      if value.lower() not in ("true", "false", "1", "0"):
        raise ValueError(f"config argument {key}={value!r} must be true or false")
      out[key] = value.lower() in ("true", "1")
    elif isinstance(default, int):
      out[key] = int(value)
    elif isinstance(default, float):
      out[key] = float(value)
    else:
      out[key] = value
  return out


def base_config(*, method: str = "mmap_mt", runlocal: bool = False) -> mlc.ConfigDict:
  """Every field a run reads, with the MaPLe/MmAP ViT-B/16 setting as defaults.

  224 px CLIP preprocessing, batch 4..8 per task, deep prompts with 2x8 MmAP tokens in the first
  11 layers. The optimiser is each method family's published recipe (`optim.*` = None; see
  mmap_jax/train/recipes.py): MaPLe/MmAP's SGD lr 0.0035 for mmap, AdamW for full fine-tuning.
  """
  c = mlc.ConfigDict()
  c.method = method
  c.seed = 0
  c.runlocal = runlocal

  c.clip = mlc.ConfigDict()
  c.clip.path = mlc.FieldReference(None, field_type=str)   # a converted checkpoint (launch.convert)
  c.clip.dtype = "float32"      # compute dtype of the encoders: float32 | bfloat16
  c.clip.remat = False          # rematerialise encoder blocks in the backward pass

  # See mmap_jax/prompts/spec.py. None = the method family's default for the CLIP at hand,
  # resolved by PromptSpec, never here: a field means the same whichever way `method` is set.
  c.prompt = mlc.ConfigDict()
  c.prompt.length = mlc.FieldReference(None, field_type=int)         # L tokens per layer
  c.prompt.depth = mlc.FieldReference(None, field_type=int)          # J prompted layers
  c.prompt.source_length = mlc.FieldReference(None, field_type=int)  # MmAP L_s (None = L)
  c.prompt.source_dim = mlc.FieldReference(None, field_type=int)     # MmAP d_s (None: 256)
  c.prompt.per_layer_scaling = False
  c.prompt.init_std = 0.02
  c.prompt.vpt_init = "normal"       # MaPLe repo's VPT: N(0, 0.02^2); "xavier_uniform": VPT's own
  # published: each family's published prompt size; equal: CoOp/VPT/MaPLe/IVLP at MmAP-MT's
  # prompt tokens per layer and depth (the `equal_budget` config argument).
  c.prompt.budget = "published"
  c.prompt.indep_text_source_dim = mlc.FieldReference(None, field_type=int)    # mmap_indep_mt
  c.prompt.indep_visual_source_dim = mlc.FieldReference(None, field_type=int)  # (None: d_s / 2)
  c.prompt.zeroshot_template = "a photo of a {}."
  # Words the learned text context starts from (coop, maple, ivlp): None = the family's default
  # ("a photo of a" for maple, as published), "" = random init. See PromptSpec.ctx_init.
  c.prompt.ctx_init = mlc.FieldReference(None, field_type=str)
  c.prompt.adapter_ratio = 0.2       # clipadapter_*: ratio * adapter(f) + (1 - ratio) * f
  c.prompt.adapter_reduction = 4     # clipadapter_*: bottleneck embed_dim / reduction
  c.prompt.adapter_on = "image"      # clipadapter_*: image | text | both
  # lora_*: CLIP-LoRA's defaults (mmap_jax/prompts/spec.py cites them)
  c.prompt.lora_rank = 2             # r
  c.prompt.lora_alpha = 1.0          # alpha
  c.prompt.lora_targets = "q,k,v"    # subset of q,k,v,o ("q+k+v+o" also works)
  c.prompt.lora_dropout = 0.25       # on the LoRA branch's input, training steps only
  c.prompt.lora_scaling = "sqrt_rank"  # alpha / sqrt(r) (CLIP-LoRA) | rank: alpha / r (Hu et al.)
  c.groups = mlc.ConfigDict()
  # gradient: the paper's gradient-driven grouping (warm-up); explicit: groups.explicit;
  # ablations without a warm-up: random (seeded, groups.num_groups balanced groups),
  # all_in_one (one group of all tasks), one_per_task (T singleton groups)
  c.groups.mode = "gradient"
  c.groups.explicit = mlc.FieldReference(None, field_type=str)  # "Art+Product;Clipart+Real World"
  # k groups, "auto" (k in 1..T by the partition objective, mmap_jax/grouping), 0: by threshold
  c.groups.num_groups = mlc.FieldReference(2, field_type=object)
  c.groups.threshold = 0.0
  c.groups.warmup_steps = 100
  c.groups.every = 1
  c.groups.affinity = "cosine"  # cosine of per-task gradients | tag (Fifty et al. 2021 lookahead)
  # cosine: which tower's contribution to the gradient: text | visual | both (each normalised,
  # then concatenated) | summed (the parameter gradient, the towers' contributions added)
  c.groups.towers = "both"
  c.groups.affinity_params = "source"  # cosine over the shared MmAP's source prompts, or "all"
  c.groups.grad_ema = 0.0       # 0: per-step gradients; b in (0,1): cosine of an EMA (decay b)
  c.groups.init_from_warmup = False  # start every group-shared MmAP from the warm-up's MmAP
  c.groups.seed = mlc.FieldReference(None, field_type=int)  # mode=random; None: the run's seed

  c.data = mlc.ConfigDict()
  c.data.name = "demo_domains"
  c.data.root = mlc.FieldReference(None, field_type=str)
  c.data.data_dir = mlc.FieldReference(None, field_type=str)  # TFDS data dir
  c.data.domains = mlc.FieldReference(None, field_type=str)   # comma separated subset
  c.data.split_seed = 0
  c.data.train_fraction = 0.8
  c.data.split_files = mlc.FieldReference(None, field_type=str)
  # Share of each class's train images carved out as the validation split (seeded by
  # split_seed; the same for every method and training seed). 0: none (then train.select='last').
  c.data.val_fraction = 0.1
  # At least this many validation images per class (capped at half of a class), carved before
  # the few-shot draw, so val never depends on `shots` (the few-shot protocol's pool of >= 8).
  c.data.val_per_class = 8
  # Train images per class drawn by split_seed from what the carve leaves (nested: the 4-shot
  # split is part of the 16-shot one); 0 (or "all" in the config argument) = the whole train
  # pool. Real datasets default to all: their step counts were sized for the full splits.
  c.data.shots = 0
  c.data.skip_corrupt = False
  c.data.allow_per_task_classes = False

  c.input = mlc.ConfigDict()
  c.input.batch_size = 8        # per task, global (over all devices and hosts)
  c.input.eval_batch_size = 64
  c.input.random_resized_crop = True
  c.input.crop_scale_min = 0.08
  c.input.flip = True
  c.input.workers = 2

  # The optimisation recipe: None = the method family's published recipe
  # (mmap_jax/train/recipes.py RECIPES); a value set here or by --config.optim.X overrides that
  # field only. The resolved recipe and the overridden fields go into results.json.
  c.optim = mlc.ConfigDict()
  c.optim.name = mlc.FieldReference(None, field_type=str)            # sgd | adamw
  c.optim.lr = mlc.FieldReference(None, field_type=float)            # peak learning rate
  c.optim.weight_decay = mlc.FieldReference(None, field_type=float)
  c.optim.momentum = mlc.FieldReference(None, field_type=float)      # SGD
  c.optim.b1 = mlc.FieldReference(None, field_type=float)            # AdamW betas, eps
  c.optim.b2 = mlc.FieldReference(None, field_type=float)
  c.optim.eps = mlc.FieldReference(None, field_type=float)
  c.optim.decay_mask = mlc.FieldReference(None, field_type=str)      # all | no_norm_bias_embed
  c.optim.warmup_steps = mlc.FieldReference(None, field_type=int)
  c.optim.warmup_type = mlc.FieldReference(None, field_type=str)     # linear | constant
  c.optim.warmup_lr = mlc.FieldReference(None, field_type=float)     # lr of a constant warm-up
  c.optim.min_lr = mlc.FieldReference(None, field_type=float)        # the cosine's end value
  c.optim.grad_clip = mlc.FieldReference(None, field_type=float)     # 0 disables clipping
  c.optim.accum_steps = 1
  # Per-family optim values of this config (family -> {field: value}), e.g. learning rates tuned
  # on a dataset's validation split; between the published recipe and c.optim (recipes.py).
  c.optim_per_family = mlc.ConfigDict()

  c.train = mlc.ConfigDict()
  c.train.steps = 2000
  c.train.log_every = 20
  c.train.eval_every = 500      # validation only; the test split is evaluated once, at the end
  c.train.select = "best_val"   # reported state: best_val (highest mean val accuracy) | last
  c.train.ckpt_every = 200
  c.train.keep_checkpoints = 3
  # Optimizer steps per jitted call (a lax.scan; same result as 1): one execution's host
  # temporaries serve K steps and the host dispatches once per K. Calls end at every
  # log/eval/checkpoint step, so those stay exact; each distinct call length compiles once.
  c.train.steps_per_call = 1

  # The text tower over the ("data",) mesh (mmap_jax/parallel.py TextSharding): shard_text splits
  # the class prompts over the devices (false: every device encodes all; same result);
  # text_chunk > 0 encodes each device's classes that many at a time under remat (large label
  # sets: bounded text activations), 0 all at once.
  c.parallel = mlc.ConfigDict()
  c.parallel.shard_text = True
  c.parallel.text_chunk = 0
  return c


def dataset_config(dataset: str, arg: str | None, *, clip_default: str | None = None,
                   root_default: str | None = None, **extra_args: Any) -> tuple[mlc.ConfigDict, mlc.ConfigDict]:
  """The base config for a dataset plus the parsed argument string (shared by the dataset files).

  Dataset files adjust the config and end with `return finish(c, a)`.

  Arguments every dataset config accepts: method=..., clip=<converted dir>, root=<manual dir>,
  data_dir=<TFDS dir>, domains=a|b (a '|'-separated subset), split_files=<dir of split lists>,
  shots=4|16|64|all (train images per class; data.shots), runlocal, equal_budget
  (prompt.budget='equal': CoOp, VPT, MaPLe and IVLP at MmAP-MT's prompt length and depth; the
  default keeps each family's published sizes).
  """
  a = parse_arg(arg, method="mmap_mt", clip=clip_default, root=root_default, data_dir=None,
                domains=None, split_files=None, shots=None, runlocal=False, equal_budget=False,
                **extra_args)
  c = base_config(method=a.method, runlocal=a.runlocal)
  c.prompt.budget = "equal" if a.equal_budget else "published"
  c.clip.path = a.clip
  c.data.name = dataset
  c.data.root = a.root
  c.data.data_dir = a.data_dir
  c.data.domains = a.domains.replace("|", ",") if a.domains else None
  c.data.split_files = a.split_files
  if a.shots is not None:
    c.data.shots = parse_shots(a.shots)
  return c, a


def parse_shots(value: str) -> int:
  """'all' -> 0, '16' -> 16 (the `shots=` config argument); bad values name the field."""
  if str(value).strip().lower() == "all":
    return 0
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"data.shots: shots={value!r} must be 'all' or an integer k >= 0 "
                     "(images per class, e.g. 4, 16, 64)") from None


def finish(c: mlc.ConfigDict, a: mlc.ConfigDict) -> mlc.ConfigDict:
  """Last step of every get_config: `runlocal` shrinks whatever the dataset file set."""
  if a.runlocal:
    shrink_for_runlocal(c)
  return c


def shrink_for_runlocal(c: mlc.ConfigDict) -> None:
  """A few steps with small batches: a smoke run that exercises every stage on a laptop."""
  c.input.batch_size = 8
  c.input.eval_batch_size = 32
  c.input.workers = 0
  c.train.steps = 6
  c.train.log_every = 2
  c.train.eval_every = 3        # two validations, so the selection has a choice
  c.train.ckpt_every = 3
  c.optim.warmup_steps = 1
  c.groups.warmup_steps = 3
