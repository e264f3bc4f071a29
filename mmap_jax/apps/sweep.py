"""Method comparisons and hyper-parameter grids over seeds: one sub-workdir per run, one table.

A sweep is a base config (`configs/demo.py:clip=/x,runlocal` plus `--config.*` overrides), a
grid `method=coop_mt,mmap_mt;optim.lr=0.01,0.02` (fields separated by ';', values by ','; the
settings are the cartesian product, first field outermost) and a list of seeds (`--seeds=0,1,2`;
default: the config's own `seed`, one run). Every (setting, seed) is a run into
`<workdir>/<setting>/seed=<s>` (e.g. `method=mmap_mt__optim.lr=0.02/seed=1`) and counts as
finished once that directory holds `results.json`, which `train_and_evaluate` writes last; an
unfinished run is simply run again and resumes from its own checkpoints, so a killed sweep
resumes too; a finished run whose recorded RunSpec differs from what this sweep would run (say,
after --tuned changed) is an error naming it and the fields, never silently kept. Runs go
seed-major (every setting at the first seed, then at the next), so a sweep stopped half-way
already compares all settings. `seed` cannot be a --sweep field: the seeds of a
setting are one table row (mean +- std), not separate rows.

The seed (`config.seed`) draws the prompt init and the training batches (shuffle order and
augmentation; the grouping warm-up uses seed+7 / seed+1).

Grouping against random partitions: `--sweep='groups.mode=gradient,random' --seeds=0,1,2,3,4`
(groups.seed unset) gives the random row one partition per seed, drawn from the run's seed
(`run_spec.GroupSpec.random_seed`), so its mean ± std and its delta_ci (--reference=
'groups.mode=gradient') are over 5 random partitions, paired seed by seed with the gradient
grouping's runs; the row's `groups` lists them and `distinct_groups` counts the distinct ones
(few tasks have few balanced partitions: 4 tasks in 2 groups have 3). Fixing the partition while
varying the training seed is `--sweep='groups.mode=random;groups.seed=0,1,2,3,4'` instead (one
row per partition). It does not touch the data: the
train/test split is drawn from `data.split_seed` (and the demo world from `data.demo_seed`), so
all seeds of a sweep train and test on the same examples.

Every swept field, `method` included, is set like a `--config.field=value` override, after the
user's own overrides (no config field depends on `method` at `get_config` time: method-dependent
defaults are resolved by PromptSpec and the optimizer recipes, so `--config.method=X` and
`file.py:method=X` build the same run). Values are parsed with the type of the existing config field and every
run is validated before anything runs, so a typo fails in seconds, naming the field.

Runs go one after another in this process (`run`): `train_and_evaluate` builds its own jitted
functions, checkpointer, TensorBoard writer and SIGTERM handler per call and releases them in a
`finally`, so nothing leaks from one run into the next, and the frozen CLIP is loaded again per
run (cheap next to training). On a pod every host runs the same sweep, as with launch.train.
To spread the runs over several slices instead, `commands` gives one `launch.train` command
per run (with `--config.seed=<s>`); a later plain sweep over the same workdir finds them
finished and only tabulates.

Outputs in the sweep workdir (process 0): `results.json` ({"tasks": {task: {"num_classes"}},
"seeds", "std", "missing": [runs], "rows": [row]}, accuracies as fractions; a row is one setting:
"setting", "seeds" and "n_seeds" (its finished runs), "workdirs", "accuracy": {task: stat},
"average": stat, with stat = {"per_seed": [...], "mean", "std"}, "val_accuracy" / "val_average"
(the same, only when every run of the row reports `val_accuracy`), "selection" and "groups" per
seed, "trainable_params" / "trainable_percent" (mean over seeds; they differ only when grouping
picks a different number of groups per seed) and their "_per_seed" lists), `results.md` (the
paper-style table: rows = settings, columns = swept fields, seeds, tasks, average, val average,
trainable params; cells mean +- sample std, ddof=1), `accuracy_vs_params.png` (the paper's
Figure 1 shape, with +-std error bars), `accuracy_vs_shots.png` when `data.shots` is swept (one
line per other-field combination, e.g. per method; x = shots, 'all' last) and
`affinity_<setting>__seed=<s>.png` for each run whose grouping drew a heatmap. Paired
statistics: every row's `delta_ci` = {"mean", "low", "high", "excludes_zero", "seeds", ...} is its average test accuracy minus the reference setting's
(`--reference`, default method=mmap_mt; 'method=mmap_mt;data.shots=*' pairs each row with
MmAP-MT at its own shots: `resolve_references`) with a 95% paired bootstrap
interval (`mmap_jax.apps.stats`: seeds, then test images, one draw for both), computed from the
runs' per-image `test_correct.npz`; the table marks intervals excluding 0 with '*'.
`accuracies.csv` holds every (setting, seed, task) test (and validation) accuracy. The workdir
may be a `gs://`-style URI: every read and write goes through `mmap_jax.paths` (etils.epath),
results.json atomically.

Reusing another sweep's runs (`reuse=[other sweep workdirs]`, launch.sweep --reuse): a run that
another sweep finished with the same resolved RunSpec (`run_key`: everything the trainer reads,
the seed included) is copied from there (its files, without checkpoints/ or TensorBoard events,
plus `reused_from.json`: {"sweep": the --reuse directory as given, "run": '<setting>/seed=<s>'})
instead of being trained again; e.g. a shots sweep's 16-shot runs are the method table's runs
when 16 is the config's default. It assumes the same code and CLIP files. On one host such runs
agree per test image bit for bit (the demo's MmAP-MT trained again in the `prompt.budget=equal`
sweep, where that field changes nothing for it, against the table's 5 seeds, and their
grouping warm-ups' affinities: `tests/test_sweep.py`). Across hosts XLA's float32 rounding may
differ: the demo's TAG warm-up affinities, re-run in a later session, moved at ~1e-6 relative
(`git diff 91ffca0 b213535 -- benchmarks/results/demo_world2/evidence/affinity`).
"""
from __future__ import annotations

import copy
import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import ml_collections as mlc
import numpy as np
from absl import flags
from ml_collections import config_flags
from ml_collections.config_flags import config_path

from mmap_jax import paths

RESULTS_FILE = "results.json"
CSV_FILE = "accuracies.csv"      # every (setting, seed, task) test accuracy, beside results.json
TABLE_FILE = "results.md"
PLOT_FILE = "accuracy_vs_params.png"
SHOTS_FIELD, SHOTS_PLOT_FILE = "data.shots", "accuracy_vs_shots.png"
AFFINITY_PLOT = "affinity.png"   # what a grouping run draws into its own workdir
_MAX_NAME = 120                  # sub-workdir names longer than this are shortened + hashed


