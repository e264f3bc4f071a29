"""The learned pytree of every method, and its expansion to per-task prompt tokens.

Learned pytree layout (stacked leading axes, so expansion is one vmap, never a loop over tasks):
  zeroshot                         {}
  <fam>_st                         {"task":   family params with leading [T]}
  <fam>_mt, mmap_shared            {"shared": family params}
  mmap_mt, mmap_indep_mt           {"group":  MmAP params [G, ...], "task": MmAP params [T, ...]}
  mmap_shared_mt / mmap_task_mt    {"shared": one 2L-token MmAP} / {"task": 2L-token MmAPs [T]}
  fullft_mt / fullft_st            {"clip":   a copy of the CLIP params (leading [T] for _st)}
  clipadapter/bitfit/lora _st, _mt {"task": PEFT params [T, ...]} / {"shared": PEFT params}
                                   (mmap_jax/peft; they change the CLIP, not the prompts)

Per-task prompts (`task_prompts`) are PromptTokens with a leading task axis [T, J, L_tot, d];
for mmap_mt, L_tot = 2L: task t at layer j sees concat(group[g(t)]_j, task[t]_j) on the token
axis. Groups are static: a tuple of tuples of task indices partitioning range(T).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmap_jax import peft
from mmap_jax.groups import Groups, check_groups
from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts import coop, ctx_init, ivlp, maple, mmap, mmap_indep, vpt
from mmap_jax.prompts.base import PromptTokens
from mmap_jax.prompts.spec import PEFT_FAMILIES, PromptSpec

Learned = dict[str, Any]

FAMILY_MODULES = {"coop": coop, "vpt": vpt, "maple": maple, "ivlp": ivlp, "mmap": mmap}
PROMPT_MODULES = {**FAMILY_MODULES, "mmap_indep": mmap_indep}


def prompt_module(spec: PromptSpec):
  """The module (init / expand) of one prompt unit of `spec`'s method."""
  return PROMPT_MODULES[spec.prompt_module_name]


# ----------------------------------------------------------------------------- groups

def resolve_groups(groups: Optional[Sequence[Sequence[int]]], num_tasks: int) -> Groups:
  """Validate a partition of range(num_tasks) (`groups.check_groups`), keeping the given group
  order (the learned pytree's group axis follows it); None = one group holding every task."""
  if groups is None:
    return (tuple(range(num_tasks)),)
  out = tuple(tuple(int(t) for t in g) for g in groups)
  try:
    check_groups(out, num_tasks)
  except ValueError as e:
    raise ValueError(f"groups={out} must partition the task indices 0..{num_tasks - 1} into "
                     f"non-empty groups (each task in exactly one group): {e}") from None
  return out


def task_to_group(groups: Optional[Sequence[Sequence[int]]], num_tasks: int) -> np.ndarray:
  """Static int32 [T]: the group index of each task."""
  idx = np.zeros((num_tasks,), np.int32)
  for g, members in enumerate(resolve_groups(groups, num_tasks)):
    idx[list(members)] = g
  return idx


def init_groups_from_shared(learned: Learned, shared: Any) -> Learned:
  """mmap_mt `learned` with EVERY group-shared MmAP set to a copy of `shared` (the params of one
  MmAP unit, e.g. the grouping warm-up's `{"shared": ...}["shared"]`); task-specific MmAPs are
  kept. Starts each group from what all tasks learned together (`groups.init_from_warmup`)."""
  if not isinstance(learned, dict) or set(learned) != {"group", "task"}:
    got = sorted(learned) if isinstance(learned, dict) else type(learned).__name__
    raise ValueError("init_groups_from_shared: `learned` must be an mmap_mt pytree with keys "
                     f"['group', 'task'], got {got}")
  if jax.tree.structure(shared) != jax.tree.structure(
      jax.tree.map(lambda x: x[0], learned["group"])):
    raise ValueError(f"init_groups_from_shared: `shared` has structure {jax.tree.structure(shared)}"
                     f", the group MmAPs {jax.tree.structure(learned['group'])}")

  def copy(group_leaf, shared_leaf):
    shared_leaf = jnp.asarray(shared_leaf)
    if tuple(shared_leaf.shape) != tuple(group_leaf.shape[1:]):
      raise ValueError(f"init_groups_from_shared: a shared leaf has shape {shared_leaf.shape}, "
                       f"a group MmAP's {tuple(group_leaf.shape[1:])} (prompt config changed?)")
    return jnp.broadcast_to(shared_leaf.astype(group_leaf.dtype), group_leaf.shape)

  return {"group": jax.tree.map(copy, learned["group"], shared), "task": learned["task"]}


