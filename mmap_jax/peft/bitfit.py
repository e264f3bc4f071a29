"""BitFit (Ben Zaken et al. 2022): only the bias terms of CLIP are trained, nothing else.

Which leaves count: every leaf named `bias` in both towers (`visual/...`, `text/...`):
per block the attention in-projection (q, k, v biases, [3W]) and out-projection, the MLP's two
linears, and both LayerNorms' additive terms (ln_1, ln_2), plus ln_pre / ln_post (vision) and
ln_final (text). That is BitFit's set for a transformer (all additive bias vectors of the
attention, MLP and LayerNorm layers). Not counted: LayerNorm scales (multiplicative), the
class / positional / token embeddings, conv1 and the output projections (CLIP's have no bias),
and logit_scale: none is a bias term.

The learned pytree mirrors CLIP's nesting with only those leaves, initialised to the pretrained
biases (BitFit tunes the biases themselves, so weight decay acts on them as it would in the
paper's setup); at init the effective CLIP is bit-identical to the frozen one.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Mapping

import jax.numpy as jnp

from mmap_jax.models.config import ClipConfig

if TYPE_CHECKING:
  from mmap_jax.prompts.spec import PromptSpec

TOWERS = ("visual", "text")


def _is_bias(path: tuple[str, ...]) -> bool:
  return len(path) >= 2 and path[0] in TOWERS and path[-1] == "bias"


def _select(tree: Any, path: tuple[str, ...] = ()) -> Any:
  """The sub-pytree of `tree` holding only the bias leaves (None where there are none)."""
  if isinstance(tree, Mapping):
    kept = {k: _select(v, path + (k,)) for k, v in tree.items()}
    kept = {k: v for k, v in kept.items() if v is not None}
    return kept or None
  return jnp.array(tree, jnp.float32) if _is_bias(path) else None


def init(key: Any, clip_cfg: ClipConfig, spec: "PromptSpec", clip_params: Any = None) -> Any:
  """A copy of the pretrained biases (`clip_params` is required)."""
  del key, clip_cfg, spec
  if clip_params is None:
    raise ValueError("bitfit trains CLIP's biases: pass clip_params to init_learned")
  return _select(clip_params)


def _replace(frozen: Any, learned: Any) -> Any:
  if not isinstance(learned, Mapping):
    return learned
  return {k: (_replace(v, learned[k]) if k in learned else v) for k, v in frozen.items()}


def apply(clip_params: Any, params: Any, spec: "PromptSpec", *, merged: bool = False) -> Any:
  """The frozen CLIP with its biases replaced by the learned ones (task axes carry over)."""
  del spec, merged
  return _replace(clip_params, params)


def is_task_leaf(path: tuple[str, ...], spec: "PromptSpec", *, merged: bool = False) -> bool:
  del spec, merged
  return _is_bias(path)
