"""The optimizer of the learned pytree: a resolved `recipes.Recipe`, expressed in optax.

torch's SGD(weight_decay=wd, momentum=m) adds wd * param to the gradient before momentum; the
same order here (add_decayed_weights, then sgd) makes runs comparable with the PyTorch code.
torch's AdamW decays decoupled, scaled by the lr: optax.adamw's order (adam, decay, lr) is that.
Gradient clipping (global norm) comes first, as `clip_grad_norm_` before `optimizer.step()`.

`recipe` may be a `Recipe` or any object with its attributes (a plain ConfigDict such as the demo
pretraining's); attributes it lacks take the `Recipe` defaults. None means the method trains
nothing (zeroshot): an identity optimizer and a zero learning rate.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import optax

from mmap_jax.train.recipes import DECAY_MASKS, OPTIMIZERS, Recipe

_DEFAULTS = {k: v for k, v in Recipe(name="sgd", lr=1.0, weight_decay=0.0).to_dict().items()
             if k not in ("name", "lr", "weight_decay")}

# No weight decay on these leaves (decay_mask="no_norm_bias_embed"): LayerNorm gains and biases
# (under ln_*), every bias, the embeddings and the temperature, by their names in the CLIP pytree.
NO_DECAY_LEAVES = ("bias", "embedding", "positional_embedding", "class_embedding", "logit_scale")


def _get(recipe: Any, field: str) -> Any:
  value = getattr(recipe, field, None)
  return _DEFAULTS[field] if value is None else value


def learning_rate_schedule(recipe: Optional[Any], total_steps: int) -> optax.Schedule:
  """Warm-up (linear from 0, or constant at `warmup_lr`), then cosine to `min_lr` at the end."""
  if recipe is None:
    return optax.constant_schedule(0.0)
  lr, min_lr = float(recipe.lr), float(_get(recipe, "min_lr"))
  warmup = min(int(_get(recipe, "warmup_steps")), max(total_steps - 1, 0))
  if _get(recipe, "warmup_type") == "constant" and warmup > 0:
    return optax.join_schedules(
        [optax.constant_schedule(float(_get(recipe, "warmup_lr"))),
         optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1),
                                     alpha=min_lr / lr)],
        boundaries=[warmup])
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=min_lr)


def _leaf_decays(path) -> bool:
  names = [str(getattr(k, "key", getattr(k, "idx", k))) for k in path]
  return not (names[-1] in NO_DECAY_LEAVES or any(n.startswith("ln_") for n in names))


def decay_mask(kind: str):
  """None (every leaf decays) or an optax mask function: False where a leaf must not decay.

  By leaf path only (not by rank), so leading task/group axes (fullft_st) change nothing.
  """
  if kind == "all":
    return None
  if kind == "no_norm_bias_embed":
    return lambda params: jax.tree_util.tree_map_with_path(lambda p, _: _leaf_decays(p), params)
  raise ValueError(f"optim.decay_mask={kind!r}; allowed: {DECAY_MASKS}")


def make_optimizer(recipe: Optional[Any], total_steps: int) -> optax.GradientTransformation:
  if recipe is None:
    return optax.identity()
  schedule = learning_rate_schedule(recipe, total_steps)
  wd, clip = float(recipe.weight_decay), float(_get(recipe, "grad_clip"))
  mask = decay_mask(_get(recipe, "decay_mask"))
  parts = []
  if clip > 0:
    parts.append(optax.clip_by_global_norm(clip))
  if recipe.name == "sgd":
    if wd:
      parts.append(optax.add_decayed_weights(wd, mask))
    parts.append(optax.sgd(schedule, momentum=float(_get(recipe, "momentum")) or None))
  elif recipe.name == "adamw":
    parts.append(optax.adamw(schedule, b1=float(_get(recipe, "b1")), b2=float(_get(recipe, "b2")),
                             eps=float(_get(recipe, "eps")), weight_decay=wd, mask=mask))
  else:
    raise ValueError(f"optim.name={recipe.name!r}; allowed: {OPTIMIZERS}")
  return optax.chain(*parts)
