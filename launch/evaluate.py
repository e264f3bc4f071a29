r"""Evaluate the latest (or a given) checkpoint of a workdir, or zero-shot CLIP without one.

  python -m launch.evaluate --config=configs/demo.py --workdir=/tmp/demo [--step=N]
  python -m launch.evaluate --config=configs/demo.py:method=zeroshot --workdir=/tmp/zs

Writes results.json / results.md (the per-task accuracy table) into --out (default: workdir).
"""
from absl import app, flags
from ml_collections import config_flags

from launch import distributed_flags
from mmap_jax import host_runtime
from mmap_jax.train import loop

_CONFIG = config_flags.DEFINE_config_file("config", None, "Experiment config file[:args].",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "The training workdir (checkpoints).")
_STEP = flags.DEFINE_integer("step", None, "Checkpoint step (default: latest).")
_OUT = flags.DEFINE_string("out", None, "Where to write results (default: workdir).")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  distributed_flags.initialize()
  loop.evaluate_workdir(_CONFIG.value, _WORKDIR.value, step=_STEP.value, out=_OUT.value)


if __name__ == "__main__":
  host_runtime.reexec_with_tcmalloc()   # host allocator; before JAX starts
  app.run(main)
