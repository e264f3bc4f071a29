"""Domain datasets as TFDS builders, one builder config per domain (= task).

`DATASETS` maps the names accepted by `mmap_jax.data.sources.build_tasks` to each
module's `DATASET`, a `common.FolderDataset` (or subclass) that provides:

  Builder                                   the TFDS builder class (unregistered)
  domains(root, requested, options)         -> domain folder names to build
  config_name(domain, root, options)        -> TFDS config name of one domain
  resolve_root(root, data_dir, options)     -> manual dir (demo: generates it)
  plan(root, domains, options, names)       -> [DomainPlan] (checks the layout)

The shared behaviour lives in `common.FolderDataset` (fixed domains, seeded or listed splits)
and `common.ListDataset` (classes and splits from official lists); a module overrides only what
its dataset does differently.

Datasets outside the core register themselves with `register(DATASET)` when their package is
imported: the demo's `demo_domains` (mmap_jax/demo/dataset.py, on `import mmap_jax.demo`), so
the core never imports the demo.
"""

from __future__ import annotations

from mmap_jax.data.builders import common
from mmap_jax.data.builders import domainnet
from mmap_jax.data.builders import image_folder
from mmap_jax.data.builders import mini_domainnet
from mmap_jax.data.builders import office_home

__all__ = ["DATASETS", "common", "get", "register"]

DATASETS: dict[str, common.FolderDataset] = {
    m.NAME: m.DATASET for m in (office_home, mini_domainnet, domainnet, image_folder)
}


def register(dataset: common.FolderDataset) -> common.FolderDataset:
  """Adds a dataset plug-in under `dataset.name`; returns it. Registering a name again from the
  same module replaces it (a reload); from another module it is an error."""
  old = DATASETS.get(dataset.name)
  if old is not None and old.Builder.__module__ != dataset.Builder.__module__:
    raise ValueError(f"dataset {dataset.name!r} is already registered by {old.Builder.__module__}")
  DATASETS[dataset.name] = dataset
  return dataset


def get(name: str) -> common.FolderDataset:
  try:
    return DATASETS[name]
  except KeyError:
    hint = " (import mmap_jax.demo to register it)" if name == "demo_domains" else ""
    raise ValueError(f"unknown dataset {name!r}{hint}; expected one of {sorted(DATASETS)}"
                     ) from None
