"""The embedded default dataset: a procedurally drawn multi-domain world.

Nothing is downloaded: on first use `demo_world.generate_tree` draws
`<data_dir>/downloads/manual/demo_domains/seed<S>-n<N>-px<P>/<domain>/<class>/
<i>.png` (deterministic in the seed; written atomically), which is then built
like any image folder (seeded 80/20 split per class). With the defaults (4
domains x 10 classes x 40 images of 64 px) it builds in seconds. Config names
carry the generator parameters ('demo_domains/photo-seed0-n40-px64'). `demo_world=2` draws the
24-class world of `mmap_jax.demo.world_v2` instead ('photo-w2-seed0-n160-px64'); the builder
reaches it through `world.generate_world_tree`.

It lives in the demo package and registers itself (`builders.register`) when `mmap_jax.demo` is
imported (configs/common.py does), so the core's data code never imports the demo.
"""

from __future__ import annotations

import os

from mmap_jax.data import builders
from mmap_jax.data.builders import common
from mmap_jax.demo import world as demo_world

NAME = "demo_domains"


class Builder(common.DomainBuilder, skip_registration=True):
  """The generated demo world, one config per domain."""

  name = NAME
  MANUAL_DOWNLOAD_INSTRUCTIONS = "Generated on first use by mmap_jax.demo.world."


def _tag(options: common.BuildOptions) -> str:
  """'-seed0-n100-px64' (world 1, as before) or '-w2-seed0-n160-px64'."""
  world = f"-w{options.demo_world}" if options.demo_world != 1 else ""
  return (f"{world}-seed{options.demo_seed}-n{options.demo_images_per_class}"
          f"-px{options.demo_image_size}")


class _DemoDomains(common.FolderDataset):
  """An image folder the demo world generates on first use; config names carry its parameters."""

  def config_name(self, domain: str, root: str | None, options: common.BuildOptions) -> str:
    del root
    return common.folder_config_name(domain, options, tag=_tag(options))

  def resolve_root(self, root: str | None, data_dir: str, options: common.BuildOptions) -> str:
    """Generates the tree (all domains, so any subset can be built later)."""
    if root is None:
      root = os.path.join(data_dir, "downloads", "manual", NAME, _tag(options).lstrip("-"))
    demo_world.generate_world_tree(options.demo_world, root, seed=options.demo_seed,
                                   images_per_class=options.demo_images_per_class,
                                   size=options.demo_image_size)
    return root


DATASET = builders.register(_DemoDomains(NAME, Builder, demo_world.DOMAINS))
