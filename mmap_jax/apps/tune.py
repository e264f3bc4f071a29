"""The tuning protocol: every method's learning rate chosen on VALIDATION, over 2 tuning seeds,
on a grid extended until its best value is interior; the final table then runs other seeds.

Per method (default: every family's MT form and MmAP-ST, `DEFAULT_METHODS`; the ST forms are
tuned on their own, never inheriting an MT form's value), one `field` (default `optim.lr`):

  1. grid: the given values, or the method's resolved value (published recipe, then the config's
     `optim_per_family`) times `factors` (default `FACTORS`: 1/4 .. 4, geometric);
  2. every (value, tuning seed) is a `launch.sweep` run in `<workdir>/<method>/<field>=<v>/
     seed=<s>` (finished runs are skipped, so a killed tuning resumes, and a finished one only
     re-tabulates); the score of a value is its mean over the tuning seeds of `val_average`
     (mean validation accuracy over tasks of the state train.select chose); a value some seed
     of which failed (diverged) scores -inf;
  3. best = the highest score (ties: the smaller value). At the grid's lowest or highest value,
     the grid is extended one step beyond that edge (the edge's ratio to its neighbour) and
     step 2 runs again, at most `max_extensions` times per side; each extension is recorded.

Selection needs a choice: every run must validate at least `MIN_EVALS` times (train.steps /
train.eval_every, the last step always included), checked before anything runs.

Outputs in the workdir: `tuning.json` ({"field", "tuning_seeds", "methods": {method: {"grid",
"scores": {value: {"mean", "per_seed"}}, "best", "interior", "extensions": [...], "capped"}}}),
`tuning.md` (the table with the grids), and `tuned.json` ({"tuning_seeds", "field",
"values": {method: best}}), which `launch.sweep --tuned=<workdir>/tuned.json` applies per
method; the sweep then refuses seeds that were tuning seeds.
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any, Callable, Mapping, Optional, Sequence

from mmap_jax import paths
from mmap_jax.apps import sweep

DEFAULT_METHODS = ("coop_mt", "vpt_mt", "maple_mt", "ivlp_mt", "mmap_mt", "clipadapter_mt",
                   "bitfit_mt", "lora_mt", "fullft_mt", "mmap_st")
DEFAULT_FIELD = "optim.lr"
DEFAULT_TUNING_SEEDS = (100, 101)
FACTORS = (0.25, 0.5, 1.0, 2.0, 4.0)
MIN_EVALS = 5
TUNING_JSON, TUNING_MD, TUNED_JSON = "tuning.json", "tuning.md", "tuned.json"


class TuneError(sweep.SweepError):
  """A tuning plan or config the protocol cannot use; the message names the flag or field."""


@dataclasses.dataclass
class MethodTuning:
  """One method's search: its grid (sorted), the scores so far and the extensions made."""
  method: str
  grid: list[float]
  extensions: list[dict] = dataclasses.field(default_factory=list)
  scores: dict[float, dict] = dataclasses.field(default_factory=dict)

  def best(self) -> Optional[float]:
    scored = [(s["mean"], -v, v) for v, s in self.scores.items() if v in self.grid]
    return max(scored)[2] if scored else None

  def to_json(self, max_extensions: int) -> dict:
    best = self.best()
    at_edge = best is not None and best in (self.grid[0], self.grid[-1])
    side = None if not at_edge else ("low" if best == self.grid[0] else "high")
    used = sum(1 for e in self.extensions if e["side"] == side)
    return {"grid": list(self.grid),
            "scores": {repr(v): self.scores[v] for v in self.grid if v in self.scores},
            "best": best, "interior": bool(best is not None and not at_edge),
            "extensions": list(self.extensions),
            "capped": bool(at_edge and used >= max_extensions)}


def parse_plan(raw: Optional[str]) -> dict[str, Optional[list[float]]]:
  """'coop_mt=0.01,0.1;mmap_st' -> {"coop_mt": [0.01, 0.1], "mmap_st": None (default grid)};
  None / '' -> every DEFAULT_METHODS method with its default grid. Errors name --plan."""
  if not raw or not raw.strip():
    return {m: None for m in DEFAULT_METHODS}
  plan: dict[str, Optional[list[float]]] = {}
  for part in (p.strip() for p in raw.split(";")):
    if not part:
      continue
    method, has_eq, values = part.partition("=")
    method = method.strip()
    if method in plan:
      raise TuneError(f"--plan: method {method} is given twice")
    if not has_eq:
      plan[method] = None
      continue
    try:
      grid = sorted({float(v) for v in values.split(",") if v.strip()})
    except ValueError:
      raise TuneError(f"--plan: {part!r}: values must be numbers") from None
    if len(grid) < 2 or any(v <= 0 for v in grid):
      raise TuneError(f"--plan: {part!r}: give at least 2 distinct positive values (the grid "
                      "is extended geometrically beyond its edges)")
    plan[method] = grid
  return plan


