"""Validation of a config (`validate`, which `run_spec.resolve` calls) and the loading a resolved
run needs: CLIP, tasks, class tokens, explicit groups, the workdir.

Everything here runs before anything compiles, so a bad config fails in seconds, naming the field.
"""
from __future__ import annotations

import dataclasses
import os
import pathlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
from etils import epath

from mmap_jax import heads, parallel, paths, resources
from mmap_jax.checkpoints import store
from mmap_jax.data import sources
from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts import ctx_init
from mmap_jax.prompts.spec import GROUPED_METHODS, METHODS, PromptSpec
from mmap_jax.tokenizer import ClipTokenizer
from mmap_jax.train.selection import RULES as SELECT_RULES
from mmap_jax.train import recipes

DATASETS = ("demo_domains", "office_home", "mini_domainnet", "domainnet", "image_folder")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GROUP_MODES = ("gradient", "random", "all_in_one", "one_per_task", "explicit")
AFFINITY_PARAMS = ("source", "all")  # which warm-up gradients the task affinity compares
AFFINITIES = ("cosine", "tag")       # groups.affinity: gradient cosine | TAG lookahead
TOWERS = ("both", "text", "visual", "summed")  # groups.towers (cosine)
DEMO_CLIP = "demo"   # clip.path value: the demo's own pretrained CLIP (mmap_jax/assets/demo_clip)


class ConfigError(ValueError):
  """A config field has a value the run cannot use; the message names the field."""


