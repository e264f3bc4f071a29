"""OpenAI / open_clip PyTorch checkpoints (TorchScript .pt, state dicts, safetensors) -> params.

The architecture is read off the tensors exactly as OpenAI's `build_model` does (heads are
width // 64 in both towers); the checkpoint does not record the activation, which is QuickGELU for
OpenAI's models and for open_clip's `-quickgelu` ones (open_clip's other models use GELU: pass
`activation="gelu"`).
"""
from __future__ import annotations

import math
import pathlib
from typing import Iterable

from mmap_jax.checkpoints import naming, sources
from mmap_jax.checkpoints.assemble import LoadedCheckpoint, assemble
from mmap_jax.checkpoints.errors import CheckpointError
from mmap_jax.checkpoints.sources import PathLike, TensorSource
from mmap_jax.models.config import ACTIVATIONS, ClipConfig, TextConfig, VisionConfig

OPENAI_HEAD_WIDTH = 64

# Key prefixes of CLIP variants this project's encoders do not implement.
_UNSUPPORTED = (
    (("visual.layer1.", "visual.attnpool.", "visual.stem."),
     "unsupported: ResNet image tower (only ViT CLIP models are supported)"),
    (("visual.trunk.",), "unsupported: timm image tower (only OpenAI-style ViT towers)"),
    (("text.",), "unsupported: custom / Hugging Face text tower (only OpenAI's CLIP text "
                 "transformer is supported)"),
    (("vision_model.", "text_model."),
     "this is a Hugging Face CLIP state dict; pass the Hugging Face directory (with config.json) "
     "instead, so heads and activation are known"),
)


def check_supported(source: TensorSource) -> None:
  for prefixes, why in _UNSUPPORTED:
    hit = next((k for k in source.keys() if k.startswith(prefixes)), None)
    if hit is not None:
      raise CheckpointError(f"{source.description}: {why} (found key {hit!r})")


def count_layers(keys: Iterable[str], prefix: str) -> int:
  """Blocks under `prefix` ("<prefix>{i}.") as max index + 1, so a gap shows up as missing keys."""
  idx = {int(rest.split(".", 1)[0]) for k in keys if k.startswith(prefix)
         for rest in [k[len(prefix):]] if rest.split(".", 1)[0].isdigit()}
  return max(idx) + 1 if idx else 0


def _shape(source: TensorSource, key: str, ndim: int) -> tuple[int, ...]:
  if key not in source:
    raise CheckpointError(f"{source.description}: cannot infer the CLIP architecture: "
                          f"key {key!r} not found")
  shape = source.shape(key)
  if len(shape) != ndim:
    raise CheckpointError(f"{source.where(key)}: {key!r} has shape {shape}, expected {ndim} dims")
  return shape


def _heads(width: int, tower: str, source: TensorSource) -> int:
  if width % OPENAI_HEAD_WIDTH:
    raise CheckpointError(f"{source.description}: {tower} width {width} is not a multiple of "
                          f"{OPENAI_HEAD_WIDTH}, so OpenAI's heads = width // 64 does not apply")
  return width // OPENAI_HEAD_WIDTH


def infer_config(source: TensorSource, activation: str = "quick_gelu") -> ClipConfig:
  """The architecture of an OpenAI-layout state dict, from its tensor shapes."""
  check_supported(source)
  if activation not in ACTIVATIONS:
    raise CheckpointError(f"activation={activation!r}; allowed: {ACTIVATIONS}")
  keys = source.keys()
  v_width, channels, patch, patch_w = _shape(source, "visual.conv1.weight", 4)
  if channels != 3 or patch != patch_w:
    raise CheckpointError(f"{source.description}: 'visual.conv1.weight' has shape "
                          f"{(v_width, channels, patch, patch_w)}; expected [W, 3, p, p]")
  positions = _shape(source, "visual.positional_embedding", 2)[0]
  grid = math.isqrt(max(positions - 1, 0))
  if grid * grid + 1 != positions:
    raise CheckpointError(f"{source.description}: 'visual.positional_embedding' has {positions} "
                          "rows; expected grid*grid + 1 (a square ViT with a class token)")
  vocab, t_width = _shape(source, "token_embedding.weight", 2)
  context = _shape(source, "positional_embedding", 2)[0]
  embed = _shape(source, "text_projection", 2)[1]
  v_layers = count_layers(keys, "visual.transformer.resblocks.")
  t_layers = count_layers(keys, "transformer.resblocks.")
  if not v_layers or not t_layers:
    raise CheckpointError(f"{source.description}: no transformer blocks found "
                          "('visual.transformer.resblocks.*' / 'transformer.resblocks.*')")
  try:
    return ClipConfig(
        embed_dim=embed,
        vision=VisionConfig(image_size=grid * patch, patch_size=patch, width=v_width,
                            layers=v_layers, heads=_heads(v_width, "vision", source)),
        text=TextConfig(width=t_width, layers=t_layers, heads=_heads(t_width, "text", source),
                        context_length=context, vocab_size=vocab),
        activation=activation)
  except ValueError as e:
    if isinstance(e, CheckpointError):
      raise
    raise CheckpointError(f"{source.description}: inferred an invalid architecture: {e}") from e


def source_format(path: pathlib.Path) -> str:
  if path.suffix == ".safetensors":
    return "state-dict-safetensors"
  return "openai-torchscript" if sources.is_torchscript_archive(path) else "state-dict-torch"


def load(path: PathLike, activation: str = "quick_gelu") -> LoadedCheckpoint:
  """An OpenAI / open_clip ViT checkpoint file -> (architecture, float32 params, provenance)."""
  path = pathlib.Path(path)
  source = sources.open_state_dict(path)
  cfg = infer_config(source, activation)
  params = assemble(source, naming.openai_rules(cfg), cfg, naming.OPENAI_NON_PARAMETERS)
  dtypes = sorted({source.dtype(k) for k in source.keys() if k not in naming.OPENAI_NON_PARAMETERS})
  return LoadedCheckpoint(cfg, params, {"format": source_format(path), "path": str(path.resolve()),
                                        "dtypes": dtypes})
