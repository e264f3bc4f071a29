"""Per-task gradients of a shared MmAP and their accumulated task affinity (the warm-up).

One `jax.vmap(jax.value_and_grad(...))` over the task axis gives every task's gradient; their
pairwise affinities are accumulated (`AffinityState`), and their mean over tasks is the update, so
a grouping step costs about one training step. See the package docstring for the definitions.

Two affinities (`grouping_step(..., affinity=...)`):
  cosine  cosine of the per-task gradients, optionally per tower: the loss may take the shared
          parameters in a SPLIT form (`Split`: e.g. MmAP's source prompt duplicated, one copy
          feeding the text tower and one the visual tower), so each tower's contribution to a
          task's gradient is a separate block; `affinity_filter` may then be a tuple of blocks
          (towers), each normalised per task before they are concatenated, so no tower dominates
          the cosine by the size of its gradients.
  tag     the lookahead affinity of Fifty et al. 2021 ("Efficiently Identifying Task Groupings",
          NeurIPS): Z[i, j] = 1 - L_j(theta - lr * g_i) / L_j(theta), on the step's own batch:
          how much a gradient step on task i alone lowers task j's loss (negative: it raises it).
          Directed (Z[i, j] != Z[j, i]); the partition uses (Z + Z^T) / 2. The lookahead is a
          plain gradient step at the warm-up's current learning rate (the paper's definition),
          computed for all j at once by a vmap over tasks, for one i at a time (lax.map), so the
          step's memory stays that of a training step: T extra forward passes of all T tasks.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

PyTree = Any


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


class Split(NamedTuple):
  """How a loss sees the shared parameters: `split(params) -> split_params` (the form the task
  loss takes, e.g. MmAP's source duplicated per tower) and `merge(split_grads) -> grads` (the
  transpose: the copies' gradients summed), so merged split gradients are the gradients."""
  split: Callable[[PyTree], PyTree]
  merge: Callable[[PyTree], PyTree]


def affinity_signal(grads: PyTree, affinity_filter: Any = None) -> jax.Array:
  """[T, P] rows the cosine compares: `affinity_filter(grads)` flattened (None: every leaf), or,
  for a tuple of filters (towers), each block divided by its per-task norm, then concatenated
  (a zero block stays zero), so every tower weighs the same in the cosine."""
  if not isinstance(affinity_filter, (tuple, list)):
    return flatten_task_grads(grads if affinity_filter is None else affinity_filter(grads))
  blocks = []
  for f in affinity_filter:
    b = flatten_task_grads(f(grads))
    n = jnp.linalg.norm(b, axis=1, keepdims=True)
    blocks.append(b / jnp.where(n > 0, n, 1.0))
  return jnp.concatenate(blocks, axis=1)


def lookahead_affinity(task_loss_fn: Callable[..., jax.Array], shared_params: PyTree,
                       task_grads: PyTree, losses: jax.Array, lr: Any,
                       *task_args: PyTree) -> jax.Array:
  """TAG's Z [T, T] (module docstring): Z[i, j] = 1 - L_j(params - lr * g_i) / L_j(params).

  `task_grads` has a leading task axis (g_i), `losses` [T] are L_j(params) on the same batch.
  A task whose loss is 0 gets Z = 0 in its column (nothing to lower).
  """
  lr = jnp.asarray(lr, jnp.float32)
  on_all = jax.vmap(task_loss_fn, in_axes=(None,) + (0,) * len(task_args))

  def after_step_on(g_i):
    moved = jax.tree_util.tree_map(lambda p, g: p - lr.astype(p.dtype) * g, shared_params, g_i)
    return on_all(moved, *task_args)                                  # [T]: L_j after step i
  ahead = jax.lax.map(after_step_on, task_grads)                      # [T(i), T(j)]
  base = jnp.asarray(losses, jnp.float32)[None, :]
  return jnp.where(base > 0, 1.0 - ahead.astype(jnp.float32) / jnp.where(base > 0, base, 1.0),
                   0.0)


AFFINITIES = ("cosine", "tag")


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
                  record: Any = True, affinity_filter: Any = None,
                  ema_decay: float = 0.0, affinity: str = "cosine",
                  split: Optional[Split] = None, lookahead_lr: Any = None
                  ) -> tuple[PyTree, optax.OptState, AffinityState, dict[str, jax.Array]]:
  """One warm-up step: vmapped per-task grads -> affinity update + optimizer step on their mean.

  Pure and jittable (`task_loss_fn`, `optimizer`, `affinity_filter` static). The update is the
  mean over tasks of the per-task gradients of ALL shared params, i.e. the gradient of the mean
  task loss. The affinity is the cosine over `affinity_filter(grads)` (default: every leaf),
  flattened per task. With `ema_decay=b` in (0, 1) (the state then needs an `ema`, see
  `AffinityState.zeros(T, P)`), every step first updates m <- b*m + (1-b)*g per task and the
  step's affinity is the cosine of m instead of g; m starts at 0, and needs no bias correction
  because a cosine ignores a task's common positive scale. `record=False` (may be traced) trains
  (and updates the EMA) without adding to the affinity, for "every n steps" schedules.

  With `split` (a `Split`), `task_loss_fn` takes `split.split(shared_params)` and the filters see
  the split gradients (per-tower blocks: `affinity_signal`); the update uses the merged ones.
  `affinity="tag"` records TAG's directed lookahead affinity instead (`lookahead_affinity`, a
  step of `lookahead_lr`, required; may be traced); filters, split and EMA do not apply to it.
  """
  if affinity not in AFFINITIES:
    raise ValueError(f"affinity={affinity!r}; allowed: {AFFINITIES}")
  if split is None:
    split = Split(lambda p: p, lambda g: g)
  losses, split_grads = per_task_gradients(task_loss_fn, split.split(shared_params), *task_args)
  grads = jax.vmap(split.merge)(split_grads)
  mean_grads = jax.tree_util.tree_map(lambda g: jnp.mean(g, axis=0), grads)
  updates, new_opt_state = optimizer.update(mean_grads, opt_state, shared_params)
  new_params = optax.apply_updates(shared_params, updates)
  if affinity == "tag":
    if lookahead_lr is None or ema_decay:
      raise ValueError("affinity='tag' needs lookahead_lr (the step size of the lookahead) and "
                       "takes no ema_decay")
    loss_of_params = lambda p, *a: task_loss_fn(split.split(p), *a)
    directed = lookahead_affinity(loss_of_params, shared_params, grads, losses, lookahead_lr,
                                  *task_args)
    t = directed.shape[0]
    sym = (directed + directed.T) / 2
    metrics = {
        "loss": jnp.mean(losses),
        "task_loss": losses,
        "task_grad_norm": jnp.linalg.norm(flatten_task_grads(grads), axis=1),
        "mean_pairwise_affinity": (jnp.sum(sym) - jnp.trace(sym)) / max(t * (t - 1), 1),
        "affinity": directed,
    }
    return new_params, new_opt_state, affinity_state.update(directed, record), metrics
  flat = affinity_signal(split_grads, affinity_filter)
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


