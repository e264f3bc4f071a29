"""`PromptSpec`: every prompt hyper-parameter of every method, validated against a CLIP.

A method name is `<family>_<sharing>`:
  family  zeroshot | coop | vpt | maple | ivlp | mmap | fullft | clipadapter | bitfit | lora
  sharing st (one prompt set per task) | mt (one set shared by all tasks) | shared (mmap: one
          MmAP for all tasks) | mt for mmap = group-shared MmAP per group + task-specific per task.

The PEFT baselines (clipadapter, bitfit, lora; `PEFT_FAMILIES`, code in mmap_jax/peft) learn no
prompts: they change the CLIP the encoders run with (mmap_jax/peft/__init__.py).

Fields left as None take the family's published default for the CLIP at hand, so a config only
names what it changes and a field means the same whichever way the method was chosen
(`--config.method=X` or `:method=X`): `length` from `FAMILY_DEFAULTS`; `depth` (`depth_for`) the
family's J, capped at the prompted towers' depth (VPT: every vision layer); `source_dim`
(`source_dim_for`) MmAP's d_s = 256, or the largest divisor of it that divides both widths.
"""
from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Mapping, Optional

from mmap_jax.models.config import ClipConfig

METHODS = ("zeroshot", "coop_st", "coop_mt", "vpt_st", "vpt_mt", "maple_st", "maple_mt",
           "ivlp_st", "ivlp_mt", "mmap_st", "mmap_shared", "mmap_mt", "fullft_st", "fullft_mt",
           "clipadapter_st", "clipadapter_mt", "bitfit_st", "bitfit_mt", "lora_st", "lora_mt",
           "mmap_indep_mt", "mmap_shared_mt", "mmap_task_mt")
# MmAP-MT's ablations (issue 29), all in MT form: one run, one optimizer, the summed objective.
#   mmap_indep_mt   group + task units as mmap_mt (same groups, L, J, 2L tokens per layer), but each
#                   unit's text and visual prompts come from their own sources (no Kronecker
#                   coupling); source widths chosen so the count is within 5% of mmap_mt's
#   mmap_shared_mt  one MmAP unit shared by all tasks, no task-specific units
#   mmap_task_mt    one MmAP unit per task, no group-shared units
# The last two keep MmAP-MT's 2L prompt tokens per layer: their one unit has length 2L (and
# source length 2 L_s, so the scaling matrices keep MmAP-MT's shapes).
MMAP_ABLATIONS = ("mmap_indep_mt", "mmap_shared_mt", "mmap_task_mt")
# Methods with MmAP-MT's layout {"group": [G, ...], "task": [T, ...]} and task groups.
GROUPED_METHODS = ("mmap_mt", "mmap_indep_mt")
# prompt.budget: "published" = each family's published prompt size (FAMILY_DEFAULTS); "equal" =
# the prompt baselines (EQUAL_BUDGET_FAMILIES) at MmAP-MT's prompt tokens per layer (2L) and
# depth J (CoOp stays shallow: depth 1 is what CoOp is; its 16 tokens already equal 2L = 16).
BUDGETS = ("published", "equal")
EQUAL_BUDGET_FAMILIES = ("coop", "vpt", "maple", "ivlp")
LORA_SCALINGS = ("sqrt_rank", "rank")  # alpha / sqrt(r) (CLIP-LoRA) | alpha / r (Hu et al.)
FAMILIES = ("zeroshot", "coop", "vpt", "maple", "ivlp", "mmap", "fullft",
            "clipadapter", "bitfit", "lora")
VPT_INITS = ("xavier_uniform", "normal")
MMAP_SOURCE_DIM = 256   # the MmAP paper's d_s (ViT-B/16: divides 512 and 768)
PEFT_FAMILIES = ("clipadapter", "bitfit", "lora")
ADAPTER_SIDES = ("image", "text", "both")   # CLIP-Adapter: which features get an adapter
LORA_TARGETS = ("q", "k", "v", "o")          # LoRA: attention query/key/value/output projections

