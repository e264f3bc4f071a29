"""The paired bootstrap of mmap_jax/apps/stats.py on cases whose answer is known exactly."""
from __future__ import annotations

import numpy as np
import pytest
from scipy import stats as scipy_stats

from mmap_jax.apps import stats


def _runs(*per_seed):
  """per_seed: one {task: 0/1 list} per seed -> the bool arrays the trainer writes."""
  return [{t: np.asarray(v, bool) for t, v in s.items()} for s in per_seed]


def test_identical_settings_give_exactly_zero():
  rng = np.random.default_rng(1)
  a = _runs(*({"x": rng.random(50) < 0.6, "y": rng.random(30) < 0.3} for _ in range(3)))
  ci = stats.paired_delta_ci(a, a, num_samples=500)
  assert (ci["mean"], ci["low"], ci["high"]) == (0.0, 0.0, 0.0)
  assert not ci["excludes_zero"] and stats.format_ci(ci) == "+0.00 [+0.00, +0.00]"


def test_a_constant_shift_gives_an_exact_interval():
  """Every image right for A and wrong for the reference: delta is 1 in every replicate."""
  a = _runs({"x": [1] * 20, "y": [1] * 7}, {"x": [1] * 20, "y": [1] * 7})
  ref = _runs({"x": [0] * 20, "y": [0] * 7}, {"x": [0] * 20, "y": [0] * 7})
  ci = stats.paired_delta_ci(a, ref, num_samples=300)
  assert (ci["mean"], ci["low"], ci["high"], ci["excludes_zero"]) == (1.0, 1.0, 1.0, True)
  assert stats.format_ci(ci) == "+100.00 [+100.00, +100.00] *"
  back = stats.paired_delta_ci(ref, a, num_samples=300)
  assert (back["mean"], back["low"], back["high"]) == (-1.0, -1.0, -1.0)


def test_one_seed_one_task_is_the_binomial_bootstrap():
  """One seed, one task, A right exactly where the reference is wrong on k of n images, equal
  elsewhere: a replicate's delta is Binomial(n, k/n)/n, so its quantiles are known."""
  n, k = 40, 12
  a = np.zeros(n, bool)
  a[:k] = True
  reps = stats.replicates(_runs({"t": a}), _runs({"t": np.zeros(n, bool)}), num_samples=20000,
                          seed=3)
  assert set(np.unique(np.round(reps * n, 9))) <= set(range(n + 1))
  assert reps.mean() == pytest.approx(k / n, abs=0.005)
  assert reps.var() == pytest.approx((k / n) * (1 - k / n) / n, rel=0.05)
  ci = stats.paired_delta_ci(_runs({"t": a}), _runs({"t": np.zeros(n, bool)}),
                             num_samples=20000, seed=3)
  exact = scipy_stats.binom(n, k / n)
  assert ci["mean"] == k / n
  assert abs(ci["low"] * n - exact.ppf(0.025)) <= 1 and abs(ci["high"] * n - exact.ppf(0.975)) <= 1
  assert ci["excludes_zero"]


def test_two_seeds_resample_the_seeds():
  """Per-seed constant deltas 0 and 1: replicates are 0, 1/2, 1 with probability 1/4, 1/2, 1/4,
  so the 95% interval is [0, 1] around the mean 1/2."""
  a = _runs({"t": [1, 1, 1]}, {"t": [1, 1, 1]})
  ref = _runs({"t": [1, 1, 1]}, {"t": [0, 0, 0]})
  reps = stats.replicates(a, ref, num_samples=8000, seed=0)
  values, counts = np.unique(reps, return_counts=True)
  assert values.tolist() == [0.0, 0.5, 1.0]
  assert counts / counts.sum() == pytest.approx([0.25, 0.5, 0.25], abs=0.02)
  ci = stats.paired_delta_ci(a, ref, num_samples=8000)
  assert (ci["mean"], ci["low"], ci["high"], ci["excludes_zero"]) == (0.5, 0.0, 1.0, False)


def test_pairing_cancels_what_both_settings_share():
  """A equals the reference except on 3 of 400 images where it is right: the paired interval is
  within those 3 images (0 to 1.5 points), while the settings' own accuracies spread ~5 points."""
  rng = np.random.default_rng(0)
  ref = rng.random(400) < 0.5
  a = ref.copy()
  wrong = np.flatnonzero(~ref)[:3]
  a[wrong] = True
  ci = stats.paired_delta_ci(_runs({"t": a}), _runs({"t": ref}), num_samples=4000)
  assert ci["mean"] == pytest.approx(3 / 400)
  assert 0.0 <= ci["low"] and ci["high"] <= 9 / 400
  own = stats.replicates(_runs({"t": a}), _runs({"t": np.zeros(400, bool)}), num_samples=4000)
  assert np.quantile(own, 0.975) - np.quantile(own, 0.025) > 0.08


def test_shared_image_draws_are_wider_than_per_seed_when_effects_repeat():
  """The same images favour A in all 4 seeds (seeds evaluate the same test split): a shared draw
  keeps the image variance, a per-seed draw averages it down by about sqrt(seeds)."""
  rng = np.random.default_rng(2)
  d = rng.random(200) < 0.5
  a = _runs(*({"t": d} for _ in range(4)))
  ref = _runs(*({"t": np.zeros(200, bool)} for _ in range(4)))
  width = {}
  for draw in stats.IMAGE_DRAWS:
    ci = stats.paired_delta_ci(a, ref, num_samples=3000, image_draw=draw)
    width[draw] = ci["high"] - ci["low"]
  assert width["shared"] / width["per_seed"] == pytest.approx(2.0, rel=0.15)


def test_deterministic_and_seeded():
  rng = np.random.default_rng(5)
  a = _runs(*({"t": rng.random(60) < 0.5} for _ in range(3)))
  ref = _runs(*({"t": rng.random(60) < 0.5} for _ in range(3)))
  assert stats.paired_delta_ci(a, ref, seed=7) == stats.paired_delta_ci(a, ref, seed=7)
  assert not np.array_equal(stats.replicates(a, ref, seed=7), stats.replicates(a, ref, seed=8))


@pytest.mark.parametrize("ref, needle", [
    (_runs({"t": [1, 0]}), "same seeds"),
    (_runs({"t": [1, 0, 1]}, {"t": [1, 0, 1]}), "differ in shape"),
    (_runs({"u": [1, 0]}, {"u": [1, 0]}), "task 'u' missing"),
])
def test_unpaired_inputs_are_refused(ref, needle):
  with pytest.raises(ValueError, match=needle):
    stats.paired_delta_ci(_runs({"t": [1, 0]}, {"t": [0, 0]}), ref)
