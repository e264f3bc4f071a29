r"""Pretraining of the demo's own small CLIP (mmap_jax/pretrain.py) on the demo world's pairs.

  python -m launch.pretrain --config=configs/demo_pretrain.py --workdir=/tmp/demo_pretrain \
      --out=assets/demo_clip --vocab=../shared/clip_bpe/bpe_simple_vocab_16e6.txt.gz

regenerates the committed assets/demo_clip (TIME_PLACEHOLDER). Arguments after the colon:
  runlocal     a seconds-long smoke run (tiny model, few steps, small batch)
  steps=N      override train.steps
  seed=N       override the seed
"""
from __future__ import annotations

import ml_collections as mlc

from configs.common import parse_arg
from mmap_jax import pretrain


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  a = parse_arg(arg, runlocal=False, steps=0, seed=0)
  c = pretrain.default_config()
  c.seed = a.seed
  if a.runlocal:
    c.clip.variant = "tiny"
    c.data.batch_size = 16      # a multiple of the 8 fake test devices
    c.data.text_length = 32
    c.train.steps = 4
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.optim.warmup_steps = 1
    c.eval.per_class = 2
    c.eval.batch_size = 32
  if a.steps:
    c.train.steps = a.steps
  return c
