"""Task groups: the one type and the one validator every module uses.

A grouping partitions the task indices 0..T-1 into non-empty, disjoint groups that cover every
task. `Groups` is its canonical form (members sorted, groups ordered by their smallest member);
`check_groups` validates index groups (messages name the field and, given task names, the tasks)
and `groups_from_names` turns groups written by task name (a config) into index groups.
"""
from __future__ import annotations

from typing import Any, Iterable, Optional, Sequence

import numpy as np

Groups = tuple[tuple[int, ...], ...]


def canonical_groups(groups: Iterable[Iterable[int]]) -> Groups:
  """Members sorted within each group, groups sorted by their smallest member."""
  return tuple(sorted((tuple(sorted(int(i) for i in g)) for g in groups), key=lambda g: g[0]))


def check_groups(groups: Iterable[Iterable[int]], num_tasks: int, field: str = "groups",
                 names: Optional[Sequence[str]] = None) -> Groups:
  """Validate index groups (non-empty, disjoint, covering 0..T-1) and return them canonically.

  With `names` (one per task), messages say which tasks are duplicated or missing by name.
  """
  label = (lambda i: repr(names[i])) if names is not None else (lambda i: str(i))
  seen: dict[int, int] = {}
  out = []
  for gi, g in enumerate(groups):
    g = list(g)
    if not g:
      raise ValueError(f"{field}[{gi}]: empty group")
    for i in g:
      if isinstance(i, bool) or not isinstance(i, (int, np.integer)) or not 0 <= i < num_tasks:
        raise ValueError(f"{field}[{gi}]: task index {i!r} is not an int in 0..{num_tasks - 1}")
      if int(i) in seen:
        raise ValueError(f"{field}: task {label(int(i))} is in both group {seen[int(i)]} and "
                         f"group {gi}")
      seen[int(i)] = gi
    out.append(g)
  missing = sorted(set(range(num_tasks)) - set(seen))
  if missing:
    shown = [names[i] for i in missing] if names is not None else missing
    raise ValueError(f"{field}: tasks {shown} are in no group (groups must cover all "
                     f"{num_tasks} tasks)")
  return canonical_groups(out)


def groups_from_names(groups: Any, task_names: Sequence[str], field: str = "groups") -> Groups:
  """Groups given by task name (a config) -> canonical index groups, validated by
  `check_groups`; also an error: not a list of lists, an unknown name."""
  names = list(task_names)
  if len(set(names)) != len(names):
    raise ValueError(f"task_names: duplicate names in {names}")
  index = {n: i for i, n in enumerate(names)}
  if isinstance(groups, (str, bytes)) or not isinstance(groups, Sequence) or not groups:
    raise ValueError(f"{field}: expected a non-empty list of lists of task names, got {groups!r}")
  out = []
  for gi, g in enumerate(groups):
    if isinstance(g, (str, bytes)) or not isinstance(g, Sequence):
      raise ValueError(f"{field}[{gi}]: expected a list of task names, got {g!r}")
    for n in g:
      if n not in index:
        raise ValueError(f"{field}[{gi}]: unknown task {n!r}; known tasks: {names}")
    out.append([index[n] for n in g])
  return check_groups(out, len(names), field, names=names)
