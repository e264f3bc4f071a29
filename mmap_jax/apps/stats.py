"""Paired bootstrap confidence interval of the difference between two settings' accuracies.

The data are per-image correctness on the test split, for every seed and task of both settings:
`a[s][t]` and `ref[s][t]` are bool arrays over the same test images (index = record index within
the task's test split), for the same seeds s. The statistic is the difference of the settings'
AVERAGE accuracy (mean over tasks of per-task accuracy; the table's "average" column), averaged
over seeds:

    delta = mean_s mean_t ( acc_a[s, t] - acc_ref[s, t] ).

Bootstrap replicate: draw the seeds with replacement, then the test images of each task with
replacement, and recompute delta on the draw. Paired: one draw serves both settings (the same
seeds, the same images), so what the two settings have in common (hard images, lucky seeds)
cancels. Two ways to draw the images (`image_draw`):

  shared    (default) ONE image draw per task and replicate, used for every drawn seed. The
            seeds of a sweep are evaluated on the SAME test images (the split comes from
            data.split_seed, not the training seed), i.e. images and seeds are crossed, not
            nested; a per-image effect that repeats over seeds (an image A always gets right and
            the reference always wrong) is one observation of the image population, and only a
            shared draw keeps its variance at sigma^2/n instead of sigma^2/(n * seeds).
  per_seed  an independent image draw for every drawn seed (the nested two-level bootstrap).
            Narrower when per-image effects repeat over seeds; kept for comparison.

The interval is the percentile interval of `num_samples` replicates (default 2000; 95%: the 2.5%
and 97.5% quantiles). Deterministic: the draws come from numpy's PCG64 seeded with `seed`.
`mean` is delta on the data itself (not the replicates' mean).
"""
from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np

IMAGE_DRAWS = ("shared", "per_seed")
DEFAULT_SAMPLES = 2000
DEFAULT_LEVEL = 0.95
_CHUNK_ENTRIES = 1 << 24  # replicates x images per chunk (bounds memory at ~128 MB of float64)

Correct = Sequence[Mapping[str, np.ndarray]]  # per seed: {task: bool [n_task]}


def _differences(a: Correct, ref: Correct) -> tuple[list[str], list[np.ndarray]]:
  """Per task: [S, n_t] float64 of a - ref per (seed, image), after checking the pairing."""
  if len(a) != len(ref) or not len(a):
    raise ValueError(f"paired bootstrap needs the same seeds for both settings and at least one; "
                     f"got {len(a)} and {len(ref)}")
  tasks = list(ref[0])
  diffs = []
  for t in tasks:
    rows = []
    for s, (x, y) in enumerate(zip(a, ref)):
      if t not in x or t not in y:
        raise ValueError(f"seed index {s}: task {t!r} missing (tasks {list(x)} vs {list(y)})")
      x, y = np.asarray(x[t]), np.asarray(y[t])
      if x.ndim != 1 or x.shape != y.shape or not x.size:
        raise ValueError(f"seed index {s}, task {t!r}: per-image arrays differ in shape "
                         f"({x.shape} vs {y.shape}) or are empty; not the same test images")
      rows.append(x.astype(np.float64) - y.astype(np.float64))
    if len({r.size for r in rows}) != 1:
      raise ValueError(f"task {t!r}: the seeds have different numbers of test images")
    diffs.append(np.stack(rows))
  for s, x in enumerate(a):
    if sorted(x) != sorted(tasks):
      raise ValueError(f"seed index {s}: tasks {list(x)} differ from {tasks}")
  return tasks, diffs


def _counts(rng: np.random.Generator, n: int, size: tuple[int, ...]) -> np.ndarray:
  """Multinomial draw counts: how often each of n items is drawn in n draws with replacement."""
  return rng.multinomial(n, np.full(n, 1.0 / n), size=size).astype(np.float64)


def replicates(a: Correct, ref: Correct, *, num_samples: int = DEFAULT_SAMPLES, seed: int = 0,
               image_draw: str = "shared") -> np.ndarray:
  """The bootstrap distribution of delta: [num_samples] float64 (see the module docstring)."""
  if image_draw not in IMAGE_DRAWS:
    raise ValueError(f"image_draw={image_draw!r}; allowed: {IMAGE_DRAWS}")
  if isinstance(num_samples, bool) or not isinstance(num_samples, (int, np.integer)) \
      or num_samples < 1:
    raise ValueError(f"num_samples must be a positive int, got {num_samples!r}")
  _, diffs = _differences(a, ref)
  rng = np.random.Generator(np.random.PCG64(seed))
  num_seeds = diffs[0].shape[0]
  slots = rng.integers(0, num_seeds, (num_samples, num_seeds))         # drawn seeds [B, S]
  out = np.zeros(num_samples, np.float64)
  for d in diffs:                                                        # d: [S, n]
    n = d.shape[1]
    per = max(1, _CHUNK_ENTRIES // (n * (num_seeds if image_draw == "per_seed" else 1)))
    for lo in range(0, num_samples, per):
      b = min(per, num_samples - lo)
      drawn = slots[lo:lo + b]                                           # [b, S]
      if image_draw == "shared":  # one image draw, used by every drawn seed
        img_w = _counts(rng, n, (b,)) / n                                # [b, n]
        slot_mean = np.take_along_axis(img_w @ d.T, drawn, axis=1)       # [b, S]
      else:                       # every drawn seed (each slot) draws its own images
        img_w = _counts(rng, n, (b, num_seeds)) / n                      # [b, S, n]
        slot_mean = np.einsum("bjn,bjn->bj", img_w, d[drawn])
      out[lo:lo + b] += slot_mean.mean(axis=1)
  return out / len(diffs)


def paired_delta_ci(a: Correct, ref: Correct, *, num_samples: int = DEFAULT_SAMPLES,
                    level: float = DEFAULT_LEVEL, seed: int = 0,
                    image_draw: str = "shared") -> dict:
  """{"mean", "low", "high", "excludes_zero", ...}: delta and its percentile bootstrap interval.

  `a` / `ref`: per seed (the same seeds, in the same order), {task: bool [n_task]} correctness on
  the same test images. Fractions (0.012 = 1.2 points). `excludes_zero`: low > 0 or high < 0.
  """
  if not 0.0 < level < 1.0:
    raise ValueError(f"level must be in (0, 1), got {level!r}")
  tasks, diffs = _differences(a, ref)
  mean = float(np.mean([d.mean() for d in diffs]))
  reps = replicates(a, ref, num_samples=num_samples, seed=seed, image_draw=image_draw)
  alpha = (1.0 - level) / 2
  low, high = (float(v) for v in np.quantile(reps, [alpha, 1.0 - alpha]))
  # Replicates are means of the same values: round off float noise so exact cases stay exact.
  low, high, mean = (round(v, 12) + 0.0 for v in (low, high, mean))
  return {"mean": mean, "low": low, "high": high, "excludes_zero": bool(low > 0 or high < 0),
          "level": level, "num_samples": int(num_samples), "seed": int(seed),
          "image_draw": image_draw, "n_seeds": len(a), "tasks": tasks,
          "num_test": {t: int(d.shape[1]) for t, d in zip(tasks, diffs)}}


def format_ci(ci: Optional[Mapping], *, mark: str = "*") -> str:
  """'+1.23 [-0.40, +2.80]' in points (%), with `mark` appended when the interval excludes 0."""
  if not ci:
    return "-"
  cell = (f"{100 * ci['mean']:+.2f} [{100 * ci['low']:+.2f}, {100 * ci['high']:+.2f}]")
  return cell + (f" {mark}" if ci.get("excludes_zero") else "")
