"""Disjoint task groups from an affinity: the objective J, exact and agglomerative search,
ranked alternatives, stability over the warm-up, and the ablation / explicit partitions.
"""
from __future__ import annotations

import functools
import hashlib
import math
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from mmap_jax.groups import Groups, canonical_groups, check_groups, groups_from_names

MAX_EXACT_TASKS = 12  # Bell(12) = 4,213,597 partitions; beyond that exact search is not sensible.
_TIE_TOL = 1e-12
_CHUNK = 1 << 15  # partitions scored per numpy batch (bounds memory at ~T*T*4*32K bytes)


# ----------------------------------------------------------------------------- partitions

def check_affinity(affinity: Any, field: str = "affinity") -> np.ndarray:
  a = np.asarray(affinity, dtype=np.float64)
  if a.ndim != 2 or a.shape[0] != a.shape[1] or a.shape[0] < 1:
    raise ValueError(f"{field}: expected a square [T, T] matrix with T >= 1, got shape {a.shape}")
  if not np.all(np.isfinite(a)):
    raise ValueError(f"{field}: contains NaN or inf")
  if not np.allclose(a, a.T, rtol=1e-5, atol=1e-6):
    raise ValueError(f"{field}: not symmetric (max |A - A^T| = {np.max(np.abs(a - a.T)):.3g})")
  return (a + a.T) / 2


def _labels_to_groups(labels: np.ndarray) -> Groups:
  k = int(labels.max()) + 1
  return canonical_groups(tuple(np.flatnonzero(labels == g).tolist()) for g in range(k))


def _groups_to_labels(groups: Groups, num_tasks: int) -> np.ndarray:
  labels = np.empty(num_tasks, np.int8)
  for gi, g in enumerate(groups):
    labels[list(g)] = gi
  return labels


@functools.lru_cache(maxsize=32)
def enumerate_partitions(num_tasks: int, num_groups: Optional[int] = None) -> np.ndarray:
  """All set partitions of range(T) as restricted-growth label strings [N, T] (int8), in
  lexicographic order: labels[0] = 0, labels[i] <= max(labels[:i]) + 1. N = Bell(T), or the
  Stirling number S(T, k) with `num_groups=k` (branches that cannot reach k are pruned early).
  The returned array is read-only (it is cached)."""
  if num_tasks < 1 or num_tasks > MAX_EXACT_TASKS:
    raise ValueError(f"num_tasks must be in 1..{MAX_EXACT_TASKS} for exact enumeration, "
                     f"got {num_tasks}")
  k = num_groups
  if k is not None and not 1 <= k <= num_tasks:
    raise ValueError(f"num_groups must be in 1..{num_tasks}, got {k}")
  labels = np.zeros((1, 1), np.int8)
  maxes = np.zeros(1, np.int8)
  for i in range(1, num_tasks):
    counts = maxes.astype(np.int64) + 2  # values 0..max+1
    if k is not None:
      counts = np.minimum(counts, k)
    rep = np.repeat(np.arange(len(labels)), counts)
    starts = np.repeat(np.cumsum(counts) - counts, counts)
    vals = (np.arange(len(rep)) - starts).astype(np.int8)
    labels = np.concatenate([labels[rep], vals[:, None]], axis=1)
    maxes = np.maximum(maxes[rep], vals)
    if k is not None:  # enough positions left to open the missing groups?
      keep = maxes.astype(np.int64) + 1 + (num_tasks - 1 - i) >= k
      labels, maxes = labels[keep], maxes[keep]
  if k is not None:
    keep = maxes == k - 1
    labels = labels[keep]
  labels.setflags(write=False)
  return labels


