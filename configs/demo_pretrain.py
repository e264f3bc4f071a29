r"""Pretraining of the demo's own small CLIP (mmap_jax/demo/pretrain.py) on demo world 2's pairs.

  python -m launch.pretrain --config=configs/demo_pretrain.py --workdir=/tmp/demo_pretrain \
      --out=mmap_jax/assets/demo_clip

regenerates the committed mmap_jax/assets/demo_clip (run from the repository root; the BPE merges
are the packaged mmap_jax/assets/clip_bpe file): the "demo_v2" CLIP (64 px in 8 px patches, 6
layers per tower, 8.8 M parameters), 2000 steps at batch 256 of world 2's web-like pairs (every
downstream style family, other samples and rendering parameters; mmap_jax/demo/world_v2.py).
It is deterministic and resumable: the batches are a function of (seed, step) and the same command
resumes from the latest checkpoint of its workdir (every 250 steps, and at SIGTERM), so
`timeout 3600 <the command>` rerun until it exits 0 (143: stopped with a checkpoint) gives the
weights of one uninterrupted run. mmap_jax/assets/demo_clip/pretrain_report.json has the time,
the loss curve and the zero-shot curve; `python -m launch.diagnose --config=configs/demo.py` the
zero-shot and linear-probe accuracy on the demo's test splits.
Arguments after the colon:
  runlocal     a seconds-long smoke run (tiny model, few steps, small batch)
  steps=N      override train.steps
  seed=N       override the seed
  world=1      the previous 10-class world and its 4.2 M-parameter "demo" CLIP (1200 steps at
               batch 128, about 10 minutes; git history has that asset)
"""
from __future__ import annotations

import ml_collections as mlc

from configs.common import parse_arg
from mmap_jax.demo import pretrain


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  a = parse_arg(arg, runlocal=False, steps=0, seed=0, world=2)
  c = pretrain.default_config()
  c.seed = a.seed
  c.data.world = a.world
  if a.world == 1:   # the previous demo CLIP's recipe (12.2 GFLOP per step)
    c.clip.variant = "demo"
    c.data.batch_size = 128
    c.optim.lr = 2e-3
    c.optim.warmup_steps = 60
    c.train.steps = 1200
    c.train.eval_every = 400
    c.train.ckpt_every = 200
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
