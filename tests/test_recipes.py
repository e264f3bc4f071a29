"""Optimisation recipes: resolution (None -> family default, overrides recorded), validation,
the full-FT no-decay mask on the real ViT-B/16 names, exact SGD / AdamW steps, results.json."""
from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import demo, office_home
from mmap_jax.models import clip
from mmap_jax.models.config import VARIANTS
from mmap_jax.prompts import PromptSpec, init_learned
from mmap_jax.prompts.spec import FAMILIES, METHODS
from mmap_jax.train import loop, optim, recipes, setup
from tests import train_fixtures as fx

B16 = VARIANTS["ViT-B/16"]


# ----------------------------------------------------------------------------- resolution

def test_every_family_has_a_valid_published_row():
  expected = set(FAMILIES) | {"clipadapter", "bitfit", "lora"}
  assert expected <= set(recipes.RECIPES)
  assert {m.split("_")[0] for m in METHODS} <= set(recipes.RECIPES)
  assert recipes.RECIPES["zeroshot"] is None
  for family, r in recipes.RECIPES.items():
    if r is not None:
      assert recipes.check(r) == [], family
  r = recipes.RECIPES
  assert (r["coop"].name, r["coop"].lr, r["coop"].warmup_type, r["coop"].warmup_lr) == (
      "sgd", 0.002, "constant", 1e-5)
  assert (r["maple"].lr, r["mmap"].lr, r["vpt"].lr) == (0.0035, 0.0035, 0.0025)
  assert (r["maple"].momentum, r["maple"].weight_decay, r["maple"].decay_mask) == (0.9, 5e-4, "all")
  f = r["fullft"]
  assert (f.name, f.lr, f.weight_decay, f.decay_mask, f.warmup_steps) == (
      "adamw", 1e-5, 0.1, "no_norm_bias_embed", 500)
  assert (r["lora"].name, r["lora"].lr, r["lora"].weight_decay, r["lora"].min_lr) == (
      "adamw", 2e-4, 1e-2, 1e-6)


def test_none_takes_the_family_recipe_and_an_explicit_field_overrides_only_itself():
  full = office_home.get_config("clip=/c,method=fullft_mt")
  res = setup.recipe(full)
  assert res.recipe == recipes.RECIPES["fullft"] and res.overridden == ()
  full.optim.lr = 3e-5   # WiSE-FT's lr
  res = setup.recipe(full)
  assert res.recipe == dataclasses.replace(recipes.RECIPES["fullft"], lr=3e-5)
  assert res.overridden == ("lr",)
  assert res.to_dict() == {"family": "fullft", "overridden": ["lr"], "per_family": [],
                           "recipe": {**recipes.RECIPES["fullft"].to_dict(), "lr": 3e-5}}
  json.dumps(res.to_dict())
  # Explicit values are kept even when equal to the default: they are the user's choice.
  res = recipes.resolve("coop", {"lr": 0.002, "accum_steps": 4})
  assert res.recipe == recipes.RECIPES["coop"] and res.overridden == ("lr",)
  # Zero-shot trains nothing; overrides are recorded, no optimizer is built from them.
  res = recipes.resolve("zeroshot", {"lr": 0.01})
  assert res.recipe is None and res.overridden == ("lr",)


def test_demo_trains_every_family_with_its_tuned_lr_and_published_rest():
  """The demo's per-family values: the lr tuned on validation (DEMO_LR) and a 10-step linear
  warm-up; everything else is the family's published recipe, whichever way the method is set."""
  assert set(demo.DEMO_LR) == set(recipes.RECIPES) - {"zeroshot"}
  for method in ("mmap_mt", "mmap_st", "maple_mt", "coop_mt", "vpt_mt", "ivlp_mt", "fullft_mt",
                 "clipadapter_mt", "bitfit_st", "lora_mt"):
    family = method.split("_")[0]
    res = setup.recipe(demo.get_config(f"method={method}"))
    by_flag = demo.get_config()
    by_flag.method = method
    assert setup.recipe(by_flag) == res
    assert res.overridden == () and res.per_family == ("lr", "warmup_steps", "warmup_type")
    # SGD families' MT forms: the tuned lr / 4 (tuned under the old mean over 4 tasks; every
    # form now sums, heads.py); ST forms and the AdamW families keep the tuned value.
    lr = demo.DEMO_LR[family]
    if family in demo.SGD_FAMILIES and not method.endswith("_st"):
      lr = lr / demo.TUNED_TASKS
    want = dataclasses.replace(recipes.RECIPES[family], lr=lr,
                               warmup_steps=10, warmup_type="linear")
    assert res.recipe == want, method
  # The demo's mmap schedule (SGD, linear warm-up then cosine) as the hand-written recipe.
  r = setup.recipe(demo.get_config("method=mmap_mt")).recipe
  old = recipes.Recipe(name="sgd", lr=demo.DEMO_LR["mmap"] / 4, momentum=0.9, weight_decay=5e-4,
                       warmup_steps=10, warmup_type="linear", grad_clip=0.0)
  for step in (0, 7, 10, 150, 199):
    assert float(optim.learning_rate_schedule(r, 200)(step)) == float(
        optim.learning_rate_schedule(old, 200)(step))