def affinity_size(shared_params: PyTree, affinity_filter: Any = None) -> int:
  """P: how many gradient entries per task the affinity compares (the EMA's width);
  `shared_params` in the form the filters read (split, with a `Split`)."""
  filters = affinity_filter if isinstance(affinity_filter, (tuple, list)) else (affinity_filter,)
  size = 0
  for f in filters:
    tree = shared_params if f is None else f(shared_params)
    size += int(sum(np.prod(np.shape(x), dtype=np.int64) for x in jax.tree_util.tree_leaves(tree)))
  return size


def warmup_affinity(task_loss_fn: Callable[..., jax.Array], shared_params: PyTree,
                    optimizer: optax.GradientTransformation,
                    batches: Iterable[Sequence[PyTree]], *, every: int = 1,
                    affinity_filter: Optional[Callable[[PyTree], PyTree]] = None,
                    ema_decay: float = 0.0, affinity: str = "cosine",
                    lookahead_lr: Optional[float] = None
                    ) -> tuple[PyTree, AffinityState, list[dict[str, float]]]:
  """A minimal host loop over `grouping_step` (tests, demos); the trainer has its own.

  `batches` yields tuples of task args (each with a leading task axis); the number of steps is
  the number of batches; the affinity is recorded on steps 0, every, 2*every, ...
  (`affinity="tag"`: a constant `lookahead_lr`; the state then holds the directed Z.)
  """
  if every < 1:
    raise ValueError(f"every must be >= 1, got {every}")
  step = jax.jit(grouping_step, static_argnums=(0, 3),
                 static_argnames=("affinity_filter", "ema_decay", "affinity"))
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
                                              ema_decay=ema_decay, affinity=affinity,
                                              lookahead_lr=lookahead_lr)
    history.append({"loss": float(m["loss"]),
                    "mean_pairwise_affinity": float(m["mean_pairwise_affinity"])})
  if state is None:
    raise ValueError("batches: no batch was given, no warm-up step ran")
  return shared_params, state, history
