"""Gradient-driven task grouping: which tasks should share one MmAP.

Warm-up: one MmAP is shared by all T tasks (`method=mmap_shared`). At every grouping step the
per-task gradients of the shared parameters come out of ONE `jax.vmap(jax.value_and_grad(...))`
over the task axis; their pairwise cosine similarities are accumulated into a T x T affinity, and
their mean over tasks (= the gradient of the mean task loss) is the training update, so a
grouping step costs about one training step, not T. The cosine may compare a sub-pytree of the
gradients (`affinity_filter`; the trainer's default is the MmAP source prompts) and may compare
an exponential moving average of each task's gradient instead of the step's own (`ema_decay`);
either way the affinity is the MEAN over recorded steps of that step's cosine matrix.

Partition: the tasks are split into disjoint groups maximising the objective

    J(G) = (1/T) * sum_i s_i,   s_i = mean_{j in G(i), j != i} A[i, j]   (s_i = 0 if G(i) = {i})

i.e. every task scores the mean affinity to its group-mates, and a task alone scores 0 ("no
transfer, no conflict": cosine 0 means orthogonal gradients). Equivalently J is the size-weighted
mean over groups of the group's mean pairwise affinity, singletons counting 0. The diagonal of A is
never read. Consequences: with num_groups = T the only partition is all singletons (J = 0); with
num_groups = 1 J is the mean off-diagonal affinity; left free, positively aligned tasks are merged
and conflicting ones (negative cosine) kept apart.

Search: EXACT over all set partitions (restricted-growth strings, vectorised numpy) while
T <= exact_max_tasks (default 10: 115,975 partitions), else average-linkage agglomerative
clustering. Ties (scores within 1e-12) go to fewer groups, then to the lexicographically smallest
label string (task 0's group first), so results are deterministic.

Number of groups: `num_groups=k` (exactly k groups), or `threshold=t` (the FEWEST groups such that
every group is coherent - its mean pairwise affinity is >= t, singletons trivially so - best J
among those; agglomerative: merge while the best average linkage is >= t, which gives the same
guarantee since a merge of coherent groups with cross-linkage >= t is coherent), or neither (the
partition with the best J over any number of groups).

Outputs in the workdir: `affinity.npy`, `affinity.png`, `groups.json` (with the best alternative
partitions and their scores), `affinity_history.npy`; `load_groups` reads them. A config may
instead give the groups explicitly (`resolve_explicit_groups` validates them) or ask for an
ablation partition: `random_groups`, `all_in_one_groups`, `one_per_task_groups`.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import pathlib
from typing import Any, Callable, Iterable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from mmap_jax.groups import Groups, canonical_groups, check_groups, groups_from_names

PyTree = Any

GROUPS_FILE = "groups.json"
AFFINITY_FILE = "affinity.npy"
PLOT_FILE = "affinity.png"
HISTORY_FILE = "affinity_history.npy"  # [steps, T, T]: every warm-up step's affinity
FORMAT = "mmap_jax.grouping/1"
MAX_EXACT_TASKS = 12  # Bell(12) = 4,213,597 partitions; beyond that exact search is not sensible.
_TIE_TOL = 1e-12
_CHUNK = 1 << 15  # partitions scored per numpy batch (bounds memory at ~T*T*4*32K bytes)


# ----------------------------------------------------------------------------- gradients

def per_task_gradients(task_loss_fn: Callable[..., jax.Array], shared_params: PyTree,
                       *task_args: PyTree) -> tuple[jax.Array, PyTree]:
  """Per-task losses [T] and gradients (shared_params' tree, every leaf with a leading T axis).

  `task_loss_fn(shared_params, *per_task_args) -> scalar`; every array in `task_args` has a
  leading task axis. One vmap over tasks, so the T backward passes are batched into one.
  """
  if not task_args:
    raise ValueError("per_task_gradients needs at least one per-task argument with a task axis")
  in_axes = (None,) + (0,) * len(task_args)
  return jax.vmap(jax.value_and_grad(task_loss_fn), in_axes=in_axes)(shared_params, *task_args)


def flatten_task_grads(grads: PyTree) -> jax.Array:
  """Per-task gradient pytree (leading T axis on every leaf) -> [T, P] float32."""
  leaves = jax.tree_util.tree_leaves(grads)
  if not leaves:
    raise ValueError("grads: empty pytree, nothing to flatten")
  num_tasks = {leaf.shape[0] if leaf.ndim else None for leaf in leaves}
  if len(num_tasks) != 1 or None in num_tasks:
    raise ValueError(f"grads: every leaf needs the same leading task axis, got leading sizes "
                     f"{sorted(str(n) for n in num_tasks)}")
  t = num_tasks.pop()
  return jnp.concatenate([leaf.reshape(t, -1).astype(jnp.float32) for leaf in leaves], axis=1)


def cosine_affinity(flat: jax.Array) -> jax.Array:
  """[T, P] -> [T, T] cosine similarities of the task gradients.

  Zero gradients: a task whose gradient is exactly zero has cosine 0 with every other task (no
  evidence either way) instead of NaN. The diagonal is defined as 1 (a task agrees with itself);
  the partition objective never reads it. Rows are normalised before the product (no overflow)
  and the product runs at full float32 precision (TPU/GPU default matmuls may use bf16 passes).
  """
  if flat.ndim != 2:
    raise ValueError(f"flat: expected [T, P], got shape {flat.shape}")
  flat = flat.astype(jnp.float32)
  norms = jnp.linalg.norm(flat, axis=1, keepdims=True)
  unit = flat / jnp.where(norms > 0, norms, 1.0)
  cos = jnp.matmul(unit, unit.T, precision=jax.lax.Precision.HIGHEST)
  cos = jnp.clip(cos, -1.0, 1.0)
  return jnp.fill_diagonal(cos, 1.0, inplace=False)


class AffinityState(NamedTuple):
  """Running sum of per-step affinities + how many were added (a pytree: jit state, checkpoints).

  `ema` (optional, [T, P] float32) is the exponential moving average of each task's flattened
  affinity gradient (`grouping_step(..., ema_decay=b)`); None when the EMA is off, so the pytree
  then has exactly the two leaves above.
  """
  total: jax.Array  # [T, T] float32
  count: jax.Array  # [] int32
  ema: Optional[jax.Array] = None  # [T, P] float32, or None

  @classmethod
  def zeros(cls, num_tasks: int, ema_size: Optional[int] = None) -> "AffinityState":
    """Empty state; `ema_size=P` (the flattened affinity-gradient size) adds a zero EMA."""
    if not isinstance(num_tasks, (int, np.integer)) or num_tasks < 1:
      raise ValueError(f"num_tasks must be a positive int, got {num_tasks!r}")
    ema = None
    if ema_size is not None:
      if not isinstance(ema_size, (int, np.integer)) or ema_size < 1:
        raise ValueError(f"ema_size must be a positive int, got {ema_size!r}")
      ema = jnp.zeros((num_tasks, int(ema_size)), jnp.float32)
    return cls(jnp.zeros((num_tasks, num_tasks), jnp.float32), jnp.zeros((), jnp.int32), ema)

  def update(self, affinity: jax.Array, record: Any = True) -> "AffinityState":
    """Add one step's affinity; `record` (a Python or traced bool) lets a jitted step skip it."""
    record = jnp.asarray(record, bool)
    return AffinityState(self.total + jnp.where(record, affinity.astype(jnp.float32), 0.0),
                         self.count + record.astype(jnp.int32), self.ema)

  def mean(self) -> jax.Array:
    """Mean affinity so far; all zeros while count == 0 (check `count` before partitioning)."""
    return self.total / jnp.maximum(self.count, 1).astype(jnp.float32)


def grouping_step(task_loss_fn: Callable[..., jax.Array], shared_params: PyTree,
                  opt_state: optax.OptState, optimizer: optax.GradientTransformation,
                  affinity_state: AffinityState, *task_args: PyTree,
                  record: Any = True, affinity_filter: Optional[Callable[[PyTree], PyTree]] = None,
                  ema_decay: float = 0.0) -> tuple[PyTree, optax.OptState, AffinityState,
                                                   dict[str, jax.Array]]:
  """One warm-up step: vmapped per-task grads -> affinity update + optimizer step on their mean.

  Pure and jittable (`task_loss_fn`, `optimizer`, `affinity_filter` static). The update is the
  mean over tasks of the per-task gradients of ALL shared params, i.e. the gradient of the mean
  task loss. The affinity is the cosine over `affinity_filter(grads)` (default: every leaf),
  flattened per task. With `ema_decay=b` in (0, 1) (the state then needs an `ema`, see
  `AffinityState.zeros(T, P)`), every step first updates m <- b*m + (1-b)*g per task and the
  step's affinity is the cosine of m instead of g; m starts at 0, and needs no bias correction
  because a cosine ignores a task's common positive scale. `record=False` (may be traced) trains
  (and updates the EMA) without adding to the affinity, for "every n steps" schedules.
  """
  losses, grads = per_task_gradients(task_loss_fn, shared_params, *task_args)
  mean_grads = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
  updates, new_opt_state = optimizer.update(mean_grads, opt_state, shared_params)
  new_params = optax.apply_updates(shared_params, updates)
  flat = flatten_task_grads(grads if affinity_filter is None else affinity_filter(grads))
  ema = affinity_state.ema
  if ema_decay:
    if not 0.0 < ema_decay < 1.0:
      raise ValueError(f"ema_decay must be 0 (off) or in (0, 1), got {ema_decay!r}")
    if ema is None or ema.shape != flat.shape:
      raise ValueError(f"ema_decay={ema_decay}: the AffinityState needs an ema of shape "
                       f"{flat.shape} (AffinityState.zeros(T, ema_size={flat.shape[1]})), got "
                       f"{None if ema is None else ema.shape}")
    ema = ema_decay * ema + (1.0 - ema_decay) * flat
    signal = ema
  else:
    signal = flat
  affinity = cosine_affinity(signal)
  t = affinity.shape[0]
  off = (jnp.sum(affinity) - t) / max(t * (t - 1), 1)
  metrics = {
      "loss": jnp.mean(losses),
      "task_loss": losses,
      "task_grad_norm": jnp.linalg.norm(flat, axis=1),
      "mean_pairwise_affinity": off,
      "affinity": affinity,
  }
  state = affinity_state.update(affinity, record)._replace(ema=ema)
  return new_params, new_opt_state, state, metrics


def affinity_size(shared_params: PyTree,
                  affinity_filter: Optional[Callable[[PyTree], PyTree]] = None) -> int:
  """P: how many gradient entries per task the affinity compares (the EMA's width)."""
  tree = shared_params if affinity_filter is None else affinity_filter(shared_params)
  return int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))


