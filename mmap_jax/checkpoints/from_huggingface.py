"""A Hugging Face `CLIPModel` directory (config.json + safetensors) -> params, without torch.

Widths, layers, patch and image size, context length, vocabulary and embedding size come from the
tensor shapes; heads and activation (not visible in shapes) from config.json. Every size the
config also states is cross-checked against the tensors, so an inconsistent directory fails here
rather than producing a silently wrong model.
"""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Mapping, Optional

from mmap_jax.checkpoints import naming, sources
from mmap_jax.checkpoints.assemble import LoadedCheckpoint, assemble
from mmap_jax.checkpoints.errors import CheckpointError
from mmap_jax.checkpoints.from_openai import count_layers
from mmap_jax.checkpoints.sources import PathLike, TensorSource
from mmap_jax.models import clip
from mmap_jax.models.config import ACTIVATIONS, ClipConfig, TextConfig, VisionConfig

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TORCH_WEIGHTS_FILE = "pytorch_model.bin"   # older exports: read only without safetensors (torch)
# transformers' CLIPVisionConfig / CLIPTextConfig defaults, used when config.json omits a field.
_DEFAULT_HEADS = {"vision_config": 12, "text_config": 8}


def is_hf_dir(path: PathLike) -> bool:
  return (pathlib.Path(path) / CONFIG_FILE).is_file()


def read_hf_config(directory: PathLike) -> dict[str, Any]:
  path = pathlib.Path(directory) / CONFIG_FILE
  if not path.is_file():
    raise CheckpointError(f"not a Hugging Face checkpoint: {path} not found")
  try:
    config = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
  if not isinstance(config, dict):
    raise CheckpointError(f"{path}: expected a JSON object")
  return config


def open_weights(directory: PathLike) -> TensorSource:
  """model.safetensors, else a sharded index, else pytorch_model.bin (torch, weights_only)."""
  directory = pathlib.Path(directory)
  if (directory / WEIGHTS_FILE).is_file():
    return sources.SafetensorsSource([directory / WEIGHTS_FILE])
  if (directory / INDEX_FILE).is_file():
    return sources.sharded_safetensors(directory / INDEX_FILE)
  if (directory / TORCH_WEIGHTS_FILE).is_file():
    return sources.TorchSource(sources.load_torch_state_dict(directory / TORCH_WEIGHTS_FILE),
                               str(directory / TORCH_WEIGHTS_FILE))
  raise CheckpointError(f"no weights in {directory}: looked for {WEIGHTS_FILE}, {INDEX_FILE} "
                        f"and {TORCH_WEIGHTS_FILE}")


def _tower_config(config: Mapping[str, Any], name: str) -> dict[str, Any]:
  """`text_config` updated by the legacy `text_config_dict`, as transformers merges them."""
  merged: dict[str, Any] = {}
  for key in (name, f"{name}_dict"):
    part = config.get(key)
    if isinstance(part, dict):
      merged.update(part)
  return merged


def _square(value: Any, field: str, where: str) -> Optional[int]:
  if value is None:
    return None
  if isinstance(value, (list, tuple)):
    if len(value) != 2 or value[0] != value[1]:
      raise CheckpointError(f"{where}: {field}={value!r}: unsupported: non-square images/patches")
    value = value[0]
  return int(value)


