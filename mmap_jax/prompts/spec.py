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
           "clipadapter_st", "clipadapter_mt", "bitfit_st", "bitfit_mt", "lora_st", "lora_mt")
FAMILIES = ("zeroshot", "coop", "vpt", "maple", "ivlp", "mmap", "fullft",
            "clipadapter", "bitfit", "lora")
VPT_INITS = ("xavier_uniform", "normal")
MMAP_SOURCE_DIM = 256   # the MmAP paper's d_s (ViT-B/16: divides 512 and 768)
PEFT_FAMILIES = ("clipadapter", "bitfit", "lora")
ADAPTER_SIDES = ("image", "text", "both")   # CLIP-Adapter: which features get an adapter
LORA_TARGETS = ("q", "k", "v", "o")          # LoRA: attention query/key/value/output projections

# (length L, depth J) per family; depth None = all layers of the prompted tower.
#   coop: CoOp's generic context, 16 tokens, input layer only.
#   vpt: VPT-deep, every vision layer; 8 tokens (VPT tunes this per dataset).
#   maple: MaPLe's vit_b16_c2_ep5_batch4_2ctx.yaml (N_CTX 2, PROMPT_DEPTH 9).
#   ivlp: independent V-L prompting, 2 + 2 tokens, depth 9 as MaPLe (the repo's IVLP yaml uses 12).
#   mmap: the MmAP paper's L = L_s = 8, d_s = 256, J = 11.
# A smaller CLIP (the demo's 3-layer text tower) gets J capped at its depth: `depth_for`.
FAMILY_DEFAULTS: dict[str, tuple[Optional[int], Optional[int]]] = {
    "coop": (16, 1), "vpt": (8, None), "maple": (2, 9), "ivlp": (2, 9), "mmap": (8, 11),
}

# `ctx_init`: words the learned text context starts from (their token embeddings); the first L
# tokens are learned, any further ones stay fixed text before the class name (MaPLe's and CoOp's
# trainers: ctx_vectors = token_embedding(tokenize(ctx_init))[0, 1:1+n_ctx], prompt prefix =
# ctx_init). MaPLe's published config (vit_b16_c2_ep5_batch4_2ctx.yaml) uses "a photo of a" with
# 2 learned tokens: "<ctx1> <ctx2> of a {class}.". "" = random init. CoOp learns every init word:
# with ctx_init and no length, L = its number of words (CoOp's n_ctx = len(ctx_init.split(" "))).
CTX_INIT_FAMILIES = ("coop", "maple", "ivlp")
FAMILY_CTX_INIT = {"maple": "a photo of a"}


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
  vpt_init: str = "xavier_uniform"      # VPT's own init; "normal" = N(0, init_std^2)
  zeroshot_template: str = "a photo of a {}."  # text side of methods without text prompts
  ctx_init: Optional[str] = None        # coop/maple/ivlp text context init words ("" = random)
  # CLIP-Adapter (Gao et al. 2021): ratio * adapter(f) + (1 - ratio) * f on the projected features
  adapter_ratio: float = 0.2            # the paper's image-side ratio
  adapter_reduction: int = 4            # bottleneck width embed_dim / reduction (the paper's 4)
  adapter_on: str = "image"             # image | text | both (the paper's best: image)
  # LoRA (Hu et al. 2022) on the attention projections of both towers: W + (alpha / r) B A
  lora_rank: int = 4                    # r
  lora_alpha: float = 4.0               # alpha; the update is scaled by alpha / r
  lora_targets: str = "q,v"             # subset of q,k,v,o, ',' or '+' separated (paper: q,v)

  def __post_init__(self):
    fam = self.method.split("_")[0] if isinstance(self.method, str) else None
    if self.ctx_init is None and fam in FAMILY_CTX_INIT:
      object.__setattr__(self, "ctx_init", FAMILY_CTX_INIT[fam])
    if (fam == "coop" and self.length is None and isinstance(self.ctx_init, str)
        and self.ctx_init.strip()):
      object.__setattr__(self, "length", len(ctx_init_words(self.ctx_init).split()))
    length, _ = FAMILY_DEFAULTS.get(fam, (None, None))
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
    """"none" (zeroshot), "st", "mt" or "shared"."""
    return self.method.split("_", 1)[1] if "_" in self.method else "none"

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
    """Prompt tokens each task sees per layer: 2L for mmap_mt (group ++ task), else L, 0 if none."""
    if not self.has_prompts:
      return 0
    return 2 * self.length if self.method == "mmap_mt" else self.length

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
    deepest = min(n for _, n in towers)
    return deepest if default is None else min(default, deepest)

  def source_dim_for(self, clip_cfg: ClipConfig) -> int:
    """MmAP's d_s: the configured one, else the largest common divisor of 256 and both tower
    widths (256 for ViT-B and ViT-L; the scaling matrices' widths d / d_s must be whole)."""
    if self.source_dim is not None:
      return self.source_dim
    return math.gcd(MMAP_SOURCE_DIM, clip_cfg.text.width, clip_cfg.vision.width)

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
    errors = self._peft_errors()
    if errors:
      raise ValueError(f"invalid prompt config for method {self.method!r}: " + "; ".join(errors))
    return self

  def validate(self, clip_cfg: ClipConfig) -> "PromptSpec":
    """Raise ValueError naming every bad field (and what is allowed); return self."""
    errors = []
    if self.method not in METHODS:
      raise ValueError(f"prompt.method={self.method!r}; allowed: {METHODS}")
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