def warmup_affinity(task_loss_fn: Callable[..., jax.Array], shared_params: PyTree,
                    optimizer: optax.GradientTransformation,
                    batches: Iterable[Sequence[PyTree]], *, every: int = 1,
                    affinity_filter: Optional[Callable[[PyTree], PyTree]] = None,
                    ema_decay: float = 0.0
                    ) -> tuple[PyTree, AffinityState, list[dict[str, float]]]:
  """A minimal host loop over `grouping_step` (tests, demos); the trainer has its own.

  `batches` yields tuples of task args (each with a leading task axis); the number of steps is
  the number of batches; the affinity is recorded on steps 0, every, 2*every, ...
  """
  if every < 1:
    raise ValueError(f"every must be >= 1, got {every}")
  step = jax.jit(grouping_step, static_argnums=(0, 3),
                 static_argnames=("affinity_filter", "ema_decay"))
  opt_state = optimizer.init(shared_params)
  ema_size = affinity_size(shared_params, affinity_filter) if ema_decay else None
  state, history = None, []
  for i, args in enumerate(batches):
    if state is None:
      leaf = jax.tree_util.tree_leaves(args)[0]
      state = AffinityState.zeros(int(leaf.shape[0]), ema_size)
    shared_params, opt_state, state, m = step(task_loss_fn, shared_params, opt_state, optimizer,
                                              state, *args, record=(i % every == 0),
                                              affinity_filter=affinity_filter,
                                              ema_decay=ema_decay)
    history.append({"loss": float(m["loss"]),
                    "mean_pairwise_affinity": float(m["mean_pairwise_affinity"])})
  if state is None:
    raise ValueError("batches: no batch was given, no warm-up step ran")
  return shared_params, state, history


