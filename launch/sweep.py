r"""Run a method comparison or hyper-parameter grid and tabulate it like the paper's tables.

  python -m launch.sweep --config=configs/demo.py \
      --sweep='method=zeroshot,coop_mt,vpt_mt,maple_mt,ivlp_mt,mmap_st,mmap_mt' --workdir=/tmp/cmp
  python -m launch.sweep --config=configs/office_home.py:clip=/ckpt/vit_b16 \
      --sweep='method=coop_mt,mmap_mt;optim.lr=0.0035,0.01' --config.train.steps=5000 \
      --workdir=/tmp/grid

--sweep is `field=v1,v2,...`, several fields separated by ';' (their cartesian product); fields
are config paths, values take the field's type. Each setting runs into `<workdir>/<setting>`
(`method=mmap_mt__optim.lr=0.01`); finished settings are skipped, so re-running a killed sweep
resumes it. The table (rows = settings; tasks, average, trainable params) is printed and written
to results.md / results.json, with accuracy_vs_params.png and affinity_<setting>.png, in --workdir.

--print_only prints one `python -m launch.train ...` command per setting instead (finished ones
commented out), to start each on its own TPU slice; afterwards the same sweep without
--print_only finds them finished and only builds the table.
"""
import sys

from absl import app, flags
from ml_collections import config_flags

from launch import distributed_flags
from mmap_jax import host_runtime
from mmap_jax import sweep

_CONFIG = config_flags.DEFINE_config_file(
    "config", None, "Base experiment config file[:args]; --config.* overrides apply to every "
    "setting.", lock_config=True)
_SWEEP = flags.DEFINE_string("sweep", None, "field=v1,v2,...[;field2=...]: the grid to run.")
_WORKDIR = flags.DEFINE_string("workdir", None, "The sweep's directory: one sub-workdir per "
                               "setting, the table and the plots.")
_PRINT_ONLY = flags.DEFINE_bool("print_only", False, "Print the launch.train command of every "
                                "setting instead of running them.")
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config_flag = flags.FLAGS["config"]
  try:
    settings = sweep.make_settings(config_flags.get_config_filename(config_flag), _SWEEP.value,
                                   config_flags.get_override_values(config_flag))
  except sweep.SweepError as e:
    raise app.UsageError(str(e)) from None
  if _PRINT_ONLY.value:
    print("\n".join(sweep.commands(settings, _WORKDIR.value)), flush=True)
    return
  distributed_flags.initialize()
  out = sweep.run(settings, _WORKDIR.value, log=lambda s: print(s, flush=True))
  if out.get("preempted"):
    from mmap_jax.train import loop  # pylint: disable=g-import-not-at-top
    sys.exit(loop.PREEMPTED_EXIT_CODE)


if __name__ == "__main__":
  host_runtime.reexec_with_tcmalloc()   # host allocator; before JAX starts
  app.run(main)
