r"""Run a method comparison or hyper-parameter grid and tabulate it like the paper's tables.

  python -m launch.sweep --config=configs/demo.py \
      --sweep='method=zeroshot,coop_mt,vpt_mt,maple_mt,ivlp_mt,mmap_st,mmap_mt' --workdir=/tmp/cmp
  python -m launch.sweep --config=configs/office_home.py:clip=/ckpt/vit_b16 \
      --sweep='method=coop_mt,mmap_mt;optim.lr=0.0035,0.01' --config.train.steps=5000 \
      --seeds=0,1,2 --workdir=/tmp/grid

--sweep is `field=v1,v2,...`, several fields separated by ';' (their cartesian product); fields
are config paths, values take the field's type. --seeds=0,1,2 runs every setting once per seed
(default: the config's own `seed`, one run; `seed` itself cannot be a --sweep field). The seed
draws the prompt init and the training batches; the data split stays that of data.split_seed.
Each (setting, seed) runs into `<workdir>/<setting>/seed=<s>` (`method=mmap_mt/seed=1`);
finished runs are skipped, so re-running a killed sweep resumes it. The table (rows =
settings; seeds, tasks, average, trainable params; mean ± sample std over seeds) is printed and
written to results.md / results.json (per-seed numbers), with accuracy_vs_params.png (± std error
bars) and affinity_<setting>__seed=<s>.png, in --workdir, with accuracies.csv (every
(setting, seed, task) accuracy). Every row also gets `delta_ci`: its difference in average test
accuracy to the --reference setting (default method=mmap_mt) with a 95% paired bootstrap
interval over seeds and test images; '*' marks intervals that exclude 0.

--print_only prints one `python -m launch.train ... --config.seed=<s>` command per run instead
(finished ones commented out), to start each on its own TPU slice; afterwards the same sweep
without --print_only finds them finished and only builds the table.

--reuse=DIR[,DIR]: a run that another sweep's workdir DIR already finished with the same resolved
config (RunSpec, seed included) is copied from there (with reused_from.json) instead of trained.
"""

from absl import app, flags
from ml_collections import config_flags

from launch import distributed_flags, entry, shared_flags
from mmap_jax.apps import sweep, tune

_CONFIG = shared_flags.config("Base experiment config file[:args]; --config.* overrides apply "
                               "to every setting.")
_SWEEP = flags.DEFINE_string("sweep", None, "field=v1,v2,...[;field2=...]: the grid to run.")
_SEEDS = flags.DEFINE_string("seeds", None, "Comma-separated int seeds, e.g. 0,1,2: every "
                             "setting runs once per seed; the table shows mean ± std. Default: "
                             "the config's own seed.")
_WORKDIR = shared_flags.workdir("The sweep's directory: one sub-workdir per (setting, seed), the "
                                "table and the plots; a local directory or a gs:// URI.")
_REFERENCE = flags.DEFINE_string(
    "reference", None, "field=value[;field=value]: the setting every row is compared with (a "
    "paired bootstrap 95% CI of the difference in average test accuracy, `delta_ci`). Default "
    f"{sweep.DEFAULT_REFERENCE!r} when exactly one setting matches it; 'none': no comparison. "
    "'field=*' takes the row's own value of a swept field: 'method=mmap_mt;data.shots=*' pairs "
    "each row with MmAP-MT at the same shots.")
_TUNED = flags.DEFINE_string(
    "tuned", None, "tuned.json written by launch.tune: its value of the tuned field per method "
    "(on top of --config.*; a swept field wins); --seeds must avoid its tuning seeds. Several "
    "files, comma-separated, merge: a later file's value of a method wins.")
_REUSE = flags.DEFINE_list(
    "reuse", [], "Other sweeps' workdirs: a run one of them finished with the same resolved "
    "config (RunSpec, seed included) is copied from there, with reused_from.json, instead of "
    "being trained again.")
_PRINT_ONLY = flags.DEFINE_bool("print_only", False, "Print the launch.train command of every "
                                "(setting, seed) instead of running them.")


def main(argv):
  shared_flags.no_arguments(argv)
  config_flag = flags.FLAGS["config"]
  try:
    settings = sweep.make_settings(config_flags.get_config_filename(config_flag), _SWEEP.value,
                                   config_flags.get_override_values(config_flag),
                                   seeds=sweep.parse_seeds(_SEEDS.value),
                                   tuned=tune.load_tuned(_TUNED.value) if _TUNED.value else None)
    sweep.resolve_references(settings, _REFERENCE.value)
  except sweep.SweepError as e:
    raise app.UsageError(str(e)) from None
  if _PRINT_ONLY.value:
    print("\n".join(sweep.commands(settings, _WORKDIR.value)), flush=True)
    return
  distributed_flags.initialize()
  out = sweep.run(settings, _WORKDIR.value, log=lambda s: print(s, flush=True),
                  reference=_REFERENCE.value, reuse=_REUSE.value)
  shared_flags.exit_if_interrupted(out)


def run():
  """The `mmap-sweep` console script."""
  entry.run(main)


if __name__ == "__main__":
  run()
