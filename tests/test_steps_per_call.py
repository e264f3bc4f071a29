"""Several optimizer steps per jitted call (`train.steps_per_call`): one allocation of temporaries
per call, the scanned grouping steps equal single ones bit for bit, the NaN guard acts per inner
step, and chunks end exactly at every boundary (the trainer's K-step calls equal single steps bit
for bit: tests/test_train_e2e.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from configs import benchmark as benchmark_config
from mmap_jax.apps import benchmark
from mmap_jax.prompts import multitask
from mmap_jax.train import chunks, optim, step as train_step


def _tiny(bpe_path):
  config = benchmark_config.get_config("tiny")
  config.vocab = str(bpe_path)
  return benchmark.build_workload(config)


def _optimizer():
  oc = mlc.ConfigDict({"name": "sgd", "lr": 0.05, "momentum": 0.9, "weight_decay": 5e-4,
                       "warmup_steps": 2, "grad_clip": 1.0})
  return optim.make_optimizer(oc, 10)      # warm-up + cosine + clipping: count-dependent state


@pytest.mark.slow   # two ViT compiles: full suite only
def test_one_call_of_k_steps_allocates_temporaries_once(bpe_path):
  """K steps in one call need one execution's temporaries, not K x one step's (compile only).
  That K steps per call equal K single steps bit for bit, at every chunk length the trainer
  plans (3, 2, 1), is tests/test_train_e2e.py::test_steps_per_call_matches_single_steps_at_every_boundary,
  through the trainer itself."""
  w = _tiny(bpe_path)
  opt = _optimizer()
  params = benchmark.random_clip_params(w.clip_cfg, 0)
  frozen = {"clip": params, "class_tokens": jax.tree.map(jnp.asarray, w.class_tokens)}
  learned = multitask.init_learned(jax.random.key(1), w.clip_cfg, w.spec, w.num_tasks, w.groups)
  batches = benchmark.host_batches(w, 3, seed=3)
  loss_fn = benchmark.train_loss_fn(w)
  state = train_step.init_state(learned, opt)
  single = train_step.make_train_step(loss_fn, opt, donate=False).lower(
      state, frozen, batches[0]).compile()
  multi = train_step.make_train_steps(loss_fn, opt, donate=False).lower(
      state, frozen, jax.tree.map(lambda *x: np.stack(x), *batches)).compile()
  temp = lambda c: c.memory_analysis().temp_size_in_bytes
  assert temp(multi) < 1.5 * temp(single)


def test_non_finite_inner_step_keeps_the_state_and_is_reported():
  def loss_fn(learned, frozen, batch):
    loss = jnp.sum((learned["w"] * batch["x"]) ** 2)
    return loss, {"per_task_loss": loss[None]}

  opt = optax.sgd(0.1, momentum=0.9)
  x = np.ones((3, 3), np.float32)
  x[1, 0] = np.inf                                        # the second inner step is non-finite
  multi = train_step.make_train_steps(loss_fn, opt, donate=False)
  single = train_step.make_train_step(loss_fn, opt, donate=False)
  state, m = multi(train_step.init_state({"w": jnp.ones(3)}, opt), {}, {"x": x})
  assert m["loss"].shape == (3,)
  np.testing.assert_array_equal(m["finite"], [True, False, True])
  ref = train_step.init_state({"w": jnp.ones(3)}, opt)
  for i in range(3):
    ref, _ = single(ref, {}, {"x": x[i]})
  jax.tree.map(np.testing.assert_array_equal, state, ref)
  assert int(state["step"]) == 3


def _check_plan(start, total, k, every, max_lengths=3):
  plan = chunks.plan_chunks(start, total, k, every, max_lengths)
  ends = list(np.cumsum([start] + plan))[1:]
  assert sum(plan) == total - start and all(1 <= n <= k for n in plan)
  assert len(set(plan)) <= max_lengths
  must = {s for s in range(start + 1, total + 1) if any(s % e == 0 for e in every)} | {total}
  assert must <= set(ends), sorted(must - set(ends))      # every boundary ends a chunk
  return plan


def test_chunk_plan_ends_at_every_boundary():
  assert _check_plan(0, 7, 3, (5, 3, 6)) == [3, 2, 1, 1]
  assert _check_plan(3, 7, 3, (5, 3, 6)) == [2, 1, 1]       # resumed at step 3
  assert _check_plan(0, 7, 3, (2, 2, 7)) == [2, 2, 2, 1]
  assert _check_plan(0, 12, 4, (100,)) == [4, 4, 4]
  assert _check_plan(0, 10, 4, (100,)) == [4, 4, 2]          # steps not divisible by K
  assert _check_plan(0, 10, 1, (3,)) == [1] * 10
  assert _check_plan(0, 130, 8, (50, 1000)) == [8] * 6 + [2] + [8] * 6 + [2] + [8] * 3 + [6]
  # Many different remainders: at most 3 programs (K, the commonest remainder, 1).
  for every in ((5, 7, 11), (3, 4, 13), (6, 10, 15)):
    for start in (0, 1, 17):
      _check_plan(start, 100, 4, every)
  assert _check_plan(0, 100, 8, (5, 7, 11), max_lengths=2)
  with pytest.raises(ValueError, match="steps_per_call"):
    chunks.plan_chunks(0, 10, 0, (2,))


def test_the_host_names_the_first_non_finite_inner_step():
  from mmap_jax.train import cadence
  chunk = {"finite": np.asarray([True, False, False]), "loss": np.asarray([1.0, np.inf, 2.0])}
  assert cadence.first_non_finite(chunk, 5) == (6, np.inf)       # chunk of steps 5, 6, 7
  assert cadence.first_non_finite({"finite": np.asarray([True] * 3), "loss": np.ones(3)},
                                  5) is None
  assert cadence.first_non_finite({"finite": np.asarray(False),
                                   "loss": np.asarray(np.nan)}, 4)[0] == 4


def test_cadence_checks_one_call_late_and_saves_on_preemption():
  """Cadence owns the non-finite check (deferred one call, at once before a log / eval /
  checkpoint step or a preemption save) and the checkpoint saves (checkpoint steps, and the
  step a preemption stops at)."""
  from mmap_jax.train import cadence

  class Ckpt:
    directory = "/ckpt"
    def __init__(self):
      self.saved, self.waited = [], 0
    def latest_step(self):
      return self.saved[-1] if self.saved else None
    def wait(self):
      self.waited += 1

  ok = {"finite": np.asarray(True), "loss": np.asarray(1.0)}
  bad = {"finite": np.asarray(False), "loss": np.asarray(np.nan)}

  def make(stop_at, on_non_finite=None):
    ckpt = Ckpt()
    c = cadence.Cadence(total=6, start=0, log_every=3, eval_every=0, ckpt_every=0,
                        images_per_step=8, writer=None, steps_per_call=1,
                        preemption=cadence.Preemption(lambda n: False, coordinated=False),
                        save=ckpt.saved.append, checkpointer=ckpt, on_non_finite=on_non_finite)
    c.preemption.check = lambda: c.preemption.requested
    try:
      for call in c.calls():
        c.preemption.requested = call.last == stop_at
        yield call, c, ckpt
        if c.after(call):
          return
    finally:
      c.preemption.restore()

  # Step 1 goes bad: found when step 2's metrics arrive, naming the last good checkpoint.
  seen = []
  with pytest.raises(cadence.NonFiniteError, match="step 1 .*last good checkpoint: step None"):
    for call, c, _ in make(stop_at=None):
      seen.append(call.last)
      c.ran(call, bad if call.last == 1 else ok)
  assert seen == [1, 2]
  # A bad log step (3) is found at once, before the host logs it.
  found, seen = [], []
  for call, c, ckpt in make(stop_at=None, on_non_finite=lambda s, l: found.append((s, seen[-1]))):
    seen.append(call.last)
    c.ran(call, bad if call.last == 3 else ok)
  assert found == [(3, 3)] and ckpt.saved == [6]   # the last step is always a checkpoint step
  # Preempted after step 4 (not a checkpoint step): step 4 checked, saved, written; stop.
  found = []
  for call, c, ckpt in make(stop_at=4, on_non_finite=lambda s, l: found.append(s)):
    c.ran(call, bad if call.last == 4 else ok)
  assert found == [4] and ckpt.saved == [4] and ckpt.waited == 1


@pytest.mark.slow   # a long compile: full suite only
def test_scanned_grouping_steps_equal_single_grouping_steps(bpe_path, xla_default_codegen):
  """The grouping warm-up's K-step call == K single grouping steps (affinity included), exactly."""
  import dataclasses
  from mmap_jax import grouping
  from mmap_jax.train import grouping_run
  w = _tiny(bpe_path)
  spec = dataclasses.replace(w.spec, method="mmap_shared").validate(w.clip_cfg)
  config = benchmark_config.get_config("tiny")
  config.vocab = str(bpe_path)
  ct = jax.tree.map(jnp.asarray, benchmark.class_tokens_for(w, spec))
  params = benchmark.random_clip_params(w.clip_cfg, 0)
  opt = _optimizer()
  learned = multitask.init_learned(jax.random.key(2), w.clip_cfg, spec, w.num_tasks)
  init = lambda: {"params": learned, "opt_state": opt.init(learned),
                  "affinity": grouping.AffinityState.zeros(w.num_tasks)}
  batches = benchmark.host_batches(w, 3, seed=4)
  records = [True, False, True]
  single = grouping_run.make_grouping_step(w.clip_cfg, spec, opt)
  ref = jax.tree.map(jnp.array, init())
  for b, r in zip(batches, records):
    ref, _ = single(ref, params, ct, b, jnp.asarray(r))
  multi = grouping_run.make_grouping_steps(w.clip_cfg, spec, opt)
  got, metrics = multi(jax.tree.map(jnp.array, init()), params, ct,
                       jax.tree.map(lambda *x: np.stack(x), *batches), jnp.asarray(records))
  assert metrics["loss"].shape == (3,)
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), jax.device_get(ref))