def default_grid(config, factors: Sequence[float] = FACTORS) -> list[float]:
  """The method's resolved lr (recipe, then optim_per_family, then optim) times `factors`."""
  from mmap_jax.train import setup
  centre = float(setup.recipe(config).recipe.lr)
  return [float(f"{centre * f:.6g}") for f in sorted(factors)]


def _extend(grid: list[float], side: str) -> float:
  """One geometric step beyond an edge: the edge's ratio to its neighbour."""
  if side == "low":
    return float(f"{grid[0] * grid[0] / grid[1]:.6g}")
  return float(f"{grid[-1] * grid[-1] / grid[-2]:.6g}")


def check_eval_cadence(config, where: str) -> None:
  """At least MIN_EVALS validations per run, so best_val selection has a choice."""
  steps, every = int(config.train.steps), int(config.train.eval_every)
  evals = len(set(range(every, steps + 1, every)) | {steps}) if steps > 0 else 0
  if evals < MIN_EVALS:
    raise TuneError(f"{where}: train.steps={steps} with train.eval_every={every} validates "
                    f"{evals} times; tuning needs >= {MIN_EVALS} (set train.eval_every <= "
                    f"{max(steps // MIN_EVALS, 1)})")


def _settings(config_ref: str, overrides: Mapping[str, Any], method: str, field: str,
              grid: Sequence[float], seeds: Sequence[int]) -> list[sweep.Setting]:
  spec = f"method={method};{field}={','.join(sweep.format_value(v) for v in grid)}"
  return sweep.make_settings(config_ref, spec, overrides, seeds=seeds)


def _scores(settings: Sequence[sweep.Setting], workdir, field: str,
            seeds: Sequence[int]) -> dict[float, dict]:
  """{value: {"mean", "per_seed", "seeds"}} from the finished runs' val_average; -inf when a
  tuning seed has no result (it failed) or a run reports no validation accuracy."""
  summary = sweep.collect(settings, workdir, reference="none")
  out = {}
  for s in settings:
    value = float(s.values[field])
    row = next((r for r in summary["rows"] if r["setting"] == s.values), None)
    if row is None or sorted(row["seeds"]) != sorted(seeds) or "val_average" not in row:
      out[value] = {"mean": -math.inf, "per_seed": None,
                    "note": "a tuning seed failed or reports no validation accuracy"}
    else:
      out[value] = {"mean": row["val_average"]["mean"],
                    "per_seed": row["val_average"]["per_seed"]}
  return out


def tune(config_ref: str, workdir: str, *, plan: Mapping[str, Optional[list[float]]],
         overrides: Optional[Mapping[str, Any]] = None, field: str = DEFAULT_FIELD,
         tuning_seeds: Sequence[int] = DEFAULT_TUNING_SEEDS, max_extensions: int = 3,
         factors: Sequence[float] = FACTORS, run_fn: Optional[sweep.RunFn] = None,
         log: Callable[[str], None] = print) -> dict:
  """Runs the protocol (module docstring) for every method of `plan`; returns tuning.json's
  dict and writes tuning.json, tuning.md and tuned.json into `workdir`."""
  overrides = dict(overrides or {})
  if field in overrides:
    raise TuneError(f"--config.{field} is set: it is the tuned field; leave it out")
  if len(set(tuning_seeds)) < 2:
    raise TuneError(f"--tune_seeds={list(tuning_seeds)}: the protocol averages over at least "
                    "2 tuning seeds")
  if max_extensions < 0:
    raise TuneError(f"--max_extensions={max_extensions} must be >= 0")
  if len(set(factors)) < 2 or any(f <= 0 for f in factors):
    raise TuneError(f"--factors={list(factors)}: give at least 2 distinct positive factors")
  workdir = paths.as_path(workdir)
  searches = []
  for method, grid in plan.items():  # everything is validated before the first run
    # The default grid is centred on the method's own resolved value: built without the field.
    untuned = sweep.make_settings(config_ref, f"method={method}", overrides, seeds=tuning_seeds)
    grid = list(grid or default_grid(untuned[0].config, factors))
    first = _settings(config_ref, overrides, method, field, grid, tuning_seeds)
    check_eval_cadence(first[0].config, f"method {method}")
    searches.append(MethodTuning(method, grid))
  if run_fn is None:
    from mmap_jax.train import cadence, loop
    run_fn = _tolerate_divergence(loop.train_and_evaluate, cadence.NonFiniteError)
  out = {"field": field, "tuning_seeds": list(tuning_seeds), "max_extensions": max_extensions,
         "default_grid_factors": sorted(float(f) for f in factors),
         "min_evals": MIN_EVALS, "selection": "val_average mean over the tuning seeds",
         "methods": {}}
  for search in searches:
    while True:
      settings = _settings(config_ref, overrides, search.method, field, search.grid,
                           tuning_seeds)
      sub = workdir / search.method
      log(f"tune: {search.method}: {field} grid {search.grid}, seeds {list(tuning_seeds)}")
      result = sweep.run(settings, str(sub), run_fn=run_fn, log=log, reference="none")
      if result.get("preempted"):
        return {**out, "preempted": f"{search.method}/{result['preempted']}",
                "exit_code": result.get("exit_code")}
      search.scores.update(_scores(settings, sub, field, tuning_seeds))
      best = search.best()
      side = "low" if best == search.grid[0] else "high" if best == search.grid[-1] else None
      used = sum(1 for e in search.extensions if e["side"] == side)
      if side is None or used >= max_extensions or search.scores[best]["mean"] == -math.inf:
        break
      value = _extend(search.grid, side)
      search.extensions.append({"side": side, "value": value, "because": best})
      search.grid = sorted(search.grid + [value])
      log(f"tune: {search.method}: best {field}={best} is at the {side} edge; extending to "
          f"{value}")
    out["methods"][search.method] = search.to_json(max_extensions)
  write_outputs(out, workdir)
  log(tuning_table(out))
  return out


