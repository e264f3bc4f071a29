"""Comparisons without confounds (issue 29, points 1-4), on the tiny CLIP.

Equal per-task objectives in MT and ST forms, the MmAP ablations (parameter counts and what each
trains), the equal-budget prompt sizes, LoRA's dropout (training only), and the training budget
with the grouping warm-up (results.json's cost).
"""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import demo
from mmap_jax import heads
from mmap_jax.models import clip
from mmap_jax.models.config import VARIANTS
from mmap_jax.prompts import PromptSpec, init_learned, task_prompts, trainable_param_count
from mmap_jax.prompts.multitask import clip_params_for
from mmap_jax.train import grouping_run, loop, setup
from mmap_jax.train import run_spec
from mmap_jax.train import step as train_step
from tests import train_fixtures as fx
from tests.test_multitask_model import NAMES
from tests.test_multitask_model import data, params  # noqa: F401 (the tiny CLIP's fixtures)

CFG = VARIANTS["tiny"]          # text width 48, vision width 64, 3 layers each
B16 = VARIANTS["ViT-B/16"]
GROUPS = ((0, 2), (1,))
MMAP = dict(length=4, source_length=2, depth=3, source_dim=16)
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})


def key(seed):
  return jax.random.key(seed, impl="rbg")


def spec_of(method, **kw):
  extra = MMAP if method.startswith("mmap") else {}
  return PromptSpec(method=method, **{**extra, **kw}).validate(CFG)



def _grad(spec, groups, learned, params, ct, batch):
  fn = lambda l: heads.multitask_loss(l, params, CFG, spec, groups, ct, batch)
  return jit(jax.value_and_grad(fn, has_aux=True))(learned)


# ----------------------------------------------------------------------------- point 1

def test_mt_task_specific_gradient_equals_its_st_gradient(tok, params, data):
  """Every form sums its tasks' losses: in an mmap_mt step, task t's task-specific unit gets
  exactly the gradient it gets when task t is trained alone (the ST form: a one-task run of the
  same prompts) on the same batch; a group unit gets the sum over its tasks. (Under the old MT
  mean every task unit got 1/T of it.)"""
  spec = spec_of("mmap_mt")
  ct = heads.build_class_tokens(tok, NAMES, spec.text_prompt_tokens)
  learned = init_learned(key(3), CFG, spec, 3, GROUPS)
  (loss, aux), full = _grad(spec, GROUPS, learned, params, ct, data)
  np.testing.assert_allclose(loss, aux["per_task_loss"].sum(), rtol=1e-6)
  np.testing.assert_allclose(aux["mean_task_loss"], aux["per_task_loss"].mean(), rtol=1e-6)
  one_task = jit(jax.grad(lambda l, ct, b: heads.multitask_loss(
      l, params, CFG, spec, ((0,),), ct, b)[0]))
  group_of = {0: 0, 2: 0, 1: 1}
  group_sum = [None, None]
  for t in range(3):
    g = group_of[t]
    alone = {"group": jax.tree.map(lambda x: x[g][None], learned["group"]),
             "task": jax.tree.map(lambda x: x[t][None], learned["task"])}
    batch = {"images": data["images"][t:t + 1], "labels": data["labels"][t:t + 1]}
    got = one_task(alone, heads.ClassTokens(*(np.asarray(x)[[t]] for x in ct)), batch)
    for name in ("source", "scale_text", "scale_visual"):
      want = got["task"][name][0]
      np.testing.assert_allclose(full["task"][name][t], want, rtol=1e-4,
                                 atol=1e-4 * float(jnp.abs(want).max()))
    group_sum[g] = got["group"] if group_sum[g] is None else jax.tree.map(
        jnp.add, group_sum[g], got["group"])
    assert float(jnp.abs(got["task"]["source"]).max()) > 0
  for g in range(2):
    want = group_sum[g]["source"][0]
    np.testing.assert_allclose(full["group"]["source"][g], want, rtol=1e-4,
                               atol=1e-4 * float(jnp.abs(want).max()))


def test_mmap_task_mt_is_mmap_st_at_2L_tokens(tok, params, data):
  """The MT-form ablation with task units only trains what mmap_st with 2L tokens trains, on the
  same objective: equal loss and gradients for the same prompts (MT and ST forms agree)."""
  mt = spec_of("mmap_task_mt")
  st = spec_of("mmap_st", length=8, source_length=4)
  ct = heads.build_class_tokens(tok, NAMES, mt.text_prompt_tokens)
  assert mt.text_prompt_tokens == st.text_prompt_tokens == 8
  learned = init_learned(key(5), CFG, mt, 3)
  assert jax.tree.map(jnp.shape, learned) == jax.tree.map(
      jnp.shape, init_learned(key(5), CFG, st, 3))
  (l_mt, _), g_mt = _grad(mt, None, learned, params, ct, data)
  (l_st, _), g_st = _grad(st, None, learned, params, ct, data)
  np.testing.assert_allclose(l_mt, l_st, rtol=1e-6)
  for a, b in zip(jax.tree.leaves(g_mt), jax.tree.leaves(g_st)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-8)


