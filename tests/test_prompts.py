"""Prompt methods: spec validation, per-family expansion, multi-task wiring, parameter budgets."""
import jax
import ml_collections
import numpy as np
import pytest

from mmap_jax.models import clip
from mmap_jax.models.config import VARIANTS
from mmap_jax.prompts import (METHODS, PromptSpec, init_learned, maple, mmap, multitask,
                              param_summary, task_prompts, trainable_param_count, vpt)

B16 = VARIANTS["ViT-B/16"]
TINY = VARIANTS["tiny"]
GROUPS = ((0, 2), (1, 3))
TINY_KW = dict(depth=3, source_dim=16)     # tiny widths 48 / 64


def key(seed):
  """RBG keys: compiling threefry on CPU takes ~1 s per shape, this ~0.1 s."""
  return jax.random.key(seed, impl="rbg")


def tiny_spec(method, **kw):
  base = dict(TINY_KW) if method.startswith(("mmap", "maple", "ivlp")) else {}
  if method.startswith("vpt"):
    base = {"depth": 3}
  base.update(kw)
  return PromptSpec(method=method, **base).validate(TINY)


# ----------------------------------------------------------------------------- spec

def test_defaults_per_family():
  assert (PromptSpec(method="mmap_mt").length, PromptSpec(method="mmap_mt").depth) == (8, 11)
  s = PromptSpec(method="mmap_mt")
  assert (s.source_length, s.source_dim, s.per_layer_scaling) == (8, 256, False)
  assert s.tokens_per_layer == 16 and s.text_prompt_tokens == 16
  assert (PromptSpec(method="coop_st").length, PromptSpec(method="coop_st").depth) == (16, 1)
  assert (PromptSpec(method="maple_mt").length, PromptSpec(method="maple_mt").depth) == (2, 9)
  assert (PromptSpec(method="ivlp_st").length, PromptSpec(method="ivlp_st").depth) == (2, 9)
  assert PromptSpec(method="vpt_mt").depth_for(B16) == 12
  assert PromptSpec(method="vpt_mt").text_prompt_tokens == 0
  assert PromptSpec(method="zeroshot").tokens_per_layer == 0
  # Single-task methods (summed loss): every *_st, fullft_st included; nothing else.
  assert {m for m in METHODS if PromptSpec(method=m).single_task} == {
      "coop_st", "vpt_st", "maple_st", "ivlp_st", "mmap_st", "fullft_st", "clipadapter_st",
      "bitfit_st", "lora_st"}
  for m in METHODS:
    PromptSpec(method=m).validate(B16)


def test_from_config_dict_and_configdict():
  cd = ml_collections.ConfigDict({"length": 4, "source_length": 2, "per_layer_scaling": True})
  s = PromptSpec.from_config(cd, method="mmap_st")
  assert (s.method, s.length, s.source_length, s.per_layer_scaling, s.depth) == (
      "mmap_st", 4, 2, True, 11)
  assert PromptSpec.from_config({"method": "coop_mt"}).length == 16
  with pytest.raises(ValueError, match=r"unknown prompt config field\(s\) \['lenght'\]"):
    PromptSpec.from_config({"lenght": 3}, method="coop_mt")


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="mmap_mt", source_dim=200),
     "prompt.source_dim=200 must divide text width 512 and vision width 768"),
    (dict(method="mmap_mt", length=8, source_length=3),
     "prompt.source_length=3 must be a positive divisor of prompt.length=8"),
    (dict(method="maple_mt", depth=13), r"prompt.depth=13 must be in \[1, 12\]"),
    (dict(method="coop_st", depth=2), "coop is shallow"),
    (dict(method="vpt_st", vpt_init="zeros"), "prompt.vpt_init='zeros'; allowed"),
    (dict(method="ivlp_mt", init_std=0.0), "prompt.init_std=0.0 must be > 0"),
    (dict(method="coop_mt", length=80), "too many for context_length 77"),
    (dict(method="zeroshot", zeroshot_template="a photo"), "prompt.zeroshot_template"),
    (dict(method="mmap"), "prompt.method='mmap'; allowed"),
])
def test_validation_names_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    PromptSpec(**kwargs).validate(B16)


def test_groups_must_partition_tasks():
  assert multitask.task_to_group(GROUPS, 4).tolist() == [0, 1, 0, 1]
  assert multitask.task_to_group(None, 3).tolist() == [0, 0, 0]
  for bad in (((0, 1), (1, 2, 3)), ((0, 1),), ((0, 1, 2, 3), ())):
    with pytest.raises(ValueError, match="must partition the task indices 0..3"):
      multitask.resolve_groups(bad, 4)


