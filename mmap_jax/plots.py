"""Figures written into workdirs. Uses matplotlib's object API on an Agg canvas (no pyplot global
state, no display needed, safe in threads and on headless hosts); the PNG goes through
`paths.save_figure`, so a workdir may be a `gs://`-style URI."""
from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mmap_jax import paths

_ANNOTATE_MAX_TASKS = 24  # beyond this the numbers would not be readable


def plot_affinity(path: str | os.PathLike, affinity: Any, task_names: Sequence[str],
                  groups: Optional[Iterable[Iterable[int]]] = None,
                  title: Optional[str] = None) -> None:
  """Heatmap of a T x T task affinity: task names on both axes, values annotated.

  With `groups`, tasks are reordered so each group is a contiguous block, every block is framed,
  and tick labels carry the group ("G1: clipart").
  """
  a = np.asarray(affinity, dtype=np.float64)
  t = len(task_names)
  if a.shape != (t, t):
    raise ValueError(f"affinity: shape {a.shape} does not match {t} task_names")
  if groups is not None:
    groups = [list(g) for g in groups]
    order = [i for g in groups for i in g]
    if sorted(order) != list(range(t)):
      raise ValueError(f"groups: {groups} is not a partition of the {t} tasks")
    group_of = {i: gi for gi, g in enumerate(groups) for i in g}
    labels = [f"G{group_of[i] + 1}: {task_names[i]}" for i in order]
  else:
    order = list(range(t))
    labels = [str(n) for n in task_names]
  m = a[np.ix_(order, order)]
  lim = max(1.0, float(np.max(np.abs(m)))) if m.size else 1.0

  size = 1.6 + 0.65 * t
  fig = Figure(figsize=(size + 1.6, size), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  im = ax.imshow(m, cmap="RdBu_r", vmin=-lim, vmax=lim)
  fig.colorbar(im, ax=ax, fraction=0.046, pad=0.04, label="gradient cosine similarity")
  ax.set_xticks(range(t), labels=labels, rotation=45, ha="right", rotation_mode="anchor")
  ax.set_yticks(range(t), labels=labels)
  if t <= _ANNOTATE_MAX_TASKS:
    for r in range(t):
      for c in range(t):
        v = m[r, c]
        ax.text(c, r, f"{v:.2f}", ha="center", va="center", fontsize=8,
                color="white" if abs(v) > 0.6 * lim else "black")
  if groups is not None:
    start = 0
    for g in groups:
      n = len(g)
      ax.add_patch(Rectangle((start - 0.5, start - 0.5), n, n, fill=False, edgecolor="black",
                             linewidth=2.0))
      start += n
  ax.set_title(title or ("Task affinity" + (f" ({len(groups)} groups)" if groups else "")))
  fig.tight_layout()
  paths.save_figure(path, fig)
