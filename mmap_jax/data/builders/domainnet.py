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

import os
from typing import Sequence

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


def split_dir(root: str, options: common.BuildOptions) -> str:
  """Where the lists are: split_files, else the first of LIST_DIRS that has them."""
  if options.split_files:
    return options.split_files
  for d in LIST_DIRS:
    path = os.path.normpath(os.path.join(root, d))
    if any(os.path.isfile(os.path.join(path, f"{d}_train.txt")) for d in DOMAINS):
      return path
  return os.path.normpath(root)  # find_split_file reports what is missing.


def domains(root: str | None, requested: Sequence[str] | None,
            options: common.BuildOptions) -> list[str]:
  del root, options
  return common.resolve_domains(requested, DOMAINS, NAME)


def config_name(domain: str, root: str | None, options: common.BuildOptions) -> str:
  del root
  return common.list_config_name(domain, options)


def plan(root: str, domains: Sequence[str], options: common.BuildOptions,
         config_names: dict[str, str]) -> list[common.DomainPlan]:
  common.check_root(root, NAME, domains)
  # A val list is honoured only in user split_files (their digest names the prepared data).
  return common.plan_list_domains(NAME, root, domains, split_dir(root, options), config_names,
                                  with_val=bool(options.split_files))


def resolve_root(root: str | None, data_dir: str, options: common.BuildOptions) -> str | None:
  del data_dir, options
  return root
