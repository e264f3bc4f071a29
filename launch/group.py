r"""Gradient-driven task grouping alone: warm up a shared MmAP, measure, partition, write files.

  python -m launch.group --config=configs/office_home.py:clip=/ckpt/vit_b16 --workdir=/tmp/oh

Writes affinity.npy, affinity.png (labelled heatmap) and groups.json into the workdir; a later
`launch.train` with the same workdir reuses them.
"""
from absl import app, flags
from ml_collections import config_flags

from launch import distributed_flags
from mmap_jax.train import loop
from launch import entry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Where the grouping files go: a local "
                               "directory or a gs:// URI.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed_flags.initialize()
  groups = loop.group_tasks(_CONFIG.value, _WORKDIR.value)
  print("groups:", "; ".join(" + ".join(g) for g in groups), flush=True)


def run():
  """The `mmap-group` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()
