"""`prompt.ctx_init`: a learned text context that starts from the CLIP's own word embeddings.

MaPLe's and CoOp's trainers: `prompt = tokenize(ctx_init); embedding = token_embedding(prompt);
ctx_vectors = embedding[0, 1:1+n_ctx]; prompt_prefix = ctx_init`. So the first L tokens of
ctx_init become the layer-0 text prompt (the learned tokens), and the rest of ctx_init stays in
the class prompt as fixed text: maple's "a photo of a" with L = 2 reads
"<sot> <ctx1> <ctx2> of a {class}. <eot>" (`heads.build_class_tokens(..., ctx_init=...)`).

Tokens are counted with the real tokenizer. Fewer init tokens than L is an error (MaPLe's code
would take the end-of-text and padding embeddings as context and cut the class name; its
`n_ctx <= 4` guard silently falls back to random init instead). Deep text prompts (layers >= 1)
keep their random init, as MaPLe's compound prompts do.
"""
from __future__ import annotations

from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mmap_jax.prompts.spec import PromptSpec


def token_ids(spec: PromptSpec, tokenizer) -> Optional[np.ndarray]:
  """int32 ids of `spec.ctx_init` (no start/end tokens), or None without one; checks L fits."""
  text = spec.learned_ctx_init
  if text is None:
    return None
  ids = np.asarray(tokenizer.encode(text), np.int32)
  if len(ids) < spec.length:
    raise ValueError(
        f"prompt.ctx_init={spec.ctx_init!r} is {len(ids)} token(s) with this CLIP's tokenizer, "
        f"fewer than the prompt.length={spec.length} learned context tokens it initialises; use "
        f"more words, a smaller prompt.length, or prompt.ctx_init='' for random init")
  return ids


def embeddings(spec: PromptSpec, tokenizer, clip_params: Any) -> Optional[jax.Array]:
  """[L, d_t]: the token embeddings of the first L tokens of ctx_init (None without one)."""
  ids = token_ids(spec, tokenizer)
  if ids is None:
    return None
  table = clip_params["text"]["token_embedding"]["embedding"]
  return jnp.take(table, jnp.asarray(ids[:spec.length]), axis=0).astype(jnp.float32)


def apply(params: dict, embeds: Optional[jax.Array]) -> dict:
  """One prompt set (coop / maple / ivlp params) with its layer-0 text tokens set to `embeds`."""
  if embeds is None:
    return params
  text = params["text"]
  if text.shape[1:] != embeds.shape:
    raise ValueError(f"ctx_init embeddings {embeds.shape} do not match the layer-0 text prompt "
                     f"{text.shape[1:]}")
  return {**params, "text": text.at[0].set(embeds.astype(text.dtype))}