# (length L, depth J) per family; depth None = all layers of the prompted tower.
#   coop: CoOp's generic context, 16 tokens, input layer only.
#   vpt: VPT-deep as the MaPLe repository trains it, muzairkhattak/multimodal-prompt-learning
#        configs/trainers/VPT/vit_b16_c2_ep5_batch4_4.yaml: N_CTX_VISION 8, PROMPT_DEPTH_VISION 12
#        (every vision layer); init N(0, 0.02^2) (clip/model.py VisionTransformer.__init__ and
#        ResidualAttentionBlock_IVLP: nn.init.normal_(ctx_vectors, std=0.02)): vpt_init="normal".
#   maple: MaPLe's vit_b16_c2_ep5_batch4_2ctx.yaml (N_CTX 2, PROMPT_DEPTH 9).
#   ivlp: the same repository's configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml:
#        N_CTX_TEXT 2, N_CTX_VISION 2, PROMPT_DEPTH_TEXT 12, PROMPT_DEPTH_VISION 12 (every layer
#        of ViT-B/16), CTX_INIT "a photo of a" (trainers/independentVL.py: the first n_ctx word
#        embeddings start the text context, as MaPLe's; deeper prompts N(0, 0.02^2)).
#   mmap: the MmAP paper's L = L_s = 8, d_s = 256, J = 11.
# A smaller CLIP (the demo's 3-layer text tower) gets J capped at its depth: `depth_for`.
FAMILY_DEFAULTS: dict[str, tuple[Optional[int], Optional[int]]] = {
    "coop": (16, 1), "vpt": (8, None), "maple": (2, 9), "ivlp": (2, 12), "mmap": (8, 11),
}

# `ctx_init`: words the learned text context starts from (their token embeddings); the first L
# tokens are learned, any further ones stay fixed text before the class name (MaPLe's and CoOp's
# trainers: ctx_vectors = token_embedding(tokenize(ctx_init))[0, 1:1+n_ctx], prompt prefix =
# ctx_init). MaPLe's published config (vit_b16_c2_ep5_batch4_2ctx.yaml) uses "a photo of a" with
# 2 learned tokens: "<ctx1> <ctx2> of a {class}.". "" = random init. CoOp learns every init word:
# with ctx_init and no length, L = its number of words (CoOp's n_ctx = len(ctx_init.split(" "))).
CTX_INIT_FAMILIES = ("coop", "maple", "ivlp")
FAMILY_CTX_INIT = {"maple": "a photo of a", "ivlp": "a photo of a"}


def _split_targets(targets: Any) -> list[str]:
  """"q,v" or "q+v" ('+' lets a sweep list several target sets: 'q+v,q+k+v+o')."""
  return re.split(r"[,+]", str(targets))


