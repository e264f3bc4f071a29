"""The optimizer of the learned pytree: the MaPLe/MmAP recipe, expressed in optax.

torch's SGD(weight_decay=wd, momentum=m) adds wd * param to the gradient before momentum; the
same order here (add_decayed_weights, then sgd) makes runs comparable with the PyTorch code.
"""
from __future__ import annotations

import ml_collections as mlc
import optax

OPTIMIZERS = ("sgd", "adamw")


def learning_rate_schedule(optim: mlc.ConfigDict, total_steps: int) -> optax.Schedule:
  """Linear warm-up from 0 to `lr`, then cosine decay to 0 at `total_steps`."""
  warmup = min(int(optim.warmup_steps), max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=float(optim.lr), warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=0.0)


def make_optimizer(optim: mlc.ConfigDict, total_steps: int) -> optax.GradientTransformation:
  schedule = learning_rate_schedule(optim, total_steps)
  parts = []
  if optim.grad_clip and optim.grad_clip > 0:
    parts.append(optax.clip_by_global_norm(float(optim.grad_clip)))
  if optim.name == "sgd":
    if optim.weight_decay:
      parts.append(optax.add_decayed_weights(float(optim.weight_decay)))
    parts.append(optax.sgd(schedule, momentum=float(optim.momentum) or None))
  elif optim.name == "adamw":
    parts.append(optax.adamw(schedule, weight_decay=float(optim.weight_decay)))
  else:
    raise ValueError(f"optim.name={optim.name!r}; allowed: {OPTIMIZERS}")
  return optax.chain(*parts)