class SweepError(ValueError):
  """A --sweep spec, swept value or override the sweep cannot use; the message names the field."""


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Run:
  """One (setting, seed): its own sub-workdir `<setting>/seed=<s>` and its own config."""
  setting: str                            # the setting's name
  seed: int
  config_ref: str
  overrides: tuple[tuple[str, Any], ...]  # the setting's, without `seed`, then ("seed", s)
  config: mlc.ConfigDict = dataclasses.field(compare=False, repr=False)

  @property
  def name(self) -> str:
    """The sub-workdir, relative to the sweep's: 'method=mmap_mt/seed=1'."""
    return run_name(self.setting, self.seed)

  def command(self, workdir: str) -> str:
    """The `launch.train` command that runs this seed of the setting, runnable in the repo root."""
    args = ["python", "-m", "launch.train", f"--config={self.config_ref}"]
    args += [f"--config.{k}={format_value(v)}" for k, v in self.overrides]
    args.append(f"--workdir={os.path.join(workdir, self.setting, seed_dir(self.seed))}")
    return " ".join(shlex.quote(a) for a in args)


@dataclasses.dataclass(frozen=True)
class Setting:
  """One point of the grid, how to build its config, and its runs (one per seed)."""
  fields: tuple[tuple[str, Any], ...]     # the swept (field, value) pairs, in --sweep order
  config_ref: str                         # "file.py[:args]" that get_config builds from
  overrides: tuple[tuple[str, Any], ...]  # set on top, in order: the user's, then swept fields
  config: mlc.ConfigDict = dataclasses.field(compare=False, repr=False)
  runs: tuple[Run, ...] = dataclasses.field(default=(), compare=False, repr=False)

  @property
  def name(self) -> str:
    return setting_name(self.fields)

  @property
  def values(self) -> dict[str, Any]:
    return dict(self.fields)

  @property
  def seeds(self) -> tuple[int, ...]:
    return tuple(r.seed for r in self.runs)

  @property
  def label(self) -> str:
    """Short row / point label: just the values ("mmap_mt", "mmap_mt, 0.02")."""
    return ", ".join(format_value(v) for _, v in self.fields) or "default"


def seed_dir(seed: int) -> str:
  return f"seed={seed}"


def run_name(setting: str, seed: int) -> str:
  return f"{setting}/{seed_dir(seed)}"


def parse_seeds(raw: Optional[str]) -> Optional[list[int]]:
  """'0,1,2' -> [0, 1, 2]; None or '' -> None (the config's own seed). Errors name --seeds."""
  if raw is None or not raw.strip():
    return None
  parts = [p.strip() for p in raw.split(",")]
  seeds = []
  for p in parts:
    try:
      seeds.append(int(p))
    except ValueError:
      raise SweepError(f"--seeds={raw!r}: {p!r} is not an int (expected e.g. --seeds=0,1,2)"
                       ) from None
  bad = [s for s in seeds if s < 0]
  if bad:
    raise SweepError(f"--seeds={raw!r}: seeds must be >= 0, got {bad}")
  if len(set(seeds)) != len(seeds):
    raise SweepError(f"--seeds={raw!r}: repeats a seed")
  return seeds


def ordered_runs(settings: Sequence[Setting]) -> list[Run]:
  """Seed-major: every setting at its first seed, then at the next, ... (see the module doc)."""
  depth = max((len(s.runs) for s in settings), default=0)
  return [s.runs[i] for i in range(depth) for s in settings if i < len(s.runs)]


def parse_sweep(spec: Optional[str]) -> list[tuple[str, list[str]]]:
  """'a=1,2;b.c=x' -> [("a", ["1", "2"]), ("b.c", ["x"])]: raw strings, typed later."""
  axes: list[tuple[str, list[str]]] = []
  for part in (spec or "").split(";"):
    part = part.strip()
    if not part:
      continue
    field, has_eq, raw = part.partition("=")
    field = field.strip()
    if field.startswith("config."):
      field = field[len("config."):]
    if not has_eq or not field:
      raise SweepError(f"--sweep: {part!r} is not field=v1,v2,...")
    values = [v.strip() for v in raw.split(",")]
    if not all(values):
      raise SweepError(f"--sweep: field {field} has an empty value in {raw!r}")
    if len(set(values)) != len(values):
      raise SweepError(f"--sweep: field {field} repeats a value in {raw!r}")
    if field in (f for f, _ in axes):
      raise SweepError(f"--sweep: field {field} is given twice")
    axes.append((field, values))
  return axes


def tuned_source(method: str, tuned: Optional[Mapping[str, Any]]) -> Optional[str]:
  """Which tuned method's value `method` takes under --tuned: its own, else, for an MmAP
  ablation (`MMAP_ABLATIONS`: MT form on mmap_mt's code path), mmap_mt's; None when neither."""
  if tuned is None:
    return None
  if method in tuned["values"]:
    return method
  from mmap_jax.prompts.spec import MMAP_ABLATIONS  # Deferred: the spec module imports JAX.
  return "mmap_mt" if method in MMAP_ABLATIONS and "mmap_mt" in tuned["values"] else None


