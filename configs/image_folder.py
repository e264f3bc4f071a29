r"""Your own domains: <root>/<domain>/<class>/*.jpg, one task per domain.

  python -m launch.train --config=configs/image_folder.py:root=/data/my_domains,clip=/ckpt/vit_b16,runlocal \
      --workdir=/tmp/mine

Domains with different class lists need --config.data.allow_per_task_classes=True.
Recipe as configs/common.py.
"""
import ml_collections as mlc

from configs import common


def get_config(arg: str | None = None) -> mlc.ConfigDict:
  c, a = common.dataset_config("image_folder", arg)
  return common.finish(c, a)
