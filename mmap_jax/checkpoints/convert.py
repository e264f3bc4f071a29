"""Convert a Hugging Face / OpenAI / open_clip CLIP checkpoint once into the project's format.

The library behind `launch.convert`, so that training hosts need no torch afterwards.
"""
from __future__ import annotations

import dataclasses
import pathlib
from typing import Any, Callable, Optional


from mmap_jax import checkpoints
from mmap_jax.checkpoints import CheckpointError, store
from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig
from mmap_jax.tokenizer import HF_MERGES_NAME, HF_VOCAB_NAME, ClipTokenizer




@dataclasses.dataclass
class Conversion:
  out: pathlib.Path
  cfg: ClipConfig
  param_count: int
  source: dict[str, Any]


def resolve_tokenizer(src: pathlib.Path, tokenizer: Optional[str],
                      log: Callable[[str], None] = print) -> ClipTokenizer:
  """The vocabulary for `src`: its own HF files if it has them, else `tokenizer`."""
  if src.is_dir() and (src / HF_VOCAB_NAME).is_file() and (src / HF_MERGES_NAME).is_file():
    if tokenizer:
      log(f"note: using {src}'s own {HF_VOCAB_NAME} + {HF_MERGES_NAME}; --tokenizer is ignored")
    return ClipTokenizer.from_hf_files(src / HF_VOCAB_NAME, src / HF_MERGES_NAME)
  if not tokenizer:
    what = ("a Hugging Face directory without vocab.json + merges.txt" if src.is_dir()
            else "an OpenAI / open_clip checkpoint file, which carries no vocabulary")
    raise CheckpointError(f"--src={src} is {what}; pass --tokenizer=<bpe_simple_vocab_16e6.txt.gz "
                          "or a directory holding it>")
  path = pathlib.Path(tokenizer)
  if path.is_dir():
    return ClipTokenizer.from_dir(path)
  return ClipTokenizer.from_bpe_file(path)


def convert(src: str | pathlib.Path, out: str | pathlib.Path, tokenizer: Optional[str] = None,
            activation: str = "quick_gelu", overwrite: bool = False,
            log: Callable[[str], None] = print) -> Conversion:
  """Reads `src`, checks it completely, writes `out` atomically; logs what it inferred."""
  src, out = pathlib.Path(src), pathlib.Path(out)
  if out.exists() and not overwrite:
    raise CheckpointError(f"--out={out} already exists (pass --overwrite to replace it)")
  tok = resolve_tokenizer(src, tokenizer, log)      # before the (slow) weights: fail fast
  loaded = checkpoints.load_pretrained(src, activation=activation)
  store.save(out, loaded.cfg, loaded.params, tok, source=loaded.source, overwrite=overwrite)
  count = clip.count_params(loaded.params)
  log(f"converted {src} ({loaded.source['format']}, stored as {'/'.join(loaded.source['dtypes'])})"
      f" -> {out}")
  log(f"architecture: {checkpoints.describe(loaded.cfg)}")
  log(f"parameters: {count:,} (image tower {clip.count_params(loaded.params['visual']):,}, "
      f"text tower {clip.count_params(loaded.params['text']):,})")
  log(f"tokenizer: {tok}")
  return Conversion(out, loaded.cfg, count, loaded.source)
