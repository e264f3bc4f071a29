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
  world=2      the 24-class world of issue 25 (mmap_jax/demo/world_v2.py) and its CLIP
               ("demo_v2": 64 image tokens, 6 layers per tower); default 1, today's asset

World 2 is pretrained in pieces: the same command resumes from the latest checkpoint of its
workdir (every 250 steps, and at SIGTERM), so `timeout 3600 python -m launch.pretrain
--config=configs/demo_pretrain.py:world=2 --workdir=W --out=OUT` rerun until it exits 0 gives
the same weights as one uninterrupted run.
"""
from __future__ import annotations

import ml_collections as mlc

from configs.common import parse_arg
from mmap_jax.demo import pretrain


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  a = parse_arg(arg, runlocal=False, steps=0, seed=0, world=1)
  c = pretrain.default_config()
  c.seed = a.seed
  c.data.world = a.world
  if a.world == 2:
    c.clip.variant = "demo_v2"
    c.data.batch_size = 256
    c.optim.lr = 1e-3
    c.optim.warmup_steps = 200
    # 155.5 GFLOP per step (XLA cost analysis; world 1's step: 12.2 GFLOP at batch 128), so
    # 3000 steps fit 2 h on 2 idle cores at >= 65 GFLOP/s; not yet timed on idle cores.
    c.train.steps = 3000
    c.train.eval_every = 500
    c.train.ckpt_every = 250
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
