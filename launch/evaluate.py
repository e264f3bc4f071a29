r"""Evaluate the latest (or a given) checkpoint of a workdir, or zero-shot CLIP without one.

  python -m launch.evaluate --config=configs/demo.py --workdir=/tmp/demo [--step=N]
  python -m launch.evaluate --config=configs/demo.py --workdir=/tmp/demo --split=val
  python -m launch.evaluate --config=configs/demo.py:method=zeroshot --workdir=/tmp/zs

Reports the TEST split by default (--split=val for the validation split) of the state the
checkpoint's validation record selected (--state=selected, what results.json reports) or of
the checkpoint's own state (--state=checkpoint). Writes results.json / results.md (the per-task
accuracy table; `split`, `step` and `evaluated_state` say what was evaluated) into --out
(default: workdir).
"""
from absl import app, flags
from ml_collections import config_flags

from launch import distributed_flags
from mmap_jax.train import loop
from launch import entry

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir (checkpoints): a local "
                               "directory or a gs:// URI.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_OUT = flags.DEFINE_string("out", None, "Where to write results (default: workdir); "
                           "a local directory or a gs:// URI.")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "Which split to report.")
_STATE = flags.DEFINE_enum("state", "selected", ["selected", "checkpoint"],
                           "The checkpoint's selected state (train.select) or its own state.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed_flags.initialize()
  loop.evaluate_workdir(_CONFIG.value, _WORKDIR.value, step=_STEP.value, out=_OUT.value,
                        split=_SPLIT.value, state=_STATE.value)


def run():
  """The `mmap-evaluate` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()
