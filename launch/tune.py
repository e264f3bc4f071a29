r"""The tuning protocol (mmap_jax/apps/tune.py): every method's lr on validation, 2 tuning seeds,
grids extended until the best value is interior; then the final table on other seeds.

  python -m launch.tune --config=configs/demo.py --workdir=/tmp/tune
  python -m launch.sweep --config=configs/demo.py --tuned=/tmp/tune/tuned.json \
      --sweep='method=zeroshot,coop_mt,vpt_mt,maple_mt,ivlp_mt,mmap_st,mmap_mt' \
      --seeds=0,1,2,3,4 --workdir=/tmp/final

--plan='coop_mt=0.01,0.05;mmap_st' picks methods (and grids; a method alone: its resolved lr x
1/4..4); default: every family's MT form and MmAP-ST. Every run lives in
<workdir>/<method>/optim.lr=<v>/seed=<s>; finished runs are skipped, so rerunning the same
command resumes (and a finished tuning only rewrites tuning.json / tuning.md / tuned.json).
"""

from absl import app, flags
from ml_collections import config_flags

from launch import distributed_flags, entry, shared_flags
from mmap_jax.apps import sweep, tune

_CONFIG = shared_flags.config("Base experiment config file[:args]; --config.* overrides apply "
                               "to every run.")
_PLAN = flags.DEFINE_string("plan", None, "method[=v1,v2,...][;method...]: what to tune; "
                            f"default: {','.join(tune.DEFAULT_METHODS)} with default grids.")
_FIELD = flags.DEFINE_string("field", tune.DEFAULT_FIELD, "The tuned config field.")
_SEEDS = flags.DEFINE_string("tune_seeds", ",".join(map(str, tune.DEFAULT_TUNING_SEEDS)),
                             "The tuning seeds (>= 2); the final sweep must use other seeds.")
_MAX_EXT = flags.DEFINE_integer("max_extensions", 3, "Grid extensions allowed per side.")
_FACTORS = flags.DEFINE_list("factors", [repr(f) for f in tune.FACTORS],
                             "A default grid is the method's resolved value times these.")
_WORKDIR = shared_flags.workdir("The tuning's directory (local or gs://).")


def _factors() -> list[float]:
  try:
    return [float(f) for f in _FACTORS.value]
  except ValueError:
    raise app.UsageError(f"--factors={','.join(_FACTORS.value)}: give numbers") from None


def main(argv):
  shared_flags.no_arguments(argv)
  config_flag = flags.FLAGS["config"]
  distributed_flags.initialize()
  try:
    out = tune.tune(config_flags.get_config_filename(config_flag), _WORKDIR.value,
                    plan=tune.parse_plan(_PLAN.value),
                    overrides=config_flags.get_override_values(config_flag),
                    field=_FIELD.value, tuning_seeds=sweep.parse_seeds(_SEEDS.value) or [],
                    max_extensions=_MAX_EXT.value, factors=_factors(),
                    log=lambda s: print(s, flush=True))
  except sweep.SweepError as e:
    raise app.UsageError(str(e)) from None
  shared_flags.exit_if_interrupted(out)


def run():
  entry.run(main)


if __name__ == "__main__":
  run()
