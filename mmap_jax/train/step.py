"""The jitted, data-parallel training step (and its evaluation counterpart).

One step = gradients of the multi-task loss w.r.t. the learned pytree only (the frozen CLIP weights
are an argument, never a closure constant), optional gradient accumulation over micro-batches,
an optax update, and a NaN/inf guard that keeps the previous state when anything is non-finite.
Sharding comes from the arguments: state and frozen weights replicated on the ("data",) mesh,
batches split along their per-task batch axis; the state buffers are donated.
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from mmap_jax import heads, parallel

# loss_fn(learned, frozen, batch) -> (scalar loss, aux dict of arrays)
LossFn = Callable[[Any, Any, dict], tuple[jax.Array, dict]]


def make_loss_fn(clip_cfg, spec, groups, *, dtype=jnp.float32, remat: bool = False,
                 share_prefix: bool = True,
                 text_sharding: parallel.TextSharding = parallel.REPLICATED_TEXT,
                 seed: int = 0) -> LossFn:
  """The trainer's loss: loss_fn(learned, frozen {"clip", "class_tokens"}, batch {"image",
  "label"[, "step"]}) -> (loss, {"per_task_loss", "mean_task_loss"}); the multi-task objective of
  `heads.multitask_loss` (the benchmark times this same function). With `batch["step"]` (a
  train step made with `pass_step=True`) a training step's dropout key (LoRA's
  prompt.lora_dropout) is drawn from `seed` and the step, so a resumed run draws the masks an
  uninterrupted one would."""
  def loss_fn(learned, frozen, batch):
    key = (jax.random.fold_in(jax.random.key(seed + 11), batch["step"]) if "step" in batch
           else None)
    loss, aux = heads.multitask_loss(
        learned, frozen["clip"], clip_cfg, spec, groups, frozen["class_tokens"],
        {"images": batch["image"], "labels": batch["label"]}, dtype=dtype, remat=remat,
        share_prefix=share_prefix, text_sharding=text_sharding, dropout_key=key)
    return loss, {"per_task_loss": aux["per_task_loss"], "mean_task_loss": aux["mean_task_loss"]}
  return loss_fn


def init_state(learned: Any, optimizer: optax.GradientTransformation) -> dict:
  return {"learned": learned, "opt_state": optimizer.init(learned),
          "step": jnp.zeros((), jnp.int32)}


def _all_finite(tree: Any) -> jax.Array:
  leaves = [jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(tree)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def _split_microbatches(batch: dict, accum_steps: int) -> dict:
  """[T, B, ...] -> [A, T, B/A, ...] for arrays with a batch axis; per-task arrays ([T]) repeat."""
  def split(x):
    if x.ndim < 2:
      return jnp.broadcast_to(x, (accum_steps,) + x.shape)
    t, b = x.shape[:2]
    x = x.reshape((t, accum_steps, b // accum_steps) + x.shape[2:])
    return jnp.moveaxis(x, 1, 0)
  return jax.tree.map(split, batch)


def value_and_grad_accumulated(loss_fn: LossFn, learned, frozen, batch, accum_steps: int):
  """Mean loss and gradient over `accum_steps` equal micro-batches (exact for a mean loss)."""
  vg = jax.value_and_grad(loss_fn, has_aux=True)
  if accum_steps == 1:
    return vg(learned, frozen, batch)

  def body(carry, micro):
    (loss, aux), grads = vg(learned, frozen, micro)
    acc = jax.tree.map(jnp.add, carry, (loss, aux, grads))
    return acc, None

  micro = _split_microbatches(batch, accum_steps)
  (loss0, aux0), g0 = vg(learned, frozen, jax.tree.map(lambda x: x[0], micro))
  rest = jax.tree.map(lambda x: x[1:], micro)
  (loss, aux, grads), _ = jax.lax.scan(body, (loss0, aux0, g0), rest)
  scale = 1.0 / accum_steps
  return (loss * scale, jax.tree.map(lambda x: x * scale, aux)), jax.tree.map(
      lambda x: x * scale, grads)


def _step_fn(loss_fn: LossFn, optimizer: optax.GradientTransformation, accum_steps: int,
             pass_step: bool = False):
  """The un-jitted step(state, frozen, batch) -> (state, metrics) both entry points share.

  `pass_step`: the loss sees the state's step as `batch["step"]` (int32 scalar; e.g. to fold
  into a dropout key, so every step, also after a resume, draws its own masks)."""

  def step(state, frozen, batch):
    if pass_step:
      batch = {**batch, "step": state["step"]}
    (loss, aux), grads = value_and_grad_accumulated(loss_fn, state["learned"], frozen, batch,
                                                    accum_steps)
    finite = jnp.isfinite(loss) & _all_finite(grads)
    updates, opt_state = optimizer.update(grads, state["opt_state"], state["learned"])
    learned = optax.apply_updates(state["learned"], updates)
    keep = lambda new, old: jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)
    new_state = {"learned": keep(learned, state["learned"]),
                 "opt_state": keep(opt_state, state["opt_state"]),
                 "step": state["step"] + 1}
    metrics = {"loss": loss, "finite": finite, "grad_norm": optax.tree.norm(grads), **aux}
    return new_state, metrics

  return step


def make_train_step(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                    accum_steps: int = 1, donate: bool = True, pass_step: bool = False):
  """Returns jit(step)(state, frozen, batch) -> (state, metrics)."""
  return jax.jit(_step_fn(loss_fn, optimizer, accum_steps, pass_step),
                 donate_argnums=(0,) if donate else ())


def make_train_steps(loss_fn: LossFn, optimizer: optax.GradientTransformation, *,
                     accum_steps: int = 1, donate: bool = True, pass_step: bool = False):
  """Returns jit(steps)(state, frozen, batches) -> (state, metrics): K optimizer steps per call.

  `batches` is K step batches stacked on a new leading axis ([K, T, B, ...]); the K steps run as
  a `lax.scan` of the same step as `make_train_step`, so the result equals K single-step calls,
  while XLA allocates one execution's temporaries for all K steps and the host dispatches once.
  Every metric comes back stacked ([K, ...]): the NaN guard acts per inner step (a non-finite
  step keeps the previous state; `metrics["finite"][i]` tells the host which step it was).
  One program is compiled per distinct K (the leading length of `batches`).
  """
  step = _step_fn(loss_fn, optimizer, accum_steps, pass_step)

  def steps(state, frozen, batches):
    return jax.lax.scan(lambda st, batch: step(st, frozen, batch), state, batches)

  return jax.jit(steps, donate_argnums=(0,) if donate else ())
