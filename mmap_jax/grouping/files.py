"""A grouping's files in the workdir: affinity.npy, affinity.png, affinity_history.npy and
groups.json (groups by name and index, objective, alternatives), written atomically and
validated on read; `finalize_grouping` partitions a warm-up's affinity and writes them. The
workdir may be a local path or a `gs://`-style URI (`mmap_jax.paths`, etils.epath).
"""
from __future__ import annotations

import json
import os
from typing import Any, Iterable, Mapping, Optional, Sequence

import jax
import numpy as np
from etils import epath

from mmap_jax import paths
from mmap_jax.grouping.affinity import AffinityState
from mmap_jax.grouping.partitions import (check_affinity, group_mean_affinity, partition,
                                          partition_score, ranked_partitions,
                                          resolve_explicit_groups, search_method,
                                          stable_from_step)
from mmap_jax.groups import Groups, check_groups

GROUPS_FILE = "groups.json"
AFFINITY_FILE = "affinity.npy"
PLOT_FILE = "affinity.png"
HISTORY_FILE = "affinity_history.npy"  # [steps, T, T]: every warm-up step's affinity
FORMAT = "mmap_jax.grouping/1"


# ----------------------------------------------------------------------------- files

def plot_affinity(path: str | os.PathLike, affinity: Any, task_names: Sequence[str],
                  groups: Optional[Iterable[Iterable[int]]] = None,
                  title: Optional[str] = None) -> None:
  """Labelled heatmap (see `mmap_jax.plots.plot_affinity`); matplotlib is imported lazily."""
  from mmap_jax import plots
  plots.plot_affinity(path, affinity, task_names, groups, title=title)


_RESERVED = ("format", "task_names", "groups", "group_indices", "num_groups", "affinity",
             "objective", "group_mean_affinity")


def _json_default(x: Any) -> Any:
  """numpy / jax scalars and arrays in `extra` (e.g. a step count read from device)."""
  if isinstance(x, (np.generic, np.ndarray, jax.Array)):
    return np.asarray(x).tolist()
  raise TypeError(f"extra: {type(x).__name__} is not JSON-serialisable")


def save_grouping(workdir: str | os.PathLike, task_names: Sequence[str], affinity: Any,
                  groups: Iterable[Iterable[int]],
                  extra: Optional[Mapping[str, Any]] = None) -> epath.Path:
  """Write affinity.npy, affinity.png and groups.json into `workdir`; returns the json path.

  `affinity` may be None (explicit groups, no warm-up): then only groups.json is written, with
  null affinity/objective. `extra` (JSON-serialisable; e.g. method, steps, num_groups,
  threshold) is merged into groups.json and may not override its own keys.
  """
  workdir = paths.as_path(workdir)
  names = [str(n) for n in task_names]
  if len(set(names)) != len(names):
    raise ValueError(f"task_names: duplicate names in {names}")
  groups = check_groups(groups, len(names))
  extra = dict(extra or {})
  clash = sorted(set(extra) & set(_RESERVED))
  if clash:
    raise ValueError(f"extra: keys {clash} are reserved in {GROUPS_FILE}")
  record: dict[str, Any] = {
      "format": FORMAT,
      "task_names": names,
      "groups": [[names[i] for i in g] for g in groups],
      "group_indices": [list(g) for g in groups],
      "num_groups": len(groups),
      "affinity": None, "objective": None, "group_mean_affinity": None,
  }
  workdir.mkdir(parents=True, exist_ok=True)
  if affinity is not None:
    a = check_affinity(affinity)
    if a.shape[0] != len(names):
      raise ValueError(f"affinity: shape {a.shape} does not match {len(names)} task_names")
    paths.save_npy(workdir / AFFINITY_FILE, a.astype(np.float32))
    plot_affinity(workdir / PLOT_FILE, a, names, groups)
    record["affinity"] = a.tolist()
    record["objective"] = partition_score(a, groups)
    record["group_mean_affinity"] = group_mean_affinity(a, groups)
  record.update(extra)
  # One top-level key per line, values compact: the groups and matrix rows stay readable.
  lines = [f"  {json.dumps(k)}: {json.dumps(v, default=_json_default)}" for k, v in record.items()]
  # Atomic (rename locally, one object upload on a bucket): a reader never sees half a file.
  return paths.write_text_atomic(workdir / GROUPS_FILE, "{\n" + ",\n".join(lines) + "\n}\n")


