"""Pretrained CLIP checkpoints: convert what users have once, then read the project's own format.

  load_pretrained(src)          HF directory or OpenAI/open_clip file -> LoadedCheckpoint
  store.save / store.load       the converted form (clip.json + model.safetensors + tokenizer)
Loaders return float32 numpy params laid out as `clip.init_params`; errors are `CheckpointError`.
"""
from __future__ import annotations

import pathlib

from mmap_jax.checkpoints.errors import CheckpointError
from mmap_jax.checkpoints.assemble import LoadedCheckpoint, describe
from mmap_jax.checkpoints import from_huggingface, from_openai, store
from mmap_jax.checkpoints.sources import PathLike

__all__ = ["CheckpointError", "LoadedCheckpoint", "describe", "from_huggingface", "from_openai",
           "load_pretrained", "store"]


def load_pretrained(src: PathLike, activation: str = "quick_gelu") -> LoadedCheckpoint:
  """Any supported pretrained CLIP: a Hugging Face directory, or an OpenAI / open_clip file.

  `activation` applies to OpenAI-layout files only (they do not record it); a Hugging Face
  config.json states its own.
  """
  src = pathlib.Path(src)
  if src.is_dir():
    if store.is_store(src):
      raise CheckpointError(f"{src} is already a converted checkpoint; read it with store.load")
    if not from_huggingface.is_hf_dir(src):
      raise CheckpointError(f"{src}: a directory, but no {from_huggingface.CONFIG_FILE} "
                            "(expected a Hugging Face CLIP directory)")
    return from_huggingface.load(src)
  if not src.exists():
    raise CheckpointError(f"checkpoint not found: {src}")
  return from_openai.load(src, activation=activation)