def _score_labels(a: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Objective J for every label row [N, T] -> [N] (float64), in bounded-memory chunks."""
  t = a.shape[0]
  off = a * (1.0 - np.eye(t))
  out = np.empty(len(labels), np.float64)
  for s in range(0, len(labels), _CHUNK):
    lab = labels[s:s + _CHUNK]
    same = lab[:, :, None] == lab[:, None, :]  # [n, T, T], diagonal True
    mates = same.sum(-1) - 1  # [n, T]
    sums = np.einsum("nij,ij->ni", same, off, optimize=False)
    per_task = np.where(mates > 0, sums / np.maximum(mates, 1), 0.0)
    out[s:s + _CHUNK] = per_task.mean(-1)
  return out


def _group_coherence_labels(a: np.ndarray, labels: np.ndarray) -> np.ndarray:
  """Min over groups of the group's mean pairwise affinity, per label row (singletons: +inf)."""
  t = a.shape[0]
  kmax = int(labels.max()) + 1
  out = np.empty(len(labels), np.float64)
  triu = np.triu(np.ones((t, t), bool), 1)
  for s in range(0, len(labels), _CHUNK):
    lab = labels[s:s + _CHUNK].astype(np.int64)
    onehot = (lab[:, :, None] == np.arange(kmax)).astype(np.float64)  # [n, T, K]
    pair_sum = np.einsum("nik,ij,njk->nk", onehot, a * triu, onehot, optimize=True)
    size = onehot.sum(1)
    pairs = size * (size - 1) / 2
    mean = np.where(pairs > 0, pair_sum / np.maximum(pairs, 1), np.inf)
    out[s:s + _CHUNK] = mean.min(-1)
  return out


def partition_score(affinity: Any, groups: Iterable[Iterable[int]]) -> float:
  """The objective J (module docstring) of a given partition."""
  a = check_affinity(affinity)
  groups = check_groups(groups, a.shape[0])
  return float(_score_labels(a, _groups_to_labels(groups, a.shape[0])[None])[0])


def group_mean_affinity(affinity: Any, groups: Iterable[Iterable[int]]) -> list[Optional[float]]:
  """Each group's mean pairwise affinity (None for a singleton: it has no pairs)."""
  a = check_affinity(affinity)
  out = []
  for g in check_groups(groups, a.shape[0]):
    if len(g) < 2:
      out.append(None)
    else:
      sub = a[np.ix_(g, g)]
      out.append(float(sub[np.triu_indices(len(g), 1)].mean()))
  return out


def _best_index(scores: np.ndarray, num_blocks: np.ndarray, valid: np.ndarray) -> int:
  """Highest score among `valid`; ties (within tolerance) to fewer groups, then the first row."""
  masked = np.where(valid, scores, -np.inf)
  best = masked.max()
  tied = valid & (masked >= best - _TIE_TOL * max(1.0, abs(best)))
  fewest = num_blocks[tied].min()
  return int(np.flatnonzero(tied & (num_blocks == fewest))[0])


def _exact(a: np.ndarray, num_groups: Optional[int], threshold: Optional[float]) -> Groups:
  labels = enumerate_partitions(a.shape[0], num_groups)
  scores = _score_labels(a, labels)
  blocks = labels.max(1).astype(np.int64) + 1
  valid = np.ones(len(labels), bool)
  if threshold is not None:
    valid = _group_coherence_labels(a, labels) >= threshold - _TIE_TOL
    fewest = blocks[valid].min()  # all-singletons is always valid
    valid &= blocks == fewest
  return _labels_to_groups(labels[_best_index(scores, blocks, valid)])


def _agglomerative(a: np.ndarray, num_groups: Optional[int],
                   threshold: Optional[float]) -> Groups:
  """Average-linkage merging (linkage = mean cross-group affinity, kept as block sums so a merge
  is O(T)); ties go to the pair of clusters with the smallest first members. Clusters stay sorted
  by their first member: merging q into p < q keeps p's first member, and deleting q keeps order.
  """
  t = a.shape[0]
  clusters: list[list[int]] = [[i] for i in range(t)]
  sums = a.copy()  # sums[p, q] = sum of a over clusters[p] x clusters[q]
  sizes = np.ones(t)
  path = [[list(c) for c in clusters]]
  while len(clusters) > 1:
    if num_groups is not None and len(clusters) <= num_groups:
      break
    link = sums / np.outer(sizes, sizes)
    link[np.tril_indices(len(clusters))] = -np.inf
    best = link.max()
    if threshold is not None and best < threshold - _TIE_TOL:
      break
    ties = np.argwhere(link >= best - _TIE_TOL * max(1.0, abs(best)))
    p, q = (int(x) for x in ties[0])  # row-major: smallest p, then smallest q
    clusters[p] = sorted(clusters[p] + clusters[q])
    del clusters[q]
    sums[p, :] += sums[q, :]
    sums[:, p] += sums[:, q]
    sums = np.delete(np.delete(sums, q, axis=0), q, axis=1)
    sizes[p] += sizes[q]
    sizes = np.delete(sizes, q)
    path.append([list(c) for c in clusters])
  if num_groups is None and threshold is None:  # free: best objective along the merge path
    labels = np.stack([_groups_to_labels(canonical_groups(c), t) for c in path])
    scores = _score_labels(a, labels)
    blocks = np.array([len(c) for c in path])
    return canonical_groups(path[_best_index(scores, blocks, np.ones(len(path), bool))])
  return canonical_groups(clusters)


def search_method(num_tasks: int, exact_max_tasks: int = 10) -> str:
  """"exact" or "agglomerative": what `partition` does for this many tasks."""
  return "exact" if num_tasks <= exact_max_tasks else "agglomerative"


def partition(affinity: Any, *, num_groups: Optional[int] = None,
              threshold: Optional[float] = None, exact_max_tasks: int = 10) -> Groups:
  """Disjoint groups of task indices maximising J (module docstring), canonical order.

  Give `num_groups` (1..T), or `threshold` (fewest coherent groups), or neither (best J over
  any number of groups); not both.
  """
  a = check_affinity(affinity)
  t = a.shape[0]
  if num_groups is not None and threshold is not None:
    raise ValueError("give num_groups or threshold, not both")
  if num_groups is not None:
    if isinstance(num_groups, bool) or not isinstance(num_groups, (int, np.integer)) \
        or not 1 <= num_groups <= t:
      raise ValueError(f"num_groups must be an int in 1..{t} (the number of tasks), "
                       f"got {num_groups!r}")
    num_groups = int(num_groups)
  if threshold is not None:
    if isinstance(threshold, bool) or not isinstance(threshold, (int, float, np.floating)) \
        or not math.isfinite(threshold):
      raise ValueError(f"threshold must be a finite number, got {threshold!r}")
    threshold = float(threshold)
  if isinstance(exact_max_tasks, bool) or not isinstance(exact_max_tasks, (int, np.integer)) \
      or not 0 <= exact_max_tasks <= MAX_EXACT_TASKS:
    raise ValueError(f"exact_max_tasks must be an int in 0..{MAX_EXACT_TASKS}, "
                     f"got {exact_max_tasks!r}")
  if search_method(t, exact_max_tasks) == "exact":
    return _exact(a, num_groups, threshold)
  return _agglomerative(a, num_groups, threshold)


def ranked_partitions(affinity: Any, *, num_groups: Optional[int] = None, top: int = 5,
                      exact_max_tasks: int = 10) -> list[dict[str, Any]]:
  """The `top` best partitions by J (best first) among those the exact search scores: every
  partition into exactly `num_groups` groups, or every partition when None. Ties are ordered as
  `partition` breaks them (fewer groups, then label order), so entry 0 is what `partition`
  returns without a threshold. Each entry: {"groups", "objective", "num_groups",
  "min_group_affinity"} (the least coherent group's mean pairwise affinity; None if all
  singletons). Empty beyond `exact_max_tasks` (the agglomerative search ranks nothing)."""
  a = check_affinity(affinity)
  t = a.shape[0]
  if isinstance(top, bool) or not isinstance(top, (int, np.integer)) or top < 1:
    raise ValueError(f"top must be a positive int, got {top!r}")
  if search_method(t, exact_max_tasks) != "exact":
    return []
  labels = enumerate_partitions(t, num_groups)
  scores = _score_labels(a, labels)
  blocks = labels.max(1).astype(np.int64) + 1
  first = _best_index(scores, blocks, np.ones(len(labels), bool))  # partition()'s tie-break
  rest = np.lexsort((np.arange(len(labels)), blocks, -scores))
  order = np.concatenate([[first], rest[rest != first]])[:top]
  coherence = _group_coherence_labels(a, labels[order])
  return [{"groups": _labels_to_groups(labels[i]), "objective": float(scores[i]),
           "num_groups": int(blocks[i]),
           "min_group_affinity": None if np.isinf(c) else float(c)}
          for i, c in zip(order, coherence)]


# ----------------------------------------------------------------------------- ablation partitions

def random_groups(num_tasks: int, num_groups: int, seed: int) -> Groups:
  """A seeded random partition into `num_groups` groups whose sizes differ by at most one.

  Tasks are ordered by SHA-256 of "seed:index" and cut into consecutive runs (the first
  T mod k groups one longer), which draws uniformly among the balanced partitions (each arises
  from equally many orders) and gives the same partition for a seed on any numpy/JAX version
  (numpy's Generator streams are not guaranteed stable across releases).
  """
  for name, v in (("num_tasks", num_tasks), ("num_groups", num_groups), ("seed", seed)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
      raise ValueError(f"{name} must be an int, got {v!r}")
  if num_tasks < 1 or not 1 <= num_groups <= num_tasks:
    raise ValueError(f"num_groups must be in 1..{num_tasks} (the number of tasks), got "
                     f"{num_groups}")
  order = sorted(range(num_tasks),
                 key=lambda i: hashlib.sha256(f"{int(seed)}:{i}".encode()).digest())
  base, extra = divmod(num_tasks, num_groups)
  out, start = [], 0
  for g in range(num_groups):
    size = base + (1 if g < extra else 0)
    out.append(order[start:start + size])
    start += size
  return canonical_groups(out)


def all_in_one_groups(num_tasks: int) -> Groups:
  """One group holding every task (one group-shared MmAP for all)."""
  return (tuple(range(num_tasks)),)


def one_per_task_groups(num_tasks: int) -> Groups:
  """T singleton groups (no prompt is shared between tasks)."""
  return tuple((i,) for i in range(num_tasks))


# ----------------------------------------------------------------------------- explicit groups

def resolve_explicit_groups(groups: Any, task_names: Sequence[str],
                            field: str = "grouping.groups") -> Groups:
  """Groups given by task name in a config -> canonical index groups (`groups_from_names`)."""
  return groups_from_names(groups, task_names, field)


_STABILITY_BUDGET = 2_000_000  # partitions scored in all by `stable_from_step`, at most


def stable_from_step(history: Any, *, every: int = 1, num_groups: Optional[int] = None,
                     threshold: Optional[float] = None,
                     exact_max_tasks: int = 10) -> Optional[int]:
  """The first warm-up step (1-based) from which the partition of the running mean affinity
  (over the steps recorded so far: 0, every, 2*every, ...) never changes again; a value close to
  the number of steps says the warm-up was too short to settle. None when that would score more
  than ~2M partitions (e.g. 10 tasks, free search, 100 steps)."""
  h = np.asarray(history, np.float64)
  if h.ndim != 3 or h.shape[1] != h.shape[2] or len(h) == 0:
    raise ValueError(f"history: expected [steps, T, T] with steps >= 1, got shape {h.shape}")
  rec = np.arange(0, len(h), every)
  t = h.shape[1]
  if search_method(t, exact_max_tasks) == "exact":
    if len(enumerate_partitions(t, num_groups)) * len(rec) > _STABILITY_BUDGET:
      return None
  means = np.cumsum(h[rec], axis=0) / np.arange(1, len(rec) + 1)[:, None, None]
  parts = [partition((m + m.T) / 2, num_groups=num_groups, threshold=threshold,
                     exact_max_tasks=exact_max_tasks) for m in means]
  first = len(parts) - 1
  while first > 0 and parts[first - 1] == parts[-1]:
    first -= 1
  return int(rec[first]) + 1