def make_settings(config_ref: str, sweep: Optional[str],
                  overrides: Optional[Mapping[str, Any]] = None,
                  seeds: Optional[Sequence[int]] = None,
                  tuned: Optional[Mapping[str, Any]] = None) -> list[Setting]:
  """Every setting of the grid with one run per seed, each config built, typed and validated.

  `tuned` (tuned.json of launch.tune: {"field", "tuning_seeds", "values": {method: value}})
  sets `field` per method (`tuned_source`: an untuned MT ablation takes its family's MT value)
  on top of the --config overrides (a swept field still wins), and the
  seeds must then be disjoint from the tuning seeds (no winner's curse).

  `config_ref` is what --config got ("configs/demo.py:clip=/x,runlocal"); `overrides` are the
  --config.* values (typed, or strings parsed with the field's type), applied to every setting;
  `seeds` default to the config's own `seed` (after the overrides). Raises SweepError naming the
  field before anything has run.
  """
  path, arg = split_config_ref(config_ref)
  module = _load_module(path)
  base = _get_config(module, path, arg)
  overrides = {k: _typed(k, v, base, "--config.") for k, v in (overrides or {}).items()}
  axes = [(f, [_typed(f, raw, base, "--sweep ") for raw in values])
          for f, values in parse_sweep(sweep)]
  if any(f == "seed" for f, _ in axes):
    raise SweepError("--sweep: seed cannot be swept; use --seeds=0,1,2 (each setting then runs "
                     "once per seed and its row shows mean +- std)")
  if seeds is not None and "seed" in overrides:
    raise SweepError("--config.seed and --seeds are both given; use --seeds alone")
  if seeds is not None and not list(seeds):
    raise SweepError("--seeds: no seed given")
  if seeds is None:
    seeds = [int(overrides.get("seed", base.seed))]
  seeds = [int(_typed("seed", s, base, "--seeds ")) for s in seeds]
  if tuned is not None:
    shared = sorted(set(seeds) & {int(x) for x in tuned["tuning_seeds"]})
    if shared:
      raise SweepError(f"--seeds: {shared} were tuning seeds (--tuned); the final table needs "
                       f"seeds disjoint from {list(tuned['tuning_seeds'])}")
  settings, errors = [], []
  for combo in itertools.product(*(values for _, values in axes)):
    fields = tuple(zip((f for f, _ in axes), combo))
    swept = dict(fields)
    ref, arg_i = config_ref, arg
    ov = {k: v for k, v in overrides.items() if k not in swept}
    method = swept.get("method", ov.get("method", base.method))
    source = tuned_source(method, tuned)
    if source is not None and tuned["field"] not in swept:
      ov[tuned["field"]] = _typed(tuned["field"], tuned["values"][source], base, "--tuned ")
    ov |= swept
    name = setting_name(fields)
    config = _built(module, path, arg_i, ov, name, errors)
    runs = []
    for seed in seeds:
      run_ov = {k: v for k, v in ov.items() if k != "seed"} | {"seed": seed}
      runs.append(Run(setting=name, seed=seed, config_ref=ref, overrides=tuple(run_ov.items()),
                      config=_built(module, path, arg_i, run_ov, name, errors)))
    settings.append(Setting(fields=fields, config_ref=ref, overrides=tuple(ov.items()),
                            config=config, runs=tuple(runs)))
  if errors:
    raise SweepError("\n".join(dict.fromkeys(errors)))
  names = [s.name for s in settings]
  if len(set(names)) != len(names):  # e.g. values differing only in characters a path cannot hold
    raise SweepError(f"--sweep: settings map to the same sub-workdir name: {names}")
  return settings


def _built(module, path: str, arg: Optional[str], overrides: Mapping[str, Any], name: str,
           errors: list[str]) -> mlc.ConfigDict:
  """get_config(arg) with the overrides set; a validation error is appended to `errors`."""
  config = _get_config(module, path, arg)
  _apply(config, overrides)
  try:
    _validate(config)
  except ValueError as e:
    errors.append(f"setting {name}: {e}")  # once per setting: the caller drops repeats
  return config


def split_config_ref(config_ref: str) -> tuple[str, Optional[str]]:
  """'configs/demo.py:a=1' -> ('configs/demo.py', 'a=1'), as ml_collections' config flag does."""
  path, has_arg, arg = config_ref.partition(":")
  return path, (arg if has_arg else None)


def setting_name(fields: Sequence[tuple[str, Any]]) -> str:
  """Deterministic, readable, filesystem-safe: 'method=mmap_mt__optim.lr=0.02'."""
  if not fields:
    return "default"
  raw = "__".join(f"{k}={format_value(v)}" for k, v in fields)
  name = re.sub(r"[^A-Za-z0-9._=+-]", "-", raw)
  if name != raw or len(name) > _MAX_NAME:  # keep names of different settings different
    name = f"{name[:_MAX_NAME]}-{hashlib.sha1(raw.encode()).hexdigest()[:8]}"
  return name


def format_value(v: Any) -> str:
  """How a value is written in names, labels and --config flags (parseable back by absl)."""
  if isinstance(v, bool):
    return "true" if v else "false"
  return repr(v) if isinstance(v, float) else str(v)


def parse_value(field: str, raw: str, config: mlc.ConfigDict) -> Any:
  """A command-line string typed exactly as `--config.<field>=<raw>` types it: ml_collections'
  config flag parses it (on a private copy of `config`); the error names the field."""
  argv = ["sweep", f"--config.{field}={raw}"]
  values = flags.FlagValues()
  try:   # defining the flag defines its override flags (an unsupported field type fails there)
    config_flags.DEFINE_config_dict("config", copy.deepcopy(config), flag_values=values,
                                    sys_argv=argv, lock_config=False)
    values(argv)
  except flags.Error as e:
    kind = config_path.get_type(field, config)
    raise SweepError(f"{field}={raw!r}: not a valid {getattr(kind, '__name__', kind)} ({e})"
                     ) from None
  return config_path.get_value(field, values.config)


def _typed(field: str, value: Any, config: mlc.ConfigDict, where: str) -> Any:
  try:
    kind = config_path.get_type(field, config)
  except (KeyError, AttributeError, IndexError, ValueError):
    raise SweepError(f"{where}{field}: no such config field") from None
  if isinstance(kind, type) and issubclass(kind, mlc.ConfigDict):
    raise SweepError(f"{where}{field}: is a group of fields; name a leaf ({field}.<name>)")
  if value is None:  # nullable fields (FieldReference(None, ...)) keep meaning "the default"
    return None
  if isinstance(value, str):
    return parse_value(field, value, config)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if kind is not object and not isinstance(value, kind):
    raise SweepError(f"{where}{field}={value!r}: expected a {kind.__name__}")
  return value


def _apply(config: mlc.ConfigDict, overrides: Mapping[str, Any]) -> None:
  for field, value in overrides.items():
    try:
      config_path.set_value(field, config, value)
    except (TypeError, ValueError, KeyError, AttributeError) as e:
      raise SweepError(f"{field}={value!r}: {e}") from None


def _validate(config: mlc.ConfigDict) -> None:
  from mmap_jax.train import setup  # Deferred: parsing a sweep should not need the trainer.
  setup.validate(config)


def _load_module(path: str):
  """The config file as a module: a path relative to the working directory, else the installed
  `configs/<file>` (resources.resolve_config_path, as the launchers' --config)."""
  from mmap_jax import resources  # pylint: disable=g-import-not-at-top
  path = resources.resolve_config_path(path)
  if not os.path.isfile(path):
    raise SweepError(f"--config: no config file {path!r}")
  name = "sweep_config_" + re.sub(r"\W", "_", os.path.splitext(path)[0])
  spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _get_config(module, path: str, arg: Optional[str]) -> mlc.ConfigDict:
  try:
    return module.get_config(*([] if arg is None else [arg]))
  except (TypeError, ValueError) as e:
    raise SweepError(f"--config={path}:{arg or ''}: {e}") from None


