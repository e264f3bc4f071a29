"""CLIP architecture descriptions: frozen dataclasses, JSON round-trip, and the standard variants.

The architecture is data (read outside jit), so every shape the encoders need is static.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

ACTIVATIONS = ("quick_gelu", "gelu")


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  """The ViT image tower."""
  image_size: int
  patch_size: int
  width: int
  layers: int
  heads: int

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_positions(self) -> int:
    return self.grid * self.grid + 1


@dataclasses.dataclass(frozen=True)
class TextConfig:
  """The causal text transformer."""
  width: int
  layers: int
  heads: int
  context_length: int = 77
  vocab_size: int = 49408


@dataclasses.dataclass(frozen=True)
class ClipConfig:
  """A whole CLIP: two towers projected into a shared `embed_dim` space."""
  embed_dim: int
  vision: VisionConfig
  text: TextConfig
  activation: str = "quick_gelu"  # OpenAI's models; some open_clip models use "gelu".

  def __post_init__(self):
    errors = []
    for tower, c in (("vision", self.vision), ("text", self.text)):
      if c.width % c.heads:
        errors.append(f"{tower}.width={c.width} is not divisible by {tower}.heads={c.heads}")
      if min(c.width, c.layers, c.heads) <= 0:
        errors.append(f"{tower} width/layers/heads must be positive, got {c}")
    if self.vision.image_size % self.vision.patch_size:
      errors.append(f"vision.image_size={self.vision.image_size} is not a multiple of "
                    f"vision.patch_size={self.vision.patch_size}")
    if self.activation not in ACTIVATIONS:
      errors.append(f"activation={self.activation!r}; allowed: {ACTIVATIONS}")
    if errors:
      raise ValueError("invalid ClipConfig: " + "; ".join(errors))

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "ClipConfig":
    try:
      return cls(embed_dim=int(d["embed_dim"]), vision=VisionConfig(**d["vision"]),
                 text=TextConfig(**d["text"]), activation=d.get("activation", "quick_gelu"))
    except (KeyError, TypeError) as e:
      raise ValueError(f"malformed CLIP architecture description {dict(d)!r}: {e}") from e


def _openai(embed, image, patch, v_width, v_layers, t_width, t_layers=12) -> ClipConfig:
  # OpenAI uses 64-wide heads in both towers.
  return ClipConfig(
      embed_dim=embed,
      vision=VisionConfig(image_size=image, patch_size=patch, width=v_width, layers=v_layers,
                          heads=v_width // 64),
      text=TextConfig(width=t_width, layers=t_layers, heads=t_width // 64))


VARIANTS: dict[str, ClipConfig] = {
    "ViT-B/32": _openai(512, 224, 32, 768, 12, 512),
    "ViT-B/16": _openai(512, 224, 16, 768, 12, 512),
    "ViT-L/14": _openai(768, 224, 14, 1024, 24, 768),
    "ViT-L/14@336": _openai(768, 336, 14, 1024, 24, 768),
    # Tiny shapes for tests and the CPU demo; the real tokenizer vocabulary still fits.
    "tiny": ClipConfig(embed_dim=32,
                       vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=4),
                       text=TextConfig(width=48, layers=3, heads=4)),
    # The small CLIP the demo pretrains itself (mmap_jax/demo/pretrain.py) on 64 px demo-world images.
    "demo": ClipConfig(embed_dim=64,
                       vision=VisionConfig(image_size=64, patch_size=16, width=128, layers=4, heads=4),
                       text=TextConfig(width=64, layers=3, heads=2)),
    # World 2's CLIP (issue 25): 64 px in 8 px patches = 64 image tokens, 6 layers per tower.
    "demo_v2": ClipConfig(embed_dim=128,
                          vision=VisionConfig(image_size=64, patch_size=8, width=128, layers=6,
                                              heads=4),
                          text=TextConfig(width=128, layers=6, heads=4)),
}


def get_variant(name: str) -> ClipConfig:
  if name not in VARIANTS:
    raise ValueError(f"unknown CLIP variant {name!r}; known: {sorted(VARIANTS)}")
  return VARIANTS[name]
