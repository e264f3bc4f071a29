"""Host-side batch making: which records a step reads, decode, augment, stack.

Both loaders are plain picklable callables (numpy + PIL only), so grain can
run them in worker processes: `TrainStepLoader(step)` returns this process's
slice of a training step for every task, `EvalBatchLoader((task, batch))` one
padded eval batch slice. Everything they return is a pure function of their
arguments and the seed; see `mmap_jax.data.pipeline` for the why.
"""

from __future__ import annotations

import collections
import json
import os
import threading
from typing import Sequence

import numpy as np

from mmap_jax.data import images
from mmap_jax.data import preprocess

_SHUFFLE_TAG = 0x5F1E
_AUGMENT_TAG = 0xA065

# Test hook: a file path; every record read is appended to it as a JSON line (kind, seed, step or
# batch, task, this process's slice start, record indices), so the multi-process tests can check
# that no record is read by two processes within a step. Unset in real runs.
_READ_LOG = os.environ.get("MMAP_JAX_READ_LOG")


def _log_reads(**entry) -> None:
  with open(_READ_LOG, "a") as f:  # one short line per write: O_APPEND keeps lines whole
    f.write(json.dumps(entry) + "\n")


class TrainStepLoader:
  """Step index -> this process's slice of the step's batch, for every task.

  Task t's stream is its train split shuffled per epoch by (seed, task_id,
  epoch); step s covers stream positions [s*B, (s+1)*B), of which this
  process reads [s*B + local_start, s*B + local_start + local_size).
  """

  def __init__(self, sources: Sequence[Sequence[dict]], task_ids: Sequence[int],
               batch_size: int, local_start: int, local_size: int, image_size: int,
               seed: int, augment: preprocess.AugmentConfig, with_index: bool = False):
    self.sources = list(sources)
    self.sizes = [len(s) for s in self.sources]
    self.task_ids = [int(t) for t in task_ids]
    self.batch_size = batch_size
    self.local_start = local_start
    self.local_size = local_size
    self.image_size = image_size
    self.seed = seed
    self.augment = augment
    self.with_index = with_index
    self._init_cache()

  def _init_cache(self) -> None:
    # Recent epoch permutations; grain may call us from several threads.
    self._perms: collections.OrderedDict[tuple[int, int], np.ndarray] = collections.OrderedDict()
    self._lock = threading.Lock()

  def __getstate__(self) -> dict:
    state = dict(self.__dict__)
    del state["_perms"], state["_lock"]  # Locks do not pickle; caches need not.
    return state

  def __setstate__(self, state: dict) -> None:
    self.__dict__.update(state)
    self._init_cache()

  def _perm(self, t: int, epoch: int) -> np.ndarray:
    key = (t, epoch)
    with self._lock:
      perm = self._perms.get(key)
      if perm is None:
        rng = np.random.default_rng([_SHUFFLE_TAG, self.seed, self.task_ids[t], epoch])
        perm = self._perms[key] = rng.permutation(self.sizes[t])
        while len(self._perms) > 3 * len(self.sources):
          self._perms.popitem(last=False)
      return perm

  def positions(self, step: int) -> np.ndarray:
    """Stream positions this process reads at `step` (same for every task)."""
    first = step * self.batch_size + self.local_start
    return np.arange(first, first + self.local_size, dtype=np.int64)

  def record_indices(self, t: int, step: int) -> np.ndarray:
    pos = self.positions(step)
    n = self.sizes[t]
    return np.array([self._perm(t, int(p // n))[p % n] for p in pos], np.int64)

  def __call__(self, step: int) -> dict[str, np.ndarray]:
    step = int(step)
    num_tasks, size = len(self.sources), self.image_size
    out = {
        "image": np.empty((num_tasks, self.local_size, size, size, 3), np.float32),
        "label": np.empty((num_tasks, self.local_size), np.int32),
        "task": np.asarray(self.task_ids, np.int32),
    }
    if self.with_index:
      out["index"] = np.empty((num_tasks, self.local_size), np.int32)
    min_side = self.augment.min_decode_side(size) if self.augment.random_resized_crop else None
    positions = self.positions(step)
    for t, source in enumerate(self.sources):
      indices = self.record_indices(t, step)
      records = source.__getitems__(indices.tolist())
      for b, (record, pos) in enumerate(zip(records, positions)):
        rng = np.random.default_rng([_AUGMENT_TAG, self.seed, self.task_ids[t], int(pos)])
        image = images.decode_rgb(record["image"], min_short_side=min_side)
        pixels = preprocess.train_pixels(image, size, rng, self.augment)
        preprocess.normalize_into(pixels, out["image"][t, b])
        out["label"][t, b] = record["label"]
      if self.with_index:
        out["index"][t] = indices
      if _READ_LOG:
        _log_reads(kind="train", seed=self.seed, step=step, task=self.task_ids[t],
                   start=self.local_start, indices=indices.tolist())
    return out


class EvalBatchLoader:
  """(task position, batch number) -> this process's slice of that eval batch.

  Batch j of a task covers test records [j*B, (j+1)*B); rows past the end are
  zeros with mask False.
  """

  def __init__(self, sources: Sequence[Sequence[dict]], task_ids: Sequence[int],
               batch_size: int, local_start: int, local_size: int, image_size: int,
               with_index: bool = False):
    self.sources = list(sources)
    self.task_ids = [int(t) for t in task_ids]
    self.batch_size = batch_size
    self.local_start = local_start
    self.local_size = local_size
    self.image_size = image_size
    self.with_index = with_index

  def __call__(self, item: tuple[int, int]) -> dict[str, np.ndarray]:
    t, j = (int(x) for x in item)
    source, size = self.sources[t], self.image_size
    first = j * self.batch_size + self.local_start
    indices = np.arange(first, first + self.local_size)
    mask = indices < len(source)
    out = {
        "image": np.zeros((self.local_size, size, size, 3), np.float32),
        "label": np.zeros((self.local_size,), np.int32),
        "mask": mask,
        "task": np.int32(self.task_ids[t]),
    }
    if self.with_index:
      out["index"] = np.where(mask, indices, -1).astype(np.int32)
    records = source.__getitems__(indices[mask].tolist()) if mask.any() else []
    if _READ_LOG:
      _log_reads(kind="eval", batch=j, task=self.task_ids[t], start=self.local_start,
                 indices=indices[mask].tolist())
    for b, record in enumerate(records):
      image = images.decode_rgb(record["image"])
      preprocess.normalize_into(preprocess.eval_pixels(image, size), out["image"][b])
      out["label"][b] = record["label"]
    return out
