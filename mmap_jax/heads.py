"""Multi-task CLIP head: per-task class-name text features, image features, logits and losses.

A task is one domain with its own class list. All tasks' classes are padded to C_max and encoded
in ONE batched text call (vmap over tasks, since each task has its own prompts); padded classes
carry a valid dummy sequence (a copy of the task's first class, so no NaNs) and are excluded from
the softmax by the class mask, never by zeroing logits. Over a mesh, `parallel.TextSharding`
splits that class axis between the devices (each encodes only its share; features all-gathered).

Shapes: class ids [T, C_max, S], images [T, B, H, W, 3], labels [T, B], logits [T, B, C_max].
Labels index the task's own classes (< that task's class count).

Loss reduction: every form (ST and MT) minimises the SUM over its tasks of each task's mean
cross-entropy. So a task-specific parameter gets exactly the gradient of its own task's loss in
every form (mmap_mt's task units as mmap_st's prompts, on the same batch): a mean would scale it
by 1/T in MT only and give ST and MT forms different effective learning rates at the same lr.
Shared parameters receive the sum of T tasks' gradients, so MT and ST forms are tuned separately.
The logged `mean_task_loss` (the mean over tasks) is the number comparable across methods and T.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from mmap_jax import parallel
from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts.base import PromptTokens
from mmap_jax.prompts.multitask import (Groups, clip_params_for, clip_task_axes, prompt_module,
                                        task_prompts)
from mmap_jax.prompts.spec import PromptSpec

# Logit of an excluded (padded) class: exp(NEG - max) is exactly 0 in float32, and finite.
NEG = -1e30
PLACEHOLDER = "X"


class ClassTokens(NamedTuple):
  """Tokenized class prompts of every task (numpy; a pytree, so it can be vmapped over tasks)."""
  ids: np.ndarray         # int32 [T, C_max, S], truncated to the longest real sequence
  eot: np.ndarray         # int32 [T, C_max], end-of-text (pooling) index
  class_mask: np.ndarray  # bool [T, C_max], False for padded classes


# ----------------------------------------------------------------------------- class tokens

def class_prompt_text(name: str, num_prompt_tokens: int,
                      zeroshot_template: str = "a photo of a {}.") -> str:
  """"X X .. X {name}." with learned placeholders, else the hand-crafted template."""
  name = name.replace("_", " ")
  if num_prompt_tokens:
    return " ".join([PLACEHOLDER] * num_prompt_tokens + [name]) + "."
  return zeroshot_template.format(name)


def build_class_tokens(tokenizer, class_names_per_task: Sequence[Sequence[str]],
                       num_prompt_tokens: int, zeroshot_template: str = "a photo of a {}.",
                       context_length: int = 77, ctx_init: Optional[str] = None) -> ClassTokens:
  """Token ids of every task's class prompts, padded to C_max classes (see module docstring).

  With `num_prompt_tokens` = L > 0 the sequence is <SOS> X*L {class}.<EOT>, and the placeholders
  at positions 1..L are what the layer-0 text prompt replaces (use `spec.text_prompt_tokens`).
  With `ctx_init` (`spec.learned_ctx_init`, >= L tokens) the prompt is MaPLe's
  "{ctx_init} {class}." with its first L tokens replaced by the placeholders: the rest of
  ctx_init stays as fixed text, e.g. <SOS> X X of a {class}.<EOT> for "a photo of a" and L = 2.
  """
  if not class_names_per_task or any(len(c) == 0 for c in class_names_per_task):
    raise ValueError("class_names_per_task must list at least one class for every task")
  if num_prompt_tokens:
    placeholder = tokenizer.encode(PLACEHOLDER)
    if len(placeholder) != 1:
      raise ValueError(f"placeholder {PLACEHOLDER!r} is not a single token: {placeholder}")
  init_ids = tokenizer.encode(ctx_init) if ctx_init else []
  if ctx_init and not 1 <= num_prompt_tokens <= len(init_ids):
    raise ValueError(f"ctx_init={ctx_init!r} has {len(init_ids)} tokens; it initialises "
                     f"num_prompt_tokens={num_prompt_tokens} learned ones (need 1..{len(init_ids)})")
  c_max = max(len(c) for c in class_names_per_task)
  ids, mask = [], []
  for names in class_names_per_task:
    if ctx_init:
      texts = [f"{ctx_init} {n.replace('_', ' ')}." for n in names]
    else:
      texts = [class_prompt_text(n, num_prompt_tokens, zeroshot_template) for n in names]
    rows = tokenizer.tokenize(texts, context_length=context_length, truncate=False)
    if ctx_init:
      # CLIP's BPE works word by word, so the prompt starts with ctx_init's own tokens.
      if not (rows[:, 1:1 + len(init_ids)] == np.asarray(init_ids)).all():
        raise ValueError(f"class prompts do not start with ctx_init={ctx_init!r}'s tokens")
      rows = rows.copy()
      rows[:, 1:1 + num_prompt_tokens] = placeholder[0]
    pad = c_max - len(names)
    ids.append(np.concatenate([rows, np.repeat(rows[:1], pad, axis=0)], axis=0))
    mask.append(np.arange(c_max) < len(names))
  ids = np.stack(ids).astype(np.int32)
  if num_prompt_tokens and not (ids[..., 1:1 + num_prompt_tokens] == placeholder[0]).all():
    raise ValueError("class prompts do not have the placeholders at positions 1..L")
  ids = clip.truncate_to_longest(ids, tokenizer.eot_token)
  return ClassTokens(ids=ids, eot=clip.eot_positions(ids, tokenizer.eot_token),
                     class_mask=np.stack(mask))


# ----------------------------------------------------------------------------- features / logits

def _axis(x: Any, per_task: bool) -> Optional[int]:
  return 0 if (per_task and x is not None) else None


def _clip_axes(clip_params: Any, clip_per_task: Any) -> Any:
  """vmap in_axes of the CLIP params: `clip_per_task` is a bool (every leaf alike) or a pytree
  of 0 / None per leaf (`multitask.clip_task_axes`: PEFT *_st, only learned leaves are [T])."""
  if isinstance(clip_per_task, bool):
    return _axis(clip_params, clip_per_task)
  return clip_per_task


def _scale_per_task(clip_per_task: Any) -> bool:
  if isinstance(clip_per_task, bool):
    return clip_per_task
  return clip_per_task.get("logit_scale") == 0


def text_features(clip_params: Any, clip_cfg: ClipConfig, text_prompts: Optional[jax.Array],
                  class_tokens: ClassTokens, *, dtype=jnp.float32, remat: bool = False,
                  share_prefix: bool = True, clip_per_task: Any = False,
                  text_sharding: parallel.TextSharding = parallel.REPLICATED_TEXT) -> jax.Array:
  """Normalized class text features [T, C_max, E]; `text_prompts` [T, J, L, d_t] or None.

  One vmap over tasks; `clip_per_task` when the CLIP params have a leading [T] (fullft_st), or
  a per-leaf pytree of axes (see `_clip_axes`). `text_sharding` splits the class axis over the
  mesh (and chunks it); the result is the same, replicated.
  """
  def one(params, ids, eot, prompts):
    feats = clip.encode_text(params, clip_cfg, clip.embed_tokens(params, ids), eot, prompts,
                             dtype=dtype, remat=remat, share_prefix=share_prefix)
    return clip.normalize(feats)
  in_axes = (_clip_axes(clip_params, clip_per_task), 0, 0, _axis(text_prompts, True))
  encode = lambda ids, eot: jax.vmap(one, in_axes)(clip_params, ids, eot, text_prompts)
  ids, eot = jnp.asarray(class_tokens.ids), jnp.asarray(class_tokens.eot)
  num_tasks, num_classes = eot.shape
  padded = text_sharding.padded_classes(num_classes)
  ids, eot = (_pad_classes(x, padded) for x in (ids, eot))
  shards, chunk = text_sharding.shards, text_sharding.chunk
  split = text_sharding.split_rows
  if not chunk or padded // shards == chunk:
    feats = split(encode(split(ids), split(eot)))
  else:
    # Device d holds classes [d*m, (d+1)*m); chunk j of every device is encoded together.
    m = padded // shards
    def to_chunks(x):   # [T, C, ...] -> [m/chunk, T, shards * chunk, ...]
      x = x.reshape((num_tasks, shards, m // chunk, chunk) + x.shape[2:])
      return jnp.moveaxis(x, 2, 0).reshape((m // chunk, num_tasks, shards * chunk) + x.shape[4:])
    def encode_chunk(xs):
      return split(encode(split(xs[0]), split(xs[1])))
    feats = jax.lax.map(jax.checkpoint(encode_chunk), (to_chunks(ids), to_chunks(eot)))
    feats = feats.reshape((m // chunk, num_tasks, shards, chunk, -1))
    feats = jnp.moveaxis(feats, 0, 2).reshape((num_tasks, padded, -1))
  return text_sharding.gather_rows(feats)[:, :num_classes]


def _pad_classes(x: jax.Array, padded: int) -> jax.Array:
  """[T, C, ...] -> [T, padded, ...] with copies of class 0 (valid sequences, sliced off later)."""
  extra = padded - x.shape[1]
  if extra == 0:
    return x
  return jnp.concatenate([x, jnp.repeat(x[:, :1], extra, axis=1)], axis=1)


def image_features(clip_params: Any, clip_cfg: ClipConfig, visual_prompts: Optional[jax.Array],
                   images: jax.Array, *, dtype=jnp.float32, remat: bool = False,
                   clip_per_task: Any = False) -> jax.Array:
  """Normalized image features [T, B, E]: task t's images with task t's visual prompts."""
  def one(params, ims, prompts):
    return clip.normalize(clip.encode_image(params, clip_cfg, ims, prompts, dtype=dtype,
                                            remat=remat))
  in_axes = (_clip_axes(clip_params, clip_per_task), 0, _axis(visual_prompts, True))
  return jax.vmap(one, in_axes)(clip_params, images, visual_prompts)


def logits_from_features(clip_params: Any, image_feats: jax.Array, text_feats: jax.Array, *,
                         clip_per_task: Any = False) -> jax.Array:
  """exp(logit_scale) * cosine: [T, B, E] x [T, C, E] -> [T, B, C] (features already unit)."""
  scale = jnp.exp(jnp.asarray(clip_params["logit_scale"]))
  if not _scale_per_task(clip_per_task):
    scale = jnp.broadcast_to(scale, image_feats.shape[:1])
  return jax.vmap(lambda s, i, t: s * i @ t.T)(scale, image_feats, text_feats)


def task_logits(clip_params: Any, clip_cfg: ClipConfig, prompts: Optional[PromptTokens],
                class_tokens: ClassTokens, images: jax.Array, *, dtype=jnp.float32,
                remat: bool = False, share_prefix: bool = True, clip_per_task: Any = False,
                text_sharding: parallel.TextSharding = parallel.REPLICATED_TEXT) -> jax.Array:
  """Logits [T, B, C_max]; text features recomputed from the prompts (leading T) on every call."""
  prompts = prompts if prompts is not None else PromptTokens(None, None)
  txt = text_features(clip_params, clip_cfg, prompts.text, class_tokens, dtype=dtype,
                      remat=remat, share_prefix=share_prefix, clip_per_task=clip_per_task,
                      text_sharding=text_sharding)
  img = image_features(clip_params, clip_cfg, prompts.visual, images, dtype=dtype, remat=remat,
                       clip_per_task=clip_per_task)
  return logits_from_features(clip_params, img, txt, clip_per_task=clip_per_task)


# ----------------------------------------------------------------------------- losses

def masked_logits(logits: jax.Array, class_mask: jax.Array) -> jax.Array:
  """Padded classes pushed to NEG: use before argmax / softmax at evaluation."""
  return jnp.where(jnp.asarray(class_mask)[:, None, :], logits.astype(jnp.float32), NEG)


def masked_cross_entropy(logits: jax.Array, labels: jax.Array, class_mask: jax.Array,
                         example_mask: Optional[jax.Array] = None) -> jax.Array:
  """Per-task mean cross-entropy [T] over the task's real classes only.

  `example_mask` [T, B] (optional) drops padded examples; a task with none gets loss 0.
  """
  logp = jax.nn.log_softmax(masked_logits(logits, class_mask), axis=-1)
  nll = -jnp.take_along_axis(logp, jnp.asarray(labels)[..., None].astype(jnp.int32), axis=-1)
  nll = nll[..., 0]
  if example_mask is None:
    return nll.mean(axis=-1)
  m = jnp.asarray(example_mask, jnp.float32)
  return (nll * m).sum(-1) / jnp.maximum(m.sum(-1), 1.0)


def multitask_loss(learned: Any, clip_params: Any, clip_cfg: ClipConfig, spec: PromptSpec,
                   groups: Optional[Groups], class_tokens: ClassTokens,
                   batch: Mapping[str, jax.Array], *, dtype=jnp.float32, remat: bool = False,
                   share_prefix: bool = True, dropout_key: Optional[jax.Array] = None,
                   text_sharding: parallel.TextSharding = parallel.REPLICATED_TEXT
                   ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """(loss, aux) for `jax.value_and_grad(..., has_aux=True)` w.r.t. `learned`.

  batch: {"images": [T, B, H, W, 3], "labels": int [T, B], optional "mask": [T, B]}.
  `clip_params` is the frozen CLIP (fullft_* runs with `learned["clip"]` instead).
  `dropout_key`: a training step's key; only with it is LoRA's dropout applied (never at eval).
  loss = SUM over tasks of each task's mean cross-entropy, for every form (module docstring).
  aux = {"per_task_loss": [T], "mean_task_loss": [] (comparable across methods),
         "logits": [T, B, C_max]}.
  """
  num_tasks = class_tokens.ids.shape[0]
  prompts = task_prompts(learned, clip_cfg, spec, groups, num_tasks=num_tasks)
  params = clip_params_for(learned, clip_params, spec, dropout_key=dropout_key)
  logits = task_logits(params, clip_cfg, prompts, class_tokens, batch["images"], dtype=dtype,
                       remat=remat, share_prefix=share_prefix,
                       clip_per_task=clip_task_axes(params, spec), text_sharding=text_sharding)
  per_task = masked_cross_entropy(logits, batch["labels"], class_tokens.class_mask,
                                  batch.get("mask"))
  loss = per_task.sum()
  return loss, {"per_task_loss": per_task, "mean_task_loss": per_task.mean(), "logits": logits}


# ----------------------------------------------------------------------------- one task (grouping)

def _shared_tokens(learned: Any, clip_cfg: ClipConfig, spec: PromptSpec) -> PromptTokens:
  if spec.grouped:
    raise ValueError(f"{spec.method} has group/task prompts; use mmap_shared for per-task "
                     "gradients")
  if spec.layout not in ("shared", "clip", "none") or spec.sharing == "st":
    raise ValueError(f"single-task losses take a learned pytree shared by all tasks (methods "
                     f"*_mt except mmap_mt, mmap_indep_mt, mmap_task_mt; mmap_shared, zeroshot); "
                     f"got {spec.method!r}")
  if not spec.has_prompts:
    return PromptTokens(None, None)
  return prompt_module(spec).expand(learned["shared"], clip_cfg, spec)


def per_task_loss_fn(clip_params: Any, clip_cfg: ClipConfig, spec: PromptSpec, *,
                     dtype=jnp.float32, remat: bool = False, share_prefix: bool = True,
                     text_sharding: parallel.TextSharding = parallel.REPLICATED_TEXT
                     ) -> Callable[[Any, ClassTokens, jax.Array, jax.Array], jax.Array]:
  """fn(shared_learned, class_tokens_t, images_t [B,H,W,3], labels_t [B]) -> scalar loss.

  For per-task gradients of one shared prompt set (e.g. `mmap_shared` for task grouping), in
  ONE vmap over tasks; class_tokens_t is a ClassTokens without the task axis:
    fn = per_task_loss_fn(clip_params, clip_cfg, spec)
    grads = jax.vmap(jax.grad(fn), in_axes=(None, 0, 0, 0))(
        shared_learned, class_tokens, batch["images"], batch["labels"])   # leaves: [T, ...]
  `shared_learned` is `init_learned(...)` of a shared method ({"shared": ...}; fullft_mt and
  the PEFT *_mt methods too).
  """
  def fn(shared_learned, class_tokens_t, images_t, labels_t):
    tokens = _shared_tokens(shared_learned, clip_cfg, spec)
    params = clip_params_for(shared_learned, clip_params, spec)
    add = lambda x: None if x is None else jnp.asarray(x)[None]
    ct = ClassTokens(*(add(x) for x in class_tokens_t))
    logits = task_logits(params, clip_cfg, PromptTokens(add(tokens.text), add(tokens.visual)),
                         ct, add(images_t), dtype=dtype, remat=remat, share_prefix=share_prefix,
                         text_sharding=text_sharding)
    return masked_cross_entropy(logits, add(labels_t), ct.class_mask)[0]
  return fn


def single_task_loss(shared_learned: Any, clip_params: Any, clip_cfg: ClipConfig,
                     spec: PromptSpec, class_tokens: ClassTokens, task_index: jax.Array,
                     images: jax.Array, labels: jax.Array, *, dtype=jnp.float32,
                     remat: bool = False, share_prefix: bool = True,
                     text_sharding: parallel.TextSharding = parallel.REPLICATED_TEXT) -> jax.Array:
  """Task `task_index`'s loss with a shared prompt set; vmappable over task_index/images/labels.

  class_tokens keeps its task axis (indexed inside); images [B, H, W, 3], labels [B].
  """
  ct = ClassTokens(*(jnp.take(jnp.asarray(x), task_index, axis=0) for x in class_tokens))
  fn = per_task_loss_fn(clip_params, clip_cfg, spec, dtype=dtype, remat=remat,
                        share_prefix=share_prefix, text_sharding=text_sharding)
  return fn(shared_learned, ct, images, labels)