# ----------------------------------------------------------------------------- running


def is_finished(workdir: paths.PathLike) -> bool:
  """train_and_evaluate writes results.json last: its presence means the setting is done."""
  return (paths.as_path(workdir) / RESULTS_FILE).is_file()


def commands(settings: Sequence[Setting], workdir: str) -> list[str]:
  """One launch.train line per run (seed-major); finished ones commented out: `| bash` resumes."""
  done = lambda r: is_finished(paths.as_path(workdir) / r.name)
  return [("# finished: " if done(r) else "") + r.command(workdir) for r in ordered_runs(settings)]


REUSED_FILE = "reused_from.json"   # in a run that --reuse copied: {"sweep", "run"} of its source


def run_key(config: mlc.ConfigDict) -> str:
  """A run's identity for --reuse: its resolved RunSpec (`train.run_spec`: all the trainer
  reads; the seed included) as canonical JSON. Equal keys: the same computation, given the same
  code and CLIP files (on one host the per-image results then agree bit for bit). Resolving
  validates the config for this host's devices (setup.ConfigError)."""
  import jax
  from mmap_jax.train import run_spec as run_spec_lib  # Deferred: --print_only needs no JAX.
  return _canonical(run_spec_lib.resolve(config, jax.device_count()).to_dict())


def run_keys(settings: Sequence[Setting]) -> dict[str, str]:
  """{run name: `run_key`} of every run, resolved once before the first run starts (so the
  per-device batch split is checked too); every invalid setting is named in one SweepError."""
  keys, errors = {}, []
  for s in settings:
    for r in s.runs:
      try:
        keys[r.name] = run_key(r.config)
      except ValueError as e:
        errors.append(f"setting {s.name}: {e}")
  if errors:
    raise SweepError("\n".join(dict.fromkeys(errors)))
  return keys


def _canonical(d: Mapping[str, Any]) -> str:
  return json.dumps(d, sort_keys=True)


def finished_elsewhere(sweep_dirs: Sequence[str]) -> dict[str, dict[str, str]]:
  """{run key: {"sweep": the directory as given, "run": '<setting>/seed=<s>'}} of every finished
  run under other sweeps' workdirs (the first directory given wins a key found twice)."""
  index: dict[str, dict[str, str]] = {}
  for d in sweep_dirs:
    root = paths.as_path(d)
    if not root.is_dir():
      raise SweepError(f"--reuse: {d} is not a directory")
    for res in sorted(root.glob(f"*/seed=*/{RESULTS_FILE}")):
      spec = json.loads(res.read_text()).get("run_spec")
      if spec is not None:
        index.setdefault(_canonical(spec),
                         {"sweep": str(d), "run": f"{res.parent.parent.name}/{res.parent.name}"})
  return index


def copy_run(source: Mapping[str, str], dst: paths.PathLike) -> None:
  """A finished run's files (`source` as `finished_elsewhere` gives it) into `dst`, not its
  checkpoints/ or tensorboard/ directories; REUSED_FILE holds `source`; results.json goes last
  (it marks the run finished)."""
  src, dst = paths.as_path(source["sweep"]) / source["run"], paths.as_path(dst)
  dst.mkdir(parents=True, exist_ok=True)
  for f in sorted(src.iterdir()):
    if f.is_file() and f.name not in (RESULTS_FILE, REUSED_FILE):
      (dst / f.name).write_bytes(f.read_bytes())
  paths.write_text_atomic(dst / REUSED_FILE, json.dumps(dict(source)) + "\n")
  paths.write_text_atomic(dst / RESULTS_FILE, (src / RESULTS_FILE).read_text())


def _differences(a: Any, b: Any, prefix: str = "") -> list[str]:
  """Dotted paths at which two JSON values differ ('prompt.length')."""
  if isinstance(a, dict) and isinstance(b, dict):
    return [d for k in sorted(set(a) | set(b), key=str)
            for d in _differences(a.get(k), b.get(k), f"{prefix}{k}.")]
  return [] if a == b else [prefix.rstrip(".") or "(all)"]


def check_finished_runs(runs: Sequence[Run], workdir: paths.PathLike,
                        keys: Mapping[str, str]) -> None:
  """A finished run must be the run this sweep would make: its results.json `run_spec` equals
  its `run_key` in `keys` (e.g. a changed --tuned or --config.* would otherwise keep old
  runs under the same names). Runs whose results.json has no `run_spec` are not checked.
  Raises SweepError naming the runs and the differing fields."""
  stale = []
  for r in runs:
    res = paths.as_path(workdir) / r.name / RESULTS_FILE
    if not res.is_file():
      continue
    recorded = json.loads(res.read_text()).get("run_spec")
    if recorded is None:
      continue
    wanted = json.loads(keys[r.name])
    if _canonical(recorded) != _canonical(wanted):
      stale.append(f"{r.name} ({', '.join(_differences(recorded, wanted))})")
  if stale:
    raise SweepError(
        f"finished runs in {os.fspath(workdir)} were made with another resolved config than "
        f"this sweep gives them (differing fields in brackets): {'; '.join(stale)}. Move them "
        "away or use another --workdir to run them again.")


def reuse_finished(todo: Sequence[Run], workdir: paths.PathLike, sweep_dirs: Sequence[str],
                   log: Callable[[str], None], keys: Mapping[str, str]) -> list[Run]:
  """Copies each run of `todo` that another sweep already finished (equal `run_key`) into its
  sub-workdir (process 0 writes) and returns the runs still to run."""
  import jax
  if not sweep_dirs or not todo:
    return list(todo)
  index, left = finished_elsewhere(sweep_dirs), []
  for r in todo:
    src = index.get(keys[r.name])
    if src is None:
      left.append(r)
      continue
    if jax.process_index() == 0:
      copy_run(src, paths.as_path(workdir) / r.name)
    log(f"sweep: {r.name}: reused {src['run']} of {src['sweep']} (the same resolved run)")
  return left


RunFn = Callable[[mlc.ConfigDict, str], Any]


