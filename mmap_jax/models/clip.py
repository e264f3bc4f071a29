"""OpenAI CLIP as pure functions of a frozen params pytree, with deep-prompt hooks.

Why pure functions and not `flax.linen` modules: prompt learning needs control of the layer loop
itself (deep prompts replace tokens between blocks, the text prefix shared by all classes of a
task is computed once and attended to like a KV cache, the last block only computes the pooled
token). The params are plain nested dicts with Flax's leaf names (`kernel`, `bias`, `scale`,
`embedding`) and OpenAI's module names, so Orbax, `flax.traverse_util` and optax treat them as any
Flax pytree, and checkpoint conversion is a rename.

Layout (W = width, E = embed_dim; blocks are keyed "0".."layers-1" as in OpenAI's state dict):
  visual/{conv1/kernel [p,p,3,W], class_embedding [W], positional_embedding [G*G+1, W],
          ln_pre, transformer/resblocks/{i}, ln_post, proj [W, E]}
  text/{token_embedding/embedding [V, W], positional_embedding [ctx, W], transformer/resblocks/{i},
        ln_final, text_projection [W, E]}
  logit_scale []
  block = {ln_1, attn/{in_proj/{kernel [W,3W], bias}, out_proj/{kernel, bias}}, ln_2,
           mlp/{c_fc/{kernel [W,4W], bias}, c_proj/{kernel [4W,W], bias}}}

Deep prompts (MaPLe's convention, used by every method in this project): `prompts` is [J, L, W].
Visual: prompts[0] is appended after the patch tokens (after the positional embedding, before
`ln_pre`); before block j (1 <= j < J) the last L tokens are replaced by prompts[j]. Text:
prompts[0] replaces the token embeddings at positions 1..L (the "X X .. X" of the template, so it
receives positional embeddings like any token); before block j the hidden states at 1..L are
replaced by prompts[j]. Blocks >= J carry the prompt tokens unchanged.

Optional PEFT leaves (mmap_jax/peft builds them into the effective params; absent in a plain CLIP):
`lora_a` / `lora_b` next to a dense layer's kernel add x @ lora_a @ lora_b (LoRA, unmerged);
`visual/adapter`, `text/adapter` ({fc1, fc2, ratio}) apply CLIP-Adapter to the tower's output.

Precision: params stay float32; matmuls run in `dtype` (float32 or bfloat16); layer norm and
softmax run in float32.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Optional

import jax
import jax.numpy as jnp
import numpy as np

from mmap_jax.models.config import ClipConfig
from mmap_jax.tokenizer import CLIP_EOT_TOKEN

Params = dict[str, Any]
LN_EPS = 1e-5


# ----------------------------------------------------------------------------- initialisation

def _init_block(key, width: int, layers: int) -> Params:
  """OpenAI's `initialize_parameters` scales, so random models behave like real ones."""
  attn_std = width ** -0.5
  proj_std = width ** -0.5 * (2 * layers) ** -0.5
  fc_std = (2 * width) ** -0.5
  k = jax.random.split(key, 4)
  ln = lambda: {"scale": jnp.ones((width,), jnp.float32), "bias": jnp.zeros((width,), jnp.float32)}
  normal = lambda kk, shape, std: std * jax.random.normal(kk, shape, jnp.float32)
  return {
      "ln_1": ln(),
      "attn": {
          "in_proj": {"kernel": normal(k[0], (width, 3 * width), attn_std),
                      "bias": jnp.zeros((3 * width,), jnp.float32)},
          "out_proj": {"kernel": normal(k[1], (width, width), proj_std),
                       "bias": jnp.zeros((width,), jnp.float32)},
      },
      "ln_2": ln(),
      "mlp": {
          "c_fc": {"kernel": normal(k[2], (width, 4 * width), fc_std),
                   "bias": jnp.zeros((4 * width,), jnp.float32)},
          "c_proj": {"kernel": normal(k[3], (4 * width, width), proj_std),
                     "bias": jnp.zeros((width,), jnp.float32)},
      },
  }


