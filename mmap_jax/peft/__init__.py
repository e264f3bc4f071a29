"""Parameter-efficient fine-tuning baselines: CLIP-Adapter, BitFit, LoRA.

Unlike the prompt methods (mmap_jax/prompts: init -> expand -> PromptTokens) these change the CLIP
the encoders run with, so they share a different interface, one module per family:
  init(key, clip_cfg, spec, clip_params) -> params       one parameter set, no task axis
  apply(clip_params, params, spec, merged=False) -> the effective CLIP params; every leading
        task axis of `params` carries over to the leaves derived from them (for *_st)
  is_task_leaf(path, spec, merged=False) -> whether a leaf of apply's result is one of those
The frozen CLIP stays an argument of every function (a jit argument, never a constant); the
effective params are rebuilt inside each jitted step and never stored.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import jax

from mmap_jax.models.config import ClipConfig
from mmap_jax.peft import adapter, bitfit, lora

if TYPE_CHECKING:
  from mmap_jax.prompts.spec import PromptSpec

FAMILY_MODULES = {"clipadapter": adapter, "bitfit": bitfit, "lora": lora}


def init(key: jax.Array, clip_cfg: ClipConfig, spec: "PromptSpec", clip_params: Any = None,
         num_tasks: int | None = None) -> Any:
  """One parameter set, or `num_tasks` independent ones stacked on a leading axis."""
  module = FAMILY_MODULES[spec.family]
  if num_tasks is None:
    return module.init(key, clip_cfg, spec, clip_params)
  keys = jax.random.split(key, num_tasks)
  return jax.vmap(lambda k: module.init(k, clip_cfg, spec, clip_params))(keys)


def apply(clip_params: Any, params: Any, spec: "PromptSpec", *, merged: bool = False,
          dropout_key: Any = None) -> Any:
  """The effective CLIP; `dropout_key` (a training step's key) turns on LoRA's dropout."""
  if spec.family == "lora":
    return lora.apply(clip_params, params, spec, merged=merged, dropout_key=dropout_key)
  return FAMILY_MODULES[spec.family].apply(clip_params, params, spec, merged=merged)


def _keys(path) -> tuple[str, ...]:
  return tuple(str(getattr(k, "key", getattr(k, "idx", k))) for k in path)


def task_axes(effective: Any, spec: "PromptSpec", *, merged: bool = False) -> Any:
  """vmap in_axes of `apply(...)`'s result when `params` had a task axis: 0 on the leaves
  derived from them, None on the frozen ones (which are then shared, not copied per task)."""
  module = FAMILY_MODULES[spec.family]
  return jax.tree_util.tree_map_with_path(
      lambda p, _: 0 if module.is_task_leaf(_keys(p), spec, merged=merged) else None, effective)


__all__ = ["FAMILY_MODULES", "init", "apply", "task_axes", "adapter", "bitfit", "lora"]
