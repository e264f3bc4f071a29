"""Task groups of an mmap_mt run: the gradient-driven warm-up, or an ablation partition.

`groups.mode`:
  gradient      (the paper) warm up one shared MmAP on all tasks; each step computes all
                per-task gradients in ONE vmap (about one training step), updates the shared
                MmAP with their mean and accumulates the task affinity (`groups.affinity`):
                cosine of the gradients named by `groups.affinity_params`, per tower
                (`groups.towers`: text | visual | both, each tower's contribution to the source
                gradient normalised | summed, the plain parameter gradient), optionally EMA'd
                (`groups.grad_ema`); or TAG's lookahead affinity (`tag`, Fifty et al. 2021, at
                the warm-up's learning rate). Then partition into `groups.num_groups` groups
                (k, or `auto`: k chosen by the objective, see mmap_jax/grouping).
  random        a seeded random partition into `groups.num_groups` balanced groups
  all_in_one    one group of all tasks          one_per_task   T singleton groups
  explicit      `groups.explicit`
Only `gradient` runs the warm-up: first the recipe's lr warm-up (`optim` warmup_steps of the
mmap family, recorded as `lr_warmup_steps`; nothing is recorded, the prompts leave their init),
then `groups.warmup_steps` recorded steps, so the affinity is not measured at initialisation.
The warm-up trains the shared MmAP on the SUM of task losses, as every form does (heads.py).
`GroupSpec.warmup_total_steps` (train/run_spec.py) is its length; with `groups.init_from_warmup`
it counts against `train.steps` (the trainer's budget, train/loop.py). Every mode writes
groups.json (with "mode" and "settings"); a groups.json already in the workdir is reused when its settings match the config, and is an
error otherwise (a stale grouping is never applied silently). The warm-up also writes its
trained shared MmAP (grouping_warmup.safetensors, before groups.json), so
`groups.init_from_warmup` gives a restarted run exactly the init of an uninterrupted one.
"""
from __future__ import annotations

import time
from typing import Any, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import traverse_util
from safetensors.numpy import load as load_safetensors, save as save_safetensors

from mmap_jax import grouping, heads, parallel, paths
from mmap_jax.groups import Groups
from mmap_jax.data import pipeline, sources
from mmap_jax.prompts import mmap as mmap_prompt, multitask
from mmap_jax.prompts.base import PromptTokens
from mmap_jax.prompts.spec import PromptSpec
from mmap_jax.train import chunks, optim, setup
from mmap_jax.train import run_spec as run_spec_lib
from mmap_jax.train.run_spec import RunSpec

WARMUP_FILE = "grouping_warmup.safetensors"  # the warm-up's trained {"shared": MmAP} pytree


class GroupingResult(NamedTuple):
  groups: Groups
  warmup: Optional[Any]  # the warm-up's learned {"shared": MmAP params} (host arrays), or None


# ----------------------------------------------------------------------------- affinity leaves

def source_prompt_grads(grads: Any) -> Any:
  """The per-task gradients of the shared MmAP's source prompts only ([T, J, L_s, d_s])."""
  return {"source": grads["shared"]["source"]}


def affinity_filter(which: str):
  """`groups.affinity_params` -> the `grouping_step` filter ("all": None, every leaf)."""
  if which == "source":
    return source_prompt_grads
  if which == "all":
    return None
  raise setup.ConfigError(f"groups.affinity_params={which!r}; allowed: {setup.AFFINITY_PARAMS}")


# ----------------------------------------------------------------------------- per-tower gradients

def _split_sources(learned: Any) -> Any:
  """MmAP {"source", "scale_text", "scale_visual"} -> the source once per tower."""
  s = dict(learned["shared"])
  source = s.pop("source")
  return {"shared": {**s, "source_text": source, "source_visual": source}}


def _merge_sources(grads: Any) -> Any:
  """The transpose of `_split_sources`: the source's gradient is the sum of its copies'."""
  s = dict(grads["shared"])
  source = s.pop("source_text") + s.pop("source_visual")
  return {"shared": {**s, "source": source}}


TOWER_SPLIT = grouping.Split(_split_sources, _merge_sources)