def validate(config: mlc.ConfigDict, num_devices: Optional[int] = None
             ) -> tuple[recipes.Resolved, Optional[recipes.Resolved], PromptSpec]:
  """Reject bad values before anything is loaded or compiled; name every bad field.

  With `num_devices`, also check that each micro-batch splits evenly over the devices. Returns
  what validating resolved (the run's recipe, the grouping warm-up's recipe when the run has a
  gradient grouping, the prompt spec before the CLIP fills its defaults) for `run_spec.resolve`.
  """
  errors = []
  resolved = warmup = spec = None

  def need(cond: bool, msg: str):
    if not cond:
      errors.append(msg)

  need(config.method in METHODS, f"method={config.method!r}; allowed: {', '.join(METHODS)}")
  need(config.seed >= 0, f"seed={config.seed} must be >= 0 (numpy seeds the data order with it)")
  need(config.data.name in DATASETS, f"data.name={config.data.name!r}; allowed: {DATASETS}")
  need(config.clip.dtype in DTYPES, f"clip.dtype={config.clip.dtype!r}; allowed: {tuple(DTYPES)}")
  need(config.clip.path is not None,
       "clip.path is required: a directory written by launch.convert, or 'demo'")
  need(0.0 < config.data.train_fraction < 1.0,
       f"data.train_fraction={config.data.train_fraction} must be in (0, 1)")
  need(0.0 <= config.data.val_fraction < 1.0,
       f"data.val_fraction={config.data.val_fraction} must be in [0, 1) (0: no validation split)")
  shots = config.data.get("shots", 0)
  need(not isinstance(shots, bool) and isinstance(shots, int) and shots >= 0,
       f"data.shots={shots!r} must be an integer >= 0 (train images per class; 0 = all)")
  vmin = config.data.get("val_per_class", 0)
  need(not isinstance(vmin, bool) and isinstance(vmin, int) and vmin >= 0,
       f"data.val_per_class={vmin!r} must be an integer >= 0")
  need(isinstance(config.data.split_seed, int) and not isinstance(config.data.split_seed, bool)
       and config.data.split_seed >= 0,
       f"data.split_seed={config.data.split_seed!r} must be an integer >= 0")
  if config.data.name == "demo_domains":
    need(config.data.get("demo_world", 1) in (1, 2),
         f"data.demo_world={config.data.get('demo_world')!r}; allowed: 1 (10 classes), 2 "
         "(24 classes, the paper's regime)")
  need(config.train.select in SELECT_RULES,
       f"train.select={config.train.select!r}; allowed: {SELECT_RULES}")
  need(not (config.train.select == "best_val" and config.data.val_fraction == 0
            and not config.data.split_files and config.method != "zeroshot"),
       "train.select='best_val' needs a validation split, but data.val_fraction=0 carves none "
       "(and no data.split_files val lists are given): set data.val_fraction > 0 or "
       "train.select='last'")
  need(config.input.batch_size >= 1, f"input.batch_size={config.input.batch_size} must be >= 1")
  need(config.input.eval_batch_size >= 1,
       f"input.eval_batch_size={config.input.eval_batch_size} must be >= 1")
  need(0.0 < config.input.crop_scale_min <= 1.0,
       f"input.crop_scale_min={config.input.crop_scale_min} must be in (0, 1]")
  need(config.input.workers >= 0, f"input.workers={config.input.workers} must be >= 0")
  if config.method in METHODS:
    try:
      resolved = recipes.resolve_config(config)
    except ValueError as e:
      errors.append(str(e))
  need(config.optim.accum_steps >= 1, f"optim.accum_steps={config.optim.accum_steps} must be >= 1")
  need(config.input.batch_size % max(config.optim.accum_steps, 1) == 0,
       f"input.batch_size={config.input.batch_size} must be a multiple of "
       f"optim.accum_steps={config.optim.accum_steps}")
  if num_devices and config.optim.accum_steps >= 1:
    micro = config.input.batch_size // config.optim.accum_steps
    need(micro % num_devices == 0,
         f"input.batch_size={config.input.batch_size} (/ optim.accum_steps="
         f"{config.optim.accum_steps}) must be a multiple of the {num_devices} devices, so every "
         "device gets the same share of each task's batch")
    need(config.input.eval_batch_size % num_devices == 0,
         f"input.eval_batch_size={config.input.eval_batch_size} must be a multiple of the "
         f"{num_devices} devices (all processes together), so each test batch splits evenly")
  need(config.train.steps >= 0, f"train.steps={config.train.steps} must be >= 0")
  for f in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
    need(config.train[f] >= 1, f"train.{f}={config.train[f]} must be >= 1")
  spc = config.train.get("steps_per_call", 1)
  need(isinstance(spc, int) and not isinstance(spc, bool) and spc >= 1,
       f"train.steps_per_call={spc!r} must be an integer >= 1")
  if config.groups.mode == "auto":
    errors.append("groups.mode='auto' was renamed: use groups.mode='gradient' (the gradient-driven "
                  "grouping); the ablations are 'random', 'all_in_one', 'one_per_task'")
  else:
    need(config.groups.mode in GROUP_MODES,
         f"groups.mode={config.groups.mode!r}; allowed: {GROUP_MODES}")
  need(config.groups.affinity_params in AFFINITY_PARAMS,
       f"groups.affinity_params={config.groups.affinity_params!r}; allowed: {AFFINITY_PARAMS}")
  need(config.groups.get("affinity", "cosine") in AFFINITIES,
       f"groups.affinity={config.groups.get('affinity')!r}; allowed: {AFFINITIES}")
  need(config.groups.get("towers", "both") in TOWERS,
       f"groups.towers={config.groups.get('towers')!r}; allowed: {TOWERS}")
  k = config.groups.num_groups
  need(k == "auto" or (isinstance(k, int) and not isinstance(k, bool) and k >= 0),
       f"groups.num_groups={k!r} must be an int >= 0 (0: use groups.threshold) or 'auto' (k "
       "chosen by the partition objective)")
  need(not (config.groups.get("affinity") == "tag" and config.groups.grad_ema),
       f"groups.grad_ema={config.groups.grad_ema!r} applies to the cosine affinity only; "
       "groups.affinity='tag' needs groups.grad_ema=0")
  ema = config.groups.grad_ema
  need(not isinstance(ema, bool) and isinstance(ema, (int, float)) and (ema == 0 or 0 < ema < 1),
       f"groups.grad_ema={ema!r} must be 0 (off) or a decay in (0, 1)")
  need(isinstance(config.groups.init_from_warmup, bool),
       f"groups.init_from_warmup={config.groups.init_from_warmup!r} must be true or false")
  if config.method in GROUPED_METHODS:
    mode = config.groups.mode
    if mode == "explicit":
      need(bool(config.groups.explicit),
           "groups.explicit is required with groups.mode='explicit' (e.g. 'Art+Product;Clipart')")
    elif mode == "gradient":
      need(config.groups.warmup_steps >= 1,
           f"groups.warmup_steps={config.groups.warmup_steps} must be >= 1 for gradient grouping")
      need(config.groups.every >= 1, f"groups.every={config.groups.every} must be >= 1")
    elif mode == "random":
      need(isinstance(config.groups.num_groups, int) and config.groups.num_groups >= 1,
           f"groups.num_groups={config.groups.num_groups} must be >= 1 with groups.mode='random' "
           "(the ablation keeps the number of groups; there is no affinity to threshold)")
    need(not config.groups.init_from_warmup or mode == "gradient",
         f"groups.init_from_warmup=True needs groups.mode='gradient' (only it runs the warm-up "
         f"whose shared MmAP it copies), got groups.mode={mode!r}")
    need(not config.groups.init_from_warmup or config.method == "mmap_mt",
         f"groups.init_from_warmup=True copies the warm-up's coupled MmAP into the group units; "
         f"{config.method}'s units have independent sources (set it False)")
    if mode == "gradient":   # the warm-up trains one shared MmAP with its own recipe
      shared = mlc.ConfigDict(config.to_dict())
      shared.method = "mmap_shared"
      try:
        warmup = recipes.resolve_config(shared)
      except ValueError as e:
        errors.append(f"grouping warm-up (mmap_shared): {e}")
    if config.groups.init_from_warmup and warmup is not None:
      total = int(warmup.recipe.warmup_steps) + int(config.groups.warmup_steps)
      need(total < config.train.steps,
           f"groups.init_from_warmup=True counts the grouping warm-up's {total} steps against "
           f"train.steps={config.train.steps}: raise train.steps or shorten groups.warmup_steps")
  shard_text, text_chunk = parallel_fields(config)
  need(isinstance(shard_text, bool), f"parallel.shard_text={shard_text!r} must be true or false")
  need(isinstance(text_chunk, int) and not isinstance(text_chunk, bool) and text_chunk >= 0,
       f"parallel.text_chunk={text_chunk!r} must be an integer >= 0 (0: no chunking)")
  if config.method in METHODS:   # else the method error above says it (and its allowed values)
    try:
      spec = PromptSpec.from_config(config.prompt, config.method)
      spec.validate_fields()
    except (ValueError, TypeError) as e:
      errors.append(str(e))
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))
  return resolved, warmup, spec