def test_precedence_optim_over_per_family_over_published():
  c = demo.get_config("method=mmap_mt")
  c.optim_per_family.mmap.lr = 0.02          # e.g. a sweep over optim_per_family.mmap.lr
  c.optim.warmup_steps = 5                   # explicit: wins over the per-family 10
  res = setup.recipe(c)
  assert (res.recipe.lr, res.recipe.warmup_steps, res.recipe.warmup_type) == (0.02, 5, "linear")
  assert res.overridden == ("warmup_steps",) and res.per_family == ("lr", "warmup_type")
  assert res.recipe.weight_decay == recipes.RECIPES["mmap"].weight_decay   # published
  c.optim_per_family.nope = {"lr": 0.1}
  with pytest.raises(setup.ConfigError, match=r"optim_per_family has unknown method famil"):
    setup.recipe(c)
  with pytest.raises(ValueError, match=r"optim_per_family\.mmap\.lrr"):
    recipes.resolve("mmap", None, {"lrr": 0.1})


@pytest.mark.parametrize("optim_values, field", [
    ({"lr": -1.0}, "optim.lr"),
    ({"name": "adam"}, "optim.name"),
    ({"warmup_type": "cosine"}, "optim.warmup_type"),
    ({"decay_mask": "weights"}, "optim.decay_mask"),
    ({"momentum": 1.0}, "optim.momentum"),
    ({"min_lr": 0.01}, "optim.min_lr"),        # >= lr 0.0035
    ({"warmup_steps": 1.5}, "optim.warmup_steps"),
    ({"lrr": 0.1}, "optim.lrr"),
])
def test_invalid_recipe_fields_are_rejected_by_name(optim_values, field):
  with pytest.raises(ValueError, match=field.replace(".", r"\.")):
    recipes.resolve("mmap", optim_values)


def test_setup_validate_names_a_bad_optim_field():
  c = demo.get_config("clip=/c,method=fullft_mt")
  c.optim.decay_mask = "weights"
  c.optim.b2 = 1.5
  with pytest.raises(setup.ConfigError) as e:
    setup.validate(c)
  assert "optim.decay_mask='weights'" in str(e.value) and "optim.b2=1.5" in str(e.value)
  with pytest.raises(ValueError, match="no recipe for method family 'nope'"):
    recipes.resolve("nope")


# ----------------------------------------------------------------------------- decay mask

def _names(path):
  return "/".join(str(k.key) for k in path)


@pytest.mark.parametrize("method", ["fullft_mt", "fullft_st"])
def test_full_ft_no_decay_mask_on_the_real_b16_names(method):
  spec = PromptSpec(method=method)
  learned = jax.eval_shape(lambda p: init_learned(jax.random.key(0), B16, spec, 3, clip_params=p),
                           clip.param_shapes(B16))
  mask = optim.decay_mask("no_norm_bias_embed")(learned)
  flat = {_names(p): m for p, m in jax.tree_util.tree_leaves_with_path(mask)}
  decayed = sorted(n for n, m in flat.items() if m)
  kept = sorted(n for n, m in flat.items() if not m)
  # Per block: in_proj, out_proj, c_fc, c_proj kernels decay; ln_1/ln_2 scale+bias and the four
  # biases do not. 12 + 12 blocks, plus conv1, visual proj and text_projection.
  assert len(decayed) == 24 * 4 + 3 == 99 and len(kept) == 24 * 8 + 11 == 203
  assert len(flat) == len(jax.tree.leaves(learned))
  for name in ("clip/visual/conv1/kernel", "clip/visual/proj", "clip/text/text_projection",
               "clip/visual/transformer/resblocks/0/attn/in_proj/kernel",
               "clip/text/transformer/resblocks/11/mlp/c_proj/kernel"):
    assert name in decayed, name
  for name in ("clip/logit_scale", "clip/visual/class_embedding", "clip/visual/positional_embedding",
               "clip/text/positional_embedding", "clip/text/token_embedding/embedding",
               "clip/visual/ln_pre/scale", "clip/visual/ln_post/bias", "clip/text/ln_final/scale",
               "clip/visual/transformer/resblocks/3/ln_1/scale",
               "clip/visual/transformer/resblocks/3/attn/in_proj/bias",
               "clip/text/transformer/resblocks/0/mlp/c_fc/bias"):
    assert name in kept, name
  assert optim.decay_mask("all") is None