def run(settings: Sequence[Setting], workdir: str, *, run_fn: Optional[RunFn] = None,
        log: Callable[[str], None] = print, reference: Optional[str] = None,
        reuse: Sequence[str] = ()) -> dict:
  """Runs every unfinished (setting, seed) in turn, then writes and prints the table; returns its
  JSON. A finished run must match its config (`check_finished_runs`). A run that one of the
  `reuse` sweep workdirs finished with the same resolved RunSpec is copied from there instead
  (`reuse_finished`; the copy holds REUSED_FILE).

  A run that fails is reported and the others still run; a SweepError listing the failures is
  raised at the end (after the table of the finished ones is written). A preempted run (SIGTERM,
  or Ctrl-C) stops the sweep: the host is going away; the returned dict then names it
  ('<setting>/seed=<s>') under "preempted" and gives the run's "exit_code" (launch.sweep exits
  with it: 143 after SIGTERM, 130 after Ctrl-C). `reference`: see
  `resolve_references` (checked before the first run).
  """
  resolve_references(settings, reference)
  if run_fn is None:
    from mmap_jax.train import loop  # Deferred: --print_only needs no JAX.
    run_fn = loop.train_and_evaluate
  keys = run_keys(settings)
  workdir = paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  runs = ordered_runs(settings)
  check_finished_runs(runs, workdir, keys)
  todo = [r for r in runs if not is_finished(workdir / r.name)]
  seeds = list(dict.fromkeys(r.seed for r in runs))
  todo = reuse_finished(todo, workdir, reuse, log, keys)
  log(f"sweep: {len(settings)} settings x {len(seeds)} seeds ({', '.join(map(str, seeds))}) = "
      f"{len(runs)} runs, {len(runs) - len(todo)} finished, {len(todo)} to run, in {workdir}")
  failed, preempted, exit_code = [], None, None
  for i, r in enumerate(todo, 1):
    sub = os.fspath(workdir / r.name)   # a str, as launch.train's --workdir
    log(f"sweep: [{i}/{len(todo)}] running {r.name}")
    try:
      out = run_fn(r.config, sub)
    except Exception as e:  # pylint: disable=broad-except
      log(f"sweep: {r.name} failed: {type(e).__name__}: {e}")
      failed.append((r.name, e))
      continue
    if isinstance(out, dict) and out.get("preempted"):
      log(f"sweep: {r.name} was preempted; stopping (re-run the sweep to resume)")
      preempted, exit_code = r.name, out.get("exit_code")
      break
  from mmap_jax import parallel  # Multi-process: process 0 has written every results.json.
  parallel.sync("mmap_jax:sweep_outputs")
  summary = write_outputs(settings, workdir, log=log, reference=reference)
  if failed:
    raise SweepError("runs failed: " + "; ".join(f"{n} ({type(e).__name__}: {e})"
                                                  for n, e in failed))
  if not preempted:
    return summary
  return {**summary, "preempted": preempted, "exit_code": exit_code}


# ----------------------------------------------------------------------------- outputs


STD_NOTE = "sample std over seeds (ddof=1); null for a single seed"


def seed_stat(values: Sequence[float]) -> dict:
  """{"per_seed", "mean", "std"}: std is the sample std (ddof=1), None for a single seed."""
  x = np.asarray(values, dtype=np.float64)
  return {"per_seed": [float(v) for v in x], "mean": float(x.mean()),
          "std": float(x.std(ddof=1)) if x.size >= 2 else None}


def _read_run(workdir: paths.PathLike, r: Run) -> Optional[dict]:
  path = paths.as_path(workdir) / r.name / RESULTS_FILE
  if not path.is_file():
    return None
  return json.loads(path.read_text())


def collect(settings: Sequence[Setting], workdir: str, reference: Optional[str] = None) -> dict:
  """The sweep's results.json dict from the finished runs' own results.json files.

  One row per setting with at least one finished seed: per-seed numbers and their mean / std.
  The test accuracy (`accuracy`) and the validation accuracy (`val_accuracy`, written by runs
  that select on a validation split) are kept apart; the latter only when every finished seed
  of the row has it, so a mean never mixes runs with and without it. Each row's `delta_ci` is
  its paired bootstrap interval against the `reference` setting (`add_delta_ci`).
  """
  tasks: dict[str, dict] = {}
  rows = []
  for s in settings:
    done = [(r, res) for r in s.runs if (res := _read_run(workdir, r)) is not None]
    if not done:
      continue
    names = list(done[0][1]["tasks"])
    for r, res in done:
      if list(res["tasks"]) != names:
        raise SweepError(f"{r.name}: tasks {list(res['tasks'])} differ from {names} of "
                         f"{done[0][0].name}")
      for t, info in res["tasks"].items():
        tasks.setdefault(t, {"num_classes": int(info["num_classes"])})
    results = [res for _, res in done]
    params = [int(res["trainable_params"]) for res in results]
    percent = [float(res["trainable_percent"]) for res in results]
    row = {"setting": s.values,
           "seeds": [r.seed for r, _ in done],
           "n_seeds": len(done),
           "workdirs": [r.name for r, _ in done],
           "accuracy": {t: seed_stat([res["tasks"][t]["accuracy"] for res in results])
                        for t in names},
           "average": seed_stat([res["average"] for res in results])}
    if all(res.get("val_accuracy") for res in results):
      val = [{t: float(a) for t, a in res["val_accuracy"].items()} for res in results]
      val_names = list(val[0])
      row["val_accuracy"] = {t: seed_stat([v[t] for v in val]) for t in val_names}
      row["val_average"] = seed_stat([np.mean([v[t] for t in val_names]) for v in val])
    if any("selection" in res for res in results):
      row["selection"] = [res.get("selection") for res in results]
    row["groups"] = [res.get("groups") for res in results]
    if all(res.get("cost") for res in results):  # training cost (issue 29): steps, wall time
      row["cost"] = cost_summary([res["cost"] for res in results])
    if any(row["groups"]):  # e.g. groups.mode=random over seeds: how many partitions were drawn
      row["distinct_groups"] = len({json.dumps(g) for g in row["groups"]})
    row |= {"trainable_params": int(round(float(np.mean(params)))),
            "trainable_percent": float(np.mean(percent)),
            "trainable_params_per_seed": params, "trainable_percent_per_seed": percent}
    rows.append(row)
  seeds = list(dict.fromkeys(r.seed for s in settings for r in s.runs))
  missing = [r.name for r in ordered_runs(settings)
             if not is_finished(paths.as_path(workdir) / r.name)]
  summary = {"tasks": tasks, "seeds": seeds, "std": STD_NOTE, "missing": missing, "rows": rows}
  add_delta_ci(summary, settings, workdir, reference)
  return summary


