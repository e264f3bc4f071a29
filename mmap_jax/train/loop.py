"""`train_and_evaluate(config, workdir)`: the whole run, wired from the other modules.

Order: validate the config (before anything compiles) -> load the frozen CLIP -> build the tasks
-> task groups (mmap_mt: groups.mode, see grouping_run) -> init or restore the learned state -> jitted
data-parallel steps with periodic logging, VALIDATION evaluation (every train.eval_every steps
and at the last step) and checkpoints -> selection of the reported state (`selection`,
train.select) -> the test split evaluated ONCE on that state, the accuracy table
(results.json / results.md) and TensorBoard scalars. The test split is read nowhere else.

Resumption: the latest complete checkpoint of `workdir/checkpoints` restores the learned pytree,
optimizer state, step, input-iterator state and the validation record with the selected state,
so a killed and restarted run reaches the same final prompts and the same selection as an
uninterrupted one. SIGTERM (preemption) saves a checkpoint before exiting, at a call boundary all
processes agree on (`cadence.Preemption`). The step loop's cadence (calls, log / eval / checkpoint
steps, progress lines, TensorBoard, hooks) is `train/cadence.py`, shared with the demo pretraining.
"""
from __future__ import annotations

import dataclasses
import socket
import time
from typing import Any, Optional

import jax
import ml_collections as mlc
import numpy as np
from absl import logging

from mmap_jax import parallel, paths
from mmap_jax.data import pipeline, sources
from mmap_jax.prompts import multitask
from mmap_jax.prompts.spec import GROUPED_METHODS
from mmap_jax.train import cadence as cadence_lib, checkpointing, evaluate as evaluation
from mmap_jax.train import correctness
from mmap_jax.train import grouping_run, optim, report
from mmap_jax.train import run_spec as run_spec_lib
from mmap_jax.train import selection as selection_lib, setup, step as train_step
from mmap_jax.train.run_spec import RunSpec
from mmap_jax.train import trained as trained_lib

# Exit status of a launcher whose run was preempted after saving its checkpoint (143).
PREEMPTED_EXIT_CODE = cadence_lib.PREEMPTED_EXIT_CODE


def _model(rs: RunSpec, workdir: str, clip: setup.Clip, tasks, mesh,
           groups_from_checkpoint: Optional[list] = None):
  """(spec, groups, group_init) for this run; runs the grouping warm-up when groups.mode asks.

  `group_init` (groups.init_from_warmup) is the warm-up's shared MmAP that every group-shared
  MmAP starts from, else None. A checkpoint's groups win (its learned state replaces the init).
  """
  spec = rs.prompt_for(clip.cfg)
  groups, group_init = None, None
  if spec.grouped:
    if groups_from_checkpoint is not None:
      groups = tuple(tuple(g) for g in groups_from_checkpoint)
    else:
      result = grouping_run.task_groups(rs, workdir, clip, tasks, mesh)
      groups = result.groups
      if rs.groups.init_from_warmup:
        group_init = result.warmup["shared"]
  return spec, groups, group_init


def _checkpointer(rs: RunSpec, workdir, read_only: bool = False) -> checkpointing.Checkpointer:
  return checkpointing.Checkpointer(setup.workdir_paths(workdir)["checkpoints"],
                                    keep=rs.train.keep_checkpoints, read_only=read_only)


