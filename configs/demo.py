r"""The embedded demo: 4 procedurally drawn domains of the demo world, and its own small CLIP.

  python -m launch.train --config=configs/demo.py --workdir=/tmp/mmap_demo
  python -m launch.train --config=configs/demo.py:method=coop_mt,runlocal --workdir=/tmp/x

The frozen CLIP is `assets/demo_clip` (pretrained contrastively on a different mixture of styles
of the same world by configs/demo_pretrain.py; rebuilt on first use if missing). No download.
"""
import ml_collections as mlc

from configs import common

# The demo CLIP's towers are 3 (text) and 4 (vision) layers deep, 64 and 128 wide: prompts span
# every text layer and MmAP's source prompts are 32 wide (32 divides both widths).
DEEP_FAMILIES = ("vpt", "maple", "ivlp", "mmap")


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c, a = common.dataset_config("demo_domains", arg, clip_default="demo")
  c.clip.vocab = mlc.FieldReference(None, field_type=str)  # only read to rebuild the demo CLIP
  c.data.demo_seed = 0
  c.data.demo_images_per_class = 40
  c.data.demo_image_size = 64
  family = a.method.split("_")[0]
  if family in DEEP_FAMILIES:
    c.prompt.depth = 3
  c.prompt.length = 4 if family in ("mmap", "vpt", "coop") else 2
  c.prompt.source_dim = 32
  c.groups.num_groups = 2
  c.groups.warmup_steps = 30
  c.input.batch_size = 16
  c.input.eval_batch_size = 64
  c.input.workers = 0
  c.optim.lr = 0.02
  c.optim.warmup_steps = 10
  c.train.steps = 150
  c.train.log_every = 10
  c.train.eval_every = 75
  c.train.ckpt_every = 50
  return common.finish(c, a)
