r"""Evaluate the latest (or a given) checkpoint of a workdir, or zero-shot CLIP without one.

  python -m launch.evaluate --workdir=/tmp/demo [--step=N]     # the run's recorded config
  python -m launch.evaluate --config=configs/demo.py --workdir=/tmp/demo [--step=N]
  python -m launch.evaluate --config=configs/demo.py --workdir=/tmp/demo --split=val
  python -m launch.evaluate --config=configs/demo.py:method=zeroshot --workdir=/tmp/zs

Reports the TEST split by default (--split=val for the validation split) of the state the
checkpoint's validation record selected (--state=selected, what results.json reports) or of
the checkpoint's own state (--state=checkpoint). Writes results.json / results.md (the per-task
accuracy table; `split`, `step` and `evaluated_state` say what was evaluated) into --out
(default: workdir), and for the test split test_correct.npz (per-image correctness, what
`launch.sweep --reference` resamples for paired confidence intervals). Without --config the
config the checkpoint recorded is used (the run's own, overrides included); give --config (and
--config.* overrides) to evaluate it differently, e.g. with another data.root.
"""
from absl import flags

from launch import distributed_flags, entry, shared_flags
from mmap_jax.train import loop

_CONFIG = shared_flags.config("Experiment config file[:args] (default: the one the checkpoint "
                              "recorded).", required=False)
_WORKDIR = shared_flags.workdir("The training workdir (checkpoints): a local directory or a "
                                "gs:// URI.")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_OUT = flags.DEFINE_string("out", None, "Where to write results (default: workdir); "
                           "a local directory or a gs:// URI.")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "Which split to report.")
_STATE = flags.DEFINE_enum("state", "selected", ["selected", "checkpoint"],
                           "The checkpoint's selected state (train.select) or its own state.")


def main(argv):
  shared_flags.no_arguments(argv)
  distributed_flags.initialize()
  loop.evaluate_workdir(_CONFIG.value, _WORKDIR.value, step=_STEP.value, out=_OUT.value,
                        split=_SPLIT.value, state=_STATE.value)


def run():
  """The `mmap-evaluate` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()