def test_adamw_with_the_mask_decays_only_weights():
  """Zero gradients: AdamW's update is exactly -lr * wd * p on decayed leaves, 0 elsewhere."""
  params = {"ln_1": {"scale": jnp.full((3,), 2.0), "bias": jnp.full((3,), 2.0)},
            "attn": {"in_proj": {"kernel": jnp.full((3, 3), 2.0), "bias": jnp.full((3,), 2.0)}},
            "positional_embedding": jnp.full((4, 3), 2.0), "logit_scale": jnp.asarray(2.0)}
  r = dataclasses.replace(recipes.RECIPES["fullft"], warmup_steps=0, lr=0.01)
  tx = optim.make_optimizer(r, 10)
  updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
  np.testing.assert_allclose(updates["attn"]["in_proj"]["kernel"], -0.01 * 0.1 * 2.0, rtol=1e-6)
  for leaf in (updates["ln_1"]["scale"], updates["ln_1"]["bias"], updates["attn"]["in_proj"]["bias"],
               updates["positional_embedding"], updates["logit_scale"]):
    np.testing.assert_array_equal(leaf, 0.0)


# ----------------------------------------------------------------------------- exact steps

def _cosine(lr, t, total):
  return lr * 0.5 * (1 + math.cos(math.pi * t / total))


def test_sgd_step_equals_the_hand_computed_torch_order():
  """wd * p is added to the gradient before momentum (torch SGD), lr from the cosine."""
  r = recipes.Recipe(name="sgd", lr=0.1, momentum=0.9, weight_decay=0.01, warmup_steps=0)
  total = 10
  tx = optim.make_optimizer(r, total)
  p0 = {"w": np.array([1.0, -2.0, 0.5], np.float32)}
  grads = [np.array([0.3, 0.1, -0.2], np.float32), np.array([-0.4, 0.2, 0.6], np.float32)]
  state, p = tx.init(p0), p0
  for g in grads:
    upd, state = tx.update({"w": jnp.asarray(g)}, state, p)
    p = optax.apply_updates(p, upd)
  # By hand: d = g + wd p; buf = m buf + d; p -= lr_t buf.
  w, buf = p0["w"].astype(np.float64), 0.0
  for t, g in enumerate(grads):
    d = g + 0.01 * w
    buf = 0.9 * buf + d
    w = w - _cosine(0.1, t, total) * buf
  np.testing.assert_allclose(p["w"], w, rtol=1e-6, atol=1e-7)
  # And torch's own SGD with the same per-step lr.
  import torch
  tw = torch.tensor(p0["w"], requires_grad=True)
  opt = torch.optim.SGD([tw], lr=0.1, momentum=0.9, weight_decay=0.01)
  for t, g in enumerate(grads):
    for group in opt.param_groups:
      group["lr"] = _cosine(0.1, t, total)
    tw.grad = torch.tensor(g)
    opt.step()
  np.testing.assert_allclose(p["w"], tw.detach().numpy(), rtol=1e-6, atol=1e-7)


def test_adamw_step_equals_the_hand_computed_decoupled_decay():
  r = recipes.Recipe(name="adamw", lr=0.01, weight_decay=0.1, b1=0.9, b2=0.999, eps=1e-8)
  tx = optim.make_optimizer(r, 100)
  p0 = {"w": jnp.asarray([1.0, -2.0]), "b": jnp.asarray([0.5])}
  g = {"w": jnp.asarray([0.3, -0.1]), "b": jnp.asarray([0.2])}
  upd, _ = tx.update(g, tx.init(p0), p0)
  # Step 1: m_hat = g, v_hat = g^2, so adam = g / (|g| + eps); decay decoupled, times lr.
  # (rtol: 0.999 is not exact in float32, so the bias correction 1 - b2 is off by ~7e-6.)
  for k in p0:
    want = -0.01 * (np.asarray(g[k]) / (np.abs(np.asarray(g[k])) + 1e-8) + 0.1 * np.asarray(p0[k]))
    np.testing.assert_allclose(upd[k], want, rtol=2e-5)
  # The decay term alone: a parameter with zero gradient moves by exactly -lr * wd * p.
  upd, _ = tx.update(jax.tree.map(jnp.zeros_like, g), tx.init(p0), p0)
  np.testing.assert_allclose(upd["w"], -0.01 * 0.1 * np.asarray(p0["w"]), rtol=1e-6)


