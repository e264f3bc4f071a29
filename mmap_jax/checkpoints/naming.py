"""Where each CLIP parameter lives in each checkpoint layout, and how it is reshaped.

One `Rule` per leaf of `clip.param_shapes(cfg)`: the source key(s), the shapes they must have in
that layout (so a mis-shaped key is reported in the checkpoint's own terms), and a function that
turns them into the Flax-style leaf. Params are addressed by '/'-joined pytree paths, the same
names the project's own safetensors files use.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig

Shape = tuple[int, ...]
SEP = "/"

# Keys that are in real checkpoints but are not parameters; skipped by name, never by pattern.
HF_NON_PARAMETERS = frozenset({
    "text_model.embeddings.position_ids",     # position index buffers of older transformers
    "vision_model.embeddings.position_ids",
})
OPENAI_NON_PARAMETERS = frozenset({
    # Model attributes stored in OpenAI's TorchScript archives (OpenAI's build_model drops them).
    "input_resolution", "context_length", "vocab_size",
    # The causal-mask buffer some open_clip versions save.
    "attn_mask",
})


@dataclasses.dataclass(frozen=True)
class Rule:
  """One param leaf `target`, built by `combine(*arrays of sources)`."""
  target: str
  sources: tuple[str, ...]
  source_shapes: tuple[Shape, ...]
  combine: Callable[..., np.ndarray]


def _copy(a: np.ndarray) -> np.ndarray:
  return a


def _transpose(a: np.ndarray) -> np.ndarray:
  """torch Linear [out, in] (or OpenAI's in_proj [3W, W]) -> Flax kernel [in, out]."""
  return a.T


def _conv(a: np.ndarray) -> np.ndarray:
  """torch Conv2d [out, in, kh, kw] -> Flax [kh, kw, in, out]."""
  return a.transpose(2, 3, 1, 0)


def _qkv_kernel(q: np.ndarray, k: np.ndarray, v: np.ndarray) -> np.ndarray:
  """Separate HF q/k/v Linear weights -> OpenAI's fused in_proj as a [W, 3W] kernel."""
  return np.concatenate([q.T, k.T, v.T], axis=1)


def _concat(*parts: np.ndarray) -> np.ndarray:
  return np.concatenate(parts, axis=0)


def _one(target: str, source: str, shape: Shape, combine=_copy) -> Rule:
  return Rule(target, (source,), (tuple(shape),), combine)


def _layer_norm(target: str, source: str, width: int) -> list[Rule]:
  return [_one(f"{target}/scale", f"{source}.weight", (width,)),
          _one(f"{target}/bias", f"{source}.bias", (width,))]


def _linear(target: str, source: str, fan_in: int, fan_out: int) -> list[Rule]:
  return [_one(f"{target}/kernel", f"{source}.weight", (fan_out, fan_in), _transpose),
          _one(f"{target}/bias", f"{source}.bias", (fan_out,))]


# ----------------------------------------------------------------------------- OpenAI / open_clip

def _openai_block(target: str, source: str, w: int) -> list[Rule]:
  return [
      *_layer_norm(f"{target}/ln_1", f"{source}.ln_1", w),
      _one(f"{target}/attn/in_proj/kernel", f"{source}.attn.in_proj_weight", (3 * w, w),
           _transpose),
      _one(f"{target}/attn/in_proj/bias", f"{source}.attn.in_proj_bias", (3 * w,)),
      *_linear(f"{target}/attn/out_proj", f"{source}.attn.out_proj", w, w),
      *_layer_norm(f"{target}/ln_2", f"{source}.ln_2", w),
      *_linear(f"{target}/mlp/c_fc", f"{source}.mlp.c_fc", w, 4 * w),
      *_linear(f"{target}/mlp/c_proj", f"{source}.mlp.c_proj", 4 * w, w),
  ]


def openai_rules(cfg: ClipConfig) -> list[Rule]:
  """OpenAI's `model.py` state-dict names (also open_clip's for its OpenAI-style ViT models)."""
  v, t, e = cfg.vision, cfg.text, cfg.embed_dim
  rules = [
      _one("visual/conv1/kernel", "visual.conv1.weight", (v.width, 3, v.patch_size, v.patch_size),
           _conv),
      _one("visual/class_embedding", "visual.class_embedding", (v.width,)),
      _one("visual/positional_embedding", "visual.positional_embedding",
           (v.num_positions, v.width)),
      *_layer_norm("visual/ln_pre", "visual.ln_pre", v.width),
      *_layer_norm("visual/ln_post", "visual.ln_post", v.width),
      _one("visual/proj", "visual.proj", (v.width, e)),
      _one("text/token_embedding/embedding", "token_embedding.weight", (t.vocab_size, t.width)),
      _one("text/positional_embedding", "positional_embedding", (t.context_length, t.width)),
      *_layer_norm("text/ln_final", "ln_final", t.width),
      _one("text/text_projection", "text_projection", (t.width, e)),
      _one("logit_scale", "logit_scale", ()),
  ]
  for i in range(v.layers):
    rules += _openai_block(f"visual/transformer/resblocks/{i}", f"visual.transformer.resblocks.{i}",
                           v.width)
  for i in range(t.layers):
    rules += _openai_block(f"text/transformer/resblocks/{i}", f"transformer.resblocks.{i}", t.width)
  return rules


# ----------------------------------------------------------------------------- Hugging Face

def _hf_block(target: str, source: str, w: int) -> list[Rule]:
  attn = f"{source}.self_attn"
  return [
      *_layer_norm(f"{target}/ln_1", f"{source}.layer_norm1", w),
      Rule(f"{target}/attn/in_proj/kernel",
           tuple(f"{attn}.{n}_proj.weight" for n in "qkv"), ((w, w),) * 3, _qkv_kernel),
      Rule(f"{target}/attn/in_proj/bias",
           tuple(f"{attn}.{n}_proj.bias" for n in "qkv"), ((w,),) * 3, _concat),
      *_linear(f"{target}/attn/out_proj", f"{attn}.out_proj", w, w),
      *_layer_norm(f"{target}/ln_2", f"{source}.layer_norm2", w),
      *_linear(f"{target}/mlp/c_fc", f"{source}.mlp.fc1", w, 4 * w),
      *_linear(f"{target}/mlp/c_proj", f"{source}.mlp.fc2", 4 * w, w),
  ]


def hf_rules(cfg: ClipConfig) -> list[Rule]:
  """transformers' `CLIPModel` state-dict names."""
  v, t, e = cfg.vision, cfg.text, cfg.embed_dim
  rules = [
      _one("visual/conv1/kernel", "vision_model.embeddings.patch_embedding.weight",
           (v.width, 3, v.patch_size, v.patch_size), _conv),
      _one("visual/class_embedding", "vision_model.embeddings.class_embedding", (v.width,)),
      _one("visual/positional_embedding", "vision_model.embeddings.position_embedding.weight",
           (v.num_positions, v.width)),
      *_layer_norm("visual/ln_pre", "vision_model.pre_layrnorm", v.width),   # sic: HF's spelling
      *_layer_norm("visual/ln_post", "vision_model.post_layernorm", v.width),
      _one("visual/proj", "visual_projection.weight", (e, v.width), _transpose),
      _one("text/token_embedding/embedding", "text_model.embeddings.token_embedding.weight",
           (t.vocab_size, t.width)),
      _one("text/positional_embedding", "text_model.embeddings.position_embedding.weight",
           (t.context_length, t.width)),
      *_layer_norm("text/ln_final", "text_model.final_layer_norm", t.width),
      _one("text/text_projection", "text_projection.weight", (e, t.width), _transpose),
      _one("logit_scale", "logit_scale", ()),
  ]
  for i in range(v.layers):
    rules += _hf_block(f"visual/transformer/resblocks/{i}", f"vision_model.encoder.layers.{i}",
                       v.width)
  for i in range(t.layers):
    rules += _hf_block(f"text/transformer/resblocks/{i}", f"text_model.encoder.layers.{i}", t.width)
  return rules


# ----------------------------------------------------------------------------- pytree paths

def flatten(tree: Mapping[str, Any]) -> dict[str, Any]:
  """Nested params -> {'visual/conv1/kernel': leaf, ...}."""
  return traverse_util.flatten_dict(dict(tree), sep=SEP)


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """Inverse of `flatten`."""
  return traverse_util.unflatten_dict(dict(flat), sep=SEP)


def expected_shapes(cfg: ClipConfig) -> dict[str, Shape]:
  """'/'-path -> shape of every leaf the encoders need (from `clip.param_shapes`)."""
  return {k: tuple(v.shape) for k, v in flatten(clip.param_shapes(cfg)).items()}