def load_grouping(workdir: str | os.PathLike) -> dict[str, Any]:
  """The whole groups.json record, validated (names, indices and their agreement)."""
  path = paths.as_path(workdir) / GROUPS_FILE
  if not path.is_file():
    raise FileNotFoundError(f"{path}: no task grouping found (run the grouping warm-up, or give "
                            f"the groups explicitly in the config)")
  try:
    record = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise ValueError(f"{path}: malformed JSON: {e}") from e
  if not isinstance(record, dict):
    raise ValueError(f"{path}: expected a JSON object, got {type(record).__name__}")
  if record.get("format", FORMAT) != FORMAT:
    raise ValueError(f"{path}: field 'format' is {record['format']!r}, expected {FORMAT!r}")
  for key in ("task_names", "groups", "group_indices"):
    if not isinstance(record.get(key), list):
      raise ValueError(f"{path}: field {key!r} missing or not a list")
  names = record["task_names"]
  if not all(isinstance(n, str) for n in names):
    raise ValueError(f"{path}: field 'task_names' must be a list of strings")
  try:
    by_index = check_groups(record["group_indices"], len(names), field="group_indices")
    by_name = resolve_explicit_groups(record["groups"], names, field="groups")
  except (ValueError, TypeError) as e:
    raise ValueError(f"{path}: {e}") from e
  if by_index != by_name:
    raise ValueError(f"{path}: fields 'groups' and 'group_indices' disagree")
  record["group_indices"] = [list(g) for g in by_index]
  return record


def load_groups(workdir: str | os.PathLike,
                task_names: Optional[Sequence[str]] = None) -> Groups:
  """Index groups from `workdir/groups.json`; with `task_names`, also check they match the file's
  (same tasks, same order), so a grouping is never applied to another task list."""
  record = load_grouping(workdir)
  if task_names is not None and list(task_names) != record["task_names"]:
    raise ValueError(f"{paths.as_path(workdir) / GROUPS_FILE}: task_names {record['task_names']} "
                     f"do not match the configured tasks {list(task_names)}")
  return tuple(tuple(g) for g in record["group_indices"])


def finalize_grouping(workdir: str | os.PathLike, task_names: Sequence[str],
                      affinity: Any, *, num_groups: Optional[int] = None,
                      threshold: Optional[float] = None, exact_max_tasks: int = 10,
                      steps: Optional[int] = None, history: Any = None, every: int = 1,
                      alternatives: int = 5,
                      extra: Optional[Mapping[str, Any]] = None) -> Groups:
  """Partition a warm-up's affinity (an array or an `AffinityState`) and save everything.

  Diagnostics in groups.json: "alternatives", the `alternatives` best partitions of the exact
  search's candidate set (see `ranked_partitions`; with a threshold they are ranked by J alone
  and carry their least coherent group's affinity) with task names, so the chosen partition's
  margin is visible. `history` ([steps, T, T], every step's affinity; steps 0, every, ... were
  recorded) goes to affinity_history.npy and gives "stable_from_step" (`stable_from_step`).
  """
  if isinstance(affinity, AffinityState):
    if int(affinity.count) == 0:
      raise ValueError("affinity: the AffinityState has count 0 (no grouping step recorded)")
    affinity = affinity.mean()
  a = check_affinity(np.asarray(affinity))
  names = [str(n) for n in task_names]
  if a.shape[0] != len(names):
    raise ValueError(f"affinity: shape {a.shape} does not match {len(names)} task_names")
  groups = partition(a, num_groups=num_groups, threshold=threshold,
                     exact_max_tasks=exact_max_tasks)
  ranked = ranked_partitions(a, num_groups=num_groups, top=alternatives,
                             exact_max_tasks=exact_max_tasks) if alternatives else []
  info = {"method": "gradient_affinity", "search": search_method(a.shape[0], exact_max_tasks),
          "objective_definition": "mean over tasks of the mean affinity to group-mates "
                                  "(singletons 0)",
          "requested_num_groups": num_groups, "threshold": threshold, "steps": steps,
          "alternatives": [dict(r, groups=[[names[i] for i in g] for g in r["groups"]])
                           for r in ranked]}
  if history is not None:
    h = np.asarray(history, np.float32)
    if h.ndim != 3 or h.shape[1:] != a.shape:
      raise ValueError(f"history: expected [steps, {a.shape[0]}, {a.shape[0]}], got {h.shape}")
    paths.save_npy(paths.as_path(workdir) / HISTORY_FILE, h)
    info["history_file"] = HISTORY_FILE
    info["stable_from_step"] = stable_from_step(h, every=every, num_groups=num_groups,
                                                threshold=threshold,
                                                exact_max_tasks=exact_max_tasks)
  info.update(extra or {})
  save_grouping(workdir, names, a, groups, info)
  return groups
