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

import dataclasses
import json
import os
import signal
import threading
from typing import Any, Optional

import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from mmap_jax import heads, parallel
from mmap_jax.data import pipeline
from mmap_jax.prompts import multitask
from mmap_jax.train import checkpointing, evaluate as evaluation, grouping_run, optim, report
from mmap_jax.train import chunks, setup, step as train_step


# Fault injection for the resume tests: "STEP:SIGNAL" (e.g. "4:SIGKILL", "3:SIGTERM") sends the
# signal to this process right after that step (and after dispatching the step's asynchronous
# checkpoint, if any, so it may be half-written), as a dying or preempted host would see it.
_SIGNAL_AT_STEP = os.environ.get("MMAP_JAX_SIGNAL_AT_STEP")

# Exit status of a launcher whose run was preempted (SIGTERM) after saving its checkpoint:
# 128 + SIGTERM, what a shell reports for a process SIGTERM ended. Schedulers that restart
# terminated tasks then restart it and the rerun resumes; 0 would read as "finished".
PREEMPTED_EXIT_CODE = 128 + int(signal.SIGTERM)


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


@dataclasses.dataclass
class _Run:
  """Everything a run has prepared before its first compiled step."""
  mesh: Any
  clip: setup.Clip
  tasks: list
  names: list
  ckpt: checkpointing.Checkpointer
  step: Optional[int]        # the checkpoint to restore (None: fresh)
  spec: Any
  groups: Any
  summary: dict
  dtype: Any
  frozen: dict               # replicated {"clip", "class_tokens"}
  optimizer: Any
  state: dict                # replicated, freshly initialised (restore() replaces it)
  total: int                 # training steps (0 for zero-shot)

  def restore(self) -> Optional[checkpointing.Restored]:
    if self.step is None:
      return None
    restored = self.ckpt.restore(self.state, self.step)
    self.state = restored.state
    return restored

  def evaluate(self, config: mlc.ConfigDict, eval_fns) -> dict[str, float]:
    return evaluation.evaluate(
        self.state["learned"], self.frozen["clip"], self.frozen["class_tokens"], self.tasks,
        eval_fns, batch_size=config.input.eval_batch_size,
        image_size=self.clip.cfg.vision.image_size, sharding=self.mesh,
        worker_count=config.input.workers)

  def write_results(self, config, out: str, accuracy: dict, step: int) -> dict:
    names, groups = self.names, self.groups
    result = report.write_results(
        out, task_names=names, accuracy=accuracy,
        num_classes={t.info.name: t.info.num_classes for t in self.tasks},
        trainable_params=self.summary["trainable"],
        trainable_percent=self.summary["percent_of_clip"], method=self.spec.method, step=step,
        extra={"groups": [[names[i] for i in g] for g in groups] if groups else None,
               "clip": self.clip.path, "dataset": config.data.name})
    if jax.process_index() == 0:
      print(report.accuracy_table(names, accuracy, self.summary["trainable"],
                                  self.summary["percent_of_clip"],
                                  title=f"{self.spec.method} @ step {step}"), flush=True)
    return result