# ----------------------------------------------------------------------------- paired statistics

DEFAULT_REFERENCE = "method=mmap_mt"
NO_REFERENCE = ("none", "")   # --reference=none: no delta_ci column
BOOTSTRAP = {"num_samples": 2000, "level": 0.95, "seed": 0, "image_draw": "shared"}
DELTA_NOTE = ("delta_ci: the row's average test accuracy minus the reference's, mean over the "
              "seeds both finished; [low, high] = 95% paired bootstrap interval (seeds, then the "
              "test images of each task, drawn with replacement; one draw for both settings; "
              "mmap_jax/apps/stats.py); '*' = the interval excludes 0")


def resolve_references(settings: Sequence[Setting], spec: Optional[str]
                       ) -> tuple[dict[str, Setting], str]:
  """Each setting's reference, {setting name: reference setting}, and a note.

  `spec` is 'field=value' parts separated by ';' (e.g. 'method=mmap_mt'). A reference has
  every given value, swept or not. A part 'field=*' names a swept field whose value is the
  row's own: 'method=mmap_mt;data.shots=*' compares every row with MmAP-MT at the row's shots,
  so a shots curve pairs within each shot count. Without '*' there is one reference for all
  rows. `spec=None` is the default 'method=mmap_mt'. It may match no setting or several; then
  there is no delta_ci and the note says why. An explicit spec must give each row exactly one
  reference; otherwise a SweepError names the field or the matches. 'none' turns the
  comparison off. A row with no reference of its own (a '*' value the reference never takes)
  gets none.
  """
  explicit = spec is not None
  spec = DEFAULT_REFERENCE if spec is None else spec.strip()
  if spec.lower() in NO_REFERENCE:
    return {}, "no reference (--reference=none)"
  if not settings:
    return {}, "no settings"
  swept = [f for f, _ in settings[0].fields]
  pairs, same = [], []
  for part in (p.strip() for p in spec.split(";")):
    field, has_eq, raw = part.partition("=")
    field = field.strip().removeprefix("config.")
    if not part or not has_eq or not field:
      raise SweepError(f"--reference={spec!r}: {part!r} is not field=value (e.g. "
                       f"--reference='{DEFAULT_REFERENCE}')")
    if raw.strip() == "*":
      if field not in swept:
        raise SweepError(f"--reference {field}=*: '*' (the row's own value) needs a swept "
                         f"field; swept: {', '.join(swept) or 'none'}")
      same.append(field)
    else:
      pairs.append((field, _typed(field, raw.strip(), settings[0].config, "--reference ")))
  matches = [s for s in settings
             if all(config_path.get_value(f, s.config) == v for f, v in pairs)]
  strata: dict[tuple, list[Setting]] = {}
  for m in matches:
    strata.setdefault(tuple(m.values[f] for f in same), []).append(m)
  if matches and all(len(v) == 1 for v in strata.values()):   # without '*': one stratum
    refs = {s.name: strata[key][0] for s in settings
            if (key := tuple(s.values[f] for f in same)) in strata}
    where = f" at each row's {', '.join(same)}" if same else ""
    return refs, f"reference: {', '.join(m.name for m in matches)}{where}"
  why = (f"--reference={spec!r} matches {len(matches)} settings"
         + (f" ({', '.join(m.name for m in matches)}); add fields (';'-separated, 'field=*' for "
            "the row's own value) to pick one" if matches
            else f" (settings: {', '.join(s.name for s in settings)})"))
  if explicit:
    raise SweepError(why)
  return {}, why + "; no delta_ci"


def _correct_per_seed(workdir: paths.PathLike, s: Setting) -> dict[int, dict]:
  """{seed: {task: bool [n_test]}} of the setting's finished runs that wrote test_correct.npz."""
  from mmap_jax.train import correctness  # Deferred: reading files needs no JAX compile.
  out = {}
  for r in s.runs:
    if is_finished(paths.as_path(workdir) / r.name):
      c = correctness.read_correct(paths.as_path(workdir) / r.name)
      if c is not None:
        out[r.seed] = c
  return out


def add_delta_ci(summary: dict, settings: Sequence[Setting], workdir: paths.PathLike,
                 reference: Optional[str]) -> None:
  """Every row gets `delta_ci` ({"mean", "low", "high", "excludes_zero", "seeds", ...} from
  `stats.paired_delta_ci`, fractions) against its reference row (`resolve_references`), or
  None with `delta_ci_note`; a reference row gets `reference: true`, and with one reference per
  '*' value a row names its own in `reference_setting`. summary["reference"] records the
  setting ("settings" when there are several), the spec and the bootstrap's parameters."""
  from mmap_jax.apps import stats
  refs, note = resolve_references(settings, reference)
  distinct = list({r.name: r for r in refs.values()}.values())
  summary["reference"] = {"spec": DEFAULT_REFERENCE if reference is None else reference,
                          "setting": distinct[0].values if len(distinct) == 1 else None,
                          "note": note, "bootstrap": dict(BOOTSTRAP), "definition": DELTA_NOTE}
  if len(distinct) > 1:
    summary["reference"]["settings"] = [r.values for r in distinct]
  by_values = {tuple(sorted(s.values.items())): s for s in settings}
  ref_correct = {r.name: _correct_per_seed(workdir, r) for r in distinct}
  for row in summary["rows"]:
    s = by_values[tuple(sorted(row["setting"].items()))]
    row["delta_ci"] = None
    ref = refs.get(s.name)
    if ref is None:
      if refs:
        row["delta_ci_note"] = "no reference setting for this row's values"
      continue
    if s is ref:
      row["reference"] = True
      continue
    if len(distinct) > 1:
      row["reference_setting"] = ref.values
    mine, theirs = _correct_per_seed(workdir, s), ref_correct[ref.name]
    seeds = [k for k in mine if k in theirs]
    if not seeds:
      row["delta_ci_note"] = ("no seed where both this setting and the reference wrote "
                              "test_correct.npz")
      continue
    try:
      ci = stats.paired_delta_ci([mine[k] for k in seeds], [theirs[k] for k in seeds],
                                 **BOOTSTRAP)
    except ValueError as e:  # e.g. runs over other test images: no pairing
      row["delta_ci_note"] = f"not paired with the reference: {e}"
      continue
    row["delta_ci"] = ci | {"seeds": seeds}


