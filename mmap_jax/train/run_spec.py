"""A run resolved once: the frozen, typed description every stage below the entry points reads.

Why: a ConfigDict is loosely typed and lets defaults, per-family tables and overrides be applied
anywhere; resolving it in several places (prompt spec, recipe, grouping warm-up, data, cadence)
made each stage a re-interpretation that could drift. The entry points (`loop.train_and_evaluate`,
`loop.evaluate_workdir`, `loop.group_tasks`, `diagnostics.diagnose`) call `resolve` once: it
validates every field (`setup.validate`, all errors at once, before anything loads or compiles),
resolves the optimisation recipes and prompt specs, and returns a `RunSpec`. Below them nothing
reads a ConfigDict and nothing is resolved again; the ConfigDict itself is only recorded (as JSON,
in checkpoints and results), so a run can be re-evaluated from its workdir alone.
"""
from __future__ import annotations

import dataclasses
import json
from typing import Any, Optional

import ml_collections as mlc

from mmap_jax import parallel
from mmap_jax.data import preprocess
from mmap_jax.models.config import ClipConfig
from mmap_jax.prompts.spec import GROUPED_METHODS, PromptSpec
from mmap_jax.train import recipes, setup

WARMUP_METHOD = "mmap_shared"   # the grouping warm-up trains one MmAP shared by all tasks


@dataclasses.dataclass(frozen=True)
class DataSpec:
  """Which dataset and how it is split (`sources.build_tasks`' arguments)."""
  name: str
  root: Optional[str]
  data_dir: Optional[str]
  domains: Optional[tuple[str, ...]]
  split_seed: int
  train_fraction: float
  val_fraction: float
  val_per_class: int
  shots: int                     # train images per class (0: the whole train pool)
  split_files: Optional[str]
  skip_corrupt: bool
  allow_per_task_classes: bool
  demo: tuple[tuple[str, Any], ...] = ()   # demo_domains only: its world's generation fields

  def build_kwargs(self) -> dict[str, Any]:
    return dict(root=self.root, data_dir=self.data_dir,
                domains=list(self.domains) if self.domains else None,
                split_seed=self.split_seed, train_fraction=self.train_fraction,
                split_files=self.split_files, val_fraction=self.val_fraction,
                skip_corrupt=self.skip_corrupt, allow_per_task_classes=self.allow_per_task_classes,
                val_per_class=self.val_per_class, shots=self.shots, **dict(self.demo))


@dataclasses.dataclass(frozen=True)
class InputSpec:
  batch_size: int                # per task, global
  eval_batch_size: int
  workers: int
  augment: preprocess.AugmentConfig


@dataclasses.dataclass(frozen=True)
class TrainSpec:
  """The schedule and cadence: steps, logging / validation / checkpoint steps, selection."""
  steps: int
  log_every: int
  eval_every: int
  ckpt_every: int
  keep_checkpoints: int
  steps_per_call: int
  select: str
  accum_steps: int


@dataclasses.dataclass(frozen=True)
class GroupSpec:
  """How tasks are grouped; `active` when the method has task groups at all."""
  active: bool
  mode: str
  explicit: Optional[str]
  num_groups: Any                # int (0: by threshold) or "auto"
  threshold: float
  warmup_steps: int              # recorded warm-up steps (after the lr warm-up)
  every: int
  affinity: str
  towers: str
  affinity_params: str
  grad_ema: float
  init_from_warmup: bool
  seed: int                      # the run's seed (the warm-up's init and data order)
  random_seed: int               # groups.mode=random: groups.seed, or the run's seed
  warmup_prompt: Optional[PromptSpec]        # the warm-up's shared MmAP (mode gradient)
  warmup_recipe: Optional[recipes.Recipe]    # and its optimisation recipe

  @property
  def lr_warmup_steps(self) -> int:
    """The grouping warm-up's unrecorded lr warm-up: the warm-up recipe's `warmup_steps`."""
    return int(self.warmup_recipe.warmup_steps) if self.warmup_recipe is not None else 0

  @property
  def warmup_total_steps(self) -> int:
    """Optimizer steps of the grouping warm-up (lr warm-up + recorded steps); 0 without one."""
    if not self.active or self.mode != "gradient":
      return 0
    return self.lr_warmup_steps + self.warmup_steps

  def settings(self, mode: Optional[str] = None) -> dict[str, Any]:
    """What determines a mode's partition (recorded in groups.json, compared on reuse)."""
    mode = mode or self.mode
    if mode == "gradient":
      out = {"mode": mode, "affinity_params": self.affinity_params,
             "grad_ema": float(self.grad_ema), "warmup_steps": self.warmup_steps,
             "every": self.every, "lr_warmup_steps": self.lr_warmup_steps,
             "num_groups": self.num_groups,
             "threshold": None if self.num_groups else float(self.threshold), "seed": self.seed,
             "affinity": self.affinity}
      out |= {"towers": self.towers} if self.affinity == "cosine" else {
          "affinity_params": None, "grad_ema": None}   # TAG reads neither
      return out
    if mode == "random":
      return {"mode": mode, "num_groups": int(self.num_groups), "seed": self.random_seed}
    if mode == "explicit":
      return {"mode": mode, "explicit": self.explicit}
    return {"mode": mode}