def _init_tower(key, width: int, layers: int) -> Params:
  keys = jax.random.split(key, layers)
  return {"resblocks": {str(i): _init_block(keys[i], width, layers) for i in range(layers)}}


def init_params(key: jax.Array, cfg: ClipConfig) -> Params:
  """Random CLIP parameters with OpenAI's initialisation (for tests, benchmarks, pretraining).

  Jitted: eager op-by-op initialisation of a hundred small arrays costs seconds of dispatch.
  """
  return _init_params_jit(key, cfg)


@functools.partial(jax.jit, static_argnums=(1,))
def _init_params_jit(key: jax.Array, cfg: ClipConfig) -> Params:
  v, t = cfg.vision, cfg.text
  k = jax.random.split(key, 10)
  ln = lambda w: {"scale": jnp.ones((w,), jnp.float32), "bias": jnp.zeros((w,), jnp.float32)}
  vscale = v.width ** -0.5
  fan_in = 3 * v.patch_size ** 2
  return {
      "visual": {
          "conv1": {"kernel": fan_in ** -0.5 * jax.random.normal(
              k[0], (v.patch_size, v.patch_size, 3, v.width), jnp.float32)},
          "class_embedding": vscale * jax.random.normal(k[1], (v.width,), jnp.float32),
          "positional_embedding": vscale * jax.random.normal(
              k[2], (v.num_positions, v.width), jnp.float32),
          "ln_pre": ln(v.width),
          "transformer": _init_tower(k[3], v.width, v.layers),
          "ln_post": ln(v.width),
          "proj": vscale * jax.random.normal(k[4], (v.width, cfg.embed_dim), jnp.float32),
      },
      "text": {
          "token_embedding": {"embedding": 0.02 * jax.random.normal(
              k[5], (t.vocab_size, t.width), jnp.float32)},
          "positional_embedding": 0.01 * jax.random.normal(
              k[6], (t.context_length, t.width), jnp.float32),
          "transformer": _init_tower(k[7], t.width, t.layers),
          "ln_final": ln(t.width),
          "text_projection": t.width ** -0.5 * jax.random.normal(
              k[8], (t.width, cfg.embed_dim), jnp.float32),
      },
      "logit_scale": jnp.asarray(math.log(1 / 0.07), jnp.float32),
  }


def param_shapes(cfg: ClipConfig) -> Params:
  """The expected shape of every leaf, without allocating (used by checkpoint loaders)."""
  return jax.eval_shape(lambda: init_params(jax.random.key(0), cfg))


def count_params(tree: Any) -> int:
  return int(sum(np.prod(np.shape(x)) for x in jax.tree.leaves(tree)))


# ----------------------------------------------------------------------------- building blocks

def layer_norm(x: jax.Array, p: Params) -> jax.Array:
  """LayerNorm in float32 whatever the compute dtype (as OpenAI's fp16-safe LayerNorm)."""
  x32 = x.astype(jnp.float32)
  mean = x32.mean(-1, keepdims=True)
  var = jnp.square(x32 - mean).mean(-1, keepdims=True)
  y = (x32 - mean) * jax.lax.rsqrt(var + LN_EPS) * p["scale"] + p["bias"]
  return y.astype(x.dtype)


def _dense(x: jax.Array, p: Params) -> jax.Array:
  y = jnp.dot(x, p["kernel"].astype(x.dtype))
  if "lora_a" in p:  # LoRA kept apart from W (mmap_jax/peft/lora.py: why, and the merged form).
    y = y + jnp.dot(_lora_down(x, p), p["lora_b"].astype(x.dtype))
  return y + p["bias"].astype(x.dtype) if "bias" in p else y


