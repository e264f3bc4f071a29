"""Independent vision-language deep prompting (MaPLe's IVLP baseline).

Separate text and visual deep prompts, no coupling between them: [J, L, d_t] and [J, L, d_v],
both N(0, 0.02^2) as in MaPLe's `ResidualAttentionBlock_IVLP`.
"""
from __future__ import annotations

import jax

from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts.base import PromptTokens, normal
from mmap_jax.prompts.spec import PromptSpec


def init(key: jax.Array, clip_cfg: ClipConfig, spec: PromptSpec) -> dict[str, jax.Array]:
  kt, kv = jax.random.split(key)
  j, l = spec.depth_for(clip_cfg), spec.length
  return {"text": normal(kt, (j, l, clip_cfg.text.width), spec.init_std),
          "visual": normal(kv, (j, l, clip_cfg.vision.width), spec.init_std)}


def expand(params, clip_cfg: ClipConfig, spec: PromptSpec) -> PromptTokens:
  del clip_cfg, spec
  return PromptTokens(text=params["text"], visual=params["visual"])
