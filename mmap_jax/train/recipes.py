"""Each method family's published optimisation recipe, and its resolution against `config.optim`.

Why a table: a comparison is only fair when every baseline trains with the recipe its authors
published (full fine-tuning with prompt tuning's SGD lr 0.0035 and weight decay on every CLIP
weight is not "full fine-tuning" as anyone publishes it). `config.optim.<field> = None` means
"the family's recipe"; a value set explicitly (a config file, `--config.optim.lr=0.01`, a sweep)
overrides that field only. Between the two sits `config.optim_per_family` (family -> optim
fields): a config's own per-family values, e.g. the demo's learning rates tuned on its validation
split. Being data keyed by family, it keeps every field's meaning independent of how `method` was
set (`--config.method=X` or `file.py:method=X`). Precedence: `config.optim` > `optim_per_family`
> the published recipe. `resolve` runs once, before anything compiles, and says which fields came
from where; the trainer records both in results.json and the checkpoint metadata.

Objective: every form minimises the sum of its tasks' mean losses (heads.py), and the published
recipes are single-task ones (a sum over one task). So an ST form trains each task exactly as
published, while an MT form's shared parameters receive the sum of T tasks' gradients: for SGD
that is up to T times a single-task step at the same lr (Adam(W) is invariant to the scale). The
table keeps the published values for both forms, and no lr is divided by T behind the user's
back (a field would then mean different things at different T); MT and ST forms are tuned
separately (`optim_per_family` accepts method keys such as "mmap_st", see `resolve_config`).

Schedules are per step (this project counts steps, not epochs): `warmup_steps` of warm-up, then a
cosine from `lr` to `min_lr` at the last step. Dassl's recipes (CoOp, MaPLe, IVLP, VPT in the MaPLe
repo, CLIP-Adapter) warm up for one epoch at a constant 1e-5 (`warmup_type="constant"`); how many
steps an epoch is depends on the data, so `warmup_steps` stays a step count (set it per dataset).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Optional

OPTIMIZERS = ("sgd", "adamw")
WARMUP_TYPES = ("linear", "constant")
# "all": every learned leaf decays (torch's default single param group, what Dassl and the PEFT
# repos do). "no_norm_bias_embed": no decay on LayerNorm gains/biases, every bias, the token /
# positional / class embeddings and logit_scale (see `optim.decay_mask`).
DECAY_MASKS = ("all", "no_norm_bias_embed")
# Fields of `config.optim` that are not part of a recipe (how a step is computed, not trained).
NON_RECIPE_FIELDS = ("accum_steps",)


@dataclasses.dataclass(frozen=True)
class Recipe:
  """One optimisation recipe. torch conventions: SGD's decay is added to the gradient before
  momentum (dampening 0, no Nesterov); AdamW's decay is decoupled and scaled by the lr."""
  name: str                 # "sgd" | "adamw"
  lr: float                 # peak learning rate
  weight_decay: float
  momentum: float = 0.0     # SGD only (0: plain SGD)
  b1: float = 0.9           # AdamW only
  b2: float = 0.999
  eps: float = 1e-8
  decay_mask: str = "all"
  warmup_steps: int = 0
  warmup_type: str = "linear"  # linear: 0 -> lr; constant: `warmup_lr` throughout the warm-up
  warmup_lr: float = 0.0
  min_lr: float = 0.0       # the cosine's final value
  grad_clip: float = 0.0    # global-norm clipping threshold; 0 disables it

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


FIELDS = tuple(f.name for f in dataclasses.fields(Recipe))
_TYPES = {f.name: f.type for f in dataclasses.fields(Recipe)}

# Dassl (KaiyangZhou/Dassl.pytorch dassl/config/defaults.py): OPTIM.WEIGHT_DECAY 5e-4, MOMENTUM
# 0.9, SGD_DAMPNING 0, SGD_NESTEROV False, WARMUP_CONS_LR 1e-5; build_optimizer passes every
# trainable parameter in one group (all decay). Shared by the Dassl-based rows below.
_DASSL_SGD = dict(name="sgd", momentum=0.9, weight_decay=5e-4, decay_mask="all",
                  warmup_steps=50, warmup_type="constant", warmup_lr=1e-5)

