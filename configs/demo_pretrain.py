r"""Pretraining of the demo's own small CLIP (mmap_jax/demo/pretrain.py) on the demo world's pairs.

  python -m launch.pretrain --config=configs/demo_pretrain.py --workdir=/tmp/demo_pretrain \
      --out=mmap_jax/assets/demo_clip

regenerates the committed mmap_jax/assets/demo_clip (run from the repository root; the BPE merges
are the packaged mmap_jax/assets/clip_bpe file).
Measured twice on 2 CPU cores shared with other jobs: 8 min 06 s and 10 min 34 s wall (1200
steps at 0.24 s/step while the machine was otherwise idle, 0.40 and 0.52 s/step on average with
the other jobs), bit-identical weights both times. Final loss 1.60 (1.49 averaged over the last
50 steps); zero-shot "a photo of a {object}." on 300 demo images per domain: photo 0.473,
clipart 0.257, sketch 0.207, painting 0.490 (average 0.357, chance 0.100).
mmap_jax/assets/demo_clip/pretrain_report.json has the rest.
Arguments after the colon:
  runlocal     a seconds-long smoke run (tiny model, few steps, small batch)
  steps=N      override train.steps
  seed=N       override the seed
"""
from __future__ import annotations

import ml_collections as mlc

from configs.common import parse_arg
from mmap_jax.demo import pretrain


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  a = parse_arg(arg, runlocal=False, steps=0, seed=0)
  c = pretrain.default_config()
  c.seed = a.seed
  if a.runlocal:
    c.clip.variant = "tiny"
    c.clip.layers = 1           # one block per tower: compiles in seconds
    c.data.batch_size = 16      # a multiple of the 8 fake test devices
    c.train.steps = 4
    c.train.log_every = 1
    c.train.ckpt_every = 2
    c.optim.warmup_steps = 1
    c.eval.per_class = 2
    c.eval.batch_size = 32
  if a.steps:
    c.train.steps = a.steps
  return c