def tower_split_loss_fn(clip_params, clip_cfg, spec: PromptSpec, *, dtype=jnp.float32,
                        remat: bool = False, text_sharding=parallel.REPLICATED_TEXT):
  """`heads.per_task_loss_fn` of mmap_shared on `TOWER_SPLIT`'s form: the text prompts expand
  from `source_text`, the visual ones from `source_visual`, so each copy's gradient is that
  tower's contribution (equal in value to the plain loss; tested against it)."""
  def fn(split_learned, class_tokens_t, images_t, labels_t):
    s = split_learned["shared"]
    add = lambda x: jnp.asarray(x)[None]
    tokens = PromptTokens(add(mmap_prompt.layer_kron(s["source_text"], s["scale_text"])),
                          add(mmap_prompt.layer_kron(s["source_visual"], s["scale_visual"])))
    ct = heads.ClassTokens(*(None if x is None else add(x) for x in class_tokens_t))
    logits = heads.task_logits(clip_params, clip_cfg, tokens, ct, add(images_t), dtype=dtype,
                               remat=remat, text_sharding=text_sharding)
    return heads.masked_cross_entropy(logits, add(labels_t), ct.class_mask)[0]
  return fn


def tower_filters(towers: str, which: str):
  """`groups.towers` (+ affinity_params) -> the filter(s) over `TOWER_SPLIT` gradients; None for
  "summed" (the plain gradients and `affinity_filter(which)`)."""
  if towers == "summed":
    return None

  def pick(tower):
    def f(grads):
      s = grads["shared"]
      out = {"source": s[f"source_{tower}"]}
      if which == "all":
        out["scale"] = s[f"scale_{tower}"]
      return out
    return f
  if towers == "both":
    return (pick("text"), pick("visual"))
  if towers in ("text", "visual"):
    return pick(towers)
  raise setup.ConfigError(f"groups.towers={towers!r}; allowed: {setup.TOWERS}")


def _grouping_step_fn(clip_cfg, spec: PromptSpec, optimizer, dtype, remat, filter_fn=None,
                      ema_decay: float = 0.0, affinity: str = "cosine", towers: str = "summed",
                      text_sharding=parallel.REPLICATED_TEXT):
  """towers != "summed" (cosine only): the loss takes TOWER_SPLIT's form and `filter_fn` the
  split gradients (`tower_filters`)."""
  split = TOWER_SPLIT if affinity == "cosine" and towers != "summed" else None

  def step(gstate, clip_params, class_tokens, batch, record, lr=None):
    if split is None:
      loss_t = heads.per_task_loss_fn(clip_params, clip_cfg, spec, dtype=dtype, remat=remat,
                                      text_sharding=text_sharding)
    else:
      loss_t = tower_split_loss_fn(clip_params, clip_cfg, spec, dtype=dtype, remat=remat,
                                   text_sharding=text_sharding)
    params, opt_state, aff, metrics = grouping.grouping_step(
        loss_t, gstate["params"], gstate["opt_state"], optimizer, gstate["affinity"],
        class_tokens, batch["image"], batch["label"], record=record,
        affinity_filter=filter_fn, ema_decay=ema_decay, affinity=affinity, split=split,
        lookahead_lr=lr if affinity == "tag" else None)
    return {"params": params, "opt_state": opt_state, "affinity": aff}, metrics
  return step


def make_grouping_step(clip_cfg, spec: PromptSpec, optimizer, *, dtype=jnp.float32,
                       remat: bool = False, filter_fn=None, ema_decay: float = 0.0,
                       affinity: str = "cosine", towers: str = "summed",
                       text_sharding=parallel.REPLICATED_TEXT):
  """jit(step)(gstate, clip_params, class_tokens, batch, record[, lr]) -> (gstate, metrics);
  `lr` is the step's learning rate, TAG's lookahead step (groups.affinity='tag' only)."""
  return jax.jit(_grouping_step_fn(clip_cfg, spec, optimizer, dtype, remat, filter_fn, ema_decay,
                                   affinity, towers, text_sharding), donate_argnums=(0,))


