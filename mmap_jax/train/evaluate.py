"""Per-task accuracy on every task's test (or validation) split, each example counted once.

Text features depend only on the learned prompts, so they are computed once per evaluation for all
tasks' classes; each test batch then needs only its task's image features.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmap_jax import heads, parallel
from mmap_jax.data import pipeline, sources
from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts import multitask
from mmap_jax.prompts.spec import PromptSpec


def make_eval_fns(clip_cfg: ClipConfig, spec: PromptSpec, groups, num_tasks: int, *,
                  dtype=jnp.float32,
                  text_sharding: parallel.TextSharding = parallel.REPLICATED_TEXT
                  ) -> tuple[Callable, Callable]:
  """(text_fn, batch_fn): jitted; the CLIP weights and prompts are arguments, never constants.

  text_fn encodes every task's classes once per evaluation, split over the mesh by
  `text_sharding` (its result is replicated)."""

  def prompts_and_params(learned, clip_params):
    prompts = multitask.task_prompts(learned, clip_cfg, spec, groups, num_tasks=num_tasks)
    return prompts, multitask.clip_params_for(learned, clip_params, spec)

  @jax.jit
  def text_fn(learned, clip_params, class_tokens):
    prompts, params = prompts_and_params(learned, clip_params)
    return heads.text_features(params, clip_cfg, prompts.text, class_tokens, dtype=dtype,
                               clip_per_task=multitask.clip_task_axes(params, spec),
                               text_sharding=text_sharding)

  @jax.jit
  def batch_fn(learned, clip_params, text_feats, class_mask, images, task):
    """Predicted class per image of one task's batch: [B] int32."""
    prompts = multitask.task_prompts(learned, clip_cfg, spec, groups, num_tasks=num_tasks)
    take = lambda x: None if x is None else jax.lax.dynamic_index_in_dim(x, task, 0, keepdims=False)
    p = multitask.task_clip_params(learned, clip_params, spec, task)
    vis = take(prompts.visual)
    feats = heads.image_features(p, clip_cfg, None if vis is None else vis[None],
                                 images[None], dtype=dtype, clip_per_task=False)
    logits = heads.logits_from_features(p, feats, take(text_feats)[None])
    logits = heads.masked_logits(logits, take(class_mask)[None])[0]
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)

  return text_fn, batch_fn


def to_host(x: jax.Array) -> np.ndarray:
  """A global array as numpy on every process (gathered when it spans several hosts)."""
  if isinstance(x, jax.Array) and not x.is_fully_addressable:
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(x, tiled=True))
  return np.asarray(x)


def evaluate(learned: Any, clip_params: Any, class_tokens: heads.ClassTokens,
             tasks: Sequence[sources.TaskData], eval_fns: tuple[Callable, Callable], *,
             batch_size: int, image_size: int, sharding=None, worker_count: int = 0,
             split: str = "test", return_correct: bool = False):
  """{task name: accuracy in [0, 1]} over each task's whole `split` ('test' or 'val').

  Tasks whose split is empty (no validation examples) are left out of the dict.
  `return_correct=True` returns (accuracy, {task name: bool [n]}), the per-example correctness
  indexed by record index within the split (what the sweep's paired bootstrap resamples).
  """
  position = {t.task_id: i for i, t in enumerate(tasks)}  # Row of prompts / class tokens.
  tasks = [t for t in tasks if len(pipeline.eval_source(t, split))]
  text_fn, batch_fn = eval_fns
  text_feats = text_fn(learned, clip_params, class_tokens)
  class_mask = jnp.asarray(class_tokens.class_mask)
  correct = np.zeros(len(tasks), np.int64)
  count = np.zeros(len(tasks), np.int64)
  slot = {t.task_id: k for k, t in enumerate(tasks)}
  per_example = [np.zeros(len(pipeline.eval_source(t, split)), bool) for t in tasks]
  for batch in pipeline.eval_batches(tasks, batch_size=batch_size, image_size=image_size,
                                     sharding=sharding, worker_count=worker_count, split=split,
                                     with_index=True):
    i, k = position[batch["task"]], slot[batch["task"]]
    pred = batch_fn(learned, clip_params, text_feats, class_mask, batch["image"],
                    jnp.asarray(i, jnp.int32))
    mask = to_host(batch["mask"])
    hit = (to_host(pred) == to_host(batch["label"])) & mask
    correct[k] += int(hit.sum())
    count[k] += int(mask.sum())
    per_example[k][to_host(batch["index"])[mask]] = hit[mask]
  for t, n in zip(tasks, count):
    if n != len(pipeline.eval_source(t, split)):
      raise RuntimeError(f"{split} evaluation of task {t.info.name!r} saw {n} examples, "
                         f"expected {len(pipeline.eval_source(t, split))}")
  accuracy = {t.info.name: float(c / max(n, 1)) for t, c, n in zip(tasks, correct, count)}
  if return_correct:
    return accuracy, {t.info.name: c for t, c in zip(tasks, per_example)}
  return accuracy
