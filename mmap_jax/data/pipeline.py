"""Multi-task input pipeline on grain: one batch of every task per step.

    it = train_iterator(tasks, batch_size=32, image_size=224, seed=0,
                        sharding=mesh, worker_count=8)
    batch = next(it)   # image [T,B,H,W,3] f32, label [T,B] i32, task [T] i32
    state = it.get_state()         # JSON-serialisable; it.set_state(state)
    for b in eval_batches(tasks, batch_size=64, image_size=224, sharding=mesh):
      ...                          # image [B,H,W,3], label [B], mask [B], task

Design, and why:
  * A training step is a pure function of (seed, step): task t's stream is
    its train split shuffled anew every epoch by (seed, task_id, epoch) and
    concatenated, and step s takes stream positions [s*B, (s+1)*B); each
    example's augmentation draws from its own generator keyed by (seed,
    task_id, position). So the checkpoint state is just the step counter,
    restoring is exact, and batches do not depend on worker count.
  * Multi-host: every process computes the same global batch indices and
    reads only its slice [p*B/P, (p+1)*B/P) of each task's batch (disjoint
    records; together the global batch, identical for any process count),
    then `jax.make_array_from_process_local_data` assembles a global
    jax.Array with the batch axis sharded over the mesh's data axis.
  * Eval pads each task's split (test, or val with split="val") to whole
    global batches; `mask` is False on padding, so every example counts once.
  * Decoding and augmentation run in `MapDataset.map` (grain threads) inside
    `mp_prefetch` worker processes (`worker_count`, 0 = in-process); each
    element is a whole local step, so a worker builds whole batches.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from typing import Any, Iterator, Mapping, Sequence

from absl import flags
import grain
import jax
import numpy as np

from mmap_jax.data import loaders
from mmap_jax.data.preprocess import AugmentConfig
from mmap_jax.data.sources import TaskData

__all__ = ["AugmentConfig", "TrainIterator", "train_iterator", "eval_batches"]

_STATE_VERSION = 1
ShardingArg = jax.sharding.Mesh | jax.sharding.NamedSharding | None


# ----------------------------------------------------------------- grain ---


def _grain_iterator(dataset: grain.MapDataset, worker_count: int, num_threads: int):
  """Threads inside each process, `worker_count` processes (0 = this one)."""
  # Elements are whole batches (tens of MB): keep every buffer a few deep.
  ds = dataset.to_iter_dataset(grain.ReadOptions(
      num_threads=num_threads, prefetch_buffer_size=max(1, 2 * num_threads)))
  if worker_count > 0:
    # grain reads absl flags when starting workers; outside absl.app (pytest,
    # notebooks, plain scripts) they are unparsed: use their defaults.
    if not flags.FLAGS.is_parsed():
      flags.FLAGS.mark_as_parsed()
    ds = ds.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=worker_count, per_worker_buffer_size=2))
  return iter(ds)


def _close(iterator) -> None:
  close = getattr(iterator, "close", None)
  if close is not None:
    close()


# ---------------------------------------------------------- device side ---


def _batch_axes(sharding: ShardingArg):
  """Mesh and the mesh axes of the batch dimension."""
  if isinstance(sharding, jax.sharding.Mesh):
    if "data" not in sharding.axis_names:
      raise ValueError(
          f"mesh axes {sharding.axis_names} have no 'data' axis to shard the batch over")
    return sharding, "data"
  if isinstance(sharding, jax.sharding.NamedSharding):
    spec = tuple(sharding.spec)
    if len(spec) >= 2 and spec[0] is None:  # P(None, 'data'): the [T, B, ...] layout.
      return sharding.mesh, spec[1]
    if len(spec) == 1:  # P('data'): the [B, ...] layout.
      return sharding.mesh, spec[0]
    raise ValueError(
        f"cannot tell the batch axis from PartitionSpec {sharding.spec}; "
        "use P('data') or P(None, 'data')")
  raise TypeError(f"sharding must be a Mesh, NamedSharding or None, got {type(sharding).__name__}")


def _mesh_axis_size(mesh, axes) -> int:
  if axes is None:
    return 1
  names = axes if isinstance(axes, tuple) else (axes,)
  return math.prod(mesh.shape[n] for n in names)


class _Assembler:
  """Local numpy slices -> global jax.Arrays (or numpy when sharding is None)."""

  def __init__(self, sharding: ShardingArg, *, task_axis: bool, batch_size: int,
               process_count: int):
    self.sharding = sharding
    if sharding is None:
      return
    if process_count != jax.process_count():
      raise ValueError(
          f"process_count={process_count} but jax.process_count()={jax.process_count()}; "
          "simulated processes can only produce local numpy batches (sharding=None)")
    mesh, axes = _batch_axes(sharding)
    if batch_size % _mesh_axis_size(mesh, axes):
      raise ValueError(
          f"batch_size {batch_size} is not divisible by the {_mesh_axis_size(mesh, axes)} "
          f"devices of mesh axes {axes!r}")
    spec = jax.sharding.PartitionSpec(None, axes) if task_axis else jax.sharding.PartitionSpec(axes)
    self.batched = jax.sharding.NamedSharding(mesh, spec)
    self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    self.batch_dim = 1 if task_axis else 0
    self.batch_size = batch_size

  def __call__(self, local: Mapping[str, np.ndarray],
               replicated_keys: Sequence[str], lead: int = 0) -> dict[str, Any]:
    """`lead` extra leading (unsharded) axes precede the usual layout, e.g. [K, T, B, ...]."""
    if self.sharding is None:
      return dict(local)
    batched = self.batched
    if lead:
      batched = jax.sharding.NamedSharding(
          batched.mesh, jax.sharding.PartitionSpec(*([None] * lead), *batched.spec))
    batch_dim = self.batch_dim + lead
    out = {}
    for key, value in local.items():
      if key in replicated_keys or np.ndim(value) <= batch_dim:
        out[key] = value if np.ndim(value) == 0 else jax.make_array_from_process_local_data(
            self.replicated, value, np.shape(value))
      else:
        shape = list(value.shape)
        shape[batch_dim] = self.batch_size
        out[key] = jax.make_array_from_process_local_data(batched, value, tuple(shape))
    return out


def _process_slice(batch_size: int, process_index: int | None, process_count: int | None):
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  if batch_size <= 0 or batch_size % process_count:
    raise ValueError(
        f"batch_size {batch_size} must be a positive multiple of process_count {process_count}")
  local = batch_size // process_count
  return process_index * local, local, process_count


# ---------------------------------------------------------------- train ---


class TrainIterator:
  """Endless training batches; `get_state()`/`set_state()` for exact resumes.

  The state is {'version', 'step', 'fingerprint'}: `step` batches have been
  yielded; the fingerprint (tasks, sizes, batch size, image size, seed,
  augmentation) refuses a state from a differently configured pipeline.
  Process and worker counts are not part of it: a run may resume on another
  topology and still see the same global batches.
  """

  def __init__(self, loader: loaders.TrainStepLoader, *, num_steps: int | None, worker_count: int,
               num_threads: int, assembler: _Assembler, fingerprint: str):
    self._loader = loader
    self._num_steps = num_steps
    self._worker_count = worker_count
    self._num_threads = num_threads
    self._assemble = assembler
    self._fingerprint = fingerprint
    self._step = 0
    self._it = None

  @property
  def step(self) -> int:
    """Number of batches yielded so far (= index of the next batch)."""
    return self._step

  def __iter__(self) -> "TrainIterator":
    return self

  def _start(self) -> None:
    if self._it is None:
      stop = self._num_steps if self._num_steps is not None else 2**62
      self._it = _grain_iterator(grain.MapDataset.range(self._step, stop).map(self._loader),
                                 self._worker_count, self._num_threads)

  def __next__(self) -> dict[str, Any]:
    if self._num_steps is not None and self._step >= self._num_steps:
      raise StopIteration
    self._start()
    local = next(self._it)
    self._step += 1
    return self._assemble(local, replicated_keys=("task",))

  def next_steps(self, k: int) -> dict[str, Any]:
    """The next `k` step batches stacked on a new leading axis ([k, T, B, ...]; 'task' [k, T]).

    Batch i is exactly what the i-th `next()` would return; the leading axis is not sharded
    (P(None, None, 'data') for images and labels), each process stacks its own slices.
    """
    if k < 1:
      raise ValueError(f"next_steps(k={k}): k must be >= 1")
    if self._num_steps is not None and self._step + k > self._num_steps:
      raise StopIteration
    self._start()
    local = [next(self._it) for _ in range(k)]
    self._step += k
    stacked = {key: np.stack([b[key] for b in local]) for key in local[0]}
    return self._assemble(stacked, replicated_keys=("task",), lead=1)

  def get_state(self) -> dict[str, Any]:
    return {"version": _STATE_VERSION, "step": self._step, "fingerprint": self._fingerprint}

  def set_state(self, state: Mapping[str, Any] | bytes | str) -> None:
    """Restores `get_state()` output (a dict, or its JSON as str/bytes)."""
    if isinstance(state, (bytes, str)):
      state = json.loads(state)
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"unsupported iterator state version {state.get('version')!r}")
    if state.get("fingerprint") != self._fingerprint:
      raise ValueError(
          "iterator state is from a differently configured pipeline (tasks, batch size, "
          f"image size, seed or augmentation differ): {state.get('fingerprint')} != "
          f"{self._fingerprint}")
    self.close()
    self._step = int(state["step"])

  def close(self) -> None:
    """Stops grain workers; iteration can continue afterwards (they restart)."""
    if self._it is not None:
      _close(self._it)
      self._it = None

  def __enter__(self) -> "TrainIterator":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except  # Interpreter shutdown.
      pass


def train_iterator(
    tasks: Sequence[TaskData],
    *,
    batch_size: int,
    image_size: int,
    seed: int,
    augment: AugmentConfig = AugmentConfig(),
    sharding: ShardingArg = None,
    worker_count: int = 0,
    num_threads: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    num_steps: int | None = None,
    with_index: bool = False,
) -> TrainIterator:
  """Shuffled, repeating per-task training streams, one batch of each per step.

  Args:
    tasks: from `build_tasks` (their `task_id`s go into `batch['task']`).
    batch_size: global examples per task per step (all processes together).
    image_size: output height = width (the model's resolution).
    seed: shuffling and augmentation seed.
    augment: random resized crop / flip settings.
    sharding: a Mesh (batch over its 'data' axis) or NamedSharding
      (P(None, 'data')) -> yields global jax.Arrays; None -> local numpy.
    worker_count: grain worker processes (0 = decode in this process).
    num_threads: decode threads per process (0 = sequential).
    process_index, process_count: default jax.process_index()/count(); pass
      them (with sharding=None) to simulate hosts in tests.
    num_steps: stop after this many steps (default: never).
    with_index: also yield 'index' [T, B_local], the train record indices.

  Returns:
    A `TrainIterator` of {'image': [T,B,H,W,3] f32, 'label': [T,B] i32,
    'task': [T] i32} (B_local = B / process_count rows when sharding=None).
  """
  if not tasks:
    raise ValueError("train_iterator needs at least one task")
  for task in tasks:
    if len(task.train) == 0:
      raise ValueError(f"task {task.info.builder} has no training examples")
  local_start, local_size, process_count = _process_slice(batch_size, process_index, process_count)
  loader = loaders.TrainStepLoader(
      [t.train for t in tasks], [t.task_id for t in tasks], batch_size, local_start, local_size,
      image_size, seed, augment, with_index)
  fingerprint = hashlib.sha1(json.dumps({
      "tasks": [[t.task_id, t.info.builder, len(t.train)]
                + ([t.info.val_split] if t.info.val_split not in ("", "none") else [])
                for t in tasks],
      "batch_size": batch_size, "image_size": image_size, "seed": seed,
      "augment": dataclasses.asdict(augment),
  }, sort_keys=True).encode()).hexdigest()[:16]
  assembler = _Assembler(sharding, task_axis=True, batch_size=batch_size,
                         process_count=process_count)
  return TrainIterator(loader, num_steps=num_steps, worker_count=worker_count,
                       num_threads=num_threads, assembler=assembler, fingerprint=fingerprint)


# ----------------------------------------------------------------- eval ---


EVAL_SPLITS = ("test", "val")


def eval_source(task: TaskData, split: str):
  """The task's `split` source ('test' or 'val')."""
  if split not in EVAL_SPLITS:
    raise ValueError(f"split={split!r}; allowed: {EVAL_SPLITS}")
  return task.test if split == "test" else task.val


def num_eval_batches(task: TaskData, batch_size: int, split: str = "test") -> int:
  return -(-len(eval_source(task, split)) // batch_size)


def eval_batches(
    tasks: TaskData | Sequence[TaskData],
    *,
    batch_size: int,
    image_size: int,
    sharding: ShardingArg = None,
    worker_count: int = 0,
    num_threads: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    with_index: bool = False,
    split: str = "test",
) -> Iterator[dict[str, Any]]:
  """Each task's `split` ('test' or 'val') once, in order, padded to full global batches.

  Yields {'image': [B,H,W,3] f32, 'label': [B] i32, 'mask': [B] bool,
  'task': int (task_id)} task after task; padding rows are zeros with
  mask False. Arguments as in `train_iterator`; with_index adds 'index'
  (record index within the split, -1 on padding).
  """
  if isinstance(tasks, TaskData):
    tasks = [tasks]
  local_start, local_size, process_count = _process_slice(batch_size, process_index, process_count)
  loader = loaders.EvalBatchLoader([eval_source(t, split) for t in tasks],
                                   [t.task_id for t in tasks], batch_size,
                                   local_start, local_size, image_size, with_index)
  items = [(t, j) for t, task in enumerate(tasks)
           for j in range(num_eval_batches(task, batch_size, split))]
  assembler = _Assembler(sharding, task_axis=False, batch_size=batch_size,
                         process_count=process_count)
  return _eval_generator(grain.MapDataset.source(items).map(loader), worker_count, num_threads,
                         assembler)


def _eval_generator(dataset, worker_count, num_threads, assembler):
  if len(dataset) == 0:
    return
  it = _grain_iterator(dataset, worker_count, num_threads)
  try:
    for local in it:
      batch = assembler(local, replicated_keys=())
      batch["task"] = int(local["task"])
      yield batch
  finally:
    _close(it)
