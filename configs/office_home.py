r"""Office-Home: 4 domains (Art, Clipart, Product, Real World) x 65 classes, one task per domain.

  python -m launch.train --config=configs/office_home.py:clip=/ckpt/vit_b16,root=/data/OfficeHomeDataset_10072016 \
      --workdir=/tmp/oh_mmap
  ...:method=maple_mt | coop_st | zeroshot | ...   any method of mmap_jax/prompts/spec.py

Defaults follow the MaPLe/MmAP recipe for ViT-B/16 (configs/common.py): SGD momentum 0.9,
lr 0.0035, cosine schedule with linear warm-up, 224 px, 8 images per task per step; 2000 steps
are ~5 epochs of the 80% train split. The split is a seeded 80/20 one unless `split_files=DIR`.
"""
import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c, a = common.dataset_config("office_home", arg)
  return common.finish(c, a)
