r"""Gradient-driven task grouping alone: warm up a shared MmAP, measure, partition, write files.

  python -m launch.group --config=configs/office_home.py:clip=/ckpt/vit_b16 --workdir=/tmp/oh

Writes affinity.npy, affinity.png (labelled heatmap) and groups.json into the workdir; a later
`launch.train` with the same workdir reuses them.
"""
from launch import distributed_flags, entry, shared_flags
from mmap_jax.train import loop

_CONFIG = shared_flags.config()
_WORKDIR = shared_flags.workdir("Where the grouping files go: a local directory or a gs:// URI.")


def main(argv):
  shared_flags.no_arguments(argv)
  distributed_flags.initialize()
  groups = loop.group_tasks(_CONFIG.value, _WORKDIR.value)
  print("groups:", "; ".join(" + ".join(g) for g in groups), flush=True)


def run():
  """The `mmap-group` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()