# ----------------------------------------------------------------------------- init / expand

def _stacked_init(module, key: jax.Array, n: int, clip_cfg: ClipConfig, spec: PromptSpec,
                  ctx=None):
  return jax.vmap(lambda k: ctx_init.apply(module.init(k, clip_cfg, spec), ctx))(
      jax.random.split(key, n))


def init_learned(key: jax.Array, clip_cfg: ClipConfig, spec: PromptSpec, num_tasks: int,
                 groups: Optional[Groups] = None, *, clip_params: Any = None,
                 tokenizer: Any = None) -> Learned:
  """The pytree the optimizer updates (layout in the module docstring).

  `clip_params` (the frozen CLIP) is required for fullft_*, whose learned pytree is a copy of it,
  for bitfit_* (a copy of its biases), and with `tokenizer` for a text context initialised from words (`spec.learned_ctx_init`, e.g.
  maple's default "a photo of a"): every prompt set's layer-0 text tokens start as their
  token embeddings (`prompts.ctx_init`).
  """
  spec.validate(clip_cfg)
  ctx = None
  if spec.learned_ctx_init is not None:
    if clip_params is None or tokenizer is None:
      raise ValueError(f"method {spec.method!r} initialises its text context from "
                       f"prompt.ctx_init={spec.ctx_init!r}: pass clip_params and tokenizer to "
                       "init_learned (or set prompt.ctx_init='' for random init)")
    ctx = ctx_init.embeddings(spec, tokenizer, clip_params)
  if num_tasks < 1:
    raise ValueError(f"num_tasks={num_tasks} must be >= 1")
  fam, sharing = spec.family, spec.sharing
  if fam == "zeroshot":
    return {}
  if fam == "fullft":
    if clip_params is None:
      raise ValueError(f"method {spec.method!r} fine-tunes CLIP: pass clip_params to init_learned")
    if sharing == "st":
      return {"clip": jax.tree.map(
          lambda x: jnp.array(jnp.broadcast_to(x, (num_tasks,) + jnp.shape(x))), clip_params)}
    return {"clip": jax.tree.map(jnp.array, clip_params)}
  if fam in PEFT_FAMILIES:
    if sharing == "st":
      return {"task": peft.init(key, clip_cfg, spec, clip_params, num_tasks=num_tasks)}
    return {"shared": peft.init(key, clip_cfg, spec, clip_params)}
  module = prompt_module(spec)
  if spec.layout == "task":
    return {"task": _stacked_init(module, key, num_tasks, clip_cfg, spec, ctx)}
  if spec.layout == "group_task":
    groups = resolve_groups(groups, num_tasks)
    kg, kt = jax.random.split(key)
    return {"group": _stacked_init(module, kg, len(groups), clip_cfg, spec),
            "task": _stacked_init(module, kt, num_tasks, clip_cfg, spec)}
  return {"shared": ctx_init.apply(module.init(key, clip_cfg, spec), ctx)}


def _broadcast(tokens: PromptTokens, n: int) -> PromptTokens:
  return PromptTokens(*(None if x is None else jnp.broadcast_to(x, (n,) + x.shape)
                        for x in tokens))


def task_prompts(learned: Learned, clip_cfg: ClipConfig, spec: PromptSpec,
                 groups: Optional[Groups] = None, *,
                 num_tasks: Optional[int] = None) -> PromptTokens:
  """Per-task deep prompts, [T, J, L_tot, d] per tower (None for an unprompted tower).

  `num_tasks` is needed only for methods whose prompts are shared by all tasks (`_mt`,
  mmap_shared), where the single expansion is broadcast over T.
  """
  if not spec.has_prompts:
    return PromptTokens(None, None)
  module = prompt_module(spec)
  expand = lambda p: module.expand(p, clip_cfg, spec)
  if spec.layout == "task":
    return jax.vmap(expand)(learned["task"])
  if spec.layout == "group_task":
    per_task = jax.vmap(expand)(learned["task"])
    per_group = jax.vmap(expand)(learned["group"])
    t = per_task.text.shape[0]
    idx = task_to_group(groups, t)
    g = per_group.text.shape[0]
    if g != int(idx.max()) + 1:
      raise ValueError(f"groups={resolve_groups(groups, t)} has {int(idx.max()) + 1} groups "
                       f"but the learned pytree has {g} group MmAPs")
    cat = lambda gp, tp: jnp.concatenate([gp[idx], tp], axis=2)
    return PromptTokens(text=cat(per_group.text, per_task.text),
                        visual=cat(per_group.visual, per_task.visual))
  if num_tasks is None:
    raise ValueError(f"method {spec.method!r} shares one prompt set: task_prompts needs num_tasks")
  return _broadcast(expand(learned["shared"]), num_tasks)


