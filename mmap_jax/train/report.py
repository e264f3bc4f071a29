"""What a researcher reads: progress lines, TensorBoard scalars, and the final accuracy table."""
from __future__ import annotations

import json
import os
import time
from typing import Mapping, Optional, Sequence

import jax
from absl import logging


def accuracy_table(task_names: Sequence[str], accuracy: Mapping[str, float],
                   trainable_params: int, trainable_percent: float, title: str = "") -> str:
  """Markdown table: rows = tasks + average, accuracy in %, then the trainable parameter budget."""
  lines = []
  if title:
    lines += [f"### {title}", ""]
  lines += ["| task | accuracy (%) |", "|---|---:|"]
  for t in task_names:
    lines.append(f"| {t} | {100 * accuracy[t]:.2f} |")
  avg = sum(accuracy[t] for t in task_names) / max(len(task_names), 1)
  lines.append(f"| **average** | **{100 * avg:.2f}** |")
  lines += ["", f"trainable parameters: {trainable_params:,} ({trainable_percent:.4f}% of CLIP)"]
  return "\n".join(lines)


def write_results(workdir: str, *, task_names: Sequence[str], accuracy: Mapping[str, float],
                  num_classes: Mapping[str, int], trainable_params: int,
                  trainable_percent: float, method: str, step: int,
                  extra: Optional[dict] = None) -> dict:
  """results.json + results.md in the workdir (process 0 only); returns the JSON dict."""
  avg = sum(accuracy[t] for t in task_names) / max(len(task_names), 1)
  result = {
      "method": method, "step": int(step),
      "tasks": {t: {"num_classes": int(num_classes[t]), "accuracy": float(accuracy[t])}
                for t in task_names},
      "average": float(avg),
      "trainable_params": int(trainable_params),
      "trainable_percent": float(trainable_percent),
      **(extra or {}),
  }
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    split = result.get("split", "test")
    notes = [f"selection: {result['selection']['reason']}"] if result.get("selection") else []
    # results.md first, results.json last and atomically: launch.sweep takes a results.json as
    # "this setting finished", so a run killed mid-write must not leave half of one.
    _write_atomic(os.path.join(workdir, "results.md"),
                  accuracy_table(task_names, accuracy, trainable_params, trainable_percent,
                                 title=f"{method} @ step {step} ({split} accuracy)") + "\n"
                  + "".join(f"\n{n}\n" for n in notes))
    _write_atomic(os.path.join(workdir, "results.json"), json.dumps(result, indent=2))
  return result


def _write_atomic(path: str, text: str) -> None:
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w") as f:
    f.write(text)
  os.replace(tmp, path)


class ScalarWriter:
  """TensorBoard event files (tensorboardX: no TensorFlow), written by process 0 only."""

  def __init__(self, logdir: str):
    self._writer = None
    if jax.process_index() == 0:
      from tensorboardX import SummaryWriter
      self._writer = SummaryWriter(logdir=logdir, flush_secs=10)

  def scalars(self, step: int, values: Mapping[str, float]) -> None:
    if self._writer is None:
      return
    for k, v in values.items():
      self._writer.add_scalar(k, float(v), global_step=int(step))

  def close(self) -> None:
    if self._writer is not None:
      self._writer.flush()
      self._writer.close()


class Progress:
  """Periodic log lines with step, loss, throughput (images/s) and ETA."""

  def __init__(self, total_steps: int, images_per_step: int, first_step: int = 0):
    self.total, self.images_per_step = total_steps, images_per_step
    self._t0, self._s0 = None, first_step

  def line(self, step: int, loss: float, lr: float, *,
           extra: Optional[Mapping[str, float]] = None, prefix: str = "") -> str:
    """`[prefix ]step s/T  loss  lr  [name value ...]  img/s  ETA`, logged and returned."""
    now = time.perf_counter()
    if self._t0 is None:  # The first interval includes compilation: start timing after it.
      self._t0, self._s0 = now, step
      rate = eta = float("nan")
    else:
      sps = (step - self._s0) / max(now - self._t0, 1e-9)
      rate = sps * self.images_per_step
      eta = (self.total - step) / max(sps, 1e-9)
    more = "".join(f"{k} {v:.4g}  " for k, v in (extra or {}).items())
    msg = (f"{prefix + ' ' if prefix else ''}step {step}/{self.total}  loss {loss:.4f}  "
           f"lr {lr:.2e}  {more}{rate:.1f} img/s  ETA {_fmt_seconds(eta)}")
    logging.info(msg)
    return msg


def _fmt_seconds(s: float) -> str:
  if s != s:  # NaN
    return "--"
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
