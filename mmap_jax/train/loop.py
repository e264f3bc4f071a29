"""`train_and_evaluate(config, workdir)`: the whole run, wired from the other modules.

Order: validate the config (before anything compiles) -> load the frozen CLIP -> build the tasks
-> task grouping (mmap_mt with groups.mode=auto) -> init or restore the learned state -> jitted
data-parallel steps with periodic logging, evaluation and checkpoints -> final evaluation, the
accuracy table (results.json / results.md) and TensorBoard scalars.

Resumption: the latest complete checkpoint of `workdir/checkpoints` restores the learned pytree,
optimizer state, step and input-iterator state, so a killed and restarted run reaches the same
final prompts as an uninterrupted one. SIGTERM (preemption) saves a checkpoint before exiting.
"""
from __future__ import annotations

import json
import os
import signal
import threading
from typing import Any, Optional

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
from absl import logging

from mmap_jax import heads, parallel
from mmap_jax.data import pipeline
from mmap_jax.prompts import multitask
from mmap_jax.train import checkpointing, evaluate as evaluation, grouping_run, optim, report
from mmap_jax.train import setup, step as train_step


# Tests set this to SIGKILL the process right after a step (and after dispatching that step's
# asynchronous checkpoint, if any, so it may be half-written), as a dying host would.
_KILL_AT_STEP = os.environ.get("MMAP_JAX_KILL_AT_STEP")


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between steps (main thread only)."""

  def __init__(self):
    self.requested = False
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True

  def restore(self):
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)


def _model(config: mlc.ConfigDict, workdir: str, clip: setup.Clip, tasks, mesh,
           groups_from_checkpoint: Optional[list] = None):
  """(spec, groups) for this run; runs the grouping warm-up when the method asks for it."""
  spec = setup.prompt_spec(config, clip.cfg)
  groups = None
  if spec.method == "mmap_mt":
    names = [t.info.name for t in tasks]
    if groups_from_checkpoint is not None:
      groups = tuple(tuple(g) for g in groups_from_checkpoint)
    elif config.groups.mode == "explicit":
      groups = setup.explicit_groups(config.groups.explicit, names)
    else:
      groups = grouping_run.run_grouping(config, workdir, clip, tasks, mesh)
  return spec, groups


def spec_dict(spec) -> dict:
  import dataclasses
  return dataclasses.asdict(spec)


def _loss_fn(clip_cfg, spec, groups, dtype, remat):
  def loss_fn(learned, frozen, batch):
    loss, aux = heads.multitask_loss(
        learned, frozen["clip"], clip_cfg, spec, groups, frozen["class_tokens"],
        {"images": batch["image"], "labels": batch["label"]}, dtype=dtype, remat=remat)
    return loss, {"per_task_loss": aux["per_task_loss"], "mean_task_loss": aux["mean_task_loss"]}
  return loss_fn


def _checkpointer(config, workdir) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(setup.workdir_paths(workdir)["checkpoints"],
                                    keep=config.train.keep_checkpoints)


def train_and_evaluate(config: mlc.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) one experiment; returns the final results dict (also results.json)."""
  mesh = parallel.data_mesh()
  setup.validate(config, mesh.devices.size)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  clip = setup.load_clip(config)
  setup.prompt_spec(config, clip.cfg)  # Fails on a bad prompt config before the data is built.
  tasks = setup.build_tasks(config)
  names = [t.info.name for t in tasks]
  logging.info("tasks: %s", ", ".join(f"{t.info.name} ({t.info.num_classes} classes, "
                                      f"{t.info.num_train} train / {t.info.num_test} test)"
                                      for t in tasks))
  ckpt = _checkpointer(config, workdir)
  latest = ckpt.latest_step()
  meta = ckpt.read_meta(latest) if latest is not None else {}
  spec, groups = _model(config, workdir, clip, tasks, mesh, meta.get("groups"))
  summary = multitask.param_summary(clip.cfg, spec, len(tasks), groups)
  logging.info("%s", summary["line"])

  dtype = setup.compute_dtype(config)
  image_size = clip.cfg.vision.image_size
  class_tokens = setup.class_tokens(clip, spec, tasks)
  frozen = parallel.replicate({"clip": clip.params, "class_tokens": class_tokens}, mesh)
  total = int(config.train.steps) if spec.family != "zeroshot" else 0
  optimizer = optim.make_optimizer(config.optim, max(total, 1))
  schedule = optim.learning_rate_schedule(config.optim, max(total, 1))
  learned = multitask.init_learned(jax.random.key(config.seed), clip.cfg, spec, len(tasks),
                                   groups, clip_params=clip.params)
  state = parallel.replicate(train_step.init_state(learned, optimizer), mesh)
  meta = {"groups": [list(g) for g in groups] if groups else None, "task_names": names,
          "class_names": [list(t.info.class_names) for t in tasks], "method": spec.method,
          "prompt": spec_dict(spec), "config": json.loads(config.to_json_best_effort())}

  it = None
  if total > 0:
    it = pipeline.train_iterator(
        tasks, batch_size=config.input.batch_size, image_size=image_size, seed=config.seed,
        augment=setup.augment_config(config), sharding=mesh, worker_count=config.input.workers)
  start = 0
  if latest is not None:
    restored = ckpt.restore(state, latest)
    state, start = restored.state, restored.step
    if it is not None:
      it.set_state(restored.data_state)
    logging.info("resumed from %s at step %d", ckpt.directory, start)

  writer = report.ScalarWriter(setup.workdir_paths(workdir)["tensorboard"])
  eval_fns = evaluation.make_eval_fns(clip.cfg, spec, groups, len(tasks), dtype=dtype)

  def run_eval(step: int) -> dict[str, float]:
    acc = evaluation.evaluate(state["learned"], frozen["clip"], frozen["class_tokens"], tasks,
                              eval_fns, batch_size=config.input.eval_batch_size,
                              image_size=image_size, sharding=mesh,
                              worker_count=config.input.workers)
    writer.scalars(step, {f"eval/accuracy/{k}": v for k, v in acc.items()}
                   | {"eval/accuracy/average": float(np.mean(list(acc.values())))})
    logging.info("step %d eval: %s", step, "  ".join(f"{k} {100 * v:.2f}" for k, v in acc.items()))
    return acc

  preempt = _Preemption()
  try:
    if start < total:
      holder = {"state": state}
      _train(config, holder, frozen, it, ckpt, meta, writer, schedule,
             optimizer, spec, clip.cfg, groups, dtype, start, total, preempt, run_eval,
             images_per_step=config.input.batch_size * len(tasks))
      state = holder["state"]
      if preempt.requested:
        return {"preempted": True, "step": int(state["step"])}
    accuracy = run_eval(total)
  finally:
    preempt.restore()
    ckpt.close()
    writer.close()
    if it is not None and hasattr(it, "close"):
      it.close()

  result = report.write_results(
      workdir, task_names=names, accuracy=accuracy,
      num_classes={t.info.name: t.info.num_classes for t in tasks},
      trainable_params=summary["trainable"], trainable_percent=summary["percent_of_clip"],
      method=spec.method, step=total,
      extra={"groups": [[names[i] for i in g] for g in groups] if groups else None,
             "clip": clip.path, "dataset": config.data.name})
  table = report.accuracy_table(names, accuracy, summary["trainable"], summary["percent_of_clip"],
                                title=f"{spec.method} @ step {total}")
  if jax.process_index() == 0:
    print(table, flush=True)
  return result


