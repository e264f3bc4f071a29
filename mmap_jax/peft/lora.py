"""LoRA (Hu et al. 2022) on the attention projections of both CLIP towers, as CLIP-LoRA runs it.

For each target projection W (x @ W, W [d, d]) of every block: W + s A B with A [d, r]
initialised as loralib's `kaiming_uniform_(a=sqrt 5)` = U(+-1/sqrt(d)) and B [r, d] zero, so the
model at step 0 is exactly the frozen CLIP; s = `spec.lora_scale` (alpha / sqrt(r) as CLIP-LoRA's
loralib/layers.py, or alpha / r). Targets (`spec.lora_targets`): q, k, v (column blocks 0:d,
d:2d, 2d:3d of CLIP's fused `attn/in_proj` kernel [d, 3d]) and o (`attn/out_proj`). Default
q,k,v, r 2, alpha 1, dropout 0.25: CLIP-LoRA's (MaxZanella/CLIP-LoRA run_utils.py).

Dropout (`spec.lora_dropout`), CLIP-LoRA's `LinearLoRA.forward`: while training, each target's
LoRA branch sees its own dropout of the layer input x (W x itself is untouched), i.e.
y = x W + s (drop_t(x) A_t) B_t, with an independent mask per target, layer and tower. Only a
training step passes a key (`apply(..., dropout_key=...)`); evaluation and prediction never do,
so they run without dropout (torch's `model.eval()`).

Learned pytree, layers stacked: {tower: {target: {"a": [layers, d, r], "b": [layers, r, d]}}}
for tower in (visual, text).

Two exact formulations of the effective CLIP:
  merged=False  attach `lora_a` [d, n r] / `lora_b` [n r, 3d] (scaled) to the projection, and
                `clip._dense` adds (x @ lora_a) @ lora_b; `lora_b` is block-structured so one
                pair serves all of q, k, v. Used for training: the frozen kernels need no weight
                gradient, only the skinny low-rank products do.
  merged=True   fold W + (alpha / r) A B into the kernels (a plain CLIP): prediction and export,
                where there is no backward pass. Equal to merged=False up to float rounding.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from mmap_jax.models.config import ClipConfig

if TYPE_CHECKING:
  from mmap_jax.prompts.spec import PromptSpec

TOWERS = (("visual", "vision"), ("text", "text"))
QKV = ("q", "k", "v")


def _tower_cfg(clip_cfg: ClipConfig, name: str):
  return clip_cfg.vision if name == "vision" else clip_cfg.text


def init(key: jax.Array, clip_cfg: ClipConfig, spec: "PromptSpec", clip_params: Any = None
         ) -> dict[str, Any]:
  del clip_params
  r, out = spec.lora_rank, {}
  for i, (tower, name) in enumerate(TOWERS):
    c = _tower_cfg(clip_cfg, name)
    out[tower] = {}
    for j, target in enumerate(spec.lora_target_list):
      k = jax.random.fold_in(key, 4 * i + j)
      bound = 1.0 / math.sqrt(c.width)
      out[tower][target] = {
          "a": jax.random.uniform(k, (c.layers, c.width, r), jnp.float32, -bound, bound),
          "b": jnp.zeros((c.layers, r, c.width), jnp.float32)}
  return out


def _layer(x: jax.Array, i: int) -> jax.Array:
  """Layer i of a stacked [..., layers, m, n] leaf (leading task axes kept)."""
  return x[..., i, :, :]


def _attach(attn: Any, p: Any, i: int, scale: float, width: int, drop=None) -> Any:
  """`drop` = (key, rate) or None: adds `lora_dropout_keys` [n] (one key per target of the
  projection) and `lora_dropout_rate` next to `lora_a` (clip._dense applies them)."""
  attn = dict(attn)
  qkv = [t for t in QKV if t in p]
  if qkv:
    rows = []
    for t in qkv:
      b = scale * _layer(p[t]["b"], i)                                   # [..., r, d]
      j = QKV.index(t)
      zeros = lambda n, b=b: jnp.zeros(b.shape[:-1] + (n,), b.dtype)
      rows.append(jnp.concatenate([zeros(j * width), b, zeros((2 - j) * width)], axis=-1))
    attn["in_proj"] = {**attn["in_proj"],
                       "lora_a": jnp.concatenate([_layer(p[t]["a"], i) for t in qkv], axis=-1),
                       "lora_b": jnp.concatenate(rows, axis=-2)}
    if drop is not None:
      attn["in_proj"] |= {"lora_dropout_keys": jax.random.split(drop[0], len(qkv)),
                          "lora_dropout_rate": jnp.float32(drop[1])}
  if "o" in p:
    attn["out_proj"] = {**attn["out_proj"], "lora_a": _layer(p["o"]["a"], i),
                        "lora_b": scale * _layer(p["o"]["b"], i)}
    if drop is not None:
      attn["out_proj"] |= {"lora_dropout_keys": jax.random.split(jax.random.fold_in(drop[0], 7),
                                                                 1),
                           "lora_dropout_rate": jnp.float32(drop[1])}
  return attn


def _merge(attn: Any, p: Any, i: int, scale: float, width: int, drop=None) -> Any:
  del drop  # merged weights are for prediction / export: no dropout
  attn = dict(attn)
  delta = lambda t: scale * jnp.matmul(_layer(p[t]["a"], i), _layer(p[t]["b"], i))  # [..., d, d]
  if any(t in p for t in QKV):
    kernel = jnp.asarray(attn["in_proj"]["kernel"])
    lead = next(jnp.shape(p[t]["a"]) for t in QKV if t in p)[:-3]
    blocks = []
    for j, t in enumerate(QKV):
      w = kernel[:, j * width:(j + 1) * width]
      blocks.append(w + delta(t) if t in p else jnp.broadcast_to(w, lead + w.shape))
    attn["in_proj"] = {**attn["in_proj"], "kernel": jnp.concatenate(blocks, axis=-1)}
  if "o" in p:
    attn["out_proj"] = {**attn["out_proj"], "kernel": attn["out_proj"]["kernel"] + delta("o")}
  return attn


def apply(clip_params: Any, params: Any, spec: "PromptSpec", *, merged: bool = False,
          dropout_key: Any = None) -> Any:
  """The effective CLIP (module docstring); leading task axes of `params` carry over.

  `dropout_key` (training only; unmerged form) turns on `spec.lora_dropout`."""
  scale = spec.lora_scale
  edit = _merge if merged else _attach
  rate = float(spec.lora_dropout)
  use_dropout = dropout_key is not None and rate > 0 and not merged
  out = dict(clip_params)
  for t, (tower, p) in enumerate(params.items()):
    blocks = clip_params[tower]["transformer"]["resblocks"]
    width = jnp.shape(blocks["0"]["attn"]["out_proj"]["kernel"])[0]
    drop = lambda k: ((jax.random.fold_in(jax.random.fold_in(dropout_key, t), int(k)), rate)
                      if use_dropout else None)
    new = {k: {**blk, "attn": edit(blk["attn"], p, int(k), scale, width, drop(k))}
           for k, blk in blocks.items()}
    out[tower] = {**clip_params[tower],
                  "transformer": {**clip_params[tower]["transformer"], "resblocks": new}}
  return out


def is_task_leaf(path: tuple[str, ...], spec: "PromptSpec", *, merged: bool = False) -> bool:
  """Leaves of `apply`'s result derived from the learned params (they carry its task axis)."""
  if not merged:
    return path[-1] in ("lora_a", "lora_b")
  targets = spec.lora_target_list
  if len(path) < 3 or path[-1] != "kernel" or path[-3] != "attn":
    return False
  return ((path[-2] == "in_proj" and any(t in targets for t in QKV))
          or (path[-2] == "out_proj" and "o" in targets))