@dataclasses.dataclass
class _Run:
  """Everything a run has prepared before its first compiled step."""
  rs: RunSpec
  mesh: Any
  clip: setup.Clip
  tasks: list
  names: list
  ckpt: checkpointing.Checkpointer
  step: Optional[int]        # the checkpoint to restore (None: fresh)
  spec: Any
  groups: Any
  summary: dict
  frozen: dict               # replicated {"clip", "class_tokens"}
  optimizer: Any
  state: dict                # replicated, freshly initialised (restore() replaces it)
  total: int                 # training steps (0 for zero-shot)
  selection: Optional[selection_lib.Selection] = None  # validation record (training runs)
  selected: Any = None       # the selected learned pytree (best_val; None: run.state's)
  grouping_steps: int = 0    # the grouping warm-up's optimizer steps (0: none)
  budget_steps: int = 0      # train.steps: every method's optimizer steps on its final params
  t0: float = dataclasses.field(default_factory=time.perf_counter)
  prior_wall: float = 0.0    # wall seconds of earlier invocations (from the checkpoint)

  def wall_seconds(self) -> float:
    return self.prior_wall + time.perf_counter() - self.t0

  def cost(self) -> dict:
    """The training cost results.json reports (issue 29): optimizer steps on the final
    params, the grouping warm-up's steps, whether they count against the budget, wall time."""
    counted = self.total + self.grouping_steps == self.budget_steps and self.grouping_steps > 0
    return {"steps": self.total, "grouping_warmup_steps": self.grouping_steps,
            "grouping_counted_in_budget": bool(counted), "budget_steps": self.budget_steps,
            "wall_seconds": round(self.wall_seconds(), 2), "host": socket.gethostname()}
  text_sharding: Any = parallel.REPLICATED_TEXT  # how the text tower splits the class prompts

  def restore(self) -> Optional[checkpointing.Restored]:
    if self.step is None:
      return None
    restored = self.ckpt.restore(self.state, self.step)
    self.state = restored.state
    self.selected = restored.selected
    return restored

  def evaluate(self, eval_fns, *, split: str = "test",
               learned: Any = None, return_correct: bool = False) -> dict[str, float]:
    """{task: accuracy} on `split` of `learned` (default: the current state's); with
    `return_correct`, also the per-example correctness (`evaluation.evaluate`)."""
    return evaluation.evaluate(
        self.state["learned"] if learned is None else learned, self.frozen["clip"],
        self.frozen["class_tokens"], self.tasks,
        eval_fns, batch_size=self.rs.input.eval_batch_size,
        image_size=self.clip.cfg.vision.image_size, sharding=self.mesh,
        worker_count=self.rs.input.workers, split=split, return_correct=return_correct)

  def save(self, step: int, data_state: Any, meta: dict) -> None:
    """A checkpoint of the current state, with the validation record and the selected state."""
    meta = meta | {"wall_seconds": self.wall_seconds()}
    if self.selection is not None:
      meta = meta | {"selection": self.selection.to_json()}
    self.ckpt.save(step, self.state, data_state, meta, force=True, selected=self.selected)

  def write_results(self, out: str, accuracy: dict, step: int, *,
                    split: str = "test", val_accuracy: Optional[dict] = None,
                    selection: Optional[dict] = None, fields: Optional[dict] = None) -> dict:
    names, groups = self.names, self.groups
    extra = {"groups": [[names[i] for i in g] for g in groups] if groups else None,
             "clip": self.clip.path, "dataset": self.rs.data.name, "split": split,
             "trained_steps": self.total,
             "optim": self.rs.recipe.to_dict(),
             "splits": sources.splits_record(self.tasks), "run_spec": self.rs.to_dict()}
    if val_accuracy is not None:
      extra["val_accuracy"] = dict(val_accuracy)
      extra["val_average"] = selection_lib.mean(val_accuracy) if val_accuracy else None
    if selection is not None:
      extra["selection"] = selection
    extra.update(fields or {})
    result = report.write_results(
        out, task_names=names, accuracy=accuracy,
        num_classes={t.info.name: t.info.num_classes for t in self.tasks},
        trainable_params=self.summary["trainable"],
        trainable_percent=self.summary["percent_of_clip"], method=self.spec.method, step=step,
        extra=extra)
    if jax.process_index() == 0:
      print(report.accuracy_table(names, accuracy, self.summary["trainable"],
                                  self.summary["percent_of_clip"],
                                  title=f"{self.spec.method} @ step {step} ({split} accuracy)"),
            flush=True)
    return result


def resolve(config: mlc.ConfigDict) -> RunSpec:
  """The entry points' one resolution of a config, for this process's device mesh."""
  return run_spec_lib.resolve(config, jax.device_count())


