"""Any `<root>/<domain>/<class>/*` tree: bring your own domains with one flag.

Domains are the sub-folders of root (all of them unless `domains` is given),
classes the sub-folders of each domain, labels their sorted order (as in
torchvision's ImageFolder). Config names carry a digest of the root's absolute
path ('image_folder/sketch-r1a2b3c4d'), so two different trees never share
prepared data in one data_dir.
"""

from __future__ import annotations

import hashlib
import os
from typing import Sequence

from mmap_jax.data.builders import common

NAME = "image_folder"


class Builder(common.DomainBuilder, skip_registration=True):
  """A user's domain tree, one config per domain."""

  name = NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Pass the folder holding <domain>/<class>/<images> as root."


def _root_tag(root: str) -> str:
  digest = hashlib.sha1(os.path.realpath(root).encode()).hexdigest()[:8]
  return f"-r{digest}"


class _ImageFolder(common.FolderDataset):
  """Domains are root's sub-folders; config names carry a digest of the root."""

  def domains(self, root: str | None, requested: Sequence[str] | None,
              options: common.BuildOptions) -> list[str]:
    del options
    root = common.check_root(root, NAME, list(requested or ["<domain>", "..."]))
    found = common.list_dirs(root)
    if not found:
      raise common.DataLayoutError(
          f"{NAME}: root {root!r} has no domain folders; expected <root>/<domain>/<class>/<images>")
    return common.resolve_domains(requested, found, NAME,
                                  available_label=f"domain folders found in {root!r}:")

  def config_name(self, domain: str, root: str | None, options: common.BuildOptions) -> str:
    return common.folder_config_name(domain, options, tag=_root_tag(root))


DATASET = _ImageFolder(NAME, Builder)