# ----------------------------------------------------------------------------- partitions

def _check_affinity(affinity: Any, field: str = "affinity") -> np.ndarray:
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
  a = _check_affinity(affinity)
  groups = check_groups(groups, a.shape[0])
  return float(_score_labels(a, _groups_to_labels(groups, a.shape[0])[None])[0])


def group_mean_affinity(affinity: Any, groups: Iterable[Iterable[int]]) -> list[Optional[float]]:
  """Each group's mean pairwise affinity (None for a singleton: it has no pairs)."""
  a = _check_affinity(affinity)
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
  a = _check_affinity(affinity)
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
  a = _check_affinity(affinity)
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
                  extra: Optional[Mapping[str, Any]] = None) -> pathlib.Path:
  """Write affinity.npy, affinity.png and groups.json into `workdir`; returns the json path.

  `affinity` may be None (explicit groups, no warm-up): then only groups.json is written, with
  null affinity/objective. `extra` (JSON-serialisable; e.g. method, steps, num_groups,
  threshold) is merged into groups.json and may not override its own keys.
  """
  workdir = pathlib.Path(workdir)
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
    a = _check_affinity(affinity)
    if a.shape[0] != len(names):
      raise ValueError(f"affinity: shape {a.shape} does not match {len(names)} task_names")
    np.save(workdir / AFFINITY_FILE, a.astype(np.float32))
    plot_affinity(workdir / PLOT_FILE, a, names, groups)
    record["affinity"] = a.tolist()
    record["objective"] = partition_score(a, groups)
    record["group_mean_affinity"] = group_mean_affinity(a, groups)
  record.update(extra)
  path = workdir / GROUPS_FILE
  tmp = path.with_suffix(".json.tmp")
  # One top-level key per line, values compact: the groups and matrix rows stay readable.
  lines = [f"  {json.dumps(k)}: {json.dumps(v, default=_json_default)}" for k, v in record.items()]
  tmp.write_text("{\n" + ",\n".join(lines) + "\n}\n")
  os.replace(tmp, path)  # atomic: a reader never sees half a file
  return path


def load_grouping(workdir: str | os.PathLike) -> dict[str, Any]:
  """The whole groups.json record, validated (names, indices and their agreement)."""
  path = pathlib.Path(workdir) / GROUPS_FILE
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
    raise ValueError(f"{pathlib.Path(workdir) / GROUPS_FILE}: task_names {record['task_names']} "
                     f"do not match the configured tasks {list(task_names)}")
  return tuple(tuple(g) for g in record["group_indices"])


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
  a = _check_affinity(np.asarray(affinity))
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
    pathlib.Path(workdir).mkdir(parents=True, exist_ok=True)
    np.save(pathlib.Path(workdir) / HISTORY_FILE, h)
    info["history_file"] = HISTORY_FILE
    info["stable_from_step"] = stable_from_step(h, every=every, num_groups=num_groups,
                                                threshold=threshold,
                                                exact_max_tasks=exact_max_tasks)
  info.update(extra or {})
  save_grouping(workdir, names, a, groups, info)
  return groups