def _train(config, holder, frozen, it, ckpt, meta, writer, schedule, optimizer, spec, clip_cfg,
           groups, dtype, start, total, preempt, run_eval, images_per_step):
  """The step loop; `holder["state"]` always holds the newest good state."""
  step_fn = train_step.make_train_step(_loss_fn(clip_cfg, spec, groups, dtype, config.clip.remat),
                                       optimizer, accum_steps=config.optim.accum_steps)
  progress = report.Progress(total, images_per_step, first_step=start)
  pending = None  # The previous step's metrics: checked one step late so the device never idles.

  def check(metrics, step):
    if not bool(metrics["finite"]):
      last = ckpt.latest_step()
      raise NonFiniteError(
          f"non-finite loss or gradient at step {step} (loss={float(metrics['loss'])}); the "
          f"update was not applied; last good checkpoint: step {last} in {ckpt.directory}. "
          "Lower optim.lr, enable optim.grad_clip, or use clip.dtype=float32.")

  for step in range(start, total):
    batch = next(it)
    holder["state"], metrics = step_fn(holder["state"], frozen, batch)
    if pending is not None:
      check(*pending)
    pending = (metrics, step + 1)
    done = step + 1
    if done % config.train.log_every == 0 or done == total:
      check(*pending)
      loss = float(metrics["loss"])
      lr = float(schedule(done - 1))
      progress.line(done, loss, lr)
      writer.scalars(done, {"train/loss": loss, "train/lr": lr,
                            "train/grad_norm": float(metrics["grad_norm"])}
                     | {f"train/task_loss/{i}": float(v)
                        for i, v in enumerate(np.asarray(metrics["per_task_loss"]))})
    if done % config.train.ckpt_every == 0 or done == total or preempt.requested:
      check(*pending)
      ckpt.save(done, holder["state"], it.get_state(), meta, force=True)
    if preempt.requested:
      ckpt.wait()
      return
    if done % config.train.eval_every == 0 and done != total:
      run_eval(done)
    if _KILL_AT_STEP and done == int(_KILL_AT_STEP):
      os.kill(os.getpid(), signal.SIGKILL)  # Fault injection for the resume test.
  check(*pending)


