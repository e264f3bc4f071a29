r"""MiniDomainNet: 4 domains (clipart, painting, real, sketch) x 126 classes (the official lists).

  python -m launch.train --config=configs/mini_domainnet.py:clip=/ckpt/vit_b16,root=/data/domainnet \
      --workdir=/tmp/mdn_mmap

`root` holds the DomainNet domain folders and the miniDomainNet split lists
({domain}_{train,test}.txt, e.g. in root/splits_mini). Recipe as configs/common.py.
"""
import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c, a = common.dataset_config("mini_domainnet", arg)
  c.train.steps = 4000  # ~18.7k train images per domain at 8 per task per step: ~2 epochs
  return common.finish(c, a)
