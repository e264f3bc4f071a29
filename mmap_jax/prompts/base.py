"""What every prompt method shares: the `PromptTokens` it expands to and small init helpers.

Each family module (coop, vpt, maple, ivlp, mmap) exposes the same two pure functions
  init(key, clip_cfg, spec) -> params pytree           (one prompt set: no task axis)
  expand(params, clip_cfg, spec) -> PromptTokens        (text [J, L, d_t] | None, visual ... | None)
so `multitask` can stack/vmap any of them over groups and tasks without knowing which it is.
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple, Optional

import jax
import jax.numpy as jnp


class PromptTokens(NamedTuple):
  """Deep prompts per tower, clip.py's convention ([..., J, L, width]); None = unprompted."""
  text: Optional[jax.Array]
  visual: Optional[jax.Array]


def normal(key: jax.Array, shape: tuple[int, ...], std: float) -> jax.Array:
  return std * jax.random.normal(key, shape, jnp.float32)


def uniform(key: jax.Array, shape: tuple[int, ...], bound: float) -> jax.Array:
  return jax.random.uniform(key, shape, jnp.float32, -bound, bound)


def torch_linear(key: jax.Array, fan_in: int, fan_out: int) -> dict[str, Any]:
  """PyTorch's default `nn.Linear` init (kaiming_uniform(a=sqrt 5) = U(+-1/sqrt(fan_in)))."""
  kk, kb = jax.random.split(key)
  bound = 1.0 / math.sqrt(fan_in)
  return {"kernel": uniform(kk, (fan_in, fan_out), bound), "bias": uniform(kb, (fan_out,), bound)}
