"""From a config to the pieces a run needs: validated fields, CLIP, tasks, class tokens, groups.

Everything here runs before anything compiles, so a bad config fails in seconds, naming the field.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np

from mmap_jax import heads
from mmap_jax.checkpoints import store
from mmap_jax.data import preprocess, sources
from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts.spec import METHODS, PromptSpec
from mmap_jax.tokenizer import ClipTokenizer
from mmap_jax.train.optim import OPTIMIZERS

DATASETS = ("demo_domains", "office_home", "mini_domainnet", "domainnet", "image_folder")
DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}
GROUP_MODES = ("auto", "explicit")
DEMO_CLIP = "demo"   # clip.path value: the demo's own pretrained CLIP (assets/demo_clip)


class ConfigError(ValueError):
  """A config field has a value the run cannot use; the message names the field."""


def validate(config: mlc.ConfigDict, num_devices: Optional[int] = None) -> None:
  """Reject bad values before anything is loaded or compiled; name every bad field.

  With `num_devices`, also check that each micro-batch splits evenly over the devices.
  """
  errors = []

  def need(cond: bool, msg: str):
    if not cond:
      errors.append(msg)

  need(config.method in METHODS, f"method={config.method!r}; allowed: {', '.join(METHODS)}")
  need(config.data.name in DATASETS, f"data.name={config.data.name!r}; allowed: {DATASETS}")
  need(config.clip.dtype in DTYPES, f"clip.dtype={config.clip.dtype!r}; allowed: {tuple(DTYPES)}")
  need(config.clip.path is not None,
       "clip.path is required: a directory written by launch.convert, or 'demo'")
  need(0.0 < config.data.train_fraction < 1.0,
       f"data.train_fraction={config.data.train_fraction} must be in (0, 1)")
  need(config.input.batch_size >= 1, f"input.batch_size={config.input.batch_size} must be >= 1")
  need(config.input.eval_batch_size >= 1,
       f"input.eval_batch_size={config.input.eval_batch_size} must be >= 1")
  need(0.0 < config.input.crop_scale_min <= 1.0,
       f"input.crop_scale_min={config.input.crop_scale_min} must be in (0, 1]")
  need(config.input.workers >= 0, f"input.workers={config.input.workers} must be >= 0")
  need(config.optim.name in OPTIMIZERS, f"optim.name={config.optim.name!r}; allowed: {OPTIMIZERS}")
  need(config.optim.lr > 0, f"optim.lr={config.optim.lr} must be > 0")
  need(config.optim.warmup_steps >= 0, f"optim.warmup_steps={config.optim.warmup_steps} must be >= 0")
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
  need(config.train.steps >= 0, f"train.steps={config.train.steps} must be >= 0")
  for f in ("log_every", "eval_every", "ckpt_every", "keep_checkpoints"):
    need(config.train[f] >= 1, f"train.{f}={config.train[f]} must be >= 1")
  need(config.groups.mode in GROUP_MODES, f"groups.mode={config.groups.mode!r}; allowed: {GROUP_MODES}")
  if config.method == "mmap_mt":
    if config.groups.mode == "explicit":
      need(bool(config.groups.explicit),
           "groups.explicit is required with groups.mode='explicit' (e.g. 'Art+Product;Clipart')")
    else:
      need(config.groups.warmup_steps >= 1,
           f"groups.warmup_steps={config.groups.warmup_steps} must be >= 1 for automatic grouping")
      need(config.groups.every >= 1, f"groups.every={config.groups.every} must be >= 1")
      need(config.groups.num_groups >= 0,
           f"groups.num_groups={config.groups.num_groups} must be >= 0 (0: use groups.threshold)")
  try:
    PromptSpec.from_config(config.prompt, config.method).validate_fields()
  except (ValueError, TypeError) as e:
    errors.append(str(e))
  if errors:
    raise ConfigError("invalid config:\n  " + "\n  ".join(errors))


@dataclasses.dataclass(frozen=True)
class Clip:
  cfg: ClipConfig
  params: Any            # host numpy / jax arrays, float32
  tokenizer: ClipTokenizer
  path: str


def load_clip(config: mlc.ConfigDict) -> Clip:
  """The frozen CLIP named by `clip.path` (the project's format), or the demo's own."""
  path = config.clip.path
  if path == DEMO_CLIP:
    from mmap_jax import pretrain  # Deferred: only the demo needs the pretraining code.
    path = pretrain.ensure_demo_clip(None, vocab_path=config.clip.get("vocab"))
  cfg, params, tok = store.load(path)
  return Clip(cfg=cfg, params=params, tokenizer=tok, path=str(path))


def prompt_spec(config: mlc.ConfigDict, clip_cfg: ClipConfig) -> PromptSpec:
  try:
    return PromptSpec.from_config(config.prompt, config.method).validate(clip_cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def _csv(value: Optional[str]) -> Optional[list[str]]:
  if value is None or value == "":
    return None
  return [v.strip() for v in str(value).split(",") if v.strip()]


def build_tasks(config: mlc.ConfigDict) -> list[sources.TaskData]:
  d = config.data
  return sources.build_tasks(
      d.name, root=d.root, data_dir=d.data_dir, domains=_csv(d.domains),
      split_seed=d.split_seed, train_fraction=d.train_fraction, split_files=d.split_files,
      skip_corrupt=d.skip_corrupt, allow_per_task_classes=d.allow_per_task_classes,
      **({"demo_seed": d.demo_seed, "demo_images_per_class": d.demo_images_per_class,
          "demo_image_size": d.demo_image_size} if d.name == "demo_domains" else {}))


def augment_config(config: mlc.ConfigDict) -> preprocess.AugmentConfig:
  return preprocess.AugmentConfig(
      random_resized_crop=bool(config.input.random_resized_crop),
      scale=(float(config.input.crop_scale_min), 1.0), hflip=bool(config.input.flip))


def class_tokens(clip: Clip, spec: PromptSpec,
                 tasks: Sequence[sources.TaskData]) -> heads.ClassTokens:
  return heads.build_class_tokens(
      clip.tokenizer, [t.info.class_names for t in tasks], spec.text_prompt_tokens,
      spec.zeroshot_template, clip.cfg.text.context_length)


def explicit_groups(spec_str: str, task_names: Sequence[str]) -> tuple[tuple[int, ...], ...]:
  """"Art+Product;Clipart+Real World" -> ((0, 2), (1, 3)); every task exactly once."""
  from mmap_jax import grouping
  groups = [[n.strip() for n in g.split("+") if n.strip()] for g in spec_str.split(";")
            if g.strip()]
  try:
    return grouping.resolve_explicit_groups(groups, task_names)
  except ValueError as e:
    raise ConfigError(f"groups.explicit={spec_str!r}: {e}") from e


def compute_dtype(config: mlc.ConfigDict):
  return DTYPES[config.clip.dtype]


def host_params(tree: Any) -> Any:
  return jax.tree.map(np.asarray, tree)


def workdir_paths(workdir: str) -> dict[str, str]:
  return {"checkpoints": os.path.join(workdir, "checkpoints"),
          "tensorboard": os.path.join(workdir, "tensorboard"),
          "grouping": os.path.join(workdir, "grouping")}