def _prepare(rs: RunSpec, workdir: str, *, step: Optional[int] = None,
             require_checkpoint: bool = False, read_only: bool = False) -> _Run:
  """`read_only` (evaluation): the workdir's checkpoints are read, nothing there is created."""
  t0 = time.perf_counter()  # the run's wall time includes loading and the grouping warm-up
  mesh = parallel.data_mesh()
  if not read_only:
    setup.check_workdir(workdir)
    paths.as_path(workdir).mkdir(parents=True, exist_ok=True)
  clip, tasks = setup.load_inputs(rs)
  logging.info("tasks: %s", ", ".join(f"{t.info.name} ({t.info.num_classes} classes, "
                                      f"{t.info.num_train} train / {t.info.num_val} val / "
                                      f"{t.info.num_test} test)" for t in tasks))
  ckpt = _checkpointer(rs, workdir, read_only=read_only)
  # Process 0's view of the shared directory decides, so every process restores the same step.
  step = parallel.broadcast_from_process0(ckpt.latest_step()) if step is None else step
  if step is None and require_checkpoint:
    raise FileNotFoundError(f"no checkpoint in {ckpt.directory}; train first or evaluate "
                            "with method=zeroshot")
  meta = ckpt.read_meta(step) if step is not None else {}
  spec, groups, group_init = _model(rs, workdir, clip, tasks, mesh, meta.get("groups"))
  if meta.get("method") not in (None, spec.method):
    raise setup.ConfigError(f"method={spec.method!r} but the checkpoint in {ckpt.directory} "
                            f"was trained with {meta['method']!r}")
  summary = multitask.param_summary(clip.cfg, spec, len(tasks), groups)
  logging.info("%s", summary["line"])
  class_tokens = setup.class_tokens(clip, spec, tasks)
  # Equal budgets: train.steps optimizer steps on the final params for every method; a grouping
  # warm-up whose prompts start the group units (groups.init_from_warmup) is part of them.
  grouping_steps = rs.groups.warmup_total_steps
  counted = grouping_steps if rs.groups.init_from_warmup else 0
  total = rs.train.steps - counted if spec.family != "zeroshot" else 0
  if total > 0:
    setup.check_validation(rs.train.select, rs.data.val_fraction, tasks)
  optimizer = optim.make_optimizer(rs.recipe.recipe, max(total, 1))
  learned = multitask.init_learned(jax.random.key(rs.seed), clip.cfg, spec, len(tasks),
                                   groups, clip_params=clip.params, tokenizer=clip.tokenizer)
  if group_init is not None:
    learned = multitask.init_groups_from_shared(learned, group_init)
  return _Run(rs=rs, mesh=mesh, clip=clip, tasks=tasks, names=[t.info.name for t in tasks],
              ckpt=ckpt,
              step=step, spec=spec, groups=groups, summary=summary,
              frozen=parallel.replicate({"clip": clip.params, "class_tokens": class_tokens},
                                        mesh),
              optimizer=optimizer,
              state=parallel.replicate(train_step.init_state(learned, optimizer), mesh),
              total=total, grouping_steps=grouping_steps,
              budget_steps=total and rs.train.steps, t0=t0,
              text_sharding=rs.text_sharding(mesh))


def train_and_evaluate(config: mlc.ConfigDict, workdir: str) -> dict:
  """Runs (or resumes) one experiment; returns the final results dict (also results.json)."""
  return train_resolved(resolve(config), workdir)


