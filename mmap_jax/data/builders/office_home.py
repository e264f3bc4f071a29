"""Office-Home (Venkateswara et al., 2017): 4 domains x 65 classes.

Manual dir = the unpacked official download, `<root>/{Art,Clipart,Product,
Real World}/<class>/*.jpg`. One TFDS config per domain ('office_home/art',
'office_home/real_world'); the official release has no train/test split, so
each class is split by seed (default 80/20) unless split lists are given.
"""

from __future__ import annotations

from mmap_jax.data.builders import common

NAME = "office_home"
DOMAINS = ("Art", "Clipart", "Product", "Real World")


class Builder(common.DomainBuilder, skip_registration=True):
  """Office-Home, one config per domain."""

  name = NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Unpack OfficeHomeDataset_10072016.zip and pass the folder holding "
      "Art/ Clipart/ Product/ 'Real World'/ as root.")


DATASET = common.FolderDataset(NAME, Builder, DOMAINS)
