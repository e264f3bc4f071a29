"""MmAP unit (Xin et al., AAAI 2024): one source prompt, two modality scaling matrices.

Per prompted layer j: source S_j [L_s, d_s]; text prompt kron(S_j, W_t) [L, d_t] and visual
prompt kron(S_j, W_v) [L, d_v] with W_t [(L/L_s), (d_t/d_s)], W_v [(L/L_s), (d_v/d_s)]. Both
modalities are generated from the same source, which is what aligns them, at a fraction of the
parameters (ViT-B/16 defaults: 11*8*256 + 2 + 3 per unit). One (W_t, W_v) pair per unit unless
`per_layer_scaling` ([J, ...]). Init S ~ N(0, init_std^2), W = 1 (so each S entry starts
repeated over its block). A unit's L and L_s are `spec.unit_length` / `unit_source_length` (2L
and 2 L_s for the one-unit ablations mmap_shared_mt / mmap_task_mt).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts.base import PromptTokens, normal
from mmap_jax.prompts.spec import PromptSpec


def scaling_shapes(clip_cfg: ClipConfig,
                   spec: PromptSpec) -> tuple[tuple[int, int], tuple[int, int]]:
  """Shapes of (W_t, W_v): [L / L_s, d_t / d_s] and [L / L_s, d_v / d_s]."""
  rows, d_s = spec.unit_length // spec.unit_source_length, spec.source_dim_for(clip_cfg)
  return ((rows, clip_cfg.text.width // d_s), (rows, clip_cfg.vision.width // d_s))


def init(key: jax.Array, clip_cfg: ClipConfig, spec: PromptSpec) -> dict[str, jax.Array]:
  j = spec.depth_for(clip_cfg)
  wt, wv = scaling_shapes(clip_cfg, spec)
  lead = (j,) if spec.per_layer_scaling else ()
  return {"source": normal(key, (j, spec.unit_source_length, spec.source_dim_for(clip_cfg)),
                           spec.init_std),
          "scale_text": jnp.ones(lead + wt, jnp.float32),
          "scale_visual": jnp.ones(lead + wv, jnp.float32)}


def layer_kron(source: jax.Array, scale: jax.Array) -> jax.Array:
  """Per-layer Kronecker product: [J, a, b] x ([p, q] | [J, p, q]) -> [J, a*p, b*q]."""
  j, a, b = source.shape
  p, q = scale.shape[-2:]
  if scale.ndim == 2:
    out = jnp.einsum("jab,pq->japbq", source, scale)
  else:
    out = jnp.einsum("jab,jpq->japbq", source, scale)
  return out.reshape(j, a * p, b * q)


def expand(params, clip_cfg: ClipConfig, spec: PromptSpec) -> PromptTokens:
  del clip_cfg, spec
  s = params["source"]
  return PromptTokens(text=layer_kron(s, params["scale_text"]),
                      visual=layer_kron(s, params["scale_visual"]))
