"""How the step loop splits training into jitted calls of several steps (`train.steps_per_call`).

A chunk is one call of `step.make_train_steps`. Chunks end exactly at every log / checkpoint /
eval step and at the last step, so the host sees the state of those steps as with one step per
call. Every distinct chunk length is one compiled program, so the lengths are limited: each gap
between boundaries is cut into full chunks of K and a remainder, and remainders are either used
as they are (when few distinct ones occur) or cut from a small set that always contains 1.
"""
from __future__ import annotations

import collections
from typing import Sequence


def boundaries(start: int, total: int, every: Sequence[int]) -> list[int]:
  """Sorted steps in (start, total] where the host must see the state (multiples + total)."""
  out = {total} if total > start else set()
  for e in every:
    if e >= 1:
      out.update(range((start // e + 1) * e, total + 1, e))
  return sorted(out)


def plan_chunks(start: int, total: int, steps_per_call: int, every: Sequence[int],
                max_lengths: int = 3) -> list[int]:
  """Chunk lengths (<= steps_per_call) covering steps start..total, none crossing a boundary.

  At most `max_lengths` distinct lengths (one compile each): K, and the most common remainders
  of the gaps between boundaries; rarer remainders are cut greedily from those and 1.
  """
  k = int(steps_per_call)
  if k < 1 or max_lengths < 2:
    raise ValueError(f"steps_per_call={k} must be >= 1 and max_lengths={max_lengths} >= 2")
  stops = boundaries(start, total, every)
  gaps = [b - a for a, b in zip([start] + stops[:-1], stops)]
  remainders = collections.Counter(g % k for g in gaps if g % k)
  if len(remainders) <= max_lengths - 1:
    allowed = set(remainders)
  else:   # Keep the remainders covering most steps; 1 makes any other one representable.
    ranked = sorted(remainders, key=lambda r: (-remainders[r] * r, -r))
    allowed = {1} | set(ranked[:max_lengths - 2])
  allowed = sorted(allowed | {k}, reverse=True)
  plan = []
  for g in gaps:
    plan += [k] * (g // k)
    rest = g % k
    for n in allowed:
      plan += [n] * (rest // n)
      rest %= n
  return plan
