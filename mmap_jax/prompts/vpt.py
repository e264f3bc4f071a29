"""VPT-deep (Jia et al., ECCV 2022): visual prompts only, new tokens at every vision layer.

Init as VPT's `nn.init.uniform_(-val, val)` with val = sqrt(6 / (3 * p * p + d_v)) (Xavier
uniform over the patch-embedding fan-in), or N(0, init_std^2) as MaPLe's VPT re-implementation
(`vpt_init="normal"`). The text side keeps the hand-crafted template.
"""
from __future__ import annotations

import math

import jax

from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts.base import PromptTokens, normal, uniform
from mmap_jax.prompts.spec import PromptSpec


def init(key: jax.Array, clip_cfg: ClipConfig, spec: PromptSpec) -> dict[str, jax.Array]:
  vc = clip_cfg.vision
  shape = (spec.depth_for(clip_cfg), spec.length, vc.width)
  if spec.vpt_init == "normal":
    return {"visual": normal(key, shape, spec.init_std)}
  return {"visual": uniform(key, shape, math.sqrt(6.0 / (3 * vc.patch_size ** 2 + vc.width)))}


def expand(params, clip_cfg: ClipConfig, spec: PromptSpec) -> PromptTokens:
  del clip_cfg, spec
  return PromptTokens(text=None, visual=params["visual"])