def evaluate_workdir(config: mlc.ConfigDict, workdir: str, *, step: Optional[int] = None,
                     out: Optional[str] = None) -> dict:
  """Accuracy of a workdir's checkpoint (latest or `step`), or zero-shot CLIP with none."""
  mesh = parallel.data_mesh()
  setup.validate(config, mesh.devices.size)
  workdir = os.path.abspath(workdir)
  clip = setup.load_clip(config)
  tasks = setup.build_tasks(config)
  names = [t.info.name for t in tasks]
  ckpt = _checkpointer(config, workdir)
  step = ckpt.latest_step() if step is None else step
  meta = ckpt.read_meta(step) if step is not None else {}
  if step is None and config.method != "zeroshot":
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first or evaluate "
                            "with method=zeroshot")
  spec, groups = _model(config, workdir, clip, tasks, mesh, meta.get("groups"))
  if meta and meta.get("method") not in (None, spec.method):
    raise setup.ConfigError(f"method={spec.method!r} but the checkpoint in {ckpt.directory} "
                            f"was trained with {meta['method']!r}")
  dtype = setup.compute_dtype(config)
  class_tokens = setup.class_tokens(clip, spec, tasks)
  frozen = parallel.replicate({"clip": clip.params, "class_tokens": class_tokens}, mesh)
  optimizer = optim.make_optimizer(config.optim, max(int(config.train.steps), 1))
  learned = multitask.init_learned(jax.random.key(config.seed), clip.cfg, spec, len(tasks),
                                   groups, clip_params=clip.params)
  state = parallel.replicate(train_step.init_state(learned, optimizer), mesh)
  if step is not None:
    state = ckpt.restore(state, step).state
  ckpt.close()
  accuracy = evaluation.evaluate(
      state["learned"], frozen["clip"], frozen["class_tokens"], tasks,
      evaluation.make_eval_fns(clip.cfg, spec, groups, len(tasks), dtype=dtype),
      batch_size=config.input.eval_batch_size, image_size=clip.cfg.vision.image_size,
      sharding=mesh, worker_count=config.input.workers)
  summary = multitask.param_summary(clip.cfg, spec, len(tasks), groups)
  result = report.write_results(
      out or workdir, task_names=names, accuracy=accuracy,
      num_classes={t.info.name: t.info.num_classes for t in tasks},
      trainable_params=summary["trainable"], trainable_percent=summary["percent_of_clip"],
      method=spec.method, step=step or 0,
      extra={"groups": [[names[i] for i in g] for g in groups] if groups else None,
             "clip": clip.path, "dataset": config.data.name})
  if jax.process_index() == 0:
    print(report.accuracy_table(names, accuracy, summary["trainable"],
                                summary["percent_of_clip"],
                                title=f"{spec.method} @ step {step or 0}"), flush=True)
  return result


def group_tasks(config: mlc.ConfigDict, workdir: str) -> list[list[str]]:
  """Runs only the grouping warm-up (whatever config.method says) and returns groups by name."""
  mesh = parallel.data_mesh()
  setup.validate(config, mesh.devices.size)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  clip = setup.load_clip(config)
  tasks = setup.build_tasks(config)
  names = [t.info.name for t in tasks]
  groups = grouping_run.run_grouping(config, workdir, clip, tasks, mesh)
  return [[names[i] for i in g] for g in groups]