def _prepare(config: mlc.ConfigDict, workdir: str, *, step: Optional[int] = None,
             require_checkpoint: bool = False) -> _Run:
  mesh = parallel.data_mesh()
  setup.validate(config, mesh.devices.size)
  os.makedirs(workdir, exist_ok=True)
  clip = setup.load_clip(config)
  setup.prompt_spec(config, clip.cfg)  # Fails on a bad prompt config before the data is built.
  tasks = setup.build_tasks(config)
  logging.info("tasks: %s", ", ".join(f"{t.info.name} ({t.info.num_classes} classes, "
                                      f"{t.info.num_train} train / {t.info.num_test} test)"
                                      for t in tasks))
  ckpt = _checkpointer(config, workdir)
  step = ckpt.latest_step() if step is None else step
  if step is None and require_checkpoint:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first or evaluate "
                            "with method=zeroshot")
  meta = ckpt.read_meta(step) if step is not None else {}
  spec, groups = _model(config, workdir, clip, tasks, mesh, meta.get("groups"))
  if meta.get("method") not in (None, spec.method):
    raise setup.ConfigError(f"method={spec.method!r} but the checkpoint in {ckpt.directory} "
                            f"was trained with {meta['method']!r}")
  summary = multitask.param_summary(clip.cfg, spec, len(tasks), groups)
  logging.info("%s", summary["line"])
  class_tokens = setup.class_tokens(clip, spec, tasks)
  total = int(config.train.steps) if spec.family != "zeroshot" else 0
  optimizer = optim.make_optimizer(config.optim, max(total, 1))
  learned = multitask.init_learned(jax.random.key(config.seed), clip.cfg, spec, len(tasks),
                                   groups, clip_params=clip.params)
  return _Run(mesh=mesh, clip=clip, tasks=tasks, names=[t.info.name for t in tasks], ckpt=ckpt,
              step=step, spec=spec, groups=groups, summary=summary,
              dtype=setup.compute_dtype(config),
              frozen=parallel.replicate({"clip": clip.params, "class_tokens": class_tokens},
                                        mesh),
              optimizer=optimizer,
              state=parallel.replicate(train_step.init_state(learned, optimizer), mesh),
              total=total)