def parallel_fields(config: mlc.ConfigDict) -> tuple[Any, Any]:
  """(parallel.shard_text, parallel.text_chunk); configs written before them get the defaults."""
  p = config.get("parallel") or {}
  return p.get("shard_text", True), p.get("text_chunk", 0)


@dataclasses.dataclass(frozen=True)
class Clip:
  cfg: ClipConfig
  params: Any            # host numpy / jax arrays, float32
  tokenizer: ClipTokenizer
  path: str


def load_clip(path: str) -> Clip:
  """The frozen CLIP at `path` (clip.path: the project's format), or the demo's own ("demo")."""
  if path == DEMO_CLIP:
    path = resources.demo_clip_dir(check=True)
  cfg, params, tok = store.load(path)
  return Clip(cfg=cfg, params=params, tokenizer=tok, path=str(path))


def recipe(config: mlc.ConfigDict) -> recipes.Resolved:
  """The optimisation recipe of a config: the family's published one, explicit fields
  overriding (for tools that need only the recipe; a run resolves it in `run_spec.resolve`)."""
  try:
    return recipes.resolve_config(config)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def ctx_init_ids(clip: Clip, spec: PromptSpec) -> None:
  """Fail before compiling when `prompt.ctx_init` does not fit the CLIP's tokenizer."""
  try:
    ctx_init.token_ids(spec, clip.tokenizer)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def build_tasks(data) -> list[sources.TaskData]:
  """Opens the tasks, preparing missing TFDS data first; multi-process: process 0 builds first.

  Concurrent TFDS builds into one shared data_dir race; after process 0's build the others find
  the data prepared (a host with its own local data_dir builds its copy then).
  """
  if jax.process_index() == 0:
    tasks = sources.build_tasks(data.name, **data.build_kwargs())
  parallel.sync("mmap_jax:build_tasks")
  return tasks if jax.process_index() == 0 else sources.build_tasks(data.name,
                                                                     **data.build_kwargs())


