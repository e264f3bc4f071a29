"""Orbax checkpoints of what a run learns: never the frozen CLIP weights.

A checkpoint holds the learned pytree, the optimizer state, the step, the input iterator's state
(so a resumed run sees exactly the batches the uninterrupted run would have seen), the task
groups and the config; with validation-based selection also the selected (best-so-far) learned
pytree, whose record (step, validation history) is in the metadata. Every checkpoint thus
carries the selected state: rotation (`keep`) can never delete it, and a resume restores the
best-so-far record together with the state it belongs to. Orbax writes each step into a temporary directory and renames it when
complete (on gs://, which cannot rename, it marks a complete step with a commit_success.txt
file instead), so a half-written checkpoint is never listed as the latest.

The directory is an etils.epath.Path (`paths.as_path`): a `gs://` URI reaches orbax untouched
(its tensorstore kvstore then writes the arrays straight to the bucket), a local path absolute.

Read-only use (`read_only=True`: evaluation, prediction) creates nothing and cleans nothing: a run
still training may be writing a temporary step there, which a cleanup would delete.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp

from mmap_jax import paths

_STATE, _DATA, _META, _SELECTED = "state", "data", "meta", "selected"


@dataclasses.dataclass
class Restored:
  step: int
  state: Any           # {"learned", "opt_state", "step"} placed like the target
  data_state: Any      # whatever the input iterator's get_state() returned (JSON)
  meta: dict           # {"groups", "config", "selection", ...}
  selected: Any = None  # the selected learned pytree (None: not saved, e.g. select=last)


class Checkpointer:
  """Keeps the last `keep` checkpoints of a workdir; saves asynchronously.

  `read_only`: for tools that only read a run (evaluate, predict): the directory is neither
  created nor cleaned of temporary steps, nothing is deleted, and `save` refuses.
  """

  def __init__(self, directory: paths.PathLike, *, keep: int = 3, async_save: bool = True,
               read_only: bool = False):
    self.directory = paths.as_path(directory)
    self.read_only = read_only
    if read_only:   # orbax's own read_only flag would log a warning per changed default
      options = ocp.CheckpointManagerOptions(
          max_to_keep=None, create=False, cleanup_tmp_directories=False,
          enable_async_checkpointing=False, save_root_metadata=False)
    else:
      options = ocp.CheckpointManagerOptions(
          max_to_keep=keep, create=True, enable_async_checkpointing=async_save,
          cleanup_tmp_directories=True)
    self._manager = ocp.CheckpointManager(self.directory, options=options,
                                          item_names=(_STATE, _DATA, _META, _SELECTED))

  def latest_step(self) -> Optional[int]:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def save(self, step: int, state: Any, data_state: Any, meta: dict, *, force: bool = False,
           selected: Any = None) -> bool:
    if self.read_only:
      raise RuntimeError(f"{self.directory} was opened read-only")
    items = {
        _STATE: ocp.args.StandardSave(state),
        _DATA: ocp.args.JsonSave(data_state),
        _META: ocp.args.JsonSave(json.loads(json.dumps(meta, default=str))),
    }
    if selected is not None:
      items[_SELECTED] = ocp.args.StandardSave(selected)
    return self._manager.save(step, args=ocp.args.Composite(**items), force=force)

  def has_selected(self, step: int) -> bool:
    return self.item_path(step, _SELECTED).is_dir()

  def item_path(self, step: int, item: str):
    """`<directory>/<step>/<item>` ('state', 'selected', ...) as an epath.Path."""
    return self.directory / str(step) / item

  def restore(self, target_state: Any, step: Optional[int] = None) -> Restored:
    """Restore into the structure, dtypes and shardings of `target_state` (a live or abstract tree)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    if step not in self.all_steps():
      raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                              f"available: {self.all_steps()}")
    abstract = jax.tree.map(ocp.utils.to_shape_dtype_struct, target_state)
    items = {
        _STATE: ocp.args.StandardRestore(abstract),
        _DATA: ocp.args.JsonRestore(),
        _META: ocp.args.JsonRestore(),
    }
    with_selected = self.has_selected(step)
    if with_selected:  # Same structure, dtypes and shardings as the live learned pytree.
      items[_SELECTED] = ocp.args.StandardRestore(abstract["learned"])
    out = self._manager.restore(step, args=ocp.args.Composite(**items))
    return Restored(step=step, state=out[_STATE], data_state=out[_DATA], meta=out[_META],
                    selected=out[_SELECTED] if with_selected else None)

  def read_meta(self, step: Optional[int] = None) -> dict:
    """The JSON metadata alone (groups, config), e.g. to rebuild the model before restoring."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f"no checkpoint in {self.directory}")
    return self._manager.restore(step, args=ocp.args.Composite(
        **{_META: ocp.args.JsonRestore()}))[_META]

  def reached_preemption(self, counter: int) -> bool:
    """True on every process at the same `counter` once any process got SIGTERM (orbax ->
    jax's preemption sync point; False without jax.distributed). Every process must call it
    with consecutive counters (train.cadence.Preemption does)."""
    return bool(self._manager.reached_preemption(counter))

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.wait_until_finished()
    self._manager.close()
