"""Files shipped inside the package (found with importlib.resources, so they work after
`pip install .` as well as from a clone): the demo's pretrained CLIP and OpenAI's CLIP BPE merges.
"""
from __future__ import annotations

import importlib.resources
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
                            f"with `{REBUILD_DEMO_CLIP}` (about 10 minutes on 2 CPU cores)")
  return path


def clip_bpe_path() -> pathlib.Path:
  """OpenAI CLIP's BPE merge list (MIT licence, as distributed with OpenAI CLIP; sha256 BPE_SHA256).

  What `launch.pretrain` builds the demo CLIP's tokenizer from and the benchmark tokenizes with;
  real checkpoints carry their own vocabulary (launch.convert copies it).
  """
  return _asset("clip_bpe", "bpe_simple_vocab_16e6.txt.gz")