def _lora_down(x: jax.Array, p: Params) -> jax.Array:
  """x @ lora_a; in training (`lora_dropout_keys` [n], one per target of lora_a's n column
  blocks) each block sees its own inverted dropout of x, as CLIP-LoRA's per-projection dropout."""
  a = p["lora_a"].astype(x.dtype)
  if "lora_dropout_keys" not in p:
    return jnp.dot(x, a)
  keys, rate = p["lora_dropout_keys"], p["lora_dropout_rate"]
  n = keys.shape[0]
  r = a.shape[-1] // n
  keep = 1.0 - rate
  parts = []
  for i in range(n):
    mask = jax.random.bernoulli(keys[i], keep, x.shape)
    xi = jnp.where(mask, x / keep.astype(x.dtype), jnp.zeros((), x.dtype))
    parts.append(jnp.dot(xi, a[..., i * r:(i + 1) * r]))
  return jnp.concatenate(parts, axis=-1)


def feature_adapter(x: jax.Array, p: Optional[Params]) -> jax.Array:
  """CLIP-Adapter on projected features (mmap_jax/peft/adapter.py); identity when `p` is None.

  ratio * relu(relu(x W1) W2) + (1 - ratio) * x, in float32.
  """
  if p is None:
    return x
  h = jax.nn.relu(jnp.dot(x, p["fc1"]["kernel"]))
  a = jax.nn.relu(jnp.dot(h, p["fc2"]["kernel"]))
  return p["ratio"] * a + (1.0 - p["ratio"]) * x


def _activation(x: jax.Array, kind: str) -> jax.Array:
  if kind == "quick_gelu":
    return x * jax.nn.sigmoid(1.702 * x)
  return jax.nn.gelu(x, approximate=False)


# The activation is recomputed from the hidden pre-activation in the backward pass instead of
# saving its intermediates (sigmoid and product, [tokens, 4W] each): elementwise, cheap, and it
# removes two of the three largest saved tensors of a block.
_checkpointed_activation = jax.checkpoint(_activation, static_argnums=(1,))


def _mlp(x: jax.Array, p: Params, activation: str) -> jax.Array:
  return _dense(_checkpointed_activation(_dense(x, p["c_fc"]), activation), p["c_proj"])


