"""Office-Home (Venkateswara et al., 2017): 4 domains x 65 classes.

Manual dir = the unpacked official download, `<root>/{Art,Clipart,Product,
Real World}/<class>/*.jpg`. One TFDS config per domain ('office_home/art',
'office_home/real_world'); the official release has no train/test split, so
each class is split by seed (default 80/20) unless split lists are given.
"""

from __future__ import annotations

from typing import Sequence

from mmap_jax.data.builders import common

NAME = "office_home"
DOMAINS = ("Art", "Clipart", "Product", "Real World")


class Builder(common.DomainBuilder, skip_registration=True):
  """Office-Home, one config per domain."""

  name = NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = (
      "Unpack OfficeHomeDataset_10072016.zip and pass the folder holding "
      "Art/ Clipart/ Product/ 'Real World'/ as root.")


def domains(root: str | None, requested: Sequence[str] | None,
            options: common.BuildOptions) -> list[str]:
  del root, options
  return common.resolve_domains(requested, DOMAINS, NAME)


def config_name(domain: str, root: str | None, options: common.BuildOptions) -> str:
  del root
  return common.folder_config_name(domain, options)


def plan(root: str, domains: Sequence[str], options: common.BuildOptions,
         config_names: dict[str, str]) -> list[common.DomainPlan]:
  return common.plan_folder_domains(NAME, root, domains, options, config_names)


def resolve_root(root: str | None, data_dir: str, options: common.BuildOptions) -> str | None:
  del data_dir, options
  return root
