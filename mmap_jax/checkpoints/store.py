"""The project's own CLIP checkpoint: what training, evaluation and prediction read.

A directory with
  clip.json          {"format": "mmap-jax-clip", "format_version": 1,
                      "config": ClipConfig.to_dict(), "source": where it was converted from,
                      "param_count": n}
  model.safetensors  float32 params keyed by '/'-joined pytree paths ('visual/conv1/kernel', ...)
  the tokenizer      ClipTokenizer.save (bpe_simple_vocab_16e6.txt.gz)
Reading needs numpy + safetensors only (no torch). Writing goes to a temporary sibling directory
that is renamed into place, so a reader never sees half a checkpoint.
"""
from __future__ import annotations

import json
import os
import pathlib
import shutil
import tempfile
from typing import Any, Mapping, Optional

import numpy as np
from safetensors.numpy import save_file

from mmap_jax.checkpoints import naming
from mmap_jax.checkpoints.assemble import validate_params
from mmap_jax.checkpoints.errors import CheckpointError
from mmap_jax.checkpoints.sources import PathLike, SafetensorsSource
from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig
from mmap_jax.tokenizer import ClipTokenizer

FORMAT = "mmap-jax-clip"
FORMAT_VERSION = 1
META_FILE = "clip.json"
WEIGHTS_FILE = "model.safetensors"

Params = dict[str, Any]


def is_store(path: PathLike) -> bool:
  return (pathlib.Path(path) / META_FILE).is_file()


def _check_tokenizer(tokenizer: ClipTokenizer, cfg: ClipConfig, what: str) -> None:
  if tokenizer.vocab_size > cfg.text.vocab_size:
    raise CheckpointError(f"{what}: the tokenizer has {tokenizer.vocab_size} tokens but the text "
                          f"tower embeds only {cfg.text.vocab_size}")


def save(directory: PathLike, cfg: ClipConfig, params: Params, tokenizer: ClipTokenizer,
         source: Optional[Mapping[str, Any]] = None, overwrite: bool = False) -> pathlib.Path:
  """Writes the checkpoint atomically; `params` must match `clip.param_shapes(cfg)` exactly."""
  directory = pathlib.Path(directory)
  if directory.exists() and not overwrite:
    raise CheckpointError(f"{directory} already exists (pass overwrite=True to replace it)")
  flat = {k: np.asarray(v, np.float32, order="C")
          for k, v in naming.flatten(params).items()}
  validate_params(naming.unflatten(flat), cfg, f"params to save in {directory}")
  _check_tokenizer(tokenizer, cfg, f"checkpoint for {directory}")
  meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config": cfg.to_dict(),
          "source": dict(source or {}), "param_count": clip.count_params(params)}
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.tmp-"))
  try:
    os.chmod(tmp, 0o755)
    save_file(flat, str(tmp / WEIGHTS_FILE), metadata={"format": FORMAT,
                                                       "format_version": str(FORMAT_VERSION)})
    tokenizer.save(tmp)
    (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n",
                                 encoding="utf-8")
    for f in tmp.iterdir():         # temp-file writers create 0600; checkpoints are shared
      os.chmod(f, 0o644)
    if directory.exists():          # overwrite: move the old one aside, then swap
      old = pathlib.Path(tempfile.mkdtemp(dir=directory.parent, prefix=f".{directory.name}.old-"))
      os.replace(directory, old / "ckpt")
      os.replace(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.replace(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return directory


def read_meta(directory: PathLike) -> dict[str, Any]:
  """clip.json, checked for format and version."""
  directory = pathlib.Path(directory)
  if not directory.is_dir():
    raise CheckpointError(f"CLIP checkpoint directory not found: {directory}")
  path = directory / META_FILE
  if not path.is_file():
    raise CheckpointError(f"{directory} is not a converted CLIP checkpoint: {path} not found "
                          "(convert one with `python -m launch.convert`)")
  try:
    meta = json.loads(path.read_text(encoding="utf-8"))
  except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
    raise CheckpointError(f"{path}: cannot read JSON: {e}") from e
  if not isinstance(meta, dict) or meta.get("format") != FORMAT:
    raise CheckpointError(f"{path}: not a {FORMAT} file (format={meta.get('format')!r})"
                          if isinstance(meta, dict) else f"{path}: expected a JSON object")
  if meta.get("format_version") != FORMAT_VERSION:
    raise CheckpointError(f"{path}: format_version {meta.get('format_version')!r} is not "
                          f"supported (this code reads version {FORMAT_VERSION})")
  if "config" not in meta:
    raise CheckpointError(f"{path}: missing field 'config'")
  return meta


def load_config(directory: PathLike) -> ClipConfig:
  """Just the architecture (cheap: no weights read)."""
  meta = read_meta(directory)
  try:
    return ClipConfig.from_dict(meta["config"])
  except ValueError as e:
    raise CheckpointError(f"{pathlib.Path(directory) / META_FILE}: field 'config': {e}") from e


def load_params(directory: PathLike, cfg: ClipConfig) -> Params:
  """float32 numpy params, checked leaf for leaf against `cfg` (place/shard them as needed)."""
  path = pathlib.Path(directory) / WEIGHTS_FILE
  source = SafetensorsSource([path])
  flat = {k: source.get(k) for k in source.keys()}
  params = naming.unflatten(flat)
  validate_params(params, cfg, str(path))
  return params


def load(directory: PathLike) -> tuple[ClipConfig, Params, ClipTokenizer]:
  """(architecture, float32 numpy params, tokenizer) of a converted checkpoint."""
  directory = pathlib.Path(directory)
  cfg = load_config(directory)
  params = load_params(directory, cfg)
  try:
    tokenizer = ClipTokenizer.from_dir(directory)
  except (OSError, ValueError) as e:
    raise CheckpointError(f"{directory}: cannot load the tokenizer: {e}") from e
  _check_tokenizer(tokenizer, cfg, str(directory))
  return cfg, params, tokenizer
