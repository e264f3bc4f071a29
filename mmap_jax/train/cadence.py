"""The step-loop cadence both trainers share: `train/loop.py` and the demo's pretraining.

One place decides, for a run of `total` steps resumed at `start`:
  - which calls run (`train.steps_per_call` K > 1: `chunks.plan_chunks`, chunks end at every
    boundary) and at which steps the host logs, evaluates and checkpoints (`due`: multiples of
    the field, and always the last step);
  - the progress lines (loss, lr, images/s, ETA; report.Progress) and the TensorBoard scalars
    (report.ScalarWriter: process 0 only, tensorboardX);
  - what runs after every call: the checkpoint at a checkpoint step, registered hooks, then
    the preemption check, and on preemption the save-and-stop (a checkpoint of the step just
    done, whether or not it is a checkpoint step; `after` returns True);
  - the non-finite check of each call's metrics (`ran`), deferred by one call so the device
    never waits for the host, and made at once before the host reads or saves a state (log,
    eval, checkpoint and preemption steps).

Why not clu (metric_writers, periodic_actions): clu 0.0.12's `clu.metric_writers` imports its
TensorFlow SummaryWriter at import time (`import tensorflow`), and `clu.periodic_actions` imports
`clu.metric_writers`, so neither imports without TensorFlow, which this project does not install.

Preemption (SIGTERM), and Ctrl-C (SIGINT) alike, stops the run at a call boundary *every
process agrees on*, after saving a checkpoint there; a second Ctrl-C exits at once, unsaved:
  - One process: a Python SIGTERM / SIGINT handler sets a flag, read at the next boundary.
  - Several processes (jax.distributed): `jax.distributed.initialize` starts jax's preemption
    sync manager, whose C++ notifier installs its own SIGTERM handler (std::signal) and polls
    it from a thread; on a notice each process publishes its last call counter through the
    coordination service and all agree on max + 1. A Python `signal.signal(SIGTERM, ...)`
    installed later would replace that handler (one sigaction per signal), so none is installed;
    every process asks `reached(counter)` (orbax `CheckpointManager.reached_preemption`) at
    every call boundary with the number of calls this process has made so far (over all runs
    of the process, e.g. a sweep's: jax's manager keeps the last counter it saw): consecutive
    and never decreasing, as the protocol's "max + 1" needs (chunk end *steps* skip values when
    K > 1, and restart at a resume). Ctrl-C on a process (process 0's terminal, typically) is
    forwarded to that process as SIGTERM, so it takes the same agreed step.
"""
from __future__ import annotations

import dataclasses
import itertools
import os
import signal
import sys
import threading
from typing import Any, Callable, Iterator, Mapping, Optional, Sequence

import jax
import numpy as np
from absl import logging

from mmap_jax.train import chunks, report

# Exit status of a launcher whose run was preempted (SIGTERM) after saving its checkpoint:
# 128 + SIGTERM, what a shell reports for a process SIGTERM ended. Schedulers that restart
# terminated tasks then restart it and the rerun resumes; 0 would read as "finished".
PREEMPTED_EXIT_CODE = 128 + int(signal.SIGTERM)
# ... and of one stopped by Ctrl-C (SIGINT) after saving: 130, what a shell reports for Ctrl-C.
INTERRUPTED_EXIT_CODE = 128 + int(signal.SIGINT)

# hook(first, last): called after every call of every training loop in this process, with the
# (1-based) range of steps that call completed, after that step's log / eval / checkpoint.
Hook = Callable[[int, int], None]
_HOOKS: list[Hook] = []
# Call counter of the agreed preemption check, shared by every run of this process.
_CALLS = itertools.count(1)


def register_hook(hook: Hook) -> Callable[[], None]:
  """Runs `hook` after every call of every training loop of this process; returns its remover.

  For instrumentation that must not live in the loops (profiling windows, fault injection in
  tests: tests/faults.py)."""
  _HOOKS.append(hook)
  return lambda: _HOOKS.remove(hook) if hook in _HOOKS else None


class Preempted(Exception):
  """A run stopped for preemption (or Ctrl-C) after saving the checkpoint of `step` (rerun to
  resume); `exit_code` is what its launcher exits with (143, or 130 after Ctrl-C)."""

  def __init__(self, step: int, directory: str, exit_code: int = PREEMPTED_EXIT_CODE):
    super().__init__(f"preempted: checkpoint of step {step} saved in {directory}")
    self.step, self.directory, self.exit_code = step, directory, exit_code