# ----------------------------------------------------------------------------- point 2

@pytest.mark.parametrize("variant", ("ViT-B/16", "ViT-L/14", "demo", "tiny"))
def test_indep_ablation_is_within_5_percent_of_mmap_mt(variant):
  cfg = VARIANTS[variant]
  kw = MMAP if variant == "tiny" else {}
  mt = PromptSpec(method="mmap_mt", **kw).validate(cfg)
  indep = PromptSpec(method="mmap_indep_mt", **kw).validate(cfg)
  n_mt = trainable_param_count(cfg, mt, 4, GROUPS[:1] + ((1, 3),))
  n_indep = trainable_param_count(cfg, indep, 4, GROUPS[:1] + ((1, 3),))
  assert abs(n_indep - n_mt) <= 0.05 * n_mt, (variant, n_indep, n_mt)
  assert n_indep != n_mt                        # not the same model: W_t / W_v are wider
  if variant.startswith("ViT"):        # the paper's CLIPs: two sources of d_s / 2 = 128
    assert indep.indep_source_dims(cfg) == (128, 128)
  # Same L, J and prompt tokens per layer as MmAP-MT.
  assert (indep.length, indep.depth_for(cfg), indep.tokens_per_layer) == (
      mt.length, mt.depth_for(cfg), mt.tokens_per_layer)


def test_ablation_counts_at_b16():
  unit = 11 * 8 * 256 + 2 + 3
  big = 11 * 16 * 256 + 2 + 3                   # one unit with 2L tokens (L_s 16)
  count = lambda m: trainable_param_count(B16, PromptSpec(method=m), 4, ((0, 2), (1, 3)))
  assert count("mmap_mt") == 6 * unit
  assert count("mmap_indep_mt") == 6 * (11 * 8 * 256 + 4 + 6)
  assert count("mmap_shared_mt") == big and count("mmap_task_mt") == 4 * big
  with pytest.raises(ValueError, match=r"prompt\.indep_text_source_dim=100 must be a positive "
                                       r"divisor of the text width 512"):
    PromptSpec(method="mmap_indep_mt", indep_text_source_dim=100).validate(B16)


def test_what_each_ablation_trains(tok, params, data):
  shapes = lambda m: jax.tree.map(jnp.shape, jax.eval_shape(
      lambda: init_learned(key(0), CFG, spec_of(m), 3, GROUPS)))
  # One unit of 2L = 8 tokens from L_s = 4 source tokens: W_t / W_v keep MmAP-MT's [2, d / d_s].
  assert shapes("mmap_shared_mt") == {"shared": {"source": (3, 4, 16), "scale_text": (2, 3),
                                                 "scale_visual": (2, 4)}}
  assert shapes("mmap_task_mt") == {"task": {"source": (3, 3, 4, 16), "scale_text": (3, 2, 3),
                                             "scale_visual": (3, 2, 4)}}
  # Source widths (4, 8): the unit count closest to an MmAP unit's on the tiny CLIP (112 vs 110).
  unit = {"source_text": (3, 2, 4), "source_visual": (3, 2, 8), "scale_text": (2, 12),
          "scale_visual": (2, 8)}
  lead = lambda n: {k: (n,) + v for k, v in unit.items()}
  assert shapes("mmap_indep_mt") == {"group": lead(2), "task": lead(3)}
  for m in ("mmap_shared_mt", "mmap_task_mt", "mmap_indep_mt"):   # 2L tokens per layer
    tok_shapes = jax.eval_shape(lambda m=m: task_prompts(
        init_learned(key(0), CFG, spec_of(m), 3, GROUPS), CFG, spec_of(m), GROUPS, num_tasks=3))
    assert (tok_shapes.text.shape, tok_shapes.visual.shape) == ((3, 3, 8, 48), (3, 3, 8, 64)), m
  # No coupling: the text prompts do not depend on the visual source, nor the reverse, and every
  # leaf is trained (non-zero gradient).
  spec = spec_of("mmap_indep_mt")
  learned = init_learned(key(1), CFG, spec, 3, GROUPS)
  moved = {**learned, "task": {**learned["task"],
                               "source_visual": learned["task"]["source_visual"] + 1.0}}
  a, b = (task_prompts(x, CFG, spec, GROUPS) for x in (learned, moved))
  np.testing.assert_array_equal(a.text, b.text)
  assert not np.allclose(a.visual, b.visual)
  ct = heads.build_class_tokens(tok, NAMES, spec.text_prompt_tokens)
  _, grads = _grad(spec, GROUPS, learned, params, ct, data)
  for path, g in jax.tree_util.tree_leaves_with_path(grads):
    assert float(jnp.abs(g).max()) > 0, path