@dataclasses.dataclass(frozen=True)
class PromptSpec:
  """Prompt hyper-parameters. Fields a method does not use are ignored by it."""
  method: str = "mmap_mt"
  length: Optional[int] = None          # L: prompt tokens per layer (per MmAP unit for mmap)
  depth: Optional[int] = None           # J: prompted layers 0..J-1
  source_length: Optional[int] = None   # MmAP L_s (divides L); None = L
  source_dim: Optional[int] = None      # MmAP d_s (divides both tower widths); None: source_dim_for
  per_layer_scaling: bool = False       # MmAP: one (W_t, W_v) pair per layer instead of per unit
  init_std: float = 0.02                # N(0, std^2) init of prompt tokens / MmAP source prompts
  vpt_init: str = "normal"              # MaPLe repo's VPT: N(0, init_std^2); "xavier_uniform": VPT's
  budget: str = "published"             # prompt sizes: published | equal (BUDGETS)
  indep_text_source_dim: Optional[int] = None    # mmap_indep_mt text source width (None: d_s/2)
  indep_visual_source_dim: Optional[int] = None  # mmap_indep_mt visual source width (None: d_s/2)
  zeroshot_template: str = "a photo of a {}."  # text side of methods without text prompts
  ctx_init: Optional[str] = None        # coop/maple/ivlp text context init words ("" = random)
  # CLIP-Adapter (Gao et al. 2021): ratio * adapter(f) + (1 - ratio) * f on the projected features
  adapter_ratio: float = 0.2            # the paper's image-side ratio
  adapter_reduction: int = 4            # bottleneck width embed_dim / reduction (the paper's 4)
  adapter_on: str = "image"             # image | text | both (the paper's best: image)
  # LoRA on the attention projections of both towers, every layer: W + scale * A B. Defaults as
  # CLIP-LoRA ships them (MaxZanella/CLIP-LoRA run_utils.py: --params q k v, --r 2, --alpha 1,
  # --dropout_rate 0.25, --position all, --encoder both; loralib/layers.py: scaling =
  # lora_alpha / math.sqrt(r), dropout on the LoRA branch's input only while training).
  lora_rank: int = 2                    # r
  lora_alpha: float = 1.0               # alpha
  lora_targets: str = "q,k,v"           # subset of q,k,v,o, ',' or '+' separated
  lora_dropout: float = 0.25            # dropout on the LoRA branch's input, training only
  lora_scaling: str = "sqrt_rank"       # alpha / sqrt(r) (CLIP-LoRA) | "rank": alpha / r (Hu et al.)

  def __post_init__(self):
    fam = self.method.split("_")[0] if isinstance(self.method, str) else None
    if self.ctx_init is None and fam in FAMILY_CTX_INIT:
      object.__setattr__(self, "ctx_init", FAMILY_CTX_INIT[fam])
    if (fam == "coop" and self.length is None and isinstance(self.ctx_init, str)
        and self.ctx_init.strip()):
      object.__setattr__(self, "length", len(ctx_init_words(self.ctx_init).split()))
    length, _ = FAMILY_DEFAULTS.get(fam, (None, None))
    if self.budget == "equal" and fam in EQUAL_BUDGET_FAMILIES:
      # MmAP-MT's 2L tokens per layer. Its init words are fewer than 2L: random init, as the
      # MaPLe / IVLP trainers do when n_ctx > 4 (their `if ctx_init and n_ctx <= 4`).
      length = 2 * FAMILY_DEFAULTS["mmap"][0]
      if self.ctx_init is None or (fam in FAMILY_CTX_INIT and self.ctx_init == FAMILY_CTX_INIT[fam]
                                   and self.length is None):
        object.__setattr__(self, "ctx_init", "")
    if self.length is None and length is not None:
      object.__setattr__(self, "length", length)
    if self.source_length is None and self.length is not None:
      object.__setattr__(self, "source_length", self.length)

  # ---------------------------------------------------------------- method structure
  @property
  def family(self) -> str:
    return self.method.split("_")[0]

  @property
  def sharing(self) -> str:
    """"none" (zeroshot), "st", "mt" or "shared" (the MmAP ablations `mmap_*_mt` are "mt")."""
    return self.method.rsplit("_", 1)[1] if "_" in self.method else "none"

  @property
  def grouped(self) -> bool:
    """Group-shared + task-specific units and task groups (mmap_mt, mmap_indep_mt)."""
    return self.method in GROUPED_METHODS

  @property
  def layout(self) -> str:
    """The learned pytree's top level (prompts/multitask.py): "none", "task" ([T] sets), "shared"
    (one set), "group_task" ({"group": [G], "task": [T]}) or "clip" (fullft)."""
    if self.family == "zeroshot":
      return "none"
    if self.family == "fullft":
      return "clip"
    if self.grouped:
      return "group_task"
    if self.sharing == "st" or self.method == "mmap_task_mt":
      return "task"
    return "shared"

  @property
  def prompt_module_name(self) -> str:
    """Which prompt module builds one unit: the family's, or "mmap_indep" for mmap_indep_mt."""
    return "mmap_indep" if self.method == "mmap_indep_mt" else self.family

  @property
  def unit_length(self) -> Optional[int]:
    """Tokens per layer of one prompt unit: L, or 2L for mmap_shared_mt / mmap_task_mt (their one
    unit carries MmAP-MT's two units' tokens)."""
    if self.length is None:
      return None
    return 2 * self.length if self.method in ("mmap_shared_mt", "mmap_task_mt") else self.length

  @property
  def unit_source_length(self) -> Optional[int]:
    """L_s of one MmAP unit (doubled with `unit_length`, so W_t / W_v keep their shapes)."""
    if self.source_length is None:
      return None
    return self.source_length * (self.unit_length // self.length)

  @property
  def single_task(self) -> bool:
    """One independent parameter set per task: the loss is the SUM of per-task losses."""
    return self.sharing == "st"

  @property
  def has_text_prompts(self) -> bool:
    return self.family in ("coop", "maple", "ivlp", "mmap")

  @property
  def has_visual_prompts(self) -> bool:
    return self.family in ("vpt", "maple", "ivlp", "mmap")

  @property
  def has_prompts(self) -> bool:
    return self.has_text_prompts or self.has_visual_prompts

  @property
  def tokens_per_layer(self) -> int:
    """Prompt tokens each task sees per layer: 2L for mmap_mt (group ++ task) and its ablations,
    else L, 0 if none."""
    if not self.has_prompts:
      return 0
    return 2 * self.length if self.method in ("mmap_mt",) + MMAP_ABLATIONS else self.length

  @property
  def text_prompt_tokens(self) -> int:
    """The number of "X" placeholders in each class prompt (0: use `zeroshot_template`)."""
    return self.tokens_per_layer if self.has_text_prompts else 0

  @property
  def learned_ctx_init(self) -> Optional[str]:
    """The words the learned text context is initialised from, or None (random init)."""
    if self.family in CTX_INIT_FAMILIES and isinstance(self.ctx_init, str) and self.ctx_init.strip():
      return ctx_init_words(self.ctx_init)
    return None

  @property
  def lora_target_list(self) -> tuple[str, ...]:
    """`lora_targets` parsed, in q,k,v,o order (validated by `validate_fields`)."""
    names = {t.strip() for t in _split_targets(self.lora_targets) if t.strip()}
    return tuple(t for t in LORA_TARGETS if t in names)

  def _prompted_layers(self, clip_cfg: ClipConfig) -> list[tuple[str, int]]:
    towers = []
    if self.has_text_prompts:
      towers.append(("text", clip_cfg.text.layers))
    if self.has_visual_prompts:
      towers.append(("vision", clip_cfg.vision.layers))
    return towers

  def depth_for(self, clip_cfg: ClipConfig) -> int:
    """J: the configured depth, else the family's default capped at the prompted towers' depth."""
    if self.depth is not None:
      return self.depth
    towers = self._prompted_layers(clip_cfg)
    if not towers:
      return 0
    _, default = FAMILY_DEFAULTS.get(self.family, (None, None))
    if self.budget == "equal" and self.family in EQUAL_BUDGET_FAMILIES and self.family != "coop":
      return PromptSpec(method="mmap_mt").depth_for(clip_cfg)   # MmAP-MT's J on this CLIP
    deepest = min(n for _, n in towers)
    return deepest if default is None else min(default, deepest)

  def source_dim_for(self, clip_cfg: ClipConfig) -> int:
    """MmAP's d_s: the configured one, else the largest common divisor of 256 and both tower
    widths (256 for ViT-B and ViT-L; the scaling matrices' widths d / d_s must be whole)."""
    if self.source_dim is not None:
      return self.source_dim
    return math.gcd(MMAP_SOURCE_DIM, clip_cfg.text.width, clip_cfg.vision.width)

  def indep_source_dims(self, clip_cfg: ClipConfig) -> tuple[int, int]:
    """mmap_indep_mt's (text, visual) source widths: the configured ones, else the divisors of
    the tower widths whose unit has the parameter count closest to an MmAP unit's (ties: closest
    to d_s / 2 each, i.e. the two sources holding MmAP's d_s entries per token together). On
    ViT-B/16 and ViT-L/14 that is d_s / 2 = 128 each (+5 / +9 parameters per unit)."""
    d_t, d_v = clip_cfg.text.width, clip_cfg.vision.width
    d_s = self.source_dim_for(clip_cfg)
    j = self.depth_for(clip_cfg)
    ls = self.unit_source_length or 1
    rows = (self.unit_length or 1) // ls
    per = j if self.per_layer_scaling else 1
    unit = lambda a, b: j * ls * (a + b) + per * rows * (d_t // a + d_v // b)
    target = j * ls * d_s + per * rows * (d_t // d_s + d_v // d_s)
    divisors = lambda n: [k for k in range(1, n + 1) if n % k == 0]
    texts = [self.indep_text_source_dim] if self.indep_text_source_dim else divisors(d_t)
    visuals = [self.indep_visual_source_dim] if self.indep_visual_source_dim else divisors(d_v)
    if any(not isinstance(x, int) or x < 1 for x in texts + visuals):
      return (self.indep_text_source_dim, self.indep_visual_source_dim)  # validate() names it
    return min(((a, b) for a in texts for b in visuals),
               key=lambda ab: (abs(unit(*ab) - target), abs(ab[0] - d_s / 2) + abs(ab[1] - d_s / 2),
                               -ab[0]))

  @property
  def lora_scale(self) -> float:
    """The LoRA update's multiplier: alpha / sqrt(r) (sqrt_rank) or alpha / r (rank)."""
    r = int(self.lora_rank)
    return float(self.lora_alpha) / (math.sqrt(r) if self.lora_scaling == "sqrt_rank" else r)
  # ---------------------------------------------------------------- construction / checks
  @classmethod
  def from_config(cls, cfg: Any = None, method: Optional[str] = None) -> "PromptSpec":
    """From a dict / ConfigDict (`config.prompt`); `method` (e.g. `config.method`) overrides."""
    if cfg is None:
      d: dict[str, Any] = {}
    elif hasattr(cfg, "to_dict"):
      d = dict(cfg.to_dict())
    elif isinstance(cfg, Mapping):
      d = dict(cfg)
    else:
      raise ValueError(f"prompt config must be a mapping or ConfigDict, got {type(cfg).__name__}")
    if method is not None:
      d["method"] = method
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"unknown prompt config field(s) {unknown}; allowed: {sorted(names)}")
    return cls(**d)

  def _peft_errors(self) -> list[str]:
    """The PEFT fields' checks that need no CLIP (run by `validate_fields` and `validate`)."""
    errors = []
    fam = self.family
    if fam == "clipadapter":
      r = self.adapter_ratio
      if isinstance(r, bool) or not isinstance(r, (int, float)) or not 0.0 <= r <= 1.0:
        errors.append(f"prompt.adapter_ratio={r!r} must be in [0, 1]")
      red = self.adapter_reduction
      if isinstance(red, bool) or not isinstance(red, int) or red < 1:
        errors.append(f"prompt.adapter_reduction={red!r} must be a positive int")
      if self.adapter_on not in ADAPTER_SIDES:
        errors.append(f"prompt.adapter_on={self.adapter_on!r}; allowed: {ADAPTER_SIDES}")
    if fam == "lora":
      r = self.lora_rank
      if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        errors.append(f"prompt.lora_rank={r!r} must be a positive int")
      a = self.lora_alpha
      if isinstance(a, bool) or not isinstance(a, (int, float)) or not a > 0:
        errors.append(f"prompt.lora_alpha={a!r} must be > 0")
      d = self.lora_dropout
      if isinstance(d, bool) or not isinstance(d, (int, float)) or not 0.0 <= d < 1.0:
        errors.append(f"prompt.lora_dropout={d!r} must be in [0, 1)")
      if self.lora_scaling not in LORA_SCALINGS:
        errors.append(f"prompt.lora_scaling={self.lora_scaling!r}; allowed: {LORA_SCALINGS}")
      names = [t.strip() for t in _split_targets(self.lora_targets)]
      if (not isinstance(self.lora_targets, str) or not all(names)
          or any(t not in LORA_TARGETS for t in names) or len(set(names)) != len(names)):
        errors.append(f"prompt.lora_targets={self.lora_targets!r} must list distinct names "
                      f"from {LORA_TARGETS} separated by ',' or '+', e.g. 'q,v' or 'q+k+v+o'")
    return errors

  def validate_fields(self) -> "PromptSpec":
    """The checks that need no CLIP (config validation before anything loads); return self."""
    if self.method not in METHODS:
      raise ValueError(f"prompt.method={self.method!r}; allowed: {METHODS}")
    if self.budget not in BUDGETS:
      raise ValueError(f"prompt.budget={self.budget!r}; allowed: {BUDGETS}")
    errors = self._peft_errors()
    if errors:
      raise ValueError(f"invalid prompt config for method {self.method!r}: " + "; ".join(errors))
    return self

  def validate(self, clip_cfg: ClipConfig) -> "PromptSpec":
    """Raise ValueError naming every bad field (and what is allowed); return self."""
    errors = []
    if self.method not in METHODS:
      raise ValueError(f"prompt.method={self.method!r}; allowed: {METHODS}")
    if self.budget not in BUDGETS:
      errors.append(f"prompt.budget={self.budget!r}; allowed: {BUDGETS}")
    errors += self._peft_errors()
    if (self.family == "clipadapter" and isinstance(self.adapter_reduction, int)
        and self.adapter_reduction >= 1 and clip_cfg.embed_dim % self.adapter_reduction):
      errors.append(f"prompt.adapter_reduction={self.adapter_reduction} must divide the "
                    f"embedding width {clip_cfg.embed_dim}")
    narrow = min(clip_cfg.text.width, clip_cfg.vision.width)
    if self.family == "lora" and isinstance(self.lora_rank, int) and self.lora_rank > narrow:
      errors.append(f"prompt.lora_rank={self.lora_rank} exceeds the narrower tower's width "
                    f"{narrow}")
    d_t, d_v = clip_cfg.text.width, clip_cfg.vision.width
    fam = self.family
    if self.has_prompts:
      if not isinstance(self.length, int) or self.length < 1:
        errors.append(f"prompt.length={self.length!r} must be a positive int")
      depth = self.depth_for(clip_cfg)
      towers = self._prompted_layers(clip_cfg)
      max_depth = min(n for _, n in towers)
      if not isinstance(depth, int) or not 1 <= depth <= max_depth:
        errors.append(f"prompt.depth={self.depth!r} must be in [1, {max_depth}] "
                      f"({', '.join(f'{t} has {n} layers' for t, n in towers)})")
      if fam == "coop" and depth != 1:
        errors.append(f"prompt.depth={self.depth} but coop is shallow (depth 1); "
                      "use ivlp for deep text prompts")
      if (self.has_text_prompts and isinstance(self.length, int)
          and 1 + self.tokens_per_layer + 2 > clip_cfg.text.context_length):
        errors.append(f"prompt.length={self.length} gives {self.tokens_per_layer} text prompt "
                      f"tokens, too many for context_length {clip_cfg.text.context_length}")
      if not self.init_std > 0:
        errors.append(f"prompt.init_std={self.init_std} must be > 0")
    if fam == "vpt" and self.vpt_init not in VPT_INITS:
      errors.append(f"prompt.vpt_init={self.vpt_init!r}; allowed: {VPT_INITS}")
    if fam == "mmap":
      ls, ds = self.source_length, self.source_dim_for(clip_cfg)
      if not isinstance(ls, int) or ls < 1 or (isinstance(self.length, int) and self.length % ls):
        errors.append(f"prompt.source_length={ls!r} must be a positive divisor of "
                      f"prompt.length={self.length}")
      if not isinstance(ds, int) or ds < 1 or d_t % ds or d_v % ds:
        errors.append(f"prompt.source_dim={ds!r} must divide text width {d_t} and "
                      f"vision width {d_v}")
      if self.method == "mmap_indep_mt":
        for field, dim, width, tower in zip(
            ("indep_text_source_dim", "indep_visual_source_dim"), self.indep_source_dims(clip_cfg),
            (d_t, d_v), ("text", "vision")):
          if not isinstance(dim, int) or dim < 1 or width % dim:
            errors.append(f"prompt.{field}={dim!r} must be a positive divisor of the {tower} "
                          f"width {width} (None: prompt.source_dim / 2)")
    if self.ctx_init is not None and not isinstance(self.ctx_init, str):
      errors.append(f"prompt.ctx_init={self.ctx_init!r} must be a string (or None)")
    elif self.ctx_init and self.ctx_init.strip() and fam not in CTX_INIT_FAMILIES:
      errors.append(f"prompt.ctx_init={self.ctx_init!r} initialises a learned text context, "
                    f"which only {CTX_INIT_FAMILIES} have; leave it unset for {self.method!r}")
    if not self.has_text_prompts and self.zeroshot_template.count("{}") != 1:
      errors.append(f"prompt.zeroshot_template={self.zeroshot_template!r} must contain "
                    "exactly one '{}' for the class name")
    if errors:
      raise ValueError(f"invalid prompt config for method {self.method!r}: " + "; ".join(errors))
    return self


def ctx_init_words(text: str) -> str:
  """As MaPLe / CoOp read `ctx_init`: underscores are spaces; runs of whitespace one space."""
  return " ".join(text.replace("_", " ").split())
