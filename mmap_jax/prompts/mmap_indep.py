"""MmAP without the coupling (the `mmap_indep_mt` ablation): independent text and visual sources.

Per prompted layer j: text prompt kron(S^t_j, W_t) [L, d_t] from its own source S^t_j [L_s, d_st]
and visual prompt kron(S^v_j, W_v) [L, d_v] from S^v_j [L_s, d_sv], W_t [L/L_s, d_t/d_st],
W_v [L/L_s, d_v/d_sv]. Everything else is MmAP's (same L, L_s, J, init, per_layer_scaling), so
the only difference to an MmAP unit is that the two modalities no longer share a source: what
the Kronecker coupling buys is the gap between mmap_mt and mmap_indep_mt. With d_st = d_sv =
d_s / 2 (`PromptSpec.indep_source_dims`) the sources hold as many entries as MmAP's one source.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts.base import PromptTokens, normal
from mmap_jax.prompts.mmap import layer_kron
from mmap_jax.prompts.spec import PromptSpec


def init(key: jax.Array, clip_cfg: ClipConfig, spec: PromptSpec) -> dict[str, jax.Array]:
  j, ls = spec.depth_for(clip_cfg), spec.unit_source_length
  rows = spec.unit_length // ls
  d_st, d_sv = spec.indep_source_dims(clip_cfg)
  lead = (j,) if spec.per_layer_scaling else ()
  kt, kv = jax.random.split(key)
  return {"source_text": normal(kt, (j, ls, d_st), spec.init_std),
          "source_visual": normal(kv, (j, ls, d_sv), spec.init_std),
          "scale_text": jnp.ones(lead + (rows, clip_cfg.text.width // d_st), jnp.float32),
          "scale_visual": jnp.ones(lead + (rows, clip_cfg.vision.width // d_sv), jnp.float32)}


def expand(params, clip_cfg: ClipConfig, spec: PromptSpec) -> PromptTokens:
  del clip_cfg, spec
  return PromptTokens(text=layer_kron(params["source_text"], params["scale_text"]),
                      visual=layer_kron(params["source_visual"], params["scale_visual"]))
