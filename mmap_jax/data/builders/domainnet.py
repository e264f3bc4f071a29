"""DomainNet (Peng et al., 2019): 6 domains x 345 classes, official splits.

Manual dir = the unpacked official download, `<root>/<domain>/<class>/*.jpg`
for clipart infograph painting quickdraw real sketch, with the official lists
`<domain>_train.txt` / `<domain>_test.txt` (lines `<domain>/<class>/<file>.jpg
<label>`) in `split_files`, else `<root>/splits`, else `<root>`. Classes and
labels come from the lists.

The TFDS builder is named `mmap_domainnet`, not `domainnet`: TFDS ships its
own `domainnet` builder with the same config names and version, so prepared
data of both would otherwise share `<data_dir>/domainnet/<domain>/1.0.0`.
"""

from __future__ import annotations

from mmap_jax.data.builders import common

NAME = "domainnet"
DOMAINS = ("clipart", "infograph", "painting", "quickdraw", "real", "sketch")
LIST_DIRS = ("splits", ".")


class Builder(common.DomainBuilder, skip_registration=True):
  """Full DomainNet, one config per domain."""

  name = "mmap_domainnet"
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Unzip the six DomainNet domains into root and put the official "
      "<domain>_train.txt / <domain>_test.txt lists in root (or give split_files).")


DATASET = common.ListDataset(NAME, Builder, DOMAINS, LIST_DIRS, missing_dir=".")