def test_equal_budget_prompt_sizes():
  """`equal_budget`: CoOp, VPT, MaPLe, IVLP at MmAP-MT's 2L tokens and depth J; the published
  rows stay the default."""
  cfg = VARIANTS["demo"]
  mmap_j = PromptSpec(method="mmap_mt").depth_for(cfg)
  for method in ("vpt_mt", "maple_mt", "ivlp_st", "coop_mt", "mmap_mt"):
    c = demo.get_config(f"method={method},equal_budget,runlocal")
    spec = run_spec.resolve(c).prompt_for(cfg)
    published = run_spec.resolve(demo.get_config(f"method={method},runlocal")).prompt_for(cfg)
    if method == "mmap_mt":
      assert (spec.length, spec.depth_for(cfg)) == (published.length, published.depth_for(cfg))
      continue
    assert spec.length == 16 and published.length in (2, 8, 16), method
    assert spec.depth_for(cfg) == (1 if method == "coop_mt" else mmap_j), method
    assert spec.learned_ctx_init is None, method   # more tokens than "a photo of a": random init
  assert run_spec.resolve(demo.get_config("method=maple_mt")).prompt_for(cfg).length == 2


# ----------------------------------------------------------------------------- point 3: dropout

def test_lora_dropout_masks_each_target_independently():
  x = jnp.ones((4000, 6), jnp.float32)
  keys = jax.random.split(jax.random.key(0), 3)
  p = {"lora_a": jnp.ones((6, 3), jnp.float32), "lora_dropout_keys": keys,
       "lora_dropout_rate": jnp.float32(0.25)}
  out = np.asarray(clip._lora_down(x, p))                       # [4000, 3]: one column a target
  np.testing.assert_allclose(out.mean(0), 6.0, rtol=0.03)       # inverted dropout: unbiased
  kept = out / (1 / 0.75)                                      # entries kept per row
  assert abs(1 - kept.mean() / 6 - 0.25) < 0.01
  assert not np.array_equal(out[:, 0], out[:, 1])               # independent masks per target
  no_drop = {"lora_a": p["lora_a"]}
  np.testing.assert_array_equal(clip._lora_down(x, no_drop), jnp.full((4000, 3), 6.0))


@pytest.mark.slow   # a long compile: full suite only
def test_lora_dropout_only_in_training(tok, params, data):
  """CLIP-LoRA's dropout (0.25) acts when a training step passes a key; evaluation (no key)
  runs the undropped model, equal to the merged weights prediction uses."""
  spec = PromptSpec(method="lora_mt").validate(CFG)
  ct = heads.build_class_tokens(tok, NAMES, 0)
  learned = init_learned(key(2), CFG, spec, 3, clip_params=params)
  rng = np.random.default_rng(0)
  learned = jax.tree.map(lambda x: x + jnp.asarray(0.3 * rng.standard_normal(x.shape),
                                                   jnp.float32), learned)   # B != 0

  @jit
  def losses(learned, k1, k2):
    f = lambda k, s=spec: heads.multitask_loss(learned, params, CFG, s, None, ct, data,
                                               dropout_key=k)[0]
    off = PromptSpec(method="lora_mt", lora_dropout=0.0)
    merged = heads.task_logits(clip_params_for(learned, params, spec, merged=True), CFG, None,
                               ct, data["images"])
    plain = heads.task_logits(clip_params_for(learned, params, spec), CFG, None, ct,
                              data["images"])
    return f(None), f(k1), f(k2), f(k1, off), merged, plain

  none, one, two, off, merged, plain = losses(learned, jax.random.key(1), jax.random.key(2))
  assert float(one) != float(none) and float(one) != float(two)
  np.testing.assert_allclose(off, none, rtol=1e-6)           # rate 0: no change with a key
  np.testing.assert_allclose(plain, merged, rtol=1e-4, atol=1e-4)   # eval: no dropout
  # The trainer's loss draws a key from (seed, step) only when the step passes one.
  fn = train_step.make_loss_fn(CFG, spec, None, dtype=jnp.float32, remat=False, seed=0)
  frozen = {"clip": params, "class_tokens": ct}
  batch = {"image": data["images"], "label": data["labels"]}
  l_eval = jit(lambda l: fn(l, frozen, batch)[0])(learned)
  l_s3, l_s4 = (jit(lambda l, s: fn(l, frozen, batch | {"step": s})[0])(learned, jnp.int32(s))
                for s in (3, 4))
  np.testing.assert_allclose(l_eval, none, rtol=1e-6)
  assert float(l_s3) != float(l_eval) and float(l_s3) != float(l_s4)


