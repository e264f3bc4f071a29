"""Method comparisons and hyper-parameter grids: one sub-workdir per setting, one table for all.

A sweep is a base config (`configs/demo.py:clip=/x,runlocal` plus `--config.*` overrides) and a
grid `method=coop_mt,mmap_mt;optim.lr=0.01,0.02` (fields separated by ';', values by ','; the
settings are the cartesian product, first field outermost). Every setting runs into
`<workdir>/<name>` (e.g. `method=mmap_mt__optim.lr=0.02`) and counts as finished once that
directory holds `results.json`, which `train_and_evaluate` writes last; an unfinished setting is
simply run again and resumes from its own checkpoints, so a killed sweep resumes too.

`method` is special: config files compute prompt defaults from it in `get_config(arg)` (the demo
sets prompt.depth per method family), so when the config file takes a `method=` argument a swept
method rebuilds the config from `file.py:method=X,<the other args>`; every other swept field, and
`method` for files without that argument, is set like a `--config.field=value` override, after the
user's own overrides. Values are parsed with the type of the existing config field and every
setting is validated before anything runs, so a typo fails in seconds, naming the field.

Settings run one after another in this process (`run`): `train_and_evaluate` builds its own jitted
functions, checkpointer, TensorBoard writer and SIGTERM handler per call and releases them in a
`finally`, so nothing leaks from one setting into the next, and the frozen CLIP is loaded again per
setting (cheap next to training). On a pod every host runs the same sweep, as with launch.train.
To spread the settings over several slices instead, `commands` gives one `launch.train` command
per setting; a later plain sweep over the same workdir finds them finished and only tabulates.

Outputs in the sweep workdir (process 0): `results.json` ({"tasks": {task: {"num_classes"}},
"rows": [{"setting", "accuracy", "average", "trainable_params", "trainable_percent",
"workdir"}]}, accuracies as fractions), `results.md` (the paper-style table: rows = settings,
columns = swept fields, tasks, average, trainable params), `accuracy_vs_params.png` (the paper's
Figure 1 shape) and `affinity_<setting>.png` for each setting whose grouping drew a heatmap.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import itertools
import json
import os
import re
import shlex
import shutil
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

import ml_collections as mlc
from ml_collections.config_flags import config_path

RESULTS_FILE = "results.json"
TABLE_FILE = "results.md"
PLOT_FILE = "accuracy_vs_params.png"
AFFINITY_PLOT = "affinity.png"   # what a grouping run draws into its own workdir
_MAX_NAME = 120                  # sub-workdir names longer than this are shortened + hashed


class SweepError(ValueError):
  """A --sweep spec, swept value or override the sweep cannot use; the message names the field."""


# ----------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Setting:
  """One point of the grid and how to build its config."""
  fields: tuple[tuple[str, Any], ...]     # the swept (field, value) pairs, in --sweep order
  config_ref: str                         # "file.py[:args]" that get_config builds from
  overrides: tuple[tuple[str, Any], ...]  # set on top, in order: the user's, then swept fields
  config: mlc.ConfigDict = dataclasses.field(compare=False, repr=False)

  @property
  def name(self) -> str:
    return setting_name(self.fields)

  @property
  def values(self) -> dict[str, Any]:
    return dict(self.fields)

  @property
  def label(self) -> str:
    """Short row / point label: just the values ("mmap_mt", "mmap_mt, 0.02")."""
    return ", ".join(format_value(v) for _, v in self.fields) or "default"

  def command(self, workdir: str) -> str:
    """The `launch.train` command that runs this setting, runnable as is in the repo root."""
    args = ["python", "-m", "launch.train", f"--config={self.config_ref}"]
    args += [f"--config.{k}={format_value(v)}" for k, v in self.overrides]
    args.append(f"--workdir={os.path.join(workdir, self.name)}")
    return " ".join(shlex.quote(a) for a in args)


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


def make_settings(config_ref: str, sweep: Optional[str],
                  overrides: Optional[Mapping[str, Any]] = None) -> list[Setting]:
  """Every setting of the grid, each with its config built, typed and validated.

  `config_ref` is what --config got ("configs/demo.py:clip=/x,runlocal"); `overrides` are the
  --config.* values (typed, or strings parsed with the field's type), applied to every setting.
  Raises SweepError naming the field before anything has run.
  """
  path, arg = split_config_ref(config_ref)
  module = _load_module(path)
  base = _get_config(module, path, arg)
  overrides = {k: _typed(k, v, base, "--config.") for k, v in (overrides or {}).items()}
  axes = [(f, [_typed(f, raw, base, "--sweep ") for raw in values])
          for f, values in parse_sweep(sweep)]
  method_by_arg = any(f == "method" for f, _ in axes) and _accepts_method(module, path, arg, base)
  settings, errors = [], []
  for combo in itertools.product(*(values for _, values in axes)):
    fields = tuple(zip((f for f, _ in axes), combo))
    swept = dict(fields)
    ref, arg_i = config_ref, arg
    if method_by_arg:
      arg_i = with_arg(arg, "method", swept.pop("method"))
      ref = f"{path}:{arg_i}"
    ov = {k: v for k, v in overrides.items() if k not in swept and
          not (method_by_arg and k == "method")} | swept
    config = _get_config(module, path, arg_i)
    _apply(config, ov)
    try:
      _validate(config)
    except ValueError as e:
      errors.append(f"setting {setting_name(fields)}: {e}")
    settings.append(Setting(fields=fields, config_ref=ref, overrides=tuple(ov.items()),
                            config=config))
  if errors:
    raise SweepError("\n".join(errors))
  names = [s.name for s in settings]
  if len(set(names)) != len(names):  # e.g. values differing only in characters a path cannot hold
    raise SweepError(f"--sweep: settings map to the same sub-workdir name: {names}")
  return settings


def split_config_ref(config_ref: str) -> tuple[str, Optional[str]]:
  """'configs/demo.py:a=1' -> ('configs/demo.py', 'a=1'), as ml_collections' config flag does."""
  path, has_arg, arg = config_ref.partition(":")
  return path, (arg if has_arg else None)


def with_arg(arg: Optional[str], key: str, value: Any) -> str:
  """The config argument string with `key=value` first and any earlier `key` removed."""
  kept = [a for a in (arg or "").split(",")
          if a.strip() and a.strip().partition("=")[0].strip() != key]
  return ",".join([f"{key}={format_value(value)}", *kept])


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


def parse_value(field: str, raw: str, kind: type) -> Any:
  """A command-line string as `kind` (the config field's type); the error names the field."""
  try:
    if kind is bool:
      if raw.lower() not in ("true", "false", "1", "0"):
        raise ValueError("expected true or false")
      return raw.lower() in ("true", "1")
    if kind is int:
      return int(raw)
    if kind is float:
      return float(raw)
    if kind is str:
      return raw
  except ValueError as e:
    raise SweepError(f"{field}={raw!r}: not a valid {kind.__name__} ({e})") from None
  raise SweepError(f"{field}: fields of type {getattr(kind, '__name__', kind)} cannot be swept "
                   "(only str, int, float and bool leaves)")


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
    return parse_value(field, value, kind)
  if kind is float and isinstance(value, int) and not isinstance(value, bool):
    return float(value)
  if not isinstance(value, kind):
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
  """The config file as a module (a path relative to the working directory, like --config)."""
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


def _accepts_method(module, path: str, arg: Optional[str], base: mlc.ConfigDict) -> bool:
  """Whether `get_config` takes a `method=` argument (probed with the base config's method)."""
  try:
    module.get_config(with_arg(arg, "method", base.method))
    return True
  except (TypeError, ValueError):
    return False


# ----------------------------------------------------------------------------- running


def is_finished(workdir: str) -> bool:
  """train_and_evaluate writes results.json last: its presence means the setting is done."""
  return os.path.isfile(os.path.join(workdir, RESULTS_FILE))


def commands(settings: Sequence[Setting], workdir: str) -> list[str]:
  """One launch.train line per setting; finished ones commented out, so `| bash` resumes."""
  done = lambda s: is_finished(os.path.join(workdir, s.name))
  return [("# finished: " if done(s) else "") + s.command(workdir) for s in settings]


RunFn = Callable[[mlc.ConfigDict, str], Any]


def run(settings: Sequence[Setting], workdir: str, *, run_fn: Optional[RunFn] = None,
        log: Callable[[str], None] = print) -> dict:
  """Runs every unfinished setting in turn, then writes and prints the table; returns its JSON.

  A setting that fails is reported and the others still run; a SweepError listing the failures
  is raised at the end (after the table of the finished ones is written). A preempted setting
  (SIGTERM) stops the sweep: the host is going away; the returned dict then names it under
  "preempted" (launch.sweep exits with the trainer's preemption status).
  """
  if run_fn is None:
    from mmap_jax.train import loop  # Deferred: --print_only needs no JAX.
    run_fn = loop.train_and_evaluate
  _validate_devices(settings)
  workdir = os.path.abspath(workdir)
  os.makedirs(workdir, exist_ok=True)
  todo = [s for s in settings if not is_finished(os.path.join(workdir, s.name))]
  log(f"sweep: {len(settings)} settings, {len(settings) - len(todo)} finished, "
      f"{len(todo)} to run, in {workdir}")
  failed, preempted = [], None
  for i, s in enumerate(todo, 1):
    sub = os.path.join(workdir, s.name)
    log(f"sweep: [{i}/{len(todo)}] running {s.name}")
    try:
      out = run_fn(s.config, sub)
    except Exception as e:  # pylint: disable=broad-except
      log(f"sweep: {s.name} failed: {type(e).__name__}: {e}")
      failed.append((s.name, e))
      continue
    if isinstance(out, dict) and out.get("preempted"):
      log(f"sweep: {s.name} was preempted; stopping (re-run the sweep to resume)")
      preempted = s.name
      break
  from mmap_jax import parallel  # Multi-process: process 0 has written every results.json.
  parallel.sync("mmap_jax:sweep_outputs")
  summary = write_outputs(settings, workdir, log=log)
  if failed:
    raise SweepError("settings failed: " + "; ".join(f"{n} ({type(e).__name__}: {e})"
                                                      for n, e in failed))
  return {**summary, "preempted": preempted} if preempted else summary


def _validate_devices(settings: Sequence[Setting]) -> None:
  """The per-device batch split of every setting, checked before the first one runs."""
  import jax
  from mmap_jax.train import setup
  errors = []
  for s in settings:
    try:
      setup.validate(s.config, jax.device_count())
    except ValueError as e:
      errors.append(f"setting {s.name}: {e}")
  if errors:
    raise SweepError("\n".join(errors))


# ----------------------------------------------------------------------------- outputs


def collect(settings: Sequence[Setting], workdir: str) -> dict:
  """The sweep's results.json dict from the finished settings' own results.json files."""
  tasks: dict[str, dict] = {}
  rows = []
  for s in settings:
    path = os.path.join(workdir, s.name, RESULTS_FILE)
    if not os.path.isfile(path):
      continue
    with open(path) as f:
      r = json.load(f)
    for t, info in r["tasks"].items():
      tasks.setdefault(t, {"num_classes": int(info["num_classes"])})
    rows.append({"setting": s.values,
                 "accuracy": {t: float(info["accuracy"]) for t, info in r["tasks"].items()},
                 "average": float(r["average"]),
                 "trainable_params": int(r["trainable_params"]),
                 "trainable_percent": float(r["trainable_percent"]),
                 "workdir": s.name})
  return {"tasks": tasks, "rows": rows}


def markdown_table(summary: Mapping[str, Any], fields: Sequence[str]) -> str:
  """Paper-style: one row per setting; swept fields, task accuracies (%), average, params."""
  tasks = list(summary["tasks"])
  keys = list(fields) or ["setting"]
  head = keys + [f"{t} ({summary['tasks'][t]['num_classes']})" for t in tasks]
  head += ["average", "trainable params", "trainable (%)"]
  lines = ["| " + " | ".join(head) + " |",
           "|" + "---|" * len(keys) + "---:|" * (len(head) - len(keys))]
  for row in summary["rows"]:
    cells = [format_value(row["setting"][k]) for k in fields] or ["default"]
    cells += [f"{100 * row['accuracy'][t]:.2f}" if t in row["accuracy"] else "-" for t in tasks]
    cells += [f"**{100 * row['average']:.2f}**", f"{row['trainable_params']:,}",
              f"{row['trainable_percent']:.4g}"]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def write_outputs(settings: Sequence[Setting], workdir: str, *,
                  log: Callable[[str], None] = print) -> dict:
  """results.json, results.md, the plots and the affinity copies; prints the table."""
  import jax
  summary = collect(settings, workdir)
  fields = [f for f, _ in settings[0].fields] if settings else []
  table = markdown_table(summary, fields)
  missing = [s.name for s in settings if not is_finished(os.path.join(workdir, s.name))]
  if jax.process_index() == 0:
    with open(os.path.join(workdir, RESULTS_FILE), "w") as f:
      json.dump(summary, f, indent=2)
    with open(os.path.join(workdir, TABLE_FILE), "w") as f:
      f.write(table + "\n")
    labels = {s.name: s.label for s in settings}
    plot_accuracy_vs_params(os.path.join(workdir, PLOT_FILE),
                            [(labels[r["workdir"]], r["trainable_percent"], r["average"])
                             for r in summary["rows"]])
    copy_affinity_plots(settings, workdir)
    log(table)
    if missing:
      log(f"sweep: not finished: {', '.join(missing)}")
  return summary


def copy_affinity_plots(settings: Sequence[Setting], workdir: str) -> list[str]:
  """`<setting>/affinity.png` -> `affinity_<setting>.png`, next to the table."""
  out = []
  for s in settings:
    src = os.path.join(workdir, s.name, AFFINITY_PLOT)
    if os.path.isfile(src):
      dst = os.path.join(workdir, f"affinity_{s.name}.png")
      shutil.copyfile(src, dst)
      out.append(dst)
  return out


def plot_accuracy_vs_params(path: str, points: Iterable[tuple[str, float, float]]) -> None:
  """The paper's Figure 1: x = trainable params (% of CLIP, log), y = average accuracy (%).

  Settings without trainable parameters (zero-shot) cannot sit on a log axis: they are drawn as
  a labelled horizontal dashed line instead.
  """
  from matplotlib.backends.backend_agg import FigureCanvasAgg
  from matplotlib.figure import Figure
  fig = Figure(figsize=(6.4, 4.4), dpi=110)
  FigureCanvasAgg(fig)
  ax = fig.add_subplot(1, 1, 1)
  points = list(points)
  pos = [(lbl, x, 100 * y) for lbl, x, y in points if x > 0]
  for lbl, x, y in pos:
    ax.scatter([x], [y], s=40, zorder=3)
    ax.annotate(lbl, (x, y), textcoords="offset points", xytext=(5, 5), fontsize=8)
  ax.set_xscale("log")
  if pos:
    lo, hi = min(x for _, x, _ in pos), max(x for _, x, _ in pos)
    ax.set_xlim(lo / 3, hi * 3)
  else:
    ax.set_xlim(1e-3, 10)
  for lbl, x, y in points:
    if x <= 0:
      ax.axhline(100 * y, linestyle="--", color="gray", linewidth=1)
      ax.annotate(f"{lbl} (0 params)", (0.01, 100 * y), xycoords=("axes fraction", "data"),
                  textcoords="offset points", xytext=(0, 3), fontsize=8, color="gray")
  ys = [100 * y for _, _, y in points]
  if ys:
    pad = max(2.0, 0.1 * (max(ys) - min(ys)))
    ax.set_ylim(min(ys) - pad, max(ys) + pad)
  ax.set_xlabel("trainable parameters (% of CLIP, log scale)")
  ax.set_ylabel("average accuracy (%)")
  ax.set_title("Accuracy vs trainable parameters")
  ax.grid(True, which="both", alpha=0.3)
  fig.tight_layout()
  fig.savefig(path, format="png")
