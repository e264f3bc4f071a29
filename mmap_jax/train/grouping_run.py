"""Gradient-driven task grouping on real data: warm up one shared MmAP, measure, partition.

Each warm-up step takes one batch of every task, computes all per-task gradients of the shared
MmAP in ONE vmap (so it costs about one training step), updates the shared MmAP with their mean
and accumulates their pairwise cosine similarity. The partition and the files (affinity.npy,
affinity.png, groups.json) land in the workdir; a finished grouping there is reused.
"""
from __future__ import annotations

import os
import time
from typing import Sequence

import jax
import jax.numpy as jnp
import ml_collections as mlc
from absl import logging

from mmap_jax import grouping, heads, parallel
from mmap_jax.data import pipeline, sources
from mmap_jax.prompts import multitask
from mmap_jax.prompts.spec import PromptSpec
from mmap_jax.train import chunks, optim, setup

Groups = tuple[tuple[int, ...], ...]


def _grouping_step_fn(clip_cfg, spec: PromptSpec, optimizer, dtype, remat):
  def step(gstate, clip_params, class_tokens, batch, record):
    loss_t = heads.per_task_loss_fn(clip_params, clip_cfg, spec, dtype=dtype, remat=remat)
    params, opt_state, aff, metrics = grouping.grouping_step(
        loss_t, gstate["params"], gstate["opt_state"], optimizer, gstate["affinity"],
        class_tokens, batch["image"], batch["label"], record=record)
    return {"params": params, "opt_state": opt_state, "affinity": aff}, metrics
  return step


def make_grouping_step(clip_cfg, spec: PromptSpec, optimizer, *, dtype=jnp.float32,
                       remat: bool = False):
  """jit(step)(gstate, clip_params, class_tokens, batch, record) -> (gstate, metrics)."""
  return jax.jit(_grouping_step_fn(clip_cfg, spec, optimizer, dtype, remat), donate_argnums=(0,))


def make_grouping_steps(clip_cfg, spec: PromptSpec, optimizer, *, dtype=jnp.float32,
                        remat: bool = False):
  """K grouping steps per call (train.steps_per_call), a lax.scan of the same step:
  jit(steps)(gstate, clip_params, class_tokens, batches [K, T, B, ...], records [K]) ->
  (gstate, metrics stacked [K, ...]); equal to K calls of `make_grouping_step`."""
  step = _grouping_step_fn(clip_cfg, spec, optimizer, dtype, remat)

  def steps(gstate, clip_params, class_tokens, batches, records):
    return jax.lax.scan(lambda gs, xs: step(gs, clip_params, class_tokens, *xs), gstate,
                        (batches, records))

  return jax.jit(steps, donate_argnums=(0,))


def run_grouping(config: mlc.ConfigDict, workdir: str, clip: setup.Clip,
                 tasks: Sequence[sources.TaskData], mesh) -> Groups:
  """Warm up, partition, write affinity.npy / affinity.png / groups.json; reuse if present."""
  names = [t.info.name for t in tasks]
  if os.path.exists(os.path.join(workdir, grouping.GROUPS_FILE)):
    groups = grouping.load_groups(workdir, names)
    logging.info("reusing the task grouping in %s: %s", workdir, groups)
    return groups
  shared_config = mlc.ConfigDict(config.to_dict())
  shared_config.method = "mmap_shared"
  spec = setup.prompt_spec(shared_config, clip.cfg)
  steps, every = int(config.groups.warmup_steps), int(config.groups.every)
  dtype = setup.compute_dtype(config)
  class_tokens = parallel.replicate(setup.class_tokens(clip, spec, tasks), mesh)
  clip_params = parallel.replicate(clip.params, mesh)
  optimizer = optim.make_optimizer(config.optim, steps)
  learned = multitask.init_learned(jax.random.key(config.seed + 7), clip.cfg, spec, len(tasks))
  gstate = parallel.replicate({"params": learned, "opt_state": optimizer.init(learned),
                               "affinity": grouping.AffinityState.zeros(len(tasks))}, mesh)
  k = int(config.train.get("steps_per_call", 1))
  if k == 1:
    step = make_grouping_step(clip.cfg, spec, optimizer, dtype=dtype, remat=config.clip.remat)
  else:
    multi = make_grouping_steps(clip.cfg, spec, optimizer, dtype=dtype, remat=config.clip.remat)
  it = pipeline.train_iterator(
      tasks, batch_size=config.input.batch_size, image_size=clip.cfg.vision.image_size,
      seed=config.seed + 1, augment=setup.augment_config(config),
      sharding=mesh, worker_count=config.input.workers, num_steps=steps)
  t0 = time.perf_counter()
  metrics, log_every = None, max(config.train.log_every, 1)
  done = 0
  for n in chunks.plan_chunks(0, steps, k, (log_every,)):  # k == 1: one step per call
    if k == 1:
      gstate, metrics = step(gstate, clip_params, class_tokens, next(it),
                             jnp.asarray(done % every == 0))
      last = metrics
    else:
      records = jnp.asarray([(done + j) % every == 0 for j in range(n)])
      gstate, metrics = multi(gstate, clip_params, class_tokens, it.next_steps(n), records)
      last = jax.tree.map(lambda x: x[-1], metrics)
    done += n
    if done % log_every == 0 or done == steps:
      logging.info("grouping warm-up %d/%d  loss %.4f  mean pairwise affinity %.3f", done,
                   steps, float(last["loss"]), float(last["mean_pairwise_affinity"]))
  it.close() if hasattr(it, "close") else None
  num_groups = int(config.groups.num_groups) or None
  threshold = None if num_groups else float(config.groups.threshold)
  groups = None
  if jax.process_index() == 0:
    groups = grouping.finalize_grouping(
        workdir, names, jax.device_get(gstate["affinity"]), num_groups=num_groups,
        threshold=threshold, steps=steps,
        extra={"every": every, "seconds": round(time.perf_counter() - t0, 2)})
  else:  # Same inputs on every process: the partition is deterministic, compute it locally.
    groups = grouping.partition(jax.device_get(gstate["affinity"]).mean(),
                                num_groups=num_groups, threshold=threshold)
  logging.info("task groups: %s", [[names[i] for i in g] for g in groups])
  return groups