def check_validation(select: str, val_fraction: float,
                     tasks: Sequence[sources.TaskData]) -> None:
  """train.select='best_val' needs validation examples in every task (checked before compiling)."""
  if select != "best_val":
    return
  empty = [t.info.name for t in tasks if len(t.val) == 0]
  if empty:
    raise ConfigError(
        f"train.select='best_val' but task(s) {empty} have no validation examples "
        f"(data.val_fraction={val_fraction}; classes need >= 2 train images to "
        "give one); use train.select='last' or more data")


def class_tokens(clip: Clip, spec: PromptSpec,
                 tasks: Sequence[sources.TaskData]) -> heads.ClassTokens:
  return heads.build_class_tokens(
      clip.tokenizer, [t.info.class_names for t in tasks], spec.text_prompt_tokens,
      spec.zeroshot_template, clip.cfg.text.context_length, ctx_init=spec.learned_ctx_init)


def explicit_groups(spec_str: str, task_names: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """"Art+Product;Clipart+Real World" -> ((0, 2), (1, 3)); every task exactly once."""
  from mmap_jax import grouping
  groups = [[n.strip() for n in g.split("+") if n.strip()] for g in spec_str.split(";")
            if g.strip()]
  try:
    return grouping.resolve_explicit_groups(groups, task_names)
  except ValueError as e:
    raise ConfigError(f"groups.explicit={spec_str!r}: {e}") from e


def check_workdir(workdir: paths.PathLike) -> None:
  """A local workdir must be a directory this process can write, or creatable (gs:// and other
  object stores are checked by their first write). Raises ConfigError naming the path."""
  if paths.is_uri(workdir):
    return
  path = pathlib.Path(os.fspath(workdir)).expanduser().absolute()
  if path.exists() and not path.is_dir():
    raise ConfigError(f"workdir {path} is a file, not a directory: choose another --workdir")
  existing = next(p for p in (path, *path.parents) if p.exists())
  if not existing.is_dir():
    raise ConfigError(f"workdir {path}: {existing} is a file, not a directory: choose another "
                      "--workdir")
  if not os.access(existing, os.W_OK | os.X_OK):
    what = "is not writable" if existing == path else f"cannot be created ({existing} is not writable)"
    raise ConfigError(f"workdir {path} {what}: choose another --workdir or fix its permissions")


def load_inputs(spec) -> tuple[Clip, list[sources.TaskData]]:
  """The frozen CLIP of a `run_spec.RunSpec` (its tokenizer checked against prompt.ctx_init)
  and its tasks. When both are wrong (e.g. a CLIP not converted yet and a
  data.root that does not exist), one ConfigError reports both, so a fix is not followed by the
  next error on the next try; one problem alone raises its own error."""
  problems: list[tuple[str, BaseException]] = []
  clip = tasks = None
  try:
    clip = load_clip(spec.clip_path)
  except (OSError, ValueError) as e:
    problems.append(("clip.path", e))
  else:
    try:   # prompt.ctx_init must fit this CLIP's tokenizer
      ctx_init_ids(clip, spec.prompt_for(clip.cfg))
    except ConfigError as e:
      problems.append(("prompt", e))
  try:
    tasks = build_tasks(spec.data)
  except (OSError, ValueError) as e:
    problems.append(("data", e))
  if len(problems) == 1:
    raise problems[0][1]
  if problems:
    raise ConfigError("cannot start:\n  " + "\n  ".join(
        f"{field}: {str(e).replace(chr(10), chr(10) + '    ')}" for field, e in problems))
  return clip, tasks


def workdir_paths(workdir: paths.PathLike) -> dict[str, epath.Path]:
  """A workdir's sub-directories as epath.Paths (gs:// URIs kept, local paths absolute)."""
  root = paths.as_path(workdir)
  return {"checkpoints": root / "checkpoints", "tensorboard": root / "tensorboard",
          "grouping": root / "grouping"}