# ----------------------------------------------------------------------------- MmAP

@pytest.mark.parametrize("per_layer", [False, True])
def test_mmap_prompts_are_kron_of_source_and_scaling(per_layer):
  spec = tiny_spec("mmap_st", length=4, source_length=2, per_layer_scaling=per_layer)
  p = mmap.init(key(1), TINY, spec)
  lead = (3,) if per_layer else ()
  assert p["source"].shape == (3, 2, 16)
  assert p["scale_text"].shape == lead + (2, 3) and p["scale_visual"].shape == lead + (2, 4)
  # Init: W = 1, so each S entry is repeated over its (L/L_s) x (d/d_s) block.
  out = mmap.expand(p, TINY, spec)
  s = np.asarray(p["source"])
  for j in range(3):
    np.testing.assert_array_equal(out.text[j], np.repeat(np.repeat(s[j], 2, 0), 3, 1))
    np.testing.assert_array_equal(out.visual[j], np.repeat(np.repeat(s[j], 2, 0), 4, 1))
  assert abs(float(s.std()) - 0.02) < 0.006
  # Arbitrary W: exactly kron(S_j, W).
  k1, k2 = jax.random.split(key(2))
  p["scale_text"] = jax.random.normal(k1, p["scale_text"].shape)
  p["scale_visual"] = jax.random.normal(k2, p["scale_visual"].shape)
  out = mmap.expand(p, TINY, spec)
  assert out.text.shape == (3, 4, 48) and out.visual.shape == (3, 4, 64)
  for j in range(3):
    wt = p["scale_text"][j] if per_layer else p["scale_text"]
    wv = p["scale_visual"][j] if per_layer else p["scale_visual"]
    np.testing.assert_allclose(out.text[j], np.kron(s[j], wt), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(out.visual[j], np.kron(s[j], wv), rtol=1e-6, atol=1e-7)


def test_mmap_mt_prompt_is_group_then_task_concat():
  spec = tiny_spec("mmap_mt", length=4, source_length=4)
  learned = init_learned(key(0), TINY, spec, 4, GROUPS)
  assert learned["group"]["source"].shape == (2, 3, 4, 16)
  assert learned["task"]["source"].shape == (4, 3, 4, 16)
  tok = task_prompts(learned, TINY, spec, GROUPS)
  assert tok.text.shape == (4, 3, 8, 48) and tok.visual.shape == (4, 3, 8, 64)
  one = lambda p: mmap.expand(p, TINY, spec)
  for t, g in enumerate([0, 1, 0, 1]):
    gp = one(jax.tree.map(lambda x: x[g], learned["group"]))
    tp = one(jax.tree.map(lambda x: x[t], learned["task"]))
    np.testing.assert_array_equal(tok.text[t], np.concatenate([gp.text, tp.text], axis=1))
    np.testing.assert_array_equal(tok.visual[t], np.concatenate([gp.visual, tp.visual], axis=1))
  # Same group: identical first L tokens; task halves all differ.
  np.testing.assert_array_equal(tok.text[0, :, :4], tok.text[2, :, :4])
  np.testing.assert_array_equal(tok.visual[1, :, :4], tok.visual[3, :, :4])
  assert not np.allclose(tok.text[0, :, :4], tok.text[1, :, :4])
  assert not np.allclose(tok.text[0, :, 4:], tok.text[2, :, 4:])
  with pytest.raises(ValueError, match="has 1 groups but the learned pytree has 2"):
    task_prompts(learned, TINY, spec, None)


# ----------------------------------------------------------------------------- baselines

def test_maple_visual_is_per_layer_linear_of_text_and_init_as_maple():
  spec = tiny_spec("maple_mt", length=2)
  p = maple.init(key(3), TINY, spec)
  k = np.asarray(p["proj"]["kernel"])
  assert k.shape == (3, 48, 64) and p["proj"]["bias"].shape == (3, 64)
  assert np.abs(k).max() <= 48 ** -0.5 and np.abs(p["proj"]["bias"]).max() <= 48 ** -0.5
  np.testing.assert_array_equal(k[1], k[2])       # MaPLe's _get_clones: identical compound init
  assert not np.allclose(k[0], k[1])              # `proj` (layer 0) is its own draw
  out = maple.expand(p, TINY, spec)
  for j in range(3):
    np.testing.assert_allclose(out.visual[j], p["text"][j] @ k[j] + p["proj"]["bias"][j],
                               rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out.text, p["text"])


def test_vpt_init_follows_vpt():
  spec = PromptSpec(method="vpt_st").validate(B16)
  p = jax.eval_shape(lambda: vpt.init(jax.random.key(0), B16, spec))
  assert p["visual"].shape == (12, 8, 768)
  small = tiny_spec("vpt_st", length=8)
  v = np.asarray(vpt.init(key(0), TINY, small)["visual"])
  bound = np.sqrt(6.0 / (3 * 8 * 8 + 64))
  assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound


def test_task_prompt_shapes_at_b16():
  expect = {  # method: (text shape, visual shape) with T = 4
      "zeroshot": (None, None), "fullft_mt": (None, None),
      "coop_st": ((4, 1, 16, 512), None), "coop_mt": ((4, 1, 16, 512), None),
      "vpt_st": (None, (4, 12, 8, 768)), "vpt_mt": (None, (4, 12, 8, 768)),
      "maple_st": ((4, 9, 2, 512), (4, 9, 2, 768)), "maple_mt": ((4, 9, 2, 512), (4, 9, 2, 768)),
      "ivlp_st": ((4, 9, 2, 512), (4, 9, 2, 768)), "ivlp_mt": ((4, 9, 2, 512), (4, 9, 2, 768)),
      "mmap_st": ((4, 11, 8, 512), (4, 11, 8, 768)),
      "mmap_shared": ((4, 11, 8, 512), (4, 11, 8, 768)),
      "mmap_mt": ((4, 11, 16, 512), (4, 11, 16, 768)),
  }
  for method, (text, visual) in expect.items():
    spec = PromptSpec(method=method)
    def build(spec=spec):
      k = jax.random.key(0)
      cp = clip.init_params(k, B16) if spec.family == "fullft" else None
      learned = init_learned(k, B16, spec, 4, GROUPS, clip_params=cp)
      return task_prompts(learned, B16, spec, GROUPS, num_tasks=4)
    tok = jax.eval_shape(build)
    assert (None if tok.text is None else tok.text.shape) == text, method
    assert (None if tok.visual is None else tok.visual.shape) == visual, method
    assert spec.text_prompt_tokens == (0 if text is None else text[2]), method


# ----------------------------------------------------------------------------- budgets

def expected_counts(t=4, g=2):
  unit = 11 * 8 * 256 + 1 * 2 + 1 * 3                   # MmAP: S + W_t + W_v
  maple_one = 9 * 2 * 512 + 9 * (512 * 768 + 768)      # text prompts + J linears
  clip_total = clip.count_params(clip.param_shapes(B16))
  return {
      "zeroshot": 0, "coop_st": t * 16 * 512, "coop_mt": 16 * 512,
      "vpt_st": t * 12 * 8 * 768, "vpt_mt": 12 * 8 * 768,
      "maple_st": t * maple_one, "maple_mt": maple_one,
      "ivlp_st": t * 9 * 2 * (512 + 768), "ivlp_mt": 9 * 2 * (512 + 768),
      "mmap_st": t * unit, "mmap_shared": unit, "mmap_mt": (g + t) * unit,
      "fullft_st": t * clip_total, "fullft_mt": clip_total,
      # PEFT (closed forms and variants in tests/test_peft.py): adapter 512 -> 128 -> 512 on the
      # image side; all biases; LoRA r = 4 on q, v of every block of both towers.
      "clipadapter_st": t * 2 * 512 * 128, "clipadapter_mt": 2 * 512 * 128,
      "bitfit_st": t * 171_008, "bitfit_mt": 171_008,
      "lora_st": t * 2 * 2 * 4 * 12 * (768 + 512), "lora_mt": 2 * 2 * 4 * 12 * (768 + 512),
  }


def test_param_counts_at_b16_and_mmap_budget():
  expected = expected_counts()
  assert set(expected) == set(METHODS)
  rows = []
  for method in METHODS:
    summ = param_summary(B16, PromptSpec(method=method), 4, GROUPS)
    assert summ["trainable"] == expected[method], method
    rows.append(f"{method:12s} {summ['trainable']:>13,d} {summ['percent_of_clip']:10.4f}%")
  print("\nViT-B/16, 4 tasks, 2 groups\nmethod         trainable   % of CLIP\n" + "\n".join(rows))
  assert param_summary(B16, PromptSpec(method="mmap_mt"), 4, GROUPS)["clip"] == 149_620_737
  pct = param_summary(B16, PromptSpec(method="mmap_mt"), 4, GROUPS)["percent_of_clip"]
  assert 0.07 <= pct <= 0.11, pct                       # the paper's ~0.09%
  per_layer = PromptSpec(method="mmap_mt", per_layer_scaling=True)
  assert trainable_param_count(B16, per_layer, 4, GROUPS) == 6 * (11 * 8 * 256 + 11 * 5)