RECIPES: dict[str, Optional[Recipe]] = {
    # Nothing is trained: no optimizer (explicit optim values are recorded and unused).
    "zeroshot": None,
    # CoOp (Zhou et al., IJCV 2022), KaiyangZhou/CoOp configs/trainers/CoOp/vit_b16_ep50.yaml:
    # SGD lr 0.002, cosine, WARMUP_EPOCH 1, WARMUP_TYPE constant, WARMUP_CONS_LR 1e-5.
    "coop": Recipe(lr=0.002, **_DASSL_SGD),
    # VPT-deep as MaPLe's repo trains it (VPT's own repo tunes lr per dataset):
    # muzairkhattak/multimodal-prompt-learning configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml:
    # SGD lr 0.0025, cosine, 1 epoch constant warm-up at 1e-5.
    "vpt": Recipe(lr=0.0025, **_DASSL_SGD),
    # MaPLe (Khattak et al., CVPR 2023), configs/trainers/MaPLe/vit_b16_c2_ep5_batch4_2ctx.yaml:
    # SGD lr 0.0035, cosine, 1 epoch constant warm-up at 1e-5 (Dassl momentum / weight decay).
    "maple": Recipe(lr=0.0035, **_DASSL_SGD),
    # IVLP (MaPLe's baseline), muzairkhattak/multimodal-prompt-learning
    # configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml: OPTIM NAME sgd, LR 0.0035,
    # MAX_EPOCH 5, cosine, WARMUP_EPOCH 1, constant WARMUP_CONS_LR 1e-5, batch 4 (its prompt
    # sizes, depth 12 and "a photo of a" init are PromptSpec's ivlp defaults, prompts/spec.py).
    "ivlp": Recipe(lr=0.0035, **_DASSL_SGD),
    # MmAP (Xin et al., AAAI 2024) trains with MaPLe's recipe (SGD lr 0.0035, cosine), MaPLe's warm-up.
    "mmap": Recipe(lr=0.0035, **_DASSL_SGD),
    # Full fine-tuning of CLIP: FLYP (Goyal et al., CVPR 2023), locuslab/FLYP README (ViT-B/16
    # ImageNet: --lr=1e-5 --wd=0.1) and src/args.py (--warmup_length 500, --min_lr 0): torch AdamW
    # (betas 0.9/0.999, eps 1e-8), linear warm-up then cosine, no gradient clipping (WiSE-FT,
    # mlfoundations/wise-ft src/models/finetune.py, is the same recipe at lr 3e-5 and clips at 1.0).
    # No decay on gains / biases / embeddings / logit_scale: open_clip's training rule
    # (src/training/main.py: exclude p.ndim < 2, "ln", "bias", "logit_scale") extended to the
    # positional and token embeddings, the usual transformer convention (FLYP and WiSE-FT
    # themselves decay every parameter; set optim.decay_mask="all" for that).
    "fullft": Recipe(name="adamw", lr=1e-5, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8,
                     decay_mask="no_norm_bias_embed", warmup_steps=500, warmup_type="linear"),
    # CLIP-Adapter (Gao et al., IJCV 2023), gaopengcuhk/CLIP-Adapter clip_adapter.py: a Dassl
    # trainer (build_optimizer / build_lr_scheduler on cfg.OPTIM) released without an OPTIM
    # config, i.e. the CoOp ViT-B/16 recipe it was built on: SGD lr 0.002, cosine, constant warm-up.
    "clipadapter": Recipe(lr=0.002, **_DASSL_SGD),
    # BitFit (Ben Zaken et al., ACL 2022), benzakenelad/BitFit run_glue.py: --optimizer adamw
    # (transformers' AdamW: weight_decay 0, eps 1e-6), --learning-rate 1e-3. BitFit publishes no
    # schedule for CLIP; the project's warm-up-free cosine applies.
    "bitfit": Recipe(name="adamw", lr=1e-3, weight_decay=0.0, b1=0.9, b2=0.999, eps=1e-6),
    # LoRA for CLIP: CLIP-LoRA (Zanella & Ben Ayed, CVPRW 2024), MaxZanella/CLIP-LoRA lora.py
    # (`torch.optim.AdamW(get_lora_parameters(clip_model), weight_decay=1e-2, betas=(0.9,
    # 0.999), lr=args.lr)`, `CosineAnnealingLR(optimizer, total_iters, eta_min=1e-6)` stepped
    # every iteration, no warm-up, no clipping) and run_utils.py (--lr 2e-4, --batch_size 32,
    # --n_iters 500 x shots iterations). Its LoRA itself (q,k,v, r 2, alpha 1, dropout 0.25,
    # scale alpha / sqrt r) is PromptSpec's default (prompts/spec.py).
    "lora": Recipe(name="adamw", lr=2e-4, weight_decay=1e-2, b1=0.9, b2=0.999, eps=1e-8,
                   min_lr=1e-6),
}


@dataclasses.dataclass(frozen=True)
class Resolved:
  """The recipe a run trains with (None: nothing trained) and the fields the config set."""
  family: str
  recipe: Optional[Recipe]
  overridden: tuple[str, ...]          # set by config.optim
  per_family: tuple[str, ...] = ()     # set by config.optim_per_family[family] (and not overridden)

  def to_dict(self) -> dict[str, Any]:
    """What results.json / the checkpoint metadata record."""
    return {"family": self.family, "recipe": None if self.recipe is None else self.recipe.to_dict(),
            "overridden": list(self.overridden), "per_family": list(self.per_family)}


def _optim_dict(optim: Any) -> dict[str, Any]:
  if optim is None:
    return {}
  if hasattr(optim, "to_dict"):
    return dict(optim.to_dict())
  if isinstance(optim, Mapping):
    return dict(optim)
  raise ValueError(f"optim config must be a mapping or ConfigDict, got {type(optim).__name__}")