def train_resolved(rs: RunSpec, workdir: str) -> dict:
  """`train_and_evaluate` of a resolved run (nothing below reads the ConfigDict again)."""
  workdir = paths.as_path(workdir)
  run = _prepare(rs, workdir)
  meta = {"groups": [list(g) for g in run.groups] if run.groups else None,
          "task_names": run.names,
          "class_names": [list(t.info.class_names) for t in run.tasks],
          "method": run.spec.method, "prompt": dataclasses.asdict(run.spec),
          "config": rs.config_dict(), "optim": rs.recipe.to_dict(),
          "run_spec": rs.to_dict()}
  it = None
  if run.total > 0:
    it = pipeline.train_iterator(
        run.tasks, batch_size=rs.input.batch_size, image_size=run.clip.cfg.vision.image_size,
        seed=rs.seed, augment=rs.input.augment, sharding=run.mesh,
        worker_count=rs.input.workers)
  restored = run.restore()
  start = 0
  if restored is not None:
    start = restored.step
    run.prior_wall = float(restored.meta.get("wall_seconds", 0.0))
    if it is not None:
      it.set_state(restored.data_state)
    logging.info("resumed from %s at step %d", run.ckpt.directory, start)

  # Resumed: TensorBoard hides the earlier event files' steps after the restored one, which
  # this run logs again (a kill after the last checkpoint), so each step shows once.
  writer = report.ScalarWriter(setup.workdir_paths(workdir)["tensorboard"],
                               purge_step=start + 1 if start else None)
  eval_fns = evaluation.make_eval_fns(run.clip.cfg, run.spec, run.groups, len(run.tasks),
                                      dtype=run.rs.compute_dtype, text_sharding=run.text_sharding)
  if run.total > 0:
    run.selection = selection_lib.Selection.from_json(
        restored.meta.get("selection") if restored is not None else None, rs.train.select)
  has_val = any(len(t.val) for t in run.tasks)

  def log_eval(step: int, split: str, acc: dict[str, float], prefix: str) -> None:
    writer.scalars(step, {f"{prefix}/{k}": v for k, v in acc.items()}
                   | {f"{prefix}/average": selection_lib.mean(acc)})
    logging.info("step %d %s: %s", step, split,
                 "  ".join(f"{k} {100 * v:.2f}" for k, v in acc.items()))

  def run_eval(step: int) -> Optional[dict[str, float]]:
    """Validation only (never test): records it and keeps the selected state."""
    if not has_val:
      return None
    acc = run.evaluate(eval_fns, split="val")
    log_eval(step, "val", acc, "eval/val_accuracy")
    if run.selection.record(step, acc) and run.selection.rule == "best_val":
      run.selected = jax.tree.map(jax.numpy.copy, run.state["learned"])  # Survives donation.
    return acc

  preempt = cadence_lib.Preemption(run.ckpt.reached_preemption)
  try:
    if start < run.total:
      if _train(run, it, meta, writer, start, preempt, run_eval):
        return {"preempted": True, "step": int(run.state["step"]),
                "exit_code": preempt.exit_code, "checkpoints": str(run.ckpt.directory)}
    if run.total == 0:  # Zero-shot: one state, validation and test once each.
      val = run.evaluate(eval_fns, split="val") if has_val else {}
      record, learned, step = selection_lib.zeroshot_record(val), None, 0
    else:
      record = run.selection.to_json()
      val = (run.selection.entry() or {}).get("val", {})
      step = run.selection.step if run.selection.step is not None else run.total
      learned = run.selected if run.selection.rule == "best_val" else None
      logging.info("selected step %d: %s", step, record["reason"])
    if val:
      log_eval(run.total, "selected val", val, "final/val_accuracy")
    accuracy, correct = run.evaluate(eval_fns, split="test", learned=learned,
                                     return_correct=True)  # The only test read.
    correctness.write_correct(workdir, correct)  # before results.json (the sweep's bootstrap)
    log_eval(run.total, f"test (step {step})", accuracy, "final/test_accuracy")
  finally:
    preempt.restore()
    run.ckpt.close()
    writer.close()
    if it is not None:
      it.close()
  return run.write_results(workdir, accuracy, step, val_accuracy=val, selection=record,
                           fields={"cost": run.cost()})


def _train(run: _Run, it, meta, writer, start, preempt, run_eval) -> bool:
  """The step loop; `run.state` always holds the newest good state. True: stopped preempted.

  With train.steps_per_call = K > 1 each jitted call runs a chunk of up to K steps
  (`chunks.plan_chunks`: chunks end at every log / checkpoint / eval step and at the end), so
  logging, checkpoints, evaluation, SIGTERM and resumption happen at the same steps as with K=1.
  The calls, checkpoints, the non-finite check and save-on-preemption are `cadence.Cadence`'s.
  """
  total, rs = run.total, run.rs
  k = rs.train.steps_per_call
  loss_fn = train_step.make_loss_fn(run.clip.cfg, run.spec, run.groups, dtype=rs.compute_dtype,
                                    remat=rs.remat, text_sharding=run.text_sharding,
                                    seed=rs.seed)
  cadence = cadence_lib.Cadence(
      total=total, start=start, log_every=rs.train.log_every,
      eval_every=rs.train.eval_every, ckpt_every=rs.train.ckpt_every,
      images_per_step=rs.input.batch_size * len(run.tasks), writer=writer,
      preemption=preempt, steps_per_call=k, checkpointer=run.ckpt,
      save=lambda step: run.save(step, it.get_state(), meta))
  if k == 1:
    single = train_step.make_train_step(loss_fn, run.optimizer,
                                        accum_steps=rs.train.accum_steps, pass_step=True)
    call = lambda n: single(run.state, run.frozen, next(it))
  else:
    multi = train_step.make_train_steps(loss_fn, run.optimizer,
                                        accum_steps=rs.train.accum_steps, pass_step=True)
    call = lambda n: multi(run.state, run.frozen, it.next_steps(n))
    logging.info("steps_per_call=%d: %d calls of lengths %s", k, len(cadence.plan),
                 sorted(set(cadence.plan)))
  schedule = optim.learning_rate_schedule(rs.recipe.recipe, max(total, 1))

  for c in cadence.calls():
    done = c.last
    run.state, metrics = call(c.n)
    cadence.ran(c, metrics)   # the non-finite check (deferred one call, at once at boundaries)
    if c.log:
      last = jax.device_get(metrics)
      if k > 1:  # stacked [n, ...]: the chunk's last step is the step being logged
        last = jax.tree.map(lambda x: x[-1], last)
      loss = float(last["loss"])
      lr = float(schedule(done - 1))
      cadence.log(done, loss, lr, {"train/loss": loss, "train/lr": lr,
                                   "train/grad_norm": float(last["grad_norm"])}
                  | {f"train/task_loss/{name}": float(v) for name, v in
                     zip(run.names, np.asarray(last["per_task_loss"]))})
    if c.eval:
      run_eval(done)  # Validation, before the save: the checkpoint then holds its record.
    if cadence.after(c):  # checkpoint, hooks, preemption (all processes agree; saved if so)
      return True
  return False


