"""CLIP-Adapter (Gao et al. 2021): a residual bottleneck MLP on the projected CLIP features.

  f' = ratio * relu(relu(f W1) W2) + (1 - ratio) * f      W1 [E, E/r], W2 [E/r, E], no biases

on the image features and/or the class text features (after the tower's projection, before the
L2 normalisation), as the paper's `Adapter` module with reduction r = 4 and ratio 0.2 (its image
setting). Init as the reference code's `nn.Linear(bias=False)`: U(+-1/sqrt(fan_in)).

The adapter rides in the effective CLIP params (`visual/adapter`, `text/adapter`:
{"fc1": {"kernel"}, "fc2": {"kernel"}, "ratio": []}), which `clip.encode_image` /
`clip.encode_text` apply to their output, so training, evaluation and prediction all run it.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp

from mmap_jax.models.config import ClipConfig

if TYPE_CHECKING:
  from mmap_jax.prompts.spec import PromptSpec

SIDE_TOWERS = {"image": ("visual",), "text": ("text",), "both": ("visual", "text")}


def towers(spec: "PromptSpec") -> tuple[str, ...]:
  return SIDE_TOWERS[spec.adapter_on]


def init(key: jax.Array, clip_cfg: ClipConfig, spec: "PromptSpec", clip_params: Any = None
         ) -> dict[str, Any]:
  """{tower: {"fc1": {"kernel": [E, E/r]}, "fc2": {"kernel": [E/r, E]}}} per adapted tower."""
  del clip_params
  e = clip_cfg.embed_dim
  h = e // spec.adapter_reduction
  out = {}
  for i, tower in enumerate(towers(spec)):
    k1, k2 = jax.random.split(jax.random.fold_in(key, i))
    uniform = lambda k, shape, fan_in: jax.random.uniform(
        k, shape, jnp.float32, -1.0 / math.sqrt(fan_in), 1.0 / math.sqrt(fan_in))
    out[tower] = {"fc1": {"kernel": uniform(k1, (e, h), e)},
                  "fc2": {"kernel": uniform(k2, (h, e), h)}}
  return out


def apply(clip_params: Any, params: Any, spec: "PromptSpec", *, merged: bool = False) -> Any:
  """The frozen CLIP with the adapters attached (leading task axes of `params` carry over)."""
  del merged  # Nonlinear: nothing to merge.
  out = dict(clip_params)
  for tower, p in params.items():
    lead = jnp.shape(p["fc1"]["kernel"])[:-2]
    out[tower] = {**clip_params[tower], "adapter": {
        **p, "ratio": jnp.full(lead, spec.adapter_ratio, jnp.float32)}}
  return out


def is_task_leaf(path: tuple[str, ...], spec: "PromptSpec", *, merged: bool = False) -> bool:
  """Whether a leaf of `apply`'s result comes from the learned params (has their task axis)."""
  del spec, merged
  return len(path) >= 2 and path[1] == "adapter"