def check(recipe: Recipe) -> list[str]:
  """Every bad value of a recipe, as 'optim.<field>=... <why>' messages (empty: valid)."""
  r, errors = recipe, []

  def need(cond: bool, field: str, why: str):
    if not cond:
      errors.append(f"optim.{field}={getattr(r, field)!r}{'' if why[0] == ';' else ' '}{why}")

  need(r.name in OPTIMIZERS, "name", f"; allowed: {OPTIMIZERS}")
  need(r.lr > 0, "lr", "must be > 0")
  need(r.weight_decay >= 0, "weight_decay", "must be >= 0")
  need(0 <= r.momentum < 1, "momentum", "must be in [0, 1)")
  need(0 <= r.b1 < 1, "b1", "must be in [0, 1)")
  need(0 <= r.b2 < 1, "b2", "must be in [0, 1)")
  need(r.eps > 0, "eps", "must be > 0")
  need(r.decay_mask in DECAY_MASKS, "decay_mask", f"; allowed: {DECAY_MASKS}")
  need(r.warmup_steps >= 0, "warmup_steps", "must be >= 0")
  need(r.warmup_type in WARMUP_TYPES, "warmup_type", f"; allowed: {WARMUP_TYPES}")
  need(r.warmup_lr >= 0, "warmup_lr", "must be >= 0")
  need(r.min_lr >= 0 and (r.lr <= 0 or r.min_lr < r.lr), "min_lr", "must be in [0, optim.lr)")
  need(r.grad_clip >= 0, "grad_clip", "must be >= 0 (0 disables clipping)")
  return errors


def _set_fields(optim: Any, where: str, allowed: tuple[str, ...]) -> dict[str, Any]:
  """The non-None recipe fields of an optim mapping, type-checked; errors name `where`.<field>."""
  values = _optim_dict(optim)
  unknown = sorted(set(values) - set(FIELDS) - set(allowed))
  if unknown:
    raise ValueError(f"unknown optim field(s) {[f'{where}.{u}' for u in unknown]}; recipe fields: "
                     f"{list(FIELDS)}" + (f", others: {list(allowed)}" if allowed else ""))
  set_fields = {k: v for k, v in values.items() if k in FIELDS and v is not None}
  errors = []
  for k, v in set_fields.items():
    kind = {"str": str, "float": float, "int": int}[_TYPES[k]]
    if isinstance(v, bool) or not isinstance(v, (int, float) if kind is float else kind):
      errors.append(f"{where}.{k}={v!r} must be a {kind.__name__}")
  if errors:
    raise ValueError("invalid optim config: " + "; ".join(errors))
  return set_fields


def resolve(family: str, optim: Any = None, per_family: Any = None) -> Resolved:
  """The family's recipe, then every non-None field of `per_family` (config.optim_per_family
  [family]), then every non-None field of `optim` (config.optim) replacing it.

  Raises ValueError naming each unknown family, unknown or mistyped field and bad value.
  """
  if family not in RECIPES:
    raise ValueError(f"no recipe for method family {family!r}; known: {sorted(RECIPES)}")
  set_fields = _set_fields(optim, "optim", NON_RECIPE_FIELDS)
  tuned = _set_fields(per_family, f"optim_per_family.{family}", ())
  overridden = tuple(k for k in FIELDS if k in set_fields)
  from_family = tuple(k for k in FIELDS if k in tuned and k not in set_fields)
  set_fields = tuned | set_fields
  base = RECIPES[family]
  if base is None:
    return Resolved(family=family, recipe=None, overridden=overridden, per_family=from_family)
  recipe = dataclasses.replace(base, **{k: (float(v) if _TYPES[k] == "float" else v)
                                        for k, v in set_fields.items()})
  errors = check(recipe)
  if errors:
    raise ValueError(f"invalid optim config for method family {family!r}: " + "; ".join(errors))
  return Resolved(family=family, recipe=recipe, overridden=overridden, per_family=from_family)


def resolve_config(config: Any) -> Resolved:
  """`resolve` for a run config: the family of `config.method`, `config.optim_per_family` (if
  the config has it) and `config.optim`. Unknown families in optim_per_family are errors.

  optim_per_family is keyed by family, or by a method name (e.g. "mmap_st") whose fields win
  over its family's: MT and ST forms train different objectives' shared parameters and are
  tuned separately (heads.py: every form sums its task losses)."""
  from mmap_jax.prompts.spec import METHODS  # noqa: PLC0415 (recipes stays import-light)
  table = _optim_dict(config.get("optim_per_family") if hasattr(config, "get") else None)
  unknown = sorted(set(table) - set(RECIPES) - set(METHODS))
  if unknown:
    raise ValueError(f"optim_per_family has unknown method famil(ies) or methods {unknown}; "
                     f"known families: {sorted(RECIPES)}, methods: {list(METHODS)}")
  family = str(config.method).split("_")[0]
  fields = _optim_dict(table.get(family)) | _optim_dict(table.get(str(config.method)))
  return resolve(family, config.optim, fields or None)


__all__ = ["Recipe", "Resolved", "RECIPES", "FIELDS", "OPTIMIZERS", "WARMUP_TYPES", "DECAY_MASKS",
           "check", "resolve", "resolve_config"]