def train_and_evaluate(config: mlc.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) one experiment; returns the final results dict (also results.json)."""
  workdir = os.path.abspath(workdir)
  run = _prepare(config, workdir)
  meta = {"groups": [list(g) for g in run.groups] if run.groups else None,
          "task_names": run.names,
          "class_names": [list(t.info.class_names) for t in run.tasks],
          "method": run.spec.method, "prompt": dataclasses.asdict(run.spec),
          "config": json.loads(config.to_json_best_effort())}
  it = None
  if run.total > 0:
    it = pipeline.train_iterator(
        run.tasks, batch_size=config.input.batch_size, image_size=run.clip.cfg.vision.image_size,
        seed=config.seed, augment=setup.augment_config(config), sharding=run.mesh,
        worker_count=config.input.workers)
  restored = run.restore()
  start = 0
  if restored is not None:
    start = restored.step
    if it is not None:
      it.set_state(restored.data_state)
    logging.info("resumed from %s at step %d", run.ckpt.directory, start)

  writer = report.ScalarWriter(setup.workdir_paths(workdir)["tensorboard"])
  eval_fns = evaluation.make_eval_fns(run.clip.cfg, run.spec, run.groups, len(run.tasks),
                                      dtype=run.dtype)

  def run_eval(step: int) -> dict[str, float]:
    acc = run.evaluate(config, eval_fns)
    writer.scalars(step, {f"eval/accuracy/{k}": v for k, v in acc.items()}
                   | {"eval/accuracy/average": float(np.mean(list(acc.values())))})
    logging.info("step %d eval: %s", step, "  ".join(f"{k} {100 * v:.2f}" for k, v in acc.items()))
    return acc

  preempt = _Preemption()
  try:
    if start < run.total:
      _train(config, run, it, meta, writer, start, preempt, run_eval)
      if preempt.requested:
        return {"preempted": True, "step": int(run.state["step"])}
    accuracy = run_eval(run.total)
  finally:
    preempt.restore()
    run.ckpt.close()
    writer.close()
    if it is not None:
      it.close()
  return run.write_results(config, workdir, accuracy, run.total)


def first_non_finite(metrics: dict, first: int) -> Optional[tuple[int, float]]:
  """(step, loss) of the first non-finite step of a call's metrics (scalars for one step,
  stacked [n] for a chunk whose first step is `first`), or None when all were finite."""
  finite = np.asarray(metrics["finite"]).reshape(-1)
  if finite.all():
    return None
  i = int(np.argmin(finite))
  return first + i, float(np.asarray(metrics["loss"]).reshape(-1)[i])


def _train(config, run: _Run, it, meta, writer, start, preempt, run_eval):
  """The step loop; `run.state` always holds the newest good state.

  With train.steps_per_call = K > 1 each jitted call runs a chunk of up to K steps
  (`chunks.plan_chunks`: chunks end at every log / checkpoint / eval step and at the end), so
  logging, checkpoints, evaluation, SIGTERM and resumption happen at the same steps as with K=1.
  """
  total, ckpt = run.total, run.ckpt
  k = int(config.train.get("steps_per_call", 1))
  loss_fn = _loss_fn(run.clip.cfg, run.spec, run.groups, run.dtype, config.clip.remat)
  if k == 1:
    single = train_step.make_train_step(loss_fn, run.optimizer,
                                        accum_steps=config.optim.accum_steps)
    call = lambda n: single(run.state, run.frozen, next(it))
    plan = [1] * (total - start)
  else:
    multi = train_step.make_train_steps(loss_fn, run.optimizer,
                                        accum_steps=config.optim.accum_steps)
    call = lambda n: multi(run.state, run.frozen, it.next_steps(n))
    plan = chunks.plan_chunks(start, total, k, (config.train.log_every, config.train.ckpt_every,
                                                config.train.eval_every))
    logging.info("steps_per_call=%d: %d calls of lengths %s", k, len(plan), sorted(set(plan)))
  schedule = optim.learning_rate_schedule(config.optim, max(total, 1))
  progress = report.Progress(total, config.input.batch_size * len(run.tasks), first_step=start)
  pending = None  # The previous call's metrics: checked one call late so the device never idles.

  def check(metrics, first):
    bad = first_non_finite(metrics, first)
    if bad is not None:
      step, loss = bad
      raise NonFiniteError(
          f"non-finite loss or gradient at step {step} (loss={loss}); the "
          f"update was not applied; last good checkpoint: step {ckpt.latest_step()} in "
          f"{ckpt.directory}. Lower optim.lr, enable optim.grad_clip, or use clip.dtype=float32.")

  done = start
  for n in plan:
    run.state, metrics = call(n)
    if pending is not None:
      check(*pending)
    pending = (metrics, done + 1)
    done += n
    if done % config.train.log_every == 0 or done == total:
      check(*pending)
      last = jax.device_get(metrics)
      if k > 1:  # stacked [n, ...]: the chunk's last step is the step being logged
        last = jax.tree.map(lambda x: x[-1], last)
      loss = float(last["loss"])
      lr = float(schedule(done - 1))
      progress.line(done, loss, lr)
      writer.scalars(done, {"train/loss": loss, "train/lr": lr,
                            "train/grad_norm": float(last["grad_norm"])}
                     | {f"train/task_loss/{name}": float(v) for name, v in
                        zip(run.names, np.asarray(last["per_task_loss"]))})
    saved = done % config.train.ckpt_every == 0 or done == total
    if saved:
      check(*pending)
      ckpt.save(done, run.state, it.get_state(), meta, force=True)
    if _SIGNAL_AT_STEP and done - n < int(_SIGNAL_AT_STEP.split(":")[0]) <= done:
      os.kill(os.getpid(), getattr(signal, _SIGNAL_AT_STEP.split(":")[1]))
    if preempt.requested:
      if not saved:
        check(*pending)
        ckpt.save(done, run.state, it.get_state(), meta, force=True)
      ckpt.wait()
      logging.warning("preempted: checkpoint of step %d saved in %s", done, ckpt.directory)
      return
    if done % config.train.eval_every == 0 and done != total:
      run_eval(done)
  check(*pending)


def evaluate_workdir(config: mlc.ConfigDict, workdir: str, *, step: Optional[int] = None,
                     out: Optional[str] = None) -> dict:
  """Accuracy of a workdir's checkpoint (latest or `step`), or zero-shot CLIP with none."""
  workdir = os.path.abspath(workdir)
  run = _prepare(config, workdir, step=step, require_checkpoint=config.method != "zeroshot")
  try:
    run.restore()
  finally:
    run.ckpt.close()
  eval_fns = evaluation.make_eval_fns(run.clip.cfg, run.spec, run.groups, len(run.tasks),
                                      dtype=run.dtype)
  return run.write_results(config, out or workdir, run.evaluate(config, eval_fns), run.step or 0)


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
