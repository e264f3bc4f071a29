"""miniDomainNet (Zhou et al., DAEL): 4 DomainNet domains x 126 classes.

Manual dir = the DomainNet image root (`<root>/<domain>/<class>/<file>.jpg`)
plus the miniDomainNet lists `{clipart,painting,real,sketch}_{train,test}.txt`
(lines `<domain>/<class>/<file>.jpg <label>`), looked for in `split_files`,
else `<root>/splits_mini`, else `<root>`. Class names and label order come
from the lists, never from a table in code.
"""

from __future__ import annotations

import os
from typing import Sequence

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


def split_dir(root: str, options: common.BuildOptions) -> str:
  """Where the lists are: split_files, else the first of LIST_DIRS that has them."""
  if options.split_files:
    return options.split_files
  for d in LIST_DIRS:
    path = os.path.normpath(os.path.join(root, d))
    if any(os.path.isfile(os.path.join(path, f"{d}_train.txt")) for d in DOMAINS):
      return path
  return os.path.join(root, LIST_DIRS[0])  # find_split_file reports what is missing.


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