EVAL_STATES = ("selected", "checkpoint")


def evaluate_workdir(config: Optional[mlc.ConfigDict], workdir: str, *, step: Optional[int] = None,
                     out: Optional[str] = None, split: str = "test",
                     state: str = "selected") -> dict:
  """Accuracy on `split` ('test', default, or 'val') of a workdir's checkpoint, or zero-shot CLIP.

  The checkpoint is the latest one or `step`. `state='selected'` (default) evaluates the state
  that checkpoint's validation record selected (train.select; what results.json reports when it
  is the final checkpoint), `state='checkpoint'` the checkpoint's own current state. The results
  file says which split (`split`) and which state (`evaluated_state`, `step`) it reports.
  `config` None: the config the checkpoint recorded (`trained.recorded_config`).
  A test evaluation also writes the per-image correctness (`test_correct.npz`, what the sweep's
  paired bootstrap resamples) beside its results.
  """
  if split not in pipeline.EVAL_SPLITS:
    raise ValueError(f"split={split!r}; allowed: {pipeline.EVAL_SPLITS}")
  if state not in EVAL_STATES:
    raise ValueError(f"state={state!r}; allowed: {EVAL_STATES}")
  workdir = paths.as_path(workdir)
  if config is None:
    config = trained_lib.recorded_config(workdir, step)
  rs = resolve(config)
  run = _prepare(rs, workdir, step=step, require_checkpoint=rs.method != "zeroshot",
                 read_only=True)
  try:
    restored = run.restore()
  finally:
    run.ckpt.close()
  if split == "val" and not any(len(t.val) for t in run.tasks):
    raise setup.ConfigError("split='val' but no task has validation examples "
                            f"(data.val_fraction={rs.data.val_fraction})")
  record = (restored.meta.get("selection") if restored is not None else None) or None
  learned, at = None, run.step or 0
  # Under select=last (or before the first validation) a checkpoint's own state is its selection.
  if (state == "selected" and record and record.get("rule") == "best_val"
      and record.get("step") is not None):
    at, learned = int(record["step"]), run.selected
    if learned is None:
      raise FileNotFoundError(f"checkpoint {run.step} in {run.ckpt.directory} holds no "
                              f"selected state for step {at}")
  eval_fns = evaluation.make_eval_fns(run.clip.cfg, run.spec, run.groups, len(run.tasks),
                                      dtype=run.rs.compute_dtype, text_sharding=run.text_sharding)
  accuracy, correct = run.evaluate(eval_fns, split=split, learned=learned,
                                   return_correct=True)
  if split == "test":
    correctness.write_correct(out or workdir, correct)  # before results.json, as in training
  return run.write_results(out or workdir, accuracy, at, split=split, selection=record,
                           fields={"evaluated_state": state, "checkpoint_step": run.step})


def group_tasks(config: mlc.ConfigDict, workdir: str) -> list[list[str]]:
  """Runs only the grouping warm-up (whatever config.method says) and returns groups by name."""
  mesh = parallel.data_mesh()
  d = config.to_dict()   # the warm-up of a gradient grouping, whatever method / mode say
  d["method"] = d["method"] if d["method"] in GROUPED_METHODS else "mmap_mt"
  d["groups"]["mode"] = "gradient"
  rs = resolve(mlc.ConfigDict(d))
  setup.check_workdir(workdir)
  workdir = paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  clip, tasks = setup.load_inputs(rs)
  names = [t.info.name for t in tasks]
  groups = grouping_run.run_grouping(rs, workdir, clip, tasks, mesh).groups
  return [[names[i] for i in g] for g in groups]
