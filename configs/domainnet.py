r"""DomainNet: 6 domains (clipart, infograph, painting, quickdraw, real, sketch) x 345 classes.

  python -m launch.train --config=configs/domainnet.py:clip=/ckpt/vit_b16,root=/data/domainnet \
      --workdir=/tmp/dn_mmap

Uses the official {domain}_{train,test}.txt lists. With 6 tasks the grouping search is exact
(203 partitions). Recipe as configs/common.py.
"""
import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c, a = common.dataset_config("domainnet", arg)
  c.groups.num_groups = 2
  c.train.steps = 8000
  return common.finish(c, a)
