"""Files shipped inside the package (found with importlib.resources, so they work after
`pip install .` as well as from a clone): the demo's pretrained CLIP, OpenAI's CLIP BPE merges,
and the experiment configs (`configs/`, shipped beside `mmap_jax`).
"""
from __future__ import annotations

import importlib.resources
import os
import pathlib

BPE_SHA256 = "924691ac288e54409236115652ad4aa250f48203de50a9e4722a6ecd48d6804a"


def _asset(*parts: str) -> pathlib.Path:
  # Regular (non-zip) installs and clones both give a real directory; the demo CLIP loader and
  # the tokenizer read files by path.
  return pathlib.Path(str(importlib.resources.files("mmap_jax").joinpath("assets", *parts)))


REBUILD_DEMO_CLIP = ("python -m launch.pretrain --config=configs/demo_pretrain.py "
                     "--workdir=/tmp/demo_pretrain --out=mmap_jax/assets/demo_clip")


def demo_clip_dir(check: bool = False) -> pathlib.Path:
  """The committed demo CLIP (project format: clip.json + model.safetensors + its BPE file).

  `check`: fail, with the command that rebuilds it, when the directory holds no CLIP (a clone
  whose assets were deleted). The core never pretrains on its own: that is `mmap_jax.demo`'s job.
  """
  path = _asset("demo_clip")
  if check and not (path / "clip.json").is_file():
    raise FileNotFoundError(f"the demo CLIP is missing from {path} (no clip.json); rebuild it "
                            f"with `{REBUILD_DEMO_CLIP}` (about 2 hours on 2 CPU cores)")
  return path


def clip_bpe_path() -> pathlib.Path:
  """OpenAI CLIP's BPE merge list (MIT licence, as distributed with OpenAI CLIP; sha256 BPE_SHA256).

  What `launch.pretrain` builds the demo CLIP's tokenizer from and the benchmark tokenizes with;
  real checkpoints carry their own vocabulary (launch.convert copies it).
  """
  return _asset("clip_bpe", "bpe_simple_vocab_16e6.txt.gz")


def configs_dir() -> pathlib.Path:
  """The `configs` package's directory: the clone's, or the installed copy."""
  return pathlib.Path(str(importlib.resources.files("configs")))


def resolve_config_path(value: str) -> str:
  """'configs/demo.py:runlocal' -> '<installed configs>/demo.py:runlocal' when only that exists.

  How every config path is resolved (the launchers' --config, launch.sweep, the notebook), so
  an installed package runs from any directory: a path that exists relative to the working
  directory is kept (a clone's own, possibly edited, configs win); `configs/<file>` that does
  not exist there but is a file of the installed configs becomes that file's absolute path;
  anything else is returned unchanged, for the caller to report as missing.
  """
  path, sep, arg = value.partition(":")
  if not path or os.path.exists(path):
    return value
  parts = pathlib.PurePath(path).parts
  if len(parts) != 2 or parts[0] != "configs":
    return value
  candidate = configs_dir() / parts[1]
  return f"{candidate}{sep}{arg}" if candidate.is_file() else value