def accuracy_csv(summary: Mapping[str, Any], fields: Sequence[str]) -> str:
  """One line per (setting, seed, task): the test accuracy (fraction) and, where the run has
  one, the validation accuracy; the swept fields as columns."""
  import csv
  import io
  buf = io.StringIO()
  w = csv.writer(buf, lineterminator="\n")
  w.writerow(["setting", *fields, "seed", "task", "test_accuracy", "val_accuracy"])
  for row in summary["rows"]:
    name = setting_name(tuple((k, row["setting"][k]) for k in fields))
    values = [format_value(row["setting"][k]) for k in fields]
    for i, seed in enumerate(row["seeds"]):
      for t, stat in row["accuracy"].items():
        val = row.get("val_accuracy", {}).get(t)
        w.writerow([name, *values, seed, t, repr(stat["per_seed"][i]),
                    "" if val is None else repr(val["per_seed"][i])])
  return buf.getvalue()


def trained_cost(root: paths.PathLike) -> dict:
  """The compute a tree of sweeps took: per top-level directory under `root` (e.g. an evidence
  piece: a sweep, `<piece>/<setting>/seed=<s>`, or launch.tune's sweeps, one level deeper), the
  runs trained there (finished, results.json with `cost`; a --reuse copy counts as reused, not
  trained) and the sum of their wall seconds; then the totals. (epath globs no '**' on GCS.)"""
  root = paths.as_path(root)
  parts: dict[str, dict] = {}
  found = [*root.glob(f"*/*/seed=*/{RESULTS_FILE}"), *root.glob(f"*/*/*/seed=*/{RESULTS_FILE}")]
  for res in sorted(found):
    part = parts.setdefault(res.relative_to(root).parts[0],
                            {"trained": 0, "reused": 0, "wall_seconds": 0.0})
    if (res.parent / REUSED_FILE).is_file():
      part["reused"] += 1
      continue
    cost = json.loads(res.read_text()).get("cost")
    if cost:
      part["trained"] += 1
      part["wall_seconds"] += float(cost["wall_seconds"])
  total = {k: sum(p[k] for p in parts.values()) for k in ("trained", "reused", "wall_seconds")}
  for part in (*parts.values(), total):
    part["wall_seconds"] = round(part["wall_seconds"], 2)
  return {"parts": parts, "total": total | {"hours": round(total["wall_seconds"] / 3600, 2)}}


def cost_summary(costs: Sequence[Mapping[str, Any]]) -> dict:
  """A row's training cost over its seeds: optimizer steps on the final params, the grouping
  warm-up's steps (and whether they count against the budget), wall seconds (mean, std, hosts)."""
  wall = [float(c["wall_seconds"]) for c in costs]
  return {"steps": int(costs[0]["steps"]),
          "grouping_warmup_steps": int(costs[0]["grouping_warmup_steps"]),
          "grouping_counted_in_budget": bool(costs[0]["grouping_counted_in_budget"]),
          "wall_seconds": {"mean": float(np.mean(wall)),
                           "std": float(np.std(wall, ddof=1)) if len(wall) > 1 else None},
          "wall_seconds_per_seed": wall, "hosts": sorted({str(c["host"]) for c in costs})}


def _cost_cell(row: Mapping[str, Any]) -> str:
  """'400 + 50 warm-up steps, 812 ± 9 s' ('(in budget)' when the warm-up counts against it)."""
  c = row.get("cost")
  if not c:
    return "-"
  steps = f"{c['steps']:,}"
  if c["grouping_warmup_steps"]:
    steps += (f" + {c['grouping_warmup_steps']} warm-up" +
              (" (in budget)" if c["grouping_counted_in_budget"] else ""))
  w = c["wall_seconds"]
  wall = f"{w['mean']:.0f}" + ("" if w["std"] is None else f" ± {w['std']:.0f}")
  return f"{steps} steps, {wall} s"


def format_stat(stat: Mapping[str, Any]) -> str:
  """A fraction stat as a % cell: '48.90 ± 1.20', or '48.90' for one seed."""
  cell = f"{100 * stat['mean']:.2f}"
  return cell if stat["std"] is None else f"{cell} ± {100 * stat['std']:.2f}"


def _params_cell(row: Mapping[str, Any]) -> str:
  lo, hi = min(row["trainable_params_per_seed"]), max(row["trainable_params_per_seed"])
  return f"{lo:,}" if lo == hi else f"{lo:,}-{hi:,}"


def markdown_table(summary: Mapping[str, Any], fields: Sequence[str]) -> str:
  """Paper-style: one row per setting; swept fields, seeds, task accuracies (%), average,
  validation average (when the runs have one), the paired difference to the reference (when
  any row has one), params; then a footnote saying what ± and delta_ci are."""
  from mmap_jax.apps import stats
  tasks = list(summary["tasks"])
  keys = list(fields) or ["setting"]
  with_val = any("val_average" in row for row in summary["rows"])
  with_delta = any(row.get("delta_ci") for row in summary["rows"])
  head = keys + ["seeds"] + [f"{t} ({summary['tasks'][t]['num_classes']})" for t in tasks]
  head += ["average"] + (["val average"] if with_val else [])
  if with_delta:
    head.append(f"delta_ci vs {summary['reference']['spec']}")
  head += ["trainable params", "trainable (%)"]
  with_cost = any("cost" in row for row in summary["rows"])
  head += ["training cost"] if with_cost else []
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(keys) + "---:|" * (len(head) - len(keys))]
  total = len(summary["seeds"])
  for row in summary["rows"]:
    cells = [format_value(row["setting"][k]) for k in fields] or ["default"]
    n = row["n_seeds"]
    cells.append(str(n) if n == total else f"{n} of {total}")
    cells += [format_stat(row["accuracy"][t]) if t in row["accuracy"] else "-" for t in tasks]
    cells.append(f"**{format_stat(row['average'])}**")
    if with_val:
      cells.append(format_stat(row["val_average"]) if "val_average" in row else "-")
    if with_delta:
      cells.append("reference" if row.get("reference") else stats.format_ci(row.get("delta_ci")))
    cells += [_params_cell(row), f"{row['trainable_percent']:.4g}"]
    cells += [_cost_cell(row)] if with_cost else []
    lines.append("| " + " | ".join(cells) + " |")
  seeds = ", ".join(map(str, summary["seeds"]))
  note = (f"Test accuracy (%): mean ± sample std (ddof=1) over each row's seeds (n in the seeds "
          f"column; seeds {seeds}); a row with one seed shows its value.")
  if with_val:
    note += (" val average: the same over the validation split, never mixed with test "
             "numbers ('-' where a run has none).")
  if with_cost:
    note += (" training cost: optimizer steps on the final parameters (+ the grouping warm-up's "
             "steps; '(in budget)': counted in them), wall seconds on the host (mean ± std).")
  if with_delta:
    note += f" {DELTA_NOTE} (in points)."
    if summary["reference"].get("settings"):
      note += (" 'field=*' in the reference: each row against the reference setting with the "
               "row's own value of that field.")
  return "\n".join(lines + ["", note])