def test_cadence_calls_hooks_and_preemption_counters():
  """train.cadence: calls end at every boundary with their flags; hooks see each call's step
  range; the agreed preemption check gets consecutive call counters (jax's sync protocol sets
  the sync point to the fastest process's counter + 1, which chunk-end steps would skip) and
  installs no Python SIGTERM handler (it would replace jax's C++ one)."""
  import signal
  from mmap_jax.train import cadence

  asked, seen = [], []
  before = signal.getsignal(signal.SIGTERM)
  preemption = cadence.Preemption(lambda c: asked.append(c) or len(asked) == 3,
                                  coordinated=True)
  assert signal.getsignal(signal.SIGTERM) is before
  c = cadence.Cadence(total=7, start=0, log_every=5, eval_every=6, ckpt_every=3,
                      images_per_step=8, writer=None, preemption=preemption, steps_per_call=3,
                      hooks=[lambda a, b: seen.append((a, b))])
  calls = list(c.calls())
  assert [(x.first, x.last) for x in calls] == [(1, 3), (4, 5), (6, 6), (7, 7)]
  assert [(x.log, x.eval, x.ckpt) for x in calls] == [
      (False, False, True), (True, False, False), (False, True, True), (True, True, True)]
  stops = [c.after(x) for x in calls]
  assert stops == [False, False, True, False] and asked == list(range(asked[0], asked[0] + 4))
  assert seen == [(1, 3), (4, 5), (6, 6), (7, 7)]
  remove = cadence.register_hook(lambda a, b: seen.append(("registered", b)))
  try:
    c.after(calls[0])
  finally:
    remove()
  assert seen[-2:] == [(1, 3), ("registered", 3)]
  # The counter is the process's: a later run (a sweep's next setting) continues it.
  cadence.Preemption(lambda c: asked.append(c), coordinated=True).check()
  assert asked[-3:] == list(range(asked[0] + 3, asked[0] + 6))
  # One process: the local flag, set by SIGTERM through the Python handler.
  local = cadence.Preemption(lambda c: False, coordinated=False)
  try:
    assert signal.getsignal(signal.SIGTERM) == local._handle and not local.check()
    signal.raise_signal(signal.SIGTERM)
    assert local.check()
  finally:
    local.restore()
  assert signal.getsignal(signal.SIGTERM) is before
  assert cadence.due(7, 0, 7) and not cadence.due(6, 0, 7) and cadence.due(4, 2, 7)