def make_grouping_steps(clip_cfg, spec: PromptSpec, optimizer, *, dtype=jnp.float32,
                        remat: bool = False, filter_fn=None, ema_decay: float = 0.0,
                        affinity: str = "cosine", towers: str = "summed",
                        text_sharding=parallel.REPLICATED_TEXT):
  """K grouping steps per call (train.steps_per_call), a lax.scan of the same step:
  jit(steps)(gstate, clip_params, class_tokens, batches [K, T, B, ...], records [K][, lrs [K]])
  -> (gstate, metrics stacked [K, ...]); equal to K calls of `make_grouping_step`."""
  step = _grouping_step_fn(clip_cfg, spec, optimizer, dtype, remat, filter_fn, ema_decay,
                           affinity, towers, text_sharding)

  def steps(gstate, clip_params, class_tokens, batches, records, lrs=None):
    return jax.lax.scan(lambda gs, xs: step(gs, clip_params, class_tokens, *xs), gstate,
                        (batches, records, lrs))

  return jax.jit(steps, donate_argnums=(0,))


# ----------------------------------------------------------------------------- settings / reuse

def _check_reuse(record: dict, want: dict, path: str) -> None:
  have = dict(record.get("settings") or {"mode": "gradient"})  # files before "settings": gradient
  if have["mode"] == "gradient":  # files before groups.affinity / groups.towers: summed cosine
    have.setdefault("affinity", "cosine")
    if have["affinity"] == "cosine":
      have.setdefault("towers", "summed")
  bad = [k for k in want if k in have and have[k] != want[k]]
  if bad:
    diff = ", ".join(f"{k}: file {have[k]!r} vs config {want[k]!r}" for k in bad)
    raise setup.ConfigError(
        f"{path} holds a grouping made with other settings ({diff}); use a fresh workdir or "
        f"delete {path} (and its affinity files) to regroup")


def _existing(workdir: str, names: Sequence[str], want: dict) -> Optional[Groups]:
  """The groups of a matching groups.json in the workdir, None if there is none.

  Process 0 alone reads the file and its answer (or error) is broadcast, so every process takes
  the same branch whatever its view of the shared filesystem.
  """
  found, error = None, None
  if jax.process_index() == 0:
    path = paths.as_path(workdir) / grouping.GROUPS_FILE
    try:
      if path.exists():
        _check_reuse(grouping.load_grouping(workdir), want, path)
        found = [list(g) for g in grouping.load_groups(workdir, names)]
    except setup.ConfigError as e:
      error = str(e)
  found, error = parallel.broadcast_from_process0([found, error])
  if error:
    raise setup.ConfigError(error)
  return None if found is None else tuple(tuple(g) for g in found)


# ----------------------------------------------------------------------------- warm-up params

def save_warmup(workdir: paths.PathLike, learned: Any) -> str:
  """The warm-up's learned pytree as safetensors ('/'-joined paths), written atomically."""
  flat = {k: np.ascontiguousarray(np.asarray(v)) for k, v in
          traverse_util.flatten_dict(jax.device_get(learned), sep="/").items()}
  return str(paths.write_bytes_atomic(paths.as_path(workdir) / WARMUP_FILE,
                                      save_safetensors(flat)))


def load_warmup(workdir: paths.PathLike, expected: Any) -> Any:
  """Read WARMUP_FILE and check it against `expected` (a pytree of arrays or shape structs)."""
  path = paths.as_path(workdir) / WARMUP_FILE
  got = traverse_util.unflatten_dict(load_safetensors(path.read_bytes()), sep="/")
  want = jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype).name), expected)
  have = jax.tree.map(lambda x: (tuple(x.shape), np.dtype(x.dtype).name), got)
  if have != want:
    raise setup.ConfigError(f"{path}: holds {have}, the configured prompt needs {want} (prompt "
                            f"config changed since the warm-up? delete the grouping files)")
  return got


# ----------------------------------------------------------------------------- modes

def ablation_groups(spec: RunSpec, num_tasks: int, names: Sequence[str]) -> Groups:
  """The partition of a mode without a warm-up (random, all_in_one, one_per_task, explicit)."""
  mode = spec.groups.mode
  if mode == "explicit":
    return setup.explicit_groups(spec.groups.explicit, names)
  if mode == "all_in_one":
    return grouping.all_in_one_groups(num_tasks)
  if mode == "one_per_task":
    return grouping.one_per_task_groups(num_tasks)
  if mode == "random":
    k = int(spec.groups.num_groups)
    if not 1 <= k <= num_tasks:
      raise setup.ConfigError(f"groups.num_groups={k} must be in 1..{num_tasks} (the number of "
                              "tasks) with groups.mode='random'")
    return grouping.random_groups(num_tasks, k, spec.groups.random_seed)
  raise setup.ConfigError(f"groups.mode={mode!r} has no fixed partition; allowed: "
                          f"{setup.GROUP_MODES}")


