"""A trained workdir as a classifier's inputs: one task's prompts and CLIP params (full FT, PEFT).

Reads only what a checkpoint holds (the learned pytree and its metadata: method, prompt spec,
groups, task and class names), so prediction needs neither the dataset nor the training config.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import jax
import ml_collections as mlc
import numpy as np
import orbax.checkpoint as ocp

from mmap_jax import paths
from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts import multitask
from mmap_jax.prompts.base import PromptTokens
from mmap_jax.prompts.spec import PromptSpec
from mmap_jax.train import checkpointing


@dataclasses.dataclass(frozen=True)
class Trained:
  step: int                 # the step of the learned state (the selected one by default)
  spec: PromptSpec
  task_names: tuple[str, ...]
  class_names: tuple[tuple[str, ...], ...]
  groups: Optional[tuple[tuple[int, ...], ...]]
  learned: Any
  clip_path: Optional[str]


def load_trained(workdir: paths.PathLike, step: Optional[int] = None,
                 state: str = "selected") -> Trained:
  """The learned pytree + metadata of `workdir/checkpoints` (latest step unless given).

  state='selected' (default) returns the state the run's validation record selected (the one
  results.json reports), 'checkpoint' the checkpoint's own current state.
  """
  if state not in ("selected", "checkpoint"):
    raise ValueError(f"state={state!r}; allowed: ('selected', 'checkpoint')")
  # Read-only: the run may still be training (a cleanup would delete the save being written).
  ckpt = checkpointing.Checkpointer(paths.as_path(workdir) / "checkpoints", read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}")
    meta = ckpt.read_meta(step)
    has_selected = ckpt.has_selected(step)
  finally:
    ckpt.close()
  for key in ("method", "prompt", "task_names", "class_names"):
    if key not in meta:
      raise ValueError(f"{ckpt.directory}/{step}: checkpoint metadata lacks {key!r}")
  record = meta.get("selection") or {}
  at = step
  # Under select=last (or before the first validation) a checkpoint's own state is its selection.
  if state == "selected" and record.get("rule") == "best_val" and record.get("step") is not None:
    if not has_selected:
      raise FileNotFoundError(f"{ckpt.directory}/{step} holds no selected state for step "
                              f"{record['step']}")
    learned = ocp.StandardCheckpointer().restore(ckpt.item_path(step, "selected"))
    at = int(record["step"])
  else:
    learned = ocp.StandardCheckpointer().restore(ckpt.item_path(step, "state"))["learned"]
  groups = meta.get("groups")
  # Checkpoints written before prompt.ctx_init existed were trained with random init.
  prompt = {"ctx_init": "", **meta["prompt"]}
  return Trained(
      step=at, spec=PromptSpec(**prompt), task_names=tuple(meta["task_names"]),
      class_names=tuple(tuple(c) for c in meta["class_names"]),
      groups=tuple(tuple(g) for g in groups) if groups else None,
      learned=jax.device_get(learned),
      clip_path=(meta.get("config") or {}).get("clip", {}).get("path"))


def recorded_config(workdir: paths.PathLike, step: Optional[int] = None) -> mlc.ConfigDict:
  """The experiment config a run recorded in its checkpoint (latest step unless given), with the
  command-line overrides it ran with: what evaluating the run needs when no config is given."""
  ckpt = checkpointing.Checkpointer(paths.as_path(workdir) / "checkpoints", read_only=True)
  try:
    step = ckpt.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {ckpt.directory}, so no recorded config: "
                              "give --config")
    meta = ckpt.read_meta(step)
  finally:
    ckpt.close()
  if not meta.get("config"):
    raise FileNotFoundError(f"{ckpt.directory}/{step} recorded no config: give --config")
  return mlc.ConfigDict(meta["config"])


def task_model(trained: Trained, clip_cfg: ClipConfig, clip_params: Any,
               task: str) -> tuple[Any, PromptTokens, tuple[str, ...]]:
  """(CLIP params, PromptTokens [J, L, d] of `task`, its class names)."""
  if task not in trained.task_names:
    raise ValueError(f"task {task!r} is not in this checkpoint; tasks: {list(trained.task_names)}")
  i = trained.task_names.index(task)
  spec = trained.spec.validate(clip_cfg)
  prompts = multitask.task_prompts(trained.learned, clip_cfg, spec, trained.groups,
                                   num_tasks=len(trained.task_names))
  pick = lambda x: None if x is None else np.asarray(x)[i]
  # merged: LoRA folded into the kernels, so prediction runs a plain CLIP (exact).
  params = jax.device_get(multitask.task_clip_params(trained.learned, clip_params, spec, i,
                                                     merged=True))
  return params, PromptTokens(pick(prompts.text), pick(prompts.visual)), trained.class_names[i]