def _tolerate_divergence(run_fn, error_type):
  """A run that diverges (NaN) is a result of its lr, not a failure of the tuning: it leaves no
  results.json and scores -inf (rerunning the tuning retries it)."""
  def wrapped(config, workdir):
    try:
      return run_fn(config, workdir)
    except error_type as e:
      print(f"tune: {workdir} diverged: {e}", flush=True)
      return {"diverged": True}
  return wrapped


def tuning_table(out: Mapping[str, Any]) -> str:
  """Markdown: one row per method; the grid with each value's validation score, the choice."""
  lines = [f"| method | {out['field']} grid: val average (%) over seeds "
           f"{', '.join(map(str, out['tuning_seeds']))} | best | interior | extensions |",
           "|---|---|---:|---|---|"]
  for method, m in out["methods"].items():
    cells = []
    for v in m["grid"]:
      s = m["scores"].get(repr(v))
      score = "-" if s is None or s["mean"] == -math.inf else f"{100 * s['mean']:.2f}"
      cell = f"{sweep.format_value(v)}: {score}"
      cells.append(f"**{cell}**" if v == m["best"] else cell)
    ext = ", ".join(f"{e['side']} {sweep.format_value(e['value'])}" for e in m["extensions"])
    interior = "yes" if m["interior"] else ("no (capped)" if m["capped"] else "no")
    lines.append(f"| {method} | {'; '.join(cells)} | {sweep.format_value(m['best'])} | "
                 f"{interior} | {ext or '-'} |")
  lines += ["", f"Selection: the highest mean validation accuracy (the selected state's, "
                f"train.select) over the tuning seeds; grids extended by one geometric step "
                f"past an edge best, at most {out['max_extensions']} times per side."]
  return "\n".join(lines)


def write_outputs(out: Mapping[str, Any], workdir) -> None:
  import jax
  if jax.process_index() != 0:
    return
  workdir = paths.as_path(workdir)
  workdir.mkdir(parents=True, exist_ok=True)
  clean = json.loads(json.dumps(out, default=str).replace("-Infinity", "null"))
  paths.write_text_atomic(workdir / TUNING_JSON, json.dumps(clean, indent=2))
  paths.write_text_atomic(workdir / TUNING_MD, tuning_table(out) + "\n")
  tuned = {"field": out["field"], "tuning_seeds": out["tuning_seeds"],
           "values": {m: r["best"] for m, r in out["methods"].items()}}
  paths.write_text_atomic(workdir / TUNED_JSON, json.dumps(tuned, indent=2))


def load_tuned(path: str) -> dict:
  """tuned.json as written by `tune` (checked), for `launch.sweep --tuned`. Several files,
  comma-separated, merge: a later file's value of a method wins (e.g. values tuned under
  `prompt.budget=equal` over the published-budget ones), the tuning seeds are all the files'
  (the sweep must avoid each), and every file must tune the same field."""
  merged: Optional[dict] = None
  for one in [p.strip() for p in path.split(",") if p.strip()]:
    p = paths.as_path(one)
    if not p.is_file():
      raise sweep.SweepError(f"--tuned={one}: no such file (run launch.tune first)")
    tuned = json.loads(p.read_text())
    if not {"field", "tuning_seeds", "values"} <= set(tuned):
      raise sweep.SweepError(f"--tuned={one}: not a tuned.json (needs field, tuning_seeds, "
                             "values)")
    if merged is None:
      merged = tuned
    elif tuned["field"] != merged["field"]:
      raise sweep.SweepError(f"--tuned={one}: tunes {tuned['field']}, the files before it "
                             f"{merged['field']}; merged files must tune the same field")
    else:
      seeds = list(dict.fromkeys([*merged["tuning_seeds"], *tuned["tuning_seeds"]]))
      merged = {**merged, "tuning_seeds": seeds,
                "values": {**merged["values"], **tuned["values"]}}
  if merged is None:
    raise sweep.SweepError("--tuned: no file given")
  return merged