def task_groups(spec: RunSpec, workdir: str, clip: setup.Clip,
                tasks: Sequence[sources.TaskData], mesh) -> GroupingResult:
  """The groups of this run by `groups.mode` (+ the warm-up's MmAP for mode gradient)."""
  if spec.groups.mode == "gradient":
    return run_grouping(spec, workdir, clip, tasks, mesh)
  names = [t.info.name for t in tasks]
  want = spec.groups.settings()
  groups = ablation_groups(spec, len(tasks), names)
  existing = _existing(workdir, names, want)
  if existing is not None and existing != groups:
    raise setup.ConfigError(f"{paths.as_path(workdir) / grouping.GROUPS_FILE} holds groups "
                            f"{existing}, groups.mode={spec.groups.mode!r} gives {groups}")
  if existing is None and jax.process_index() == 0:
    grouping.save_grouping(workdir, names, None, groups, {"mode": want["mode"], "settings": want})
  logging.info("task groups (%s): %s", want["mode"], [[names[i] for i in g] for g in groups])
  return GroupingResult(groups, None)


def run_grouping(run: RunSpec, workdir: str, clip: setup.Clip,
                 tasks: Sequence[sources.TaskData], mesh) -> GroupingResult:
  """Warm up, partition, write the grouping files; reuse a matching groups.json if present.

  `run.groups.warmup_prompt` / `warmup_recipe` (one MmAP shared by all tasks) must be resolved:
  `run_spec.resolve` does so for a run whose groups.mode is gradient."""
  g = run.groups
  if g.warmup_prompt is None or g.warmup_recipe is None:
    raise ValueError("run_grouping needs a RunSpec resolved with groups.mode='gradient' and a "
                     "grouped method")
  names = [t.info.name for t in tasks]
  want = g.settings("gradient")
  auto = g.num_groups == "auto"
  num_groups = None if auto else (int(g.num_groups) or None)
  if num_groups is not None and num_groups > len(tasks):
    raise setup.ConfigError(f"groups.num_groups={num_groups} must be <= {len(tasks)} (the number "
                            "of tasks)")
  threshold = None if num_groups or auto else float(g.threshold)
  spec = run_spec_lib.validated_prompt(g.warmup_prompt, clip.cfg)
  key = jax.random.key(run.seed + 7)
  existing = _existing(workdir, names, want)
  if existing is not None:
    logging.info("reusing the task grouping in %s: %s", workdir, existing)
    warmup = None
    if parallel.broadcast_from_process0((paths.as_path(workdir) / WARMUP_FILE).exists()):
      expected = jax.eval_shape(lambda: multitask.init_learned(key, clip.cfg, spec, len(tasks)))
      warmup = load_warmup(workdir, expected)
    elif g.init_from_warmup:
      raise setup.ConfigError(
          f"groups.init_from_warmup=True but {workdir} has {grouping.GROUPS_FILE} without "
          f"{WARMUP_FILE} (written by an older version?); delete {grouping.GROUPS_FILE} to rerun "
          "the warm-up")
    return GroupingResult(existing, warmup)
  steps, every = g.warmup_steps, g.every
  lr_warmup = g.lr_warmup_steps
  total = lr_warmup + steps
  ema = float(g.grad_ema)
  kind = g.affinity
  towers = g.towers if kind == "cosine" else "summed"
  filter_fn = (tower_filters(towers, g.affinity_params) if towers != "summed"
               else affinity_filter(g.affinity_params))
  dtype = run.compute_dtype
  class_tokens = parallel.replicate(setup.class_tokens(clip, spec, tasks), mesh)
  clip_params = parallel.replicate(clip.params, mesh)
  # grouping_step applies the MEAN of the per-task gradients; x T makes it the gradient of the
  # summed objective every form trains on (heads.multitask_loss), at the same lr.
  optimizer = optax.chain(optax.scale(float(len(tasks))),
                          optim.make_optimizer(g.warmup_recipe, total))
  learned = multitask.init_learned(key, clip.cfg, spec, len(tasks))
  ema_size = grouping.affinity_size(
      _split_sources(learned) if towers != "summed" else learned, filter_fn) if ema else None
  gstate = parallel.replicate({"params": learned, "opt_state": optimizer.init(learned),
                               "affinity": grouping.AffinityState.zeros(len(tasks), ema_size)},
                              mesh)
  k = run.train.steps_per_call
  kw = dict(dtype=dtype, remat=run.remat, filter_fn=filter_fn, ema_decay=ema,
            affinity=kind, towers=towers, text_sharding=run.text_sharding(mesh))
  schedule = optim.learning_rate_schedule(g.warmup_recipe, total)

  def lr_args(first, n):
    """TAG's lookahead step: the warm-up's lr at each step of the call (none for the cosine)."""
    if kind != "tag":
      return ()
    lrs = jnp.asarray([float(schedule(first + j)) for j in range(n)], jnp.float32)
    return (lrs[0],) if k == 1 else (lrs,)
  if k == 1:
    step = make_grouping_step(clip.cfg, spec, optimizer, **kw)
  else:
    multi = make_grouping_steps(clip.cfg, spec, optimizer, **kw)
  it = pipeline.train_iterator(
      tasks, batch_size=run.input.batch_size, image_size=clip.cfg.vision.image_size,
      seed=run.seed + 1, augment=run.input.augment,
      sharding=mesh, worker_count=run.input.workers, num_steps=total)
  t0 = time.perf_counter()
  history = []  # device arrays; fetched once at the end, so the loop never waits on the device
  log_every = max(run.train.log_every, 1)
  done = 0
  # Recorded: every `every`-th step after the lr warm-up (history holds the recorded steps only).
  recorded = lambda i: i >= lr_warmup and (i - lr_warmup) % every == 0
  for n in chunks.plan_chunks(0, total, k, (log_every,)):  # k == 1: one step per call
    if k == 1:
      gstate, metrics = step(gstate, clip_params, class_tokens, next(it),
                             jnp.asarray(recorded(done)), *lr_args(done, 1))
      last = metrics
      if done >= lr_warmup:
        history.append(metrics["affinity"])
    else:
      records = jnp.asarray([recorded(done + j) for j in range(n)])
      gstate, metrics = multi(gstate, clip_params, class_tokens, it.next_steps(n), records,
                              *lr_args(done, n))
      last = jax.tree.map(lambda x: x[-1], metrics)
      history.extend(metrics["affinity"][j] for j in range(n) if done + j >= lr_warmup)
    done += n
    if done % log_every == 0 or done == total:
      logging.info("grouping warm-up %d/%d (%d lr warm-up)  loss %.4f  mean pairwise affinity "
                   "%.3f", done, total, lr_warmup, float(last["loss"]),
                   float(last["mean_pairwise_affinity"]))
  it.close() if hasattr(it, "close") else None
  state = jax.device_get(gstate["affinity"])
  affinity = np.asarray(grouping.AffinityState(state.total, state.count).mean())
  tag_info = {}
  if kind == "tag":  # directed Z; the partition reads its symmetric part
    tag_info = {"directed_affinity": affinity.tolist(),
                "affinity_definition": "tag: Z[i][j] = 1 - L_j(theta - lr g_i) / L_j(theta), "
                                       "mean over recorded steps; partitioned on (Z + Z^T) / 2"}
    affinity = (affinity + affinity.T) / 2
  warmup = jax.device_get(gstate["params"])
  groups = None
  if jax.process_index() == 0:  # Writes the files; its partition is broadcast to the others.
    save_warmup(workdir, warmup)  # before groups.json, whose presence means "grouping done"
    groups = grouping.finalize_grouping(
        workdir, names, affinity, num_groups=num_groups, threshold=threshold, steps=steps,
        history=np.stack(jax.device_get(history)), every=every,
        extra={"mode": "gradient", "settings": want, "every": every,
               "lr_warmup_steps": lr_warmup, "total_steps": total,
               "seconds": round(time.perf_counter() - t0, 2), **tag_info})
    groups = [list(g) for g in groups]
  groups = tuple(tuple(g) for g in parallel.broadcast_from_process0(groups))
  logging.info("task groups: %s", [[names[i] for i in g] for g in groups])
  return GroupingResult(groups, warmup)