def write_outputs(settings: Sequence[Setting], workdir: str, *,
                  log: Callable[[str], None] = print, reference: Optional[str] = None) -> dict:
  """results.json, results.md, accuracies.csv, the plots and the affinity copies; prints the
  table."""
  import jax
  summary = collect(settings, workdir, reference)
  fields = [f for f, _ in settings[0].fields] if settings else []
  table = markdown_table(summary, fields)
  if jax.process_index() == 0:
    workdir = paths.as_path(workdir)
    paths.write_text_atomic(workdir / RESULTS_FILE, json.dumps(summary, indent=2))
    paths.write_text_atomic(workdir / TABLE_FILE, table + "\n")
    paths.write_text_atomic(workdir / CSV_FILE, accuracy_csv(summary, fields))
    label = lambda row: next(s.label for s in settings if s.values == row["setting"])
    plot_accuracy_vs_params(
        workdir / PLOT_FILE,
        [(label(r), r["trainable_percent"], r["average"]["mean"], r["average"]["std"])
         for r in summary["rows"]])
    if SHOTS_FIELD in fields:
      plot_accuracy_vs_shots(workdir / SHOTS_PLOT_FILE, shots_curves(settings, summary["rows"]))
    copy_affinity_plots(settings, workdir)
    log(table)
    if summary["missing"]:
      log(f"sweep: not finished: {', '.join(summary['missing'])}")
  return summary


def copy_affinity_plots(settings: Sequence[Setting], workdir: paths.PathLike) -> list[str]:
  """`<setting>/seed=<s>/affinity.png` -> `affinity_<setting>__seed=<s>.png`, next to the table
  (grouping draws its own batches, so seeds can group differently)."""
  out, workdir = [], paths.as_path(workdir)
  for s in settings:
    for r in s.runs:
      src = workdir / r.name / AFFINITY_PLOT
      if src.is_file():
        dst = workdir / f"affinity_{s.name}__{seed_dir(r.seed)}.png"
        paths.write_bytes_atomic(dst, src.read_bytes())
        out.append(os.fspath(dst))
  return out


Curve = dict[int, tuple[float, Optional[float]]]   # shots (0 = all) -> (mean accuracy, std)


def shots_curves(settings: Sequence[Setting], rows: Sequence[dict]) -> dict[str, Curve]:
  """{line label: {shots: (mean, std)}} of a sweep over `data.shots`: one line per combination
  of the other swept fields (e.g. per method), its points the rows at each shots value."""
  curves: dict[str, Curve] = {}
  for row in rows:
    setting = next(s for s in settings if s.values == row["setting"])
    label = ", ".join(format_value(v) for f, v in setting.fields if f != SHOTS_FIELD) or "default"
    shots = int(setting.values[SHOTS_FIELD])
    curves.setdefault(label, {})[shots] = (row["average"]["mean"], row["average"]["std"])
  return curves


def plot_accuracy_vs_shots(path: paths.PathLike, curves: Mapping[str, Curve]):
  """The few-shot curve: x = train images per class (the swept `data.shots`, evenly spaced, 'all'
  last), y = average test accuracy (%), one line per method with ± std error bars over seeds."""
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.4, 4.4), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  ticks = sorted({k for c in curves.values() for k in c}, key=lambda k: (k == 0, k))
  pos = {k: i for i, k in enumerate(ticks)}
  for label, curve in curves.items():
    ks = sorted(curve, key=lambda k: (k == 0, k))
    ax.errorbar([pos[k] for k in ks], [100 * curve[k][0] for k in ks],
                yerr=[100 * (curve[k][1] or 0.0) for k in ks], marker="o", markersize=4,
                capsize=3, label=label)
  ax.set_xticks(range(len(ticks)), ["all" if k == 0 else str(k) for k in ticks])
  ax.set_xlabel("train images per class (data.shots)")
  ax.set_ylabel("average accuracy (%), mean ± std over seeds")
  ax.set_title("Accuracy vs shots")
  ax.grid(True, alpha=0.3)
  if curves:
    ax.legend(fontsize=8)
  fig.tight_layout()
  paths.save_figure(path, fig)
  return fig


Point = tuple[str, float, float, Optional[float]]  # label, trainable %, mean accuracy, its std


def plot_accuracy_vs_params(path: paths.PathLike, points: Iterable[Point]):
  """The paper's Figure 1: x = trainable params (% of CLIP, log), y = average accuracy (%),
  with ± std error bars over seeds (none for a single seed); returns the matplotlib Figure.

  Settings without trainable parameters (zero-shot) cannot sit on a log axis: they are drawn as
  a labelled horizontal dashed line instead, with a shaded ± std band.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.4, 4.4), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  points = [(lbl, x, 100 * y, 100 * (err or 0.0)) for lbl, x, y, err in points]
  pos = [p for p in points if p[1] > 0]
  for lbl, x, y, err in pos:
    ax.errorbar([x], [y], yerr=[err], fmt="o", markersize=6, capsize=4, zorder=3)
    ax.annotate(lbl, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
  ax.set_xscale("log")
  if pos:
    lo, hi = min(x for _, x, _, _ in pos), max(x for _, x, _, _ in pos)
    ax.set_xlim(lo / 3, hi * 3)
  else:
    ax.set_xlim(1e-3, 10)
  for lbl, x, y, err in points:
    if x <= 0:
      ax.axhline(y, linestyle="--", color="gray", linewidth=1)
      if err:
        ax.axhspan(y - err, y + err, color="gray", alpha=0.15, linewidth=0)
      ax.annotate(f"{lbl} (0 params)", (0.01, y), xycoords=("axes fraction", "data"),
                  textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray")
  if points:
    lo, hi = min(y - e for _, _, y, e in points), max(y + e for _, _, y, e in points)
    pad = max(2.0, 0.1 * (hi - lo))
    ax.set_ylim(lo - pad, hi + pad)
  ax.set_xlabel("trainable parameters (% of CLIP, log scale)")
  ax.set_ylabel("average accuracy (%), mean ± std over seeds")
  ax.set_title("Accuracy vs trainable parameters")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  paths.save_figure(path, fig)
  return fig
