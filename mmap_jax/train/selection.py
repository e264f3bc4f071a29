"""Which trained state a run reports: the validation history and the selection rule.

Periodic evaluation (`train.eval_every`, and always the final step) measures validation accuracy
only; this record decides which state's TEST accuracy is reported, so the test split never
informs a choice. Rules (`train.select`):

  best_val  the step with the highest mean validation accuracy over the tasks; ties go to the
            EARLIER step (strict improvement is needed to move the selection, as early stopping
            does): the later state fits the training data more without doing better on held-out
            data, and the choice does not depend on how often one evaluates after the peak.
  last      the final state (validation is still recorded, for the reader).

The record is plain JSON, saved in every checkpoint's metadata next to the selected state, so a
resumed run continues with exactly the history and selection the killed run had at that step.
"""
from __future__ import annotations

import dataclasses
from typing import Mapping, Optional

RULES = ("best_val", "last")
ZEROSHOT_REASON = "zeroshot (no training)"


def mean(values: Mapping[str, float]) -> float:
  return float(sum(values.values()) / len(values)) if values else float("nan")


@dataclasses.dataclass
class Selection:
  """Validation history [{step, val: {task: acc}, average}] and the selected step."""

  rule: str
  history: list = dataclasses.field(default_factory=list)
  step: Optional[int] = None

  def __post_init__(self):
    if self.rule not in RULES:
      raise ValueError(f"train.select={self.rule!r}; allowed: {RULES}")

  def record(self, step: int, val: Mapping[str, float]) -> bool:
    """Adds one evaluation; True when `step` becomes the selected state."""
    step = int(step)
    if self.history and step <= self.history[-1]["step"]:
      raise ValueError(f"validation at step {step} after step {self.history[-1]['step']}")
    entry = {"step": step, "val": {k: float(v) for k, v in val.items()}, "average": mean(val)}
    self.history.append(entry)
    if self.rule == "last" or self.step is None:
      self.step = step
      return True
    if entry["average"] > self.entry()["average"]:  # Strict: ties keep the earlier step.
      self.step = step
      return True
    return False

  def entry(self) -> Optional[dict]:
    """The history entry of the selected step (None before any evaluation)."""
    return next((e for e in self.history if e["step"] == self.step), None)

  def reason(self) -> str:
    e = self.entry()
    if e is None:
      return "no validation evaluation; the final state"
    if self.rule == "last":
      return f"train.select='last': the final state (step {e['step']})"
    steps = [h["step"] for h in self.history]
    return (f"train.select='best_val': highest mean validation accuracy "
            f"{100 * e['average']:.2f}% at step {e['step']} among {len(steps)} evaluations "
            f"(steps {steps}); ties go to the earlier step")

  def to_json(self) -> dict:
    e = self.entry()
    return {"rule": self.rule, "step": self.step,
            "val_average": None if e is None else e["average"],
            "history": [dict(h) for h in self.history], "reason": self.reason()}

  @classmethod
  def from_json(cls, record: Optional[Mapping], rule: str) -> "Selection":
    """A saved record (checkpoint metadata) or a fresh one; refuses a different rule."""
    if not record:
      return cls(rule)
    if record["rule"] != rule:
      raise ValueError(f"train.select={rule!r} but the checkpoint's selection used "
                       f"{record['rule']!r}; keep the rule when resuming")
    return cls(rule, history=[dict(h) for h in record["history"]], step=record["step"])


def zeroshot_record(val: Mapping[str, float]) -> dict:
  """The selection field of a run without training: one state, evaluated once."""
  return {"rule": "zeroshot", "step": 0, "val_average": mean(val) if val else None,
          "history": [{"step": 0, "val": dict(val), "average": mean(val)}] if val else [],
          "reason": ZEROSHOT_REASON}
