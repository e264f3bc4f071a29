"""MaPLe (Khattak et al., CVPR 2023): text deep prompts, visual prompts coupled through linears.

Layer j's visual prompt is `text[j] @ proj.kernel[j] + proj.bias[j]` (d_t -> d_v): index 0 is
MaPLe's `proj` of the shallow context, 1..J-1 its `compound_prompt_projections`. Init as MaPLe:
text tokens N(0, 0.02^2); PyTorch-default Linear init, where the J-1 compound projections start
IDENTICAL (MaPLe deep-copies one layer, `_get_clones`) and `proj` has its own draw. MaPLe's
published "a photo of a" init of the shallow context (`prompt.ctx_init`, the default for maple)
replaces the layer-0 text tokens after `init`, in `multitask.init_learned` (`prompts.ctx_init`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts.base import PromptTokens, normal, torch_linear
from mmap_jax.prompts.spec import PromptSpec


def init(key: jax.Array, clip_cfg: ClipConfig, spec: PromptSpec):
  kt, kp0, kp = jax.random.split(key, 3)
  j, l, d_t, d_v = spec.depth_for(clip_cfg), spec.length, clip_cfg.text.width, clip_cfg.vision.width
  first, clone = torch_linear(kp0, d_t, d_v), torch_linear(kp, d_t, d_v)
  stack = lambda a, b: jnp.concatenate([a[None], jnp.broadcast_to(b, (j - 1,) + b.shape)], axis=0)
  return {"text": normal(kt, (j, l, d_t), spec.init_std),
          "proj": jax.tree.map(stack, first, clone)}


def expand(params, clip_cfg: ClipConfig, spec: PromptSpec) -> PromptTokens:
  del clip_cfg, spec
  text, proj = params["text"], params["proj"]
  visual = jnp.einsum("jlt,jtv->jlv", text, proj["kernel"]) + proj["bias"][:, None, :]
  return PromptTokens(text=text, visual=visual)
