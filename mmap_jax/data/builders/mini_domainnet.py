"""miniDomainNet (Zhou et al., DAEL): 4 DomainNet domains x 126 classes.

Manual dir = the DomainNet image root (`<root>/<domain>/<class>/<file>.jpg`)
plus the miniDomainNet lists `{clipart,painting,real,sketch}_{train,test}.txt`
(lines `<domain>/<class>/<file>.jpg <label>`), looked for in `split_files`,
else `<root>/splits_mini`, else `<root>`. Class names and label order come
from the lists, never from a table in code.
"""

from __future__ import annotations

from mmap_jax.data.builders import common

NAME = "mini_domainnet"
DOMAINS = ("clipart", "painting", "real", "sketch")
LIST_DIRS = ("splits_mini", ".")


class Builder(common.DomainBuilder, skip_registration=True):
  """miniDomainNet, one config per domain."""

  name = NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Pass the DomainNet root (clipart/ painting/ real/ sketch/) holding the "
      "miniDomainNet lists in splits_mini/ (or give split_files).")


DATASET = common.ListDataset(NAME, Builder, DOMAINS, LIST_DIRS, missing_dir=LIST_DIRS[0])