def clip_params_for(learned: Learned, frozen_clip: Any, spec: PromptSpec, *,
                    merged: bool = False, dropout_key: Optional[jax.Array] = None) -> Any:
  """The CLIP params the encoders run with: the learned copy for fullft_*, the frozen CLIP with
  the PEFT parameters applied for clipadapter/bitfit/lora (`peft.apply`; `merged` folds LoRA into
  the kernels), else the frozen one.

  For fullft_st every leaf has a leading task axis, for the PEFT *_st methods the leaves derived
  from the learned params do (see `clip_task_axes`). `dropout_key` (training steps only) turns
  on the PEFT method's dropout (LoRA's `prompt.lora_dropout`).
  """
  if spec.family in PEFT_FAMILIES:
    part = learned["task"] if spec.sharing == "st" else learned["shared"]
    return peft.apply(frozen_clip, part, spec, merged=merged, dropout_key=dropout_key)
  return learned["clip"] if spec.family == "fullft" else frozen_clip


def clip_per_task(spec: PromptSpec) -> bool:
  """Whether `clip_params_for` returns per-task CLIP params (leading [T] on every leaf)."""
  return spec.method == "fullft_st"


def clip_task_axes(params: Any, spec: PromptSpec, *, merged: bool = False) -> Any:
  """How `clip_params_for(...)`'s result maps over tasks, as heads' `clip_per_task` takes it:
  a bool for every leaf alike (True only for fullft_st), or for the PEFT *_st methods a pytree
  of 0 (the learned leaves, [T]) / None (the frozen ones, shared by all tasks, never copied)."""
  if spec.family in PEFT_FAMILIES and spec.sharing == "st":
    return peft.task_axes(params, spec, merged=merged)
  return clip_per_task(spec)


def task_clip_params(learned: Learned, frozen_clip: Any, spec: PromptSpec, task: Any, *,
                     merged: bool = False) -> Any:
  """The CLIP params task `task` (an int or a traced int32 scalar) runs with, no task axis."""
  take = lambda x: jax.lax.dynamic_index_in_dim(jnp.asarray(x), task, 0, keepdims=False)
  if clip_per_task(spec):
    return jax.tree.map(take, learned["clip"])
  if spec.family in PEFT_FAMILIES and spec.sharing == "st":
    return peft.apply(frozen_clip, jax.tree.map(take, learned["task"]), spec, merged=merged)
  return clip_params_for(learned, frozen_clip, spec, merged=merged)


# ----------------------------------------------------------------------------- accounting

def trainable_param_count(clip_cfg: ClipConfig, spec: PromptSpec, num_tasks: int,
                          groups: Optional[Groups] = None) -> int:
  """Number of trained parameters, from shapes only (nothing allocated, even for fullft)."""
  def build():
    key = jax.random.key(0)
    cp = clip.init_params(key, clip_cfg) if spec.family in ("fullft", "bitfit") else None
    # ctx_init changes initial values, not shapes: count its random-init twin.
    shapes_spec = dataclasses.replace(spec, ctx_init="") if spec.learned_ctx_init else spec
    return init_learned(key, clip_cfg, shapes_spec, num_tasks, groups, clip_params=cp)
  return clip.count_params(jax.eval_shape(build))


def param_summary(clip_cfg: ClipConfig, spec: PromptSpec, num_tasks: int,
                  groups: Optional[Groups] = None) -> dict[str, Any]:
  """{"method", "trainable", "clip", "percent_of_clip", "line"} for logs and tables."""
  trainable = trainable_param_count(clip_cfg, spec, num_tasks, groups)
  total = clip.count_params(clip.param_shapes(clip_cfg))
  pct = 100.0 * trainable / total
  ngroups = len(resolve_groups(groups, num_tasks)) if spec.grouped else None
  where = f"{num_tasks} tasks" + (f", {ngroups} groups" if ngroups else "")
  return {"method": spec.method, "trainable": trainable, "clip": total, "percent_of_clip": pct,
          "line": f"{spec.method} ({where}): {trainable:,} trainable parameters = "
                  f"{pct:.4f}% of CLIP's {total:,}"}


__all__ = ["Groups", "FAMILY_MODULES", "PROMPT_MODULES", "prompt_module", "resolve_groups", "task_to_group", "init_learned",
           "task_prompts", "clip_params_for", "clip_per_task", "clip_task_axes",
           "task_clip_params", "trainable_param_count", "param_summary"]