# ----------------------------------------------------------------------------- point 4: budget

def test_grouping_warmup_length_and_budget_fields():
  c = demo.get_config("method=mmap_mt")
  assert run_spec.resolve(c).groups.lr_warmup_steps == 10 and c.groups.warmup_steps == 20
  assert run_spec.resolve(c).groups.warmup_total_steps == 30
  assert run_spec.resolve(c).groups.settings()["lr_warmup_steps"] == 10
  for m in ("mmap_st", "coop_mt", "mmap_shared_mt"):
    assert run_spec.resolve(demo.get_config(f"method={m}")).groups.warmup_total_steps == 0
  c.groups.mode = "random"
  assert run_spec.resolve(c).groups.warmup_total_steps == 0
  c = demo.get_config("method=mmap_mt,runlocal")
  c.groups.init_from_warmup = True
  c.train.steps = 4                                  # runlocal warm-up: 1 lr + 3 recorded steps
  with pytest.raises(setup.ConfigError, match=r"counts the grouping warm-up's 4 steps against "
                                              r"train\.steps=4"):
    setup.validate(c)
  c = demo.get_config("method=mmap_indep_mt,runlocal")
  c.groups.init_from_warmup = True
  with pytest.raises(setup.ConfigError, match="independent sources"):
    setup.validate(c)


@pytest.mark.slow
def test_init_from_warmup_counts_against_the_budget(tmp_path, bpe_path):
  """With groups.init_from_warmup the warm-up's steps (lr warm-up + recorded) come out of
  train.steps; the affinity is recorded only after the lr warm-up; results.json says so."""
  clip_dir = fx.make_tiny_clip(tmp_path / "clip", bpe_path)
  c = fx.tiny_config(clip_dir, str(tmp_path / "tfds"), method="mmap_mt")
  c.groups.init_from_warmup = True
  c.optim.warmup_steps = 1
  c.groups.warmup_steps = 2
  c.train.steps = 7
  result = loop.train_and_evaluate(c, str(tmp_path / "run"))
  cost = json.loads((tmp_path / "run" / "results.json").read_text())["cost"]
  assert cost == result["cost"]
  assert (cost["steps"], cost["grouping_warmup_steps"], cost["budget_steps"]) == (4, 3, 7)
  assert cost["grouping_counted_in_budget"] is True and cost["wall_seconds"] > 0
  assert result["trained_steps"] == 4
  grouping = json.loads((tmp_path / "run" / "groups.json").read_text())
  assert grouping["lr_warmup_steps"] == 1 and grouping["total_steps"] == 3
  assert np.load(tmp_path / "run" / "affinity_history.npy").shape[0] == 2


def test_sweep_table_has_a_training_cost_column():
  """The sweep's row cost: steps (+ the grouping warm-up's, marked when in the budget) and the
  wall seconds over seeds; rows without cost (older runs) show '-'."""
  from mmap_jax.apps import sweep
  costs = [{"steps": 396, "grouping_warmup_steps": 4, "grouping_counted_in_budget": True,
            "budget_steps": 400, "wall_seconds": w, "host": "h"} for w in (100.0, 110.0, 120.0)]
  row = {"cost": sweep.cost_summary(costs)}
  assert row["cost"]["wall_seconds"] == {"mean": 110.0, "std": 10.0}
  assert sweep._cost_cell(row) == "396 + 4 warm-up (in budget) steps, 110 ± 10 s"
  plain = {"cost": sweep.cost_summary([{**costs[0], "grouping_warmup_steps": 0,
                                        "grouping_counted_in_budget": False}])}
  assert sweep._cost_cell(plain) == "396 steps, 100 s" and sweep._cost_cell({}) == "-"
  stat = {"mean": 0.5, "std": None, "per_seed": [0.5]}
  summary = {"tasks": {"a": {"num_classes": 3}}, "seeds": [0],
             "rows": [{"setting": {"method": m}, "n_seeds": 1, "accuracy": {"a": stat},
                       "average": stat, "trainable_params_per_seed": [10],
                       "trainable_percent": 0.1, **extra}
                      for m, extra in (("mmap_mt", row), ("coop_mt", {}))]}
  md = sweep.markdown_table(summary, ["method"]).splitlines()
  assert md[0].rstrip(" |").endswith("training cost")
  assert md[2].rstrip(" |").endswith("110 ± 10 s") and md[3].rstrip(" |").endswith("-")
  assert "training cost: optimizer steps on the final parameters" in md[-1]
