"""What a researcher reads: progress lines, TensorBoard scalars, and the final accuracy table."""
from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from typing import Mapping, Optional, Sequence

import jax
from absl import logging

from mmap_jax import paths


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


def write_results(workdir: paths.PathLike, *, task_names: Sequence[str],
                  accuracy: Mapping[str, float], num_classes: Mapping[str, int],
                  trainable_params: int, trainable_percent: float, method: str, step: int,
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
    workdir = paths.as_path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    split = result.get("split", "test")
    notes = [f"selection: {result['selection']['reason']}"] if result.get("selection") else []
    # results.md first, results.json last and atomically: launch.sweep takes a results.json as
    # "this setting finished", so a run killed mid-write must not leave half of one.
    paths.write_text_atomic(workdir / "results.md",
                            accuracy_table(task_names, accuracy, trainable_params,
                                           trainable_percent,
                                           title=f"{method} @ step {step} ({split} accuracy)")
                            + "\n" + "".join(f"\n{n}\n" for n in notes))
    paths.write_text_atomic(workdir / "results.json", json.dumps(result, indent=2))
  return result


class _EpathRecordFile:
  """An event file on an object store: the whole file is uploaded again on every flush.

  Object stores cannot append, and tensorboardX's own gs:// / s3:// writers need
  google-cloud-storage / boto3 with credentials of their own; this goes through epath (the
  filesystem layer of every other workdir file, one set of credentials). Each upload replaces
  the object atomically, so TensorBoard always reads a complete prefix of the log. Cost: the
  file (scalars only: ~60 bytes per value) is re-sent every `flush_secs`.
  """

  def __init__(self, path: str):
    self._path, self._buffer, self._sent = paths.as_path(path), io.BytesIO(), -1

  def write(self, data: bytes) -> None:
    self._buffer.write(data)

  def flush(self) -> None:
    if self._buffer.tell() != self._sent:
      paths.write_bytes_atomic(self._path, self._buffer.getvalue())
      self._sent = self._buffer.tell()

  def close(self) -> None:
    self.flush()


class _EpathRecordFactory:
  def open(self, path: str) -> _EpathRecordFile:
    return _EpathRecordFile(path)

  def directory_check(self, path: str) -> None:
    del path  # Object stores have no directories to create.


@contextlib.contextmanager
def _without_torch_import():
  """tensorboardX's writer module tries `import torch` (only to accept torch tensors in
  add_scalar); where torch is installed but not loaded, every launch would pay for importing
  torch, for nothing this trainer logs. While tensorboardX imports, `import torch` fails as if torch
  were absent, so tensorboardX falls back to numpy; a later `import torch` works as usual."""
  if "torch" in sys.modules:
    yield
    return
  sys.modules["torch"] = None   # makes `import torch` raise ImportError
  try:
    yield
  finally:
    if sys.modules.get("torch", 0) is None:
      del sys.modules["torch"]


def _tensorboardx():
  with _without_torch_import():
    import tensorboardX
  return tensorboardX


def _register_epath_event_files() -> None:
  """tensorboardX writes `scheme://` logdirs of every epath scheme through _EpathRecordFile."""
  record_writer = _tensorboardx().record_writer
  for scheme in paths.URI_SCHEMES:
    record_writer.register_writer_factory(scheme, _EpathRecordFactory())


class ScalarWriter:
  """TensorBoard event files (tensorboardX: no TensorFlow), written by process 0 only.

  A local logdir is written as tensorboardX always does; a `gs://`-style one through epath
  (`_EpathRecordFile`).
  """

  def __init__(self, logdir: paths.PathLike, purge_step: Optional[int] = None):
    """`purge_step` (a resumed run: restored step + 1): the new event file starts with a
    SessionLog.START at that step, and TensorBoard drops the earlier files' events at and after
    it, so steps logged again after a resume appear once."""
    self._writer = None
    if jax.process_index() == 0:
      SummaryWriter = _tensorboardx().SummaryWriter
      logdir = paths.as_path(logdir)
      if paths.is_uri(logdir):
        _register_epath_event_files()
      self._writer = SummaryWriter(logdir=str(logdir), flush_secs=10, purge_step=purge_step)

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
    self._created = time.perf_counter()

  def line(self, step: int, loss: float, lr: float, *,
           extra: Optional[Mapping[str, float]] = None, prefix: str = "") -> str:
    """`[prefix ]step s/T  loss  lr  [name value ...]  img/s  ETA`, logged and returned.

    The first line's interval includes compilation, so it reports that time instead of a rate
    (`compile + first steps 12.3s`); the rate and ETA are timed from it on."""
    now = time.perf_counter()
    if self._t0 is None:
      timing = f"compile + first steps {now - self._created:.1f}s"
      self._t0, self._s0 = now, step
    else:
      sps = (step - self._s0) / max(now - self._t0, 1e-9)
      rate = sps * self.images_per_step
      eta = (self.total - step) / max(sps, 1e-9)
      timing = f"{rate:.1f} img/s  ETA {_fmt_seconds(eta)}"
    more = "".join(f"{k} {v:.4g}  " for k, v in (extra or {}).items())
    msg = (f"{prefix + ' ' if prefix else ''}step {step}/{self.total}  loss {loss:.4f}  "
           f"lr {lr:.2e}  {more}{timing}")
    logging.info(msg)
    return msg


def _fmt_seconds(s: float) -> str:
  s = int(s)
  return f"{s // 3600}h{s % 3600 // 60:02d}m{s % 60:02d}s" if s >= 3600 else f"{s // 60}m{s % 60:02d}s"