class NonFiniteError(FloatingPointError):
  """The loss or a gradient became NaN/inf; the last good checkpoint is kept."""


def first_non_finite(metrics: Mapping[str, Any], first: int) -> Optional[tuple[int, float]]:
  """(step, loss) of the first non-finite step of a call's metrics (scalars for one step,
  stacked [n] for a chunk whose first step is `first`), or None when all were finite."""
  finite = np.asarray(metrics["finite"]).reshape(-1)
  if finite.all():
    return None
  i = int(np.argmin(finite))
  return first + i, float(np.asarray(metrics["loss"]).reshape(-1)[i])


def due(step: int, every: int, total: int) -> bool:
  """The boundary rule: multiples of `every` (<= 0: none) and always the last step."""
  return step == total or (every > 0 and step % every == 0)


def _coordinated() -> bool:
  """jax.distributed is up with its preemption sync manager (jax_enable_preemption_service)."""
  if not jax.distributed.is_initialized():
    return False
  from jax.experimental import multihost_utils
  try:  # Counter 0 is the manager's initial value: asking for it changes nothing.
    multihost_utils.reached_preemption_sync_point(0)
  except RuntimeError:
    return False
  return True


class Preemption:
  """SIGTERM or Ctrl-C -> a stop at a call boundary all processes agree on (module docstring).

  `reached(counter)` is the agreed check (`Checkpointer.reached_preemption`); `check()` is
  called by every process after every call. `signum` says which signal asked (None: none yet;
  SIGTERM for the agreed check) and `exit_code` what the launcher exits with. Use as a context
  manager (restores the handlers).
  """

  def __init__(self, reached: Callable[[int], bool], *, coordinated: Optional[bool] = None):
    self._reached = reached
    self.coordinated = _coordinated() if coordinated is None else coordinated
    self.requested = False
    self.signum: Optional[int] = None
    self._previous: dict[int, object] = {}
    main = threading.current_thread() is threading.main_thread()
    if self.coordinated:
      logging.info("preemption: jax's sync manager (SIGTERM on any process stops all at the "
                   "same call)")
      if main:   # jax's C++ notifier owns SIGTERM; Ctrl-C is forwarded to it
        self._previous[signal.SIGINT] = signal.signal(signal.SIGINT, self._forward_sigint)
    elif jax.process_count() > 1:
      logging.warning("preemption: jax.distributed runs without its preemption service "
                      "(jax_enable_preemption_service=False); SIGTERM ends a process unsaved")
    elif main:
      for sig in (signal.SIGTERM, signal.SIGINT):
        self._previous[sig] = signal.signal(sig, self._handle)

  def _second_interrupt(self, signum) -> None:
    if signum == signal.SIGINT and self.signum is not None:
      print("second Ctrl-C: exiting at once, without saving", file=sys.stderr, flush=True)
      os._exit(INTERRUPTED_EXIT_CODE)  # pylint: disable=protected-access

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    self._second_interrupt(signum)
    logging.warning("%s received: saving a checkpoint and exiting%s",
                    signal.Signals(signum).name,
                    " (Ctrl-C again: exit at once, unsaved)" if signum == signal.SIGINT else "")
    self.requested = True
    self.signum = self.signum or signum

  def _forward_sigint(self, signum, frame):  # pylint: disable=unused-argument
    self._second_interrupt(signum)
    logging.warning("SIGINT received: all processes save a checkpoint at an agreed step and exit "
                    "(Ctrl-C again: exit at once, unsaved)")
    self.signum = signal.SIGINT
    os.kill(os.getpid(), signal.SIGTERM)

  @property
  def exit_code(self) -> int:
    return INTERRUPTED_EXIT_CODE if self.signum == signal.SIGINT else PREEMPTED_EXIT_CODE

  def check(self) -> bool:
    """True when the run must stop after the call just made (the same on every process)."""
    if self.coordinated:
      counter = next(_CALLS)
      self.requested = bool(self._reached(counter))
      if self.requested:
        self.signum = self.signum or signal.SIGTERM
        logging.warning("preemption sync point reached at call %d of this process", counter)
    return self.requested

  def restore(self) -> None:
    for sig, previous in self._previous.items():
      signal.signal(sig, previous)
    self._previous = {}

  def __enter__(self) -> "Preemption":
    return self

  def __exit__(self, *exc) -> None:
    self.restore()


@dataclasses.dataclass(frozen=True)
class Call:
  """One jitted call: steps first..last (1-based; `last` steps are done after it)."""
  first: int
  last: int
  log: bool
  eval: bool
  ckpt: bool

  @property
  def n(self) -> int:
    return self.last - self.first + 1


