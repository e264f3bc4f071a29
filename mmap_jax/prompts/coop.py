"""CoOp (Zhou et al., IJCV 2022): a shallow generic text context, "X X .. X {class}.".

L context vectors (16 by default) replace the placeholder embeddings at the text input only
(depth 1); the image tower is untouched. Init N(0, 0.02^2) as CoOp's random init, or CoOp's
word init with `prompt.ctx_init` (then L defaults to its word count; `prompts.ctx_init`).
"""
from __future__ import annotations

import jax

from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts.base import PromptTokens, normal
from mmap_jax.prompts.spec import PromptSpec


def init(key: jax.Array, clip_cfg: ClipConfig, spec: PromptSpec) -> dict[str, jax.Array]:
  return {"text": normal(key, (1, spec.length, clip_cfg.text.width), spec.init_std)}


def expand(params, clip_cfg: ClipConfig, spec: PromptSpec) -> PromptTokens:
  del clip_cfg, spec
  return PromptTokens(text=params["text"], visual=None)