def infer_config(config: Mapping[str, Any], source: TensorSource, config_path: str) -> ClipConfig:
  """The architecture of a HF CLIP checkpoint: shapes from tensors, heads/activation from config."""
  model_type = config.get("model_type")
  if model_type != "clip":
    raise CheckpointError(f"{config_path}: unsupported model_type {model_type!r}: only CLIP ViT "
                          "checkpoints (model_type 'clip', transformers' CLIPModel) are supported")
  vcfg, tcfg = _tower_config(config, "vision_config"), _tower_config(config, "text_config")
  for name, part, want in (("vision_config", vcfg, "clip_vision_model"),
                           ("text_config", tcfg, "clip_text_model")):
    if part.get("model_type", want) != want:
      raise CheckpointError(f"{config_path}: unsupported {name}.model_type "
                            f"{part['model_type']!r} (expected {want!r})")

  def shape(key: str, ndim: int) -> tuple[int, ...]:
    if key not in source:
      raise CheckpointError(f"{source.description}: cannot infer the CLIP architecture: "
                            f"key {key!r} not found")
    s = source.shape(key)
    if len(s) != ndim:
      raise CheckpointError(f"{source.where(key)}: {key!r} has shape {s}, expected {ndim} dims")
    return s

  patch_key = "vision_model.embeddings.patch_embedding.weight"
  v_width, channels, patch, patch_w = shape(patch_key, 4)
  if channels != 3 or patch != patch_w:
    raise CheckpointError(f"{source.where(patch_key)}: {patch_key!r} has shape "
                          f"{(v_width, channels, patch, patch_w)}; expected [W, 3, p, p]")
  pos_key = "vision_model.embeddings.position_embedding.weight"
  positions = shape(pos_key, 2)[0]
  grid = math.isqrt(max(positions - 1, 0))
  if grid * grid + 1 != positions:
    raise CheckpointError(f"{source.where(pos_key)}: {pos_key!r} has {positions} rows; expected "
                          "grid*grid + 1 (a square ViT with a class token)")
  tok_key = "text_model.embeddings.token_embedding.weight"
  vocab, t_width = shape(tok_key, 2)
  ctx_key = "text_model.embeddings.position_embedding.weight"
  context = shape(ctx_key, 2)[0]
  proj_key = "text_projection.weight"
  embed = shape(proj_key, 2)[0]
  keys = source.keys()
  v_layers = count_layers(keys, "vision_model.encoder.layers.")
  t_layers = count_layers(keys, "text_model.encoder.layers.")
  if not v_layers or not t_layers:
    raise CheckpointError(f"{source.description}: no transformer layers found "
                          "('vision_model.encoder.layers.*' / 'text_model.encoder.layers.*')")

  # What config.json states must agree with the tensors.
  checks = (
      ("vision_config.hidden_size", vcfg.get("hidden_size"), v_width, patch_key),
      ("vision_config.intermediate_size", vcfg.get("intermediate_size"), 4 * v_width,
       "vision_model.encoder.layers.0.mlp.fc1.weight"),
      ("vision_config.num_hidden_layers", vcfg.get("num_hidden_layers"), v_layers,
       "vision_model.encoder.layers.*"),
      ("vision_config.patch_size", _square(vcfg.get("patch_size"), "patch_size", config_path),
       patch, patch_key),
      ("vision_config.image_size", _square(vcfg.get("image_size"), "image_size", config_path),
       grid * patch, pos_key),
      ("vision_config.num_channels", vcfg.get("num_channels"), 3, patch_key),
      ("text_config.hidden_size", tcfg.get("hidden_size"), t_width, tok_key),
      ("text_config.intermediate_size", tcfg.get("intermediate_size"), 4 * t_width,
       "text_model.encoder.layers.0.mlp.fc1.weight"),
      ("text_config.num_hidden_layers", tcfg.get("num_hidden_layers"), t_layers,
       "text_model.encoder.layers.*"),
      ("text_config.vocab_size", tcfg.get("vocab_size"), vocab, tok_key),
      ("text_config.max_position_embeddings", tcfg.get("max_position_embeddings"), context,
       ctx_key),
      ("projection_dim", config.get("projection_dim"), embed, proj_key),
  )
  for field, declared, actual, key in checks:
    if declared is not None and int(declared) != actual:
      raise CheckpointError(f"{config_path}: {field}={declared} but the weights say {actual} "
                            f"({key} in {source.description})")

  activations = {name: part.get("hidden_act", "quick_gelu")
                 for name, part in (("vision_config", vcfg), ("text_config", tcfg))}
  for name, act in activations.items():
    if act not in ACTIVATIONS:
      raise CheckpointError(f"{config_path}: unsupported {name}.hidden_act={act!r}; "
                            f"supported: {ACTIVATIONS}")
  if len(set(activations.values())) != 1:
    raise CheckpointError(f"{config_path}: unsupported: the towers use different activations "
                          f"{activations}")
  for name, part in (("vision_config", vcfg), ("text_config", tcfg)):
    eps = part.get("layer_norm_eps", clip.LN_EPS)
    if eps is not None and not math.isclose(float(eps), clip.LN_EPS, rel_tol=1e-6):
      raise CheckpointError(f"{config_path}: unsupported {name}.layer_norm_eps={eps} "
                            f"(the encoders use {clip.LN_EPS})")
  try:
    return ClipConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=grid * patch, patch_size=patch, width=v_width,
                            layers=v_layers,
                            heads=int(vcfg.get("num_attention_heads",
                                               _DEFAULT_HEADS["vision_config"]))),
        text=TextConfig(width=t_width, layers=t_layers,
                        heads=int(tcfg.get("num_attention_heads", _DEFAULT_HEADS["text_config"])),
                        context_length=context, vocab_size=vocab),
        activation=activations["vision_config"])
  except ValueError as e:
    raise CheckpointError(f"{config_path}: inconsistent architecture: {e}") from e


def load(directory: PathLike) -> LoadedCheckpoint:
  """A Hugging Face CLIP directory -> (architecture, float32 params, provenance)."""
  directory = pathlib.Path(directory)
  config = read_hf_config(directory)
  source = open_weights(directory)
  cfg = infer_config(config, source, str(directory / CONFIG_FILE))
  params = assemble(source, naming.hf_rules(cfg), cfg, naming.HF_NON_PARAMETERS)
  dtypes = sorted({source.dtype(k) for k in source.keys() if k not in naming.HF_NON_PARAMETERS})
  return LoadedCheckpoint(cfg, params, {"format": "huggingface", "path": str(directory.resolve()),
                                        "dtypes": dtypes})