@dataclasses.dataclass(frozen=True)
class RunSpec:
  """One run, resolved: what `resolve` returns and every stage below the entry points reads."""
  method: str
  seed: int
  clip_path: str                 # a converted CLIP directory, or "demo"
  dtype: str                     # compute dtype name (setup.DTYPES)
  remat: bool
  prompt: PromptSpec             # fields checked; `prompt_for` checks it against the CLIP
  recipe: recipes.Resolved
  data: DataSpec
  input: InputSpec
  train: TrainSpec
  groups: GroupSpec
  shard_text: bool
  text_chunk: int
  recorded_config: str           # the ConfigDict as JSON: recorded, never read below

  @property
  def compute_dtype(self):
    return setup.DTYPES[self.dtype]

  def text_sharding(self, mesh) -> parallel.TextSharding:
    """How the text tower splits the class prompts over `mesh` (parallel.TextSharding)."""
    return parallel.text_sharding(mesh, self.shard_text, self.text_chunk)

  def prompt_for(self, clip_cfg: ClipConfig) -> PromptSpec:
    """The prompt spec with the CLIP's defaults filled in (ConfigError naming a bad field)."""
    return validated_prompt(self.prompt, clip_cfg)

  def config_dict(self) -> dict[str, Any]:
    """The recorded config (what checkpoints and results store)."""
    return json.loads(self.recorded_config)

  def to_dict(self) -> dict[str, Any]:
    """The resolved description itself, JSON-ready (results.json "run_spec")."""
    d = dataclasses.asdict(self)
    d.pop("recorded_config")
    d["recipe"] = self.recipe.to_dict()
    return json.loads(json.dumps(d, default=str))


def validated_prompt(spec: PromptSpec, clip_cfg: ClipConfig) -> PromptSpec:
  """`spec` with the CLIP's defaults filled in; a bad field raises ConfigError naming it."""
  try:
    return spec.validate(clip_cfg)
  except ValueError as e:
    raise setup.ConfigError(str(e)) from e


def _csv(value: Optional[str]) -> Optional[tuple[str, ...]]:
  if value is None or value == "":
    return None
  return tuple(v.strip() for v in str(value).split(",") if v.strip())


def resolve(config: mlc.ConfigDict, num_devices: Optional[int] = None) -> RunSpec:
  """Validates `config` (every bad field named at once; with `num_devices`, the batch splits)
  and resolves it into a RunSpec. Raises setup.ConfigError."""
  recipe, warmup_recipe, prompt = setup.validate(config, num_devices)
  d, i, t, g = config.data, config.input, config.train, config.groups
  grouped = config.method in GROUPED_METHODS
  gradient = grouped and g.mode == "gradient"
  demo = ()
  if d.name == "demo_domains":
    demo = tuple((k, int(d[k])) for k in ("demo_seed", "demo_images_per_class",
                                          "demo_image_size", "demo_world") if k in d)
  shard_text, text_chunk = setup.parallel_fields(config)
  return RunSpec(
      method=str(config.method), seed=int(config.seed), clip_path=str(config.clip.path),
      dtype=str(config.clip.dtype), remat=bool(config.clip.remat),
      prompt=prompt, recipe=recipe,
      data=DataSpec(
          name=str(d.name), root=d.root, data_dir=d.data_dir, domains=_csv(d.domains),
          split_seed=int(d.split_seed), train_fraction=float(d.train_fraction),
          val_fraction=float(d.val_fraction), val_per_class=int(d.get("val_per_class", 0)),
          shots=int(d.get("shots", 0)), split_files=d.split_files,
          skip_corrupt=bool(d.skip_corrupt),
          allow_per_task_classes=bool(d.allow_per_task_classes), demo=demo),
      input=InputSpec(
          batch_size=int(i.batch_size), eval_batch_size=int(i.eval_batch_size),
          workers=int(i.workers),
          augment=preprocess.AugmentConfig(
              random_resized_crop=bool(i.random_resized_crop),
              scale=(float(i.crop_scale_min), 1.0), hflip=bool(i.flip))),
      train=TrainSpec(
          steps=int(t.steps), log_every=int(t.log_every), eval_every=int(t.eval_every),
          ckpt_every=int(t.ckpt_every), keep_checkpoints=int(t.keep_checkpoints),
          steps_per_call=int(t.get("steps_per_call", 1)), select=str(t.select),
          accum_steps=int(config.optim.accum_steps)),
      groups=GroupSpec(
          active=grouped, mode=str(g.mode), explicit=g.explicit,
          num_groups=g.num_groups if g.num_groups == "auto" else int(g.num_groups),
          threshold=float(g.threshold), warmup_steps=int(g.warmup_steps), every=int(g.every),
          affinity=str(g.get("affinity", "cosine")), towers=str(g.get("towers", "summed")),
          affinity_params=str(g.affinity_params), grad_ema=float(g.grad_ema),
          init_from_warmup=bool(g.init_from_warmup), seed=int(config.seed),
          random_seed=int(config.seed if g.seed is None else g.seed),
          warmup_prompt=dataclasses.replace(prompt, method=WARMUP_METHOD) if gradient else None,
          warmup_recipe=warmup_recipe.recipe if gradient else None),
      shard_text=bool(shard_text), text_chunk=int(text_chunk),
      recorded_config=config.to_json_best_effort())


__all__ = ["RunSpec", "DataSpec", "InputSpec", "TrainSpec", "GroupSpec", "resolve",
           "validated_prompt", "WARMUP_METHOD"]