def test_schedules_linear_and_constant_warmup():
  lin = recipes.Recipe(name="sgd", lr=0.1, weight_decay=0.0, warmup_steps=4, min_lr=0.0)
  s = optim.learning_rate_schedule(lin, 20)
  ref = optax.warmup_cosine_decay_schedule(0.0, 0.1, 4, 20, 0.0)   # the pre-recipe schedule
  for t in range(20):
    assert float(s(t)) == float(ref(t))
  const = dataclasses.replace(lin, warmup_type="constant", warmup_lr=1e-5, min_lr=1e-3)
  s = optim.learning_rate_schedule(const, 20)
  assert [float(s(t)) for t in range(4)] == pytest.approx([1e-5] * 4)
  assert float(s(4)) == pytest.approx(0.1)                        # cosine starts at the peak
  for t in range(4, 20):
    want = 1e-3 + (0.1 - 1e-3) * 0.5 * (1 + math.cos(math.pi * (t - 4) / 16))
    assert float(s(t)) == pytest.approx(want, rel=1e-5)
  assert float(s(20)) == pytest.approx(1e-3)
  assert float(optim.learning_rate_schedule(None, 20)(3)) == 0.0


# ----------------------------------------------------------------------------- results.json

@pytest.mark.slow
def test_results_json_records_the_resolved_recipe(tmp_path, bpe_path):
  clip_dir = fx.make_tiny_clip(tmp_path / "clip", bpe_path)
  c = fx.tiny_config(clip_dir, str(tmp_path / "tfds"), method="coop_mt")
  c.train.steps = 2
  c.train.eval_every = 2
  c.optim.weight_decay = 0.0
  result = loop.train_and_evaluate(c, str(tmp_path / "run"))
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  assert saved["optim"] == result["optim"]
  assert saved["optim"]["family"] == "coop"
  # demo: lr, warm-up type per family; warm-up (runlocal / tiny: 1 step) and weight decay explicit.
  assert saved["optim"]["overridden"] == ["weight_decay", "warmup_steps"]
  assert saved["optim"]["per_family"] == ["lr", "warmup_type"]
  want = dataclasses.replace(recipes.RECIPES["coop"], lr=demo.DEMO_LR["coop"] / demo.TUNED_TASKS,
                             weight_decay=0.0, warmup_steps=1,
                             warmup_type="linear")
  assert saved["optim"]["recipe"] == want.to_dict()
  # The training cost (issue 29): steps on the final params, no grouping warm-up, wall time.
  cost = saved["cost"]
  assert (cost["steps"], cost["grouping_warmup_steps"], cost["budget_steps"]) == (2, 0, 2)
  assert cost["grouping_counted_in_budget"] is False
  assert cost["wall_seconds"] > 0 and isinstance(cost["host"], str) and cost["host"]


def test_optim_per_family_method_key_wins_over_family_and_unknown_keys_are_named():
  """`optim_per_family` may key a method ("mmap_st"): its fields win over its family's, and the
  other forms of the family keep the family's values."""
  c = demo.get_config("method=mmap_st")
  c.optim_per_family = {"mmap": {"lr": 0.5, "warmup_steps": 3}, "mmap_st": {"lr": 0.25}}
  got = recipes.resolve_config(c)
  assert (got.recipe.lr, got.recipe.warmup_steps) == (0.25, 3)
  c.method = "mmap_mt"
  assert recipes.resolve_config(c).recipe.lr == 0.5
  c.optim_per_family = {"mmap_xx": {"lr": 0.5}}
  with pytest.raises(ValueError, match=r"unknown method famil\(ies\) or methods \['mmap_xx'\]"):
    recipes.resolve_config(c)


def test_lora_recipe_is_clip_lora_s():
  """CLIP-LoRA (MaxZanella/CLIP-LoRA lora.py, run_utils.py): AdamW lr 2e-4, wd 1e-2, betas
  0.9 / 0.999, cosine to 1e-6, no warm-up, no clipping."""
  r = recipes.RECIPES["lora"]
  assert (r.name, r.lr, r.weight_decay, r.b1, r.b2, r.min_lr, r.warmup_steps, r.grad_clip) == (
      "adamw", 2e-4, 1e-2, 0.9, 0.999, 1e-6, 0, 0.0)
  ivlp = recipes.RECIPES["ivlp"]   # the MaPLe repo's IVLP yaml: SGD 0.0035, constant warm-up 1e-5
  assert (ivlp.name, ivlp.lr, ivlp.warmup_type, ivlp.warmup_lr) == ("sgd", 0.0035, "constant", 1e-5)
