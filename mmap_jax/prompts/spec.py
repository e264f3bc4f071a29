"""`PromptSpec`: every prompt hyper-parameter of every method, validated against a CLIP.

A method name is `<family>_<sharing>`:
  family  zeroshot | coop | vpt | maple | ivlp | mmap | fullft | clipadapter | bitfit | lora
  sharing st (one prompt set per task) | mt (one set shared by all tasks) | shared (mmap: one
          MmAP for all tasks) | mt for mmap = group-shared MmAP per group + task-specific per task.

The PEFT baselines (clipadapter, bitfit, lora; `PEFT_FAMILIES`, code in mmap_jax/peft) learn no
prompts: they change the CLIP the encoders run with (mmap_jax/peft/__init__.py).

Fields left as None take the family's published default (`FAMILY_DEFAULTS`), so a config only
names what it changes. `depth=None` for VPT means "every vision layer" (resolved against the CLIP
by `depth_for`).
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any, Mapping, Optional

from mmap_jax.models.config import ClipConfig

METHODS = ("zeroshot", "coop_st", "coop_mt", "vpt_st", "vpt_mt", "maple_st", "maple_mt",
           "ivlp_st", "ivlp_mt", "mmap_st", "mmap_shared", "mmap_mt", "fullft_st", "fullft_mt",
           "clipadapter_st", "clipadapter_mt", "bitfit_st", "bitfit_mt", "lora_st", "lora_mt")
FAMILIES = ("zeroshot", "coop", "vpt", "maple", "ivlp", "mmap", "fullft",
            "clipadapter", "bitfit", "lora")
VPT_INITS = ("xavier_uniform", "normal")
PEFT_FAMILIES = ("clipadapter", "bitfit", "lora")
ADAPTER_SIDES = ("image", "text", "both")   # CLIP-Adapter: which features get an adapter
LORA_TARGETS = ("q", "k", "v", "o")          # LoRA: attention query/key/value/output projections

# (length L, depth J) per family; depth None = all layers of the prompted tower.
#   coop: CoOp's generic context, 16 tokens, input layer only.
#   vpt: VPT-deep, every vision layer; 8 tokens (VPT tunes this per dataset).
#   maple: MaPLe's vit_b16_c2_ep5_batch4_2ctx.yaml (N_CTX 2, PROMPT_DEPTH 9).
#   ivlp: independent V-L prompting, 2 + 2 tokens, depth 9 as MaPLe (the repo's IVLP yaml uses 12).
#   mmap: the MmAP paper's L = L_s = 8, d_s = 256, J = 11.
FAMILY_DEFAULTS: dict[str, tuple[Optional[int], Optional[int]]] = {
    "coop": (16, 1), "vpt": (8, None), "maple": (2, 9), "ivlp": (2, 9), "mmap": (8, 11),
}


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
  source_dim: int = 256                 # MmAP d_s (divides both tower widths)
  per_layer_scaling: bool = False       # MmAP: one (W_t, W_v) pair per layer instead of per unit
  init_std: float = 0.02                # N(0, std^2) init of prompt tokens / MmAP source prompts
  vpt_init: str = "xavier_uniform"      # VPT's own init; "normal" = N(0, init_std^2)
  zeroshot_template: str = "a photo of a {}."  # text side of methods without text prompts
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
    length, depth = FAMILY_DEFAULTS.get(fam, (None, None))
    if self.length is None and length is not None:
      object.__setattr__(self, "length", length)
    if self.depth is None and depth is not None:
      object.__setattr__(self, "depth", depth)
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
  def lora_target_list(self) -> tuple[str, ...]:
    """`lora_targets` parsed, in q,k,v,o order (validated by `validate_fields`)."""
    names = {t.strip() for t in _split_targets(self.lora_targets) if t.strip()}
    return tuple(t for t in LORA_TARGETS if t in names)

  def depth_for(self, clip_cfg: ClipConfig) -> int:
    if self.depth is not None:
      return self.depth
    return clip_cfg.vision.layers if self.family == "vpt" else 0

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
      towers = []
      if self.has_text_prompts:
        towers.append(("text", clip_cfg.text.layers))
      if self.has_visual_prompts:
        towers.append(("vision", clip_cfg.vision.layers))
      max_depth = min(n for _, n in towers)
      if not isinstance(depth, int) or not 1 <= depth <= max_depth:
        errors.append(f"prompt.depth={self.depth!r} must be in [1, {max_depth}] "
                      f"({', '.join(f'{t} has {n} layers' for t, n in towers)})")
      if fam == "coop" and self.depth != 1:
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
      ls, ds = self.source_length, self.source_dim
      if not isinstance(ls, int) or ls < 1 or (isinstance(self.length, int) and self.length % ls):
        errors.append(f"prompt.source_length={ls!r} must be a positive divisor of "
                      f"prompt.length={self.length}")
      if not isinstance(ds, int) or ds < 1 or d_t % ds or d_v % ds:
        errors.append(f"prompt.source_dim={ds!r} must divide text width {d_t} and "
                      f"vision width {d_v}")
    if not self.has_text_prompts and self.zeroshot_template.count("{}") != 1:
      errors.append(f"prompt.zeroshot_template={self.zeroshot_template!r} must contain "
                    "exactly one '{}' for the class name")
    if errors:
      raise ValueError(f"invalid prompt config for method {self.method!r}: " + "; ".join(errors))
    return self