def _qkv(x: jax.Array, p: Params, heads: int):
  """[..., S, W] -> three [..., S, H, D] arrays; q already scaled by 1/sqrt(D) as torch does."""
  qkv = _dense(x, p["in_proj"])
  q, k, v = jnp.split(qkv, 3, axis=-1)
  split = lambda a: a.reshape(a.shape[:-1] + (heads, a.shape[-1] // heads))
  q, k, v = split(q), split(k), split(v)
  return q * jnp.asarray(q.shape[-1] ** -0.5, q.dtype), k, v


def _softmax_attend(q, k, v, mask: Optional[jax.Array]) -> jax.Array:
  """Plain attention: q [..., Sq, H, D], k/v [..., Sk, H, D], boolean mask [Sq, Sk] (True=keep).

  Heads-major inside ([..., H, S, D], one transpose each way); the softmax in float32. (A
  hand-written backward that saved or recomputed the probabilities showed no measurable gain
  over autodiff on a ViT-B/16 block under the benchmark's settings, so autodiff.)
  """
  heads_major = lambda a: jnp.swapaxes(a, -2, -3)
  q, k, v = heads_major(q), heads_major(k), heads_major(v)
  logits = jnp.einsum("...qd,...kd->...qk", q, k, preferred_element_type=jnp.float32)
  if mask is not None:
    logits = jnp.where(mask, logits, -jnp.inf)
  w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return heads_major(jnp.einsum("...qk,...kd->...qd", w, v))


def _merge_heads(o: jax.Array) -> jax.Array:
  return o.reshape(o.shape[:-2] + (o.shape[-2] * o.shape[-1],))


def residual_block(x: jax.Array, p: Params, heads: int, mask: Optional[jax.Array],
                   activation: str, shared_tail: int = 0) -> jax.Array:
  """OpenAI's ResidualAttentionBlock: pre-LN attention and MLP, both residual.

  `shared_tail` = M > 0 (no mask): the last M tokens are the same in every row (deep prompts
  right after replacement) and their outputs are discarded by the caller (replaced before the
  next block). Only their keys/values are computed, once, from row 0; queries, attention output
  and MLP run for the other tokens only, and the tail positions are returned unchanged. The
  outputs at the other positions equal the full block's.
  """
  if shared_tail:
    n = x.shape[-2] - shared_tail
    body, tail = x[..., :n, :], x[..., 0, n:, :]
    q, k, v = _qkv(layer_norm(body, p["ln_1"]), p["attn"], heads)        # [B, N, H, D]
    _, kt, vt = _qkv(layer_norm(tail, p["ln_1"]), p["attn"], heads)      # [M, H, D]
    rows = lambda a: jnp.broadcast_to(a, k.shape[:-3] + a.shape)
    k = jnp.concatenate([k, rows(kt)], axis=-3)
    v = jnp.concatenate([v, rows(vt)], axis=-3)
    body = body + _dense(_merge_heads(_softmax_attend(q, k, v, None)), p["attn"]["out_proj"])
    body = body + _mlp(layer_norm(body, p["ln_2"]), p["mlp"], activation)
    return jnp.concatenate([body, x[..., n:, :]], axis=-2)
  q, k, v = _qkv(layer_norm(x, p["ln_1"]), p["attn"], heads)
  x = x + _dense(_merge_heads(_softmax_attend(q, k, v, mask)), p["attn"]["out_proj"])
  return x + _mlp(layer_norm(x, p["ln_2"]), p["mlp"], activation)


def _pooled_block(x: jax.Array, pooled_index: jax.Array, p: Params, heads: int,
                  mask_row: Optional[jax.Array], activation: str,
                  prefix: Optional[jax.Array] = None) -> jax.Array:
  """The last block, evaluated only where the output is read: [N, S, W] -> [N, W].

  Keys and values need every token; queries, attention output and the MLP only the pooled one.
  `mask_row` [N, S] says which of the N rows' keys the pooled query may see. An optional shared
  `prefix` [P, W] precedes every row (fully visible); its keys/values are computed once.
  """
  q, k, v = _qkv(layer_norm(x, p["ln_1"]), p["attn"], heads)
  take = lambda a: jnp.take_along_axis(
      a, pooled_index.reshape((-1,) + (1,) * (a.ndim - 1)), axis=1)[:, 0]
  q0, x0 = take(q), take(x)                                     # [N, H, D], [N, W]
  logits = jnp.einsum("nhd,nkhd->nhk", q0, k, preferred_element_type=jnp.float32)
  if mask_row is not None:
    logits = jnp.where(mask_row[:, None, :], logits, -jnp.inf)
  if prefix is not None:
    _, kp, vp = _qkv(layer_norm(prefix, p["ln_1"]), p["attn"], heads)   # [P, H, D]
    lp = jnp.einsum("nhd,khd->nhk", q0, kp, preferred_element_type=jnp.float32)
    w = jax.nn.softmax(jnp.concatenate([lp, logits], axis=-1), axis=-1).astype(v.dtype)
    plen = prefix.shape[0]
    o = (jnp.einsum("nhk,khd->nhd", w[..., :plen], vp)
         + jnp.einsum("nhk,nkhd->nhd", w[..., plen:], v))
  else:
    w = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
    o = jnp.einsum("nhk,nkhd->nhd", w, v)
  x0 = x0 + _dense(o.reshape(o.shape[0], -1), p["attn"]["out_proj"])
  return x0 + _mlp(layer_norm(x0, p["ln_2"]), p["mlp"], activation)


def _maybe_remat(fn, remat: bool):
  return jax.checkpoint(fn, static_argnums=(2, 4, 5)) if remat else fn


def _replace_tokens(x: jax.Array, prompt: jax.Array, start: int) -> jax.Array:
  """Overwrite tokens [start, start+L) of every sequence with the prompt (replace, not add)."""
  prompt = jnp.broadcast_to(prompt.astype(x.dtype), x.shape[:-2] + prompt.shape)
  return jax.lax.dynamic_update_slice_in_dim(x, prompt, start, axis=x.ndim - 2)


def _check_prompts(prompts: jax.Array, layers: int, width: int, tower: str):
  if prompts.ndim != 3 or prompts.shape[-1] != width or not 1 <= prompts.shape[0] <= layers:
    raise ValueError(f"{tower} prompts must be [J, L, {width}] with 1 <= J <= {layers}, "
                     f"got shape {prompts.shape}")


# ----------------------------------------------------------------------------- image tower

def encode_image(params: Params, cfg: ClipConfig, images: jax.Array,
                 visual_prompts: Optional[jax.Array] = None, *, dtype=jnp.float32,
                 remat: bool = False, pooled_only_last: bool = True) -> jax.Array:
  """Images [B, H, W, 3] (CLIP-normalised, NHWC) -> unnormalised embeddings [B, E].

  `visual_prompts` [J, L, W_v] are deep prompts (module docstring). `pooled_only_last` evaluates
  the last block only at the class token; the result is identical. Blocks whose prompt outputs
  the next block's prompts replace (0..J-2) compute only the prompts' keys/values, once per call
  (they are the same for every image): `residual_block(..., shared_tail=L)`; exact.
  """
  vc, p = cfg.vision, params["visual"]
  b, hgt, wid, _ = images.shape
  ps = vc.patch_size
  if (hgt, wid) != (vc.image_size, vc.image_size):
    raise ValueError(f"images must be {vc.image_size}x{vc.image_size}, got {hgt}x{wid}")
  # A stride-p conv without bias is exactly a matmul over flattened (py, px, c) patches.
  patches = images.astype(dtype).reshape(b, vc.grid, ps, vc.grid, ps, 3)
  patches = patches.transpose(0, 1, 3, 2, 4, 5).reshape(b, vc.grid * vc.grid, ps * ps * 3)
  x = jnp.dot(patches, p["conv1"]["kernel"].reshape(ps * ps * 3, vc.width).astype(dtype))
  cls = jnp.broadcast_to(p["class_embedding"].astype(dtype), (b, 1, vc.width))
  x = jnp.concatenate([cls, x], axis=1) + p["positional_embedding"].astype(dtype)
  num_prompts = 0
  if visual_prompts is not None:
    _check_prompts(visual_prompts, vc.layers, vc.width, "visual")
    num_prompts = visual_prompts.shape[1]
    x = jnp.concatenate(
        [x, jnp.broadcast_to(visual_prompts[0].astype(dtype), (b,) + visual_prompts.shape[1:])],
        axis=1)
  x = layer_norm(x, p["ln_pre"])
  blocks = p["transformer"]["resblocks"]
  block = _maybe_remat(residual_block, remat)
  start = x.shape[1] - num_prompts
  last = vc.layers - 1 if pooled_only_last else vc.layers
  depth = visual_prompts.shape[0] if visual_prompts is not None else 0
  for i in range(last):
    if 1 <= i < depth:
      x = _replace_tokens(x, visual_prompts[i], start)
    # Outputs at the prompt positions of blocks 0..J-2 are replaced before the next block.
    x = block(x, blocks[str(i)], vc.heads, None, cfg.activation,
              num_prompts if i + 1 < depth else 0)
  if pooled_only_last:
    i = vc.layers - 1
    if visual_prompts is not None and 1 <= i < visual_prompts.shape[0]:
      x = _replace_tokens(x, visual_prompts[i], start)
    pooled = _pooled_block(x, jnp.zeros((b,), jnp.int32), blocks[str(i)], vc.heads, None,
                           cfg.activation)
  else:
    pooled = x[:, 0]
  pooled = layer_norm(pooled, p["ln_post"])
  return feature_adapter(jnp.dot(pooled, p["proj"].astype(dtype)).astype(jnp.float32),
                         p.get("adapter"))


# ----------------------------------------------------------------------------- text tower

def embed_tokens(params: Params, token_ids: jax.Array) -> jax.Array:
  """Token ids [..., S] -> token embeddings [..., S, W_t] (no positional embedding yet)."""
  return jnp.take(params["text"]["token_embedding"]["embedding"], token_ids, axis=0)


def eot_positions(token_ids: np.ndarray, eot_token: int = CLIP_EOT_TOKEN) -> np.ndarray:
  """Index of the first end-of-text token per row (where CLIP pools); an error if a row has
  none. OpenAI pools at `argmax(ids)`, the first EOT only while EOT is the largest id; the
  explicit search does not depend on that."""
  ids = np.asarray(token_ids)
  has = (ids == eot_token).any(-1)
  if not has.all():
    raise ValueError(f"{int((~has).sum())} token sequence(s) have no end-of-text token {eot_token}")
  return (ids == eot_token).argmax(-1).astype(np.int32)


def truncate_to_longest(token_ids: np.ndarray, eot_token: int = CLIP_EOT_TOKEN) -> np.ndarray:
  """Drop the columns after the last end-of-text token of any row: exact under the causal mask."""
  return np.asarray(token_ids)[..., : int(eot_positions(token_ids, eot_token).max()) + 1]


def _causal_mask(n: int) -> jax.Array:
  return jnp.tril(jnp.ones((n, n), bool))


def encode_text(params: Params, cfg: ClipConfig, token_embeds: jax.Array, eot_index: jax.Array,
                text_prompts: Optional[jax.Array] = None, *, dtype=jnp.float32,
                remat: bool = False, share_prefix: bool = False,
                pooled_only_last: bool = True) -> jax.Array:
  """Token embeddings [N, S, W_t] + end-of-text index [N] -> unnormalised embeddings [N, E].

  S may be shorter than the context length (see `truncate_to_longest`). `text_prompts` [J, L, W_t]
  are deep prompts at positions 1..L. With prompts, `share_prefix` computes the start token and
  the prompt tokens, identical for every sequence, once, and lets the per-sequence suffixes attend
  to their keys/values; the result is the same as the unshared computation.
  """
  tc, p = cfg.text, params["text"]
  n, s, w = token_embeds.shape
  if s > tc.context_length:
    raise ValueError(f"text sequences of length {s} exceed context_length {tc.context_length}")
  x = token_embeds.astype(dtype)
  num_prompts = 0
  if text_prompts is not None:
    _check_prompts(text_prompts, tc.layers, tc.width, "text")
    num_prompts = text_prompts.shape[1]
    if 1 + num_prompts >= s:
      raise ValueError(f"text sequences of length {s} leave no room after {num_prompts} prompts")
    x = _replace_tokens(x, text_prompts[0], 1)
  x = x + p["positional_embedding"][:s].astype(dtype)
  eot_index = jnp.asarray(eot_index, jnp.int32)
  blocks = p["transformer"]["resblocks"]
  if share_prefix and text_prompts is not None:
    pooled = _text_tower_shared_prefix(x, eot_index, blocks, cfg, text_prompts, 1 + num_prompts,
                                       remat, pooled_only_last)
  else:
    pooled = _text_tower(x, eot_index, blocks, cfg, text_prompts, remat, pooled_only_last)
  pooled = layer_norm(pooled, p["ln_final"])
  return feature_adapter(jnp.dot(pooled, p["text_projection"].astype(dtype)).astype(jnp.float32),
                         p.get("adapter"))


def _text_tower(x, eot_index, blocks, cfg: ClipConfig, prompts, remat, pooled_only_last):
  tc = cfg.text
  s = x.shape[1]
  mask = _causal_mask(s)
  block = _maybe_remat(residual_block, remat)
  last = tc.layers - 1 if pooled_only_last else tc.layers
  for i in range(last):
    if prompts is not None and 1 <= i < prompts.shape[0]:
      x = _replace_tokens(x, prompts[i], 1)
    x = block(x, blocks[str(i)], tc.heads, mask, cfg.activation, 0)  # 6 args: remat's statics
  if not pooled_only_last:
    return jnp.take_along_axis(x, eot_index[:, None, None], axis=1)[:, 0]
  i = tc.layers - 1
  if prompts is not None and 1 <= i < prompts.shape[0]:
    x = _replace_tokens(x, prompts[i], 1)
  mask_row = jnp.arange(s)[None, :] <= eot_index[:, None]
  return _pooled_block(x, eot_index, blocks[str(i)], tc.heads, mask_row, cfg.activation)


def _prefix_suffix_block(prefix, suffix, p, heads, activation):
  """One block where every suffix row sees the shared prefix's keys/values (a KV cache).

  prefix [P, W] is causal within itself and sees no suffix; suffix [N, S', W] sees the whole
  prefix and is causal within itself. Equal to running the block on concat(prefix, suffix) rows.
  """
  hp, hs = layer_norm(prefix, p["ln_1"]), layer_norm(suffix, p["ln_1"])
  qp, kp, vp = _qkv(hp, p["attn"], heads)                         # [P, H, D]
  qs, ks, vs = _qkv(hs, p["attn"], heads)                         # [N, S', H, D]
  op = _softmax_attend(qp, kp, vp, _causal_mask(prefix.shape[0]))
  sl = suffix.shape[1]
  lp = jnp.einsum("nqhd,khd->nhqk", qs, kp, preferred_element_type=jnp.float32)
  ls = jnp.einsum("nqhd,nkhd->nhqk", qs, ks, preferred_element_type=jnp.float32)
  ls = jnp.where(_causal_mask(sl), ls, -jnp.inf)
  w = jax.nn.softmax(jnp.concatenate([lp, ls], axis=-1), axis=-1).astype(vs.dtype)
  wp, ws = w[..., : prefix.shape[0]], w[..., prefix.shape[0]:]
  os_ = jnp.einsum("nhqk,khd->nqhd", wp, vp) + jnp.einsum("nhqk,nkhd->nqhd", ws, vs)
  out = p["attn"]["out_proj"]
  prefix = prefix + _dense(_merge_heads(op), out)
  suffix = suffix + _dense(_merge_heads(os_), out)
  prefix = prefix + _mlp(layer_norm(prefix, p["ln_2"]), p["mlp"], activation)
  suffix = suffix + _mlp(layer_norm(suffix, p["ln_2"]), p["mlp"], activation)
  return prefix, suffix


def _text_tower_shared_prefix(x, eot_index, blocks, cfg: ClipConfig, prompts, plen, remat,
                              pooled_only_last):
  tc = cfg.text
  # Rows agree on positions < plen by construction (start token + replaced prompt tokens).
  prefix, suffix = x[0, :plen], x[:, plen:]
  block = (jax.checkpoint(_prefix_suffix_block, static_argnums=(3, 4)) if remat
           else _prefix_suffix_block)
  last = tc.layers - 1 if pooled_only_last else tc.layers
  for i in range(last):
    if 1 <= i < prompts.shape[0]:
      prefix = _replace_tokens(prefix, prompts[i], 1)
    prefix, suffix = block(prefix, suffix, blocks[str(i)], tc.heads, cfg.activation)
  if not pooled_only_last:
    return jnp.take_along_axis(suffix, (eot_index - plen)[:, None, None], axis=1)[:, 0]
  i = tc.layers - 1
  if 1 <= i < prompts.shape[0]:
    prefix = _replace_tokens(prefix, prompts[i], 1)
  # Last block: the pooled token's query against [prefix keys, suffix keys].
  sidx = eot_index - plen
  mask_row = jnp.arange(suffix.shape[1])[None, :] <= sidx[:, None]
  return _pooled_block(suffix, sidx, blocks[str(i)], tc.heads, mask_row, cfg.activation,
                       prefix=prefix)


# ----------------------------------------------------------------------------- similarity

def normalize(x: jax.Array) -> jax.Array:
  return x / jnp.linalg.norm(x, axis=-1, keepdims=True)


def similarity_logits(params: Params, image_features: jax.Array,
                      text_features: jax.Array) -> jax.Array:
  """CLIP's logits: exp(logit_scale) * cosine(image, text), [B, E] x [C, E] -> [B, C]."""
  scale = jnp.exp(params["logit_scale"])
  return scale * normalize(image_features) @ normalize(text_features).T