class Cadence:
  """The calls of a run and what happens between them (see the module docstring).

  The loop body is: run the call, `ran(call, metrics)`, log / evaluate as the call's flags say,
  then `if cadence.after(call): stop` (the checkpoint is already saved and written).
  `save(step)` writes the checkpoint of the state the loop holds after `step`; `checkpointer`
  is what it saves into (`wait`, `directory`, `latest_step`). `on_non_finite(step, loss)` is
  called for the first non-finite step of a call; the default raises NonFiniteError naming the
  last good checkpoint (the step's NaN guard already skipped the update). Without `save` the
  cadence saves nothing; only calls handed to `ran` are checked.
  """

  def __init__(self, *, total: int, start: int, log_every: int, eval_every: int,
               ckpt_every: int, images_per_step: int, writer: report.ScalarWriter,
               preemption: Preemption, steps_per_call: int = 1, name: str = "",
               echo: bool = False, hooks: Sequence[Hook] = (),
               save: Optional[Callable[[int], None]] = None, checkpointer: Any = None,
               on_non_finite: Optional[Callable[[int, float], None]] = None):
    self.total, self.start = int(total), int(start)
    self.every = {"log": int(log_every), "eval": int(eval_every), "ckpt": int(ckpt_every)}
    self.k = int(steps_per_call)
    self.writer, self.preemption = writer, preemption
    self.progress = report.Progress(self.total, images_per_step, first_step=self.start)
    self._name, self._echo = name, echo
    self._hooks = tuple(hooks)
    self._save, self._checkpointer = save, checkpointer
    self._on_non_finite = on_non_finite or self._raise_non_finite
    self._pending = None   # (metrics, first step) of the last call, not yet checked
    self.plan = chunks.plan_chunks(self.start, self.total, self.k,
                                   (self.every["log"], self.every["ckpt"], self.every["eval"]))

  def calls(self) -> Iterator[Call]:
    done = self.start
    for n in self.plan:
      first, done = done + 1, done + n
      yield Call(first, done, *(due(done, self.every[f], self.total)
                                for f in ("log", "eval", "ckpt")))
    self._check()

  def ran(self, call: Call, metrics: Mapping[str, Any]) -> None:
    """A call's metrics (with "finite" and "loss"): the previous call's are checked now, this
    call's one call later, or now when this call ends at a log / eval / checkpoint step."""
    self._check()
    self._pending = (metrics, call.first)
    if call.log or call.eval or call.ckpt:
      self._check()

  def _check(self) -> None:
    pending, self._pending = self._pending, None
    if pending is not None:
      metrics, first = pending
      bad = first_non_finite(jax.device_get({k: metrics[k] for k in ("finite", "loss")}),
                             first)
      if bad is not None:
        self._on_non_finite(*bad)

  def _raise_non_finite(self, step: int, loss: float) -> None:
    ckpt = self._checkpointer
    where = (f"; last good checkpoint: step {ckpt.latest_step()} in {ckpt.directory}"
             if ckpt is not None else "")
    raise NonFiniteError(
        f"non-finite loss or gradient at step {step} (loss={loss}); the update was not "
        f"applied{where}. Lower optim.lr, enable optim.grad_clip, or use clip.dtype=float32.")

  def log(self, step: int, loss: float, lr: float, scalars: Mapping[str, float],
          extra: Optional[Mapping[str, float]] = None) -> str:
    """A progress line (logged; printed too with `echo`) and the step's TensorBoard scalars."""
    line = self.progress.line(step, loss, lr, extra=extra, prefix=self._name)
    if self._echo and jax.process_index() == 0:
      print(line, flush=True)
    self.writer.scalars(step, scalars)
    return line

  def after(self, call: Call) -> bool:
    """The checkpoint of a checkpoint step, hooks, then the preemption check. True: the run
    must stop here; the checkpoint of `call.last` is then saved and written."""
    if call.ckpt and self._save is not None:
      self._save(call.last)
    for hook in self._hooks + tuple(_HOOKS):
      hook(call.first, call.last)
    if not self.preemption.check():
      return False
    self._check()
    if self._save is not None:
      if not call.ckpt:
        self._save(call.last)
      if self._checkpointer is not None:
        self._checkpointer.wait()
        logging.warning("%s: checkpoint of step %d saved in %s",
                        f"{self._name} preempted".strip(), call.last,
                        self._checkpointer.directory)
    return True
