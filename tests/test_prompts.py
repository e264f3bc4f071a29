"""Prompt methods: spec validation, per-family expansion, multi-task wiring, parameter budgets."""
import dataclasses

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


@pytest.fixture(scope="module")
def tokenizer(bpe_path):
  from mmap_jax.tokenizer import ClipTokenizer
  return ClipTokenizer.from_bpe_file(bpe_path)


def tiny_spec(method, **kw):
  base = dict(TINY_KW) if method.startswith(("mmap", "maple", "ivlp")) else {}
  if method.startswith("vpt"):
    base = {"depth": 3}
  base.update(kw)
  return PromptSpec(method=method, **base).validate(TINY)


# ----------------------------------------------------------------------------- spec

def test_defaults_per_family():
  def length_depth(method):
    s = PromptSpec(method=method)
    return s.length, s.depth_for(B16)
  assert length_depth("mmap_mt") == (8, 11)
  s = PromptSpec(method="mmap_mt")
  assert (s.source_length, s.source_dim_for(B16), s.per_layer_scaling) == (8, 256, False)
  assert s.tokens_per_layer == 16 and s.text_prompt_tokens == 16
  assert length_depth("coop_st") == (16, 1)
  assert length_depth("maple_mt") == (2, 9)
  # IVLP as the MaPLe repository's configs/trainers/IVLP/vit_b16_c2_ep5_batch4_2+2ctx.yaml:
  # 2 + 2 tokens, depth 12, text context from "a photo of a".
  assert length_depth("ivlp_st") == (2, 12)
  assert PromptSpec(method="ivlp_mt").learned_ctx_init == "a photo of a"
  assert PromptSpec(method="vpt_mt").vpt_init == "normal"   # MaPLe repo's VPT: N(0, 0.02^2)
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
  assert (s.method, s.length, s.source_length, s.per_layer_scaling, s.depth_for(B16)) == (
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
  assert abs(float(v.std()) - 0.02) < 0.003 and np.abs(v).max() < 0.02 * 6   # default: normal
  xavier = tiny_spec("vpt_st", length=8, vpt_init="xavier_uniform")
  v = np.asarray(vpt.init(key(0), TINY, xavier)["visual"])
  bound = np.sqrt(6.0 / (3 * 8 * 8 + 64))
  assert np.abs(v).max() <= bound and np.abs(v).max() > 0.9 * bound


def test_task_prompt_shapes_at_b16(tokenizer):
  expect = {  # method: (text shape, visual shape) with T = 4
      "zeroshot": (None, None), "fullft_mt": (None, None),
      "coop_st": ((4, 1, 16, 512), None), "coop_mt": ((4, 1, 16, 512), None),
      "vpt_st": (None, (4, 12, 8, 768)), "vpt_mt": (None, (4, 12, 8, 768)),
      "maple_st": ((4, 9, 2, 512), (4, 9, 2, 768)), "maple_mt": ((4, 9, 2, 512), (4, 9, 2, 768)),
      "ivlp_st": ((4, 12, 2, 512), (4, 12, 2, 768)),
      "ivlp_mt": ((4, 12, 2, 512), (4, 12, 2, 768)),
      "mmap_st": ((4, 11, 8, 512), (4, 11, 8, 768)),
      # MmAP-MT's ablations keep its 2L = 16 tokens per layer and J = 11.
      "mmap_indep_mt": ((4, 11, 16, 512), (4, 11, 16, 768)),
      "mmap_shared_mt": ((4, 11, 16, 512), (4, 11, 16, 768)),
      "mmap_task_mt": ((4, 11, 16, 512), (4, 11, 16, 768)),
      "mmap_shared": ((4, 11, 8, 512), (4, 11, 8, 768)),
      "mmap_mt": ((4, 11, 16, 512), (4, 11, 16, 768)),
  }
  for method, (text, visual) in expect.items():
    spec = PromptSpec(method=method)
    def build(spec=spec):
      k = jax.random.key(0)
      cp = clip.init_params(k, B16) if spec.family == "fullft" or spec.learned_ctx_init else None
      learned = init_learned(k, B16, spec, 4, GROUPS, clip_params=cp, tokenizer=tokenizer)
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
      "ivlp_st": t * 12 * 2 * (512 + 768), "ivlp_mt": 12 * 2 * (512 + 768),
      "mmap_st": t * unit, "mmap_shared": unit, "mmap_mt": (g + t) * unit,
      # Ablations: independent sources of d_s / 2 = 128 each (W_t [1, 4], W_v [1, 6]); one
      # 16-token unit (L_s 16) shared by all tasks / per task.
      "mmap_indep_mt": (g + t) * (11 * 8 * (128 + 128) + 4 + 6),
      "mmap_shared_mt": 11 * 16 * 256 + 2 + 3, "mmap_task_mt": t * (11 * 16 * 256 + 2 + 3),
      "fullft_st": t * clip_total, "fullft_mt": clip_total,
      # PEFT (closed forms and variants in tests/test_peft.py): adapter 512 -> 128 -> 512 on the
      # image side; all biases; LoRA r = 2 on q, k, v of every block of both towers (CLIP-LoRA).
      "clipadapter_st": t * 2 * 512 * 128, "clipadapter_mt": 2 * 512 * 128,
      "bitfit_st": t * 171_008, "bitfit_mt": 171_008,
      "lora_st": t * 2 * 3 * 2 * 12 * (768 + 512), "lora_mt": 2 * 3 * 2 * 12 * (768 + 512),
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


# ----------------------------------------------------------------------------- ctx_init

def test_ctx_init_defaults_and_validation():
  from mmap_jax.prompts.spec import ctx_init_words
  maple_spec = PromptSpec(method="maple_mt")
  assert maple_spec.ctx_init == "a photo of a" and maple_spec.learned_ctx_init == "a photo of a"
  assert PromptSpec(method="maple_st", ctx_init="").learned_ctx_init is None   # random init
  assert PromptSpec(method="ivlp_st").learned_ctx_init == "a photo of a"   # the IVLP yaml's
  for method in ("coop_mt", "vpt_mt", "mmap_mt", "zeroshot", "fullft_mt"):
    assert PromptSpec(method=method).learned_ctx_init is None, method
  # CoOp: every init word is learned, L = the word count unless set.
  coop = PromptSpec(method="coop_mt", ctx_init="a_photo  of a")
  assert coop.length == 4 and coop.learned_ctx_init == "a photo of a"
  assert PromptSpec(method="coop_mt", ctx_init="a photo of a", length=2).length == 2
  assert PromptSpec(method="ivlp_mt", ctx_init="a photo of a").learned_ctx_init == "a photo of a"
  assert ctx_init_words(" a_photo\tof ") == "a photo of"
  for method in ("mmap_mt", "vpt_st", "zeroshot"):
    with pytest.raises(ValueError, match=r"prompt\.ctx_init='a photo' initialises"):
      PromptSpec(method=method, ctx_init="a photo").validate(B16)
  # The dict a checkpoint stores round-trips to the same spec.
  assert PromptSpec(**dataclasses.asdict(maple_spec)) == maple_spec


def test_ctx_init_needs_enough_tokens(tokenizer):
  from mmap_jax.prompts import ctx_init
  ids = ctx_init.token_ids(PromptSpec(method="maple_mt"), tokenizer)
  assert list(ids) == tokenizer.encode("a photo of a") and len(ids) == 4
  assert ctx_init.token_ids(PromptSpec(method="maple_mt", ctx_init=""), tokenizer) is None
  with pytest.raises(ValueError, match=r"prompt\.ctx_init='a photo of a' is 4 token\(s\).*"
                                       r"prompt\.length=5"):
    ctx_init.token_ids(PromptSpec(method="maple_mt", length=5), tokenizer)
  with pytest.raises(ValueError, match="pass clip_params and tokenizer"):
    init_learned(key(0), TINY, tiny_spec("maple_mt", length=2), 2)
  # The trainer checks it before compiling, as a config error naming the field.
  from mmap_jax.train import setup
  fake_clip = setup.Clip(cfg=TINY, params=None, tokenizer=tokenizer, path="tiny")
  with pytest.raises(setup.ConfigError, match=r"prompt\.ctx_init='a photo'"):
    setup.ctx_init_ids(fake_clip, PromptSpec(method="coop_mt", ctx_init="a photo", length=3))


def test_maple_class_tokens_read_sot_x_x_of_a_class(tokenizer):
  from mmap_jax import heads
  spec = PromptSpec(method="maple_mt")
  names = [["dog", "golden_retriever"], ["alarm clock"]]
  ct = heads.build_class_tokens(tokenizer, names, spec.text_prompt_tokens,
                                ctx_init=spec.learned_ctx_init)
  enc = tokenizer.encode
  want = [tokenizer.sot_token] + enc("X") * 2 + enc("of a dog.") + [tokenizer.eot_token]
  assert list(ct.ids[0, 0, :len(want)]) == want
  assert tokenizer.decode(ct.ids[0, 1, 1:ct.eot[0, 1]]).strip() == "x x of a golden retriever ."
  assert tokenizer.decode(ct.ids[1, 0, 1:ct.eot[1, 0]]).strip() == "x x of a alarm clock ."
  # Same ids as the hand-written "X X of a {class}." prompt.
  plain = tokenizer.tokenize(["X X of a dog.", "X X of a golden retriever."])
  np.testing.assert_array_equal(ct.ids[0], plain[:, :ct.ids.shape[-1]])
  # CoOp's ctx_init learns all its words: "X X X X {class}."
  coop = PromptSpec(method="coop_mt", ctx_init="a photo of a")
  ct = heads.build_class_tokens(tokenizer, [["dog"]], coop.text_prompt_tokens,
                                ctx_init=coop.learned_ctx_init)
  assert list(ct.ids[0, 0, :ct.eot[0, 0] + 1]) == list(tokenizer.tokenize(["X X X X dog."])[0, :8])
  with pytest.raises(ValueError, match="need 1..4"):
    heads.build_class_tokens(tokenizer, [["dog"]], 6, ctx_init="a photo of a")


@pytest.fixture(scope="module")
def tiny_params():
  rng = np.random.default_rng(0)
  return jax.tree.map(lambda s: (0.05 * rng.standard_normal(s.shape)).astype(np.float32),
                      clip.param_shapes(TINY))


@pytest.mark.parametrize("method", ["maple_mt", "maple_st", "ivlp_mt", "coop_st"])
def test_initial_learned_text_tokens_are_the_init_word_embeddings(method, tokenizer, tiny_params):
  spec = tiny_spec(method, length=2, ctx_init="a photo of a")
  learned = init_learned(key(1), TINY, spec, 3, clip_params=tiny_params, tokenizer=tokenizer)
  table = tiny_params["text"]["token_embedding"]["embedding"]
  want = table[tokenizer.encode("a photo")]                           # [2, 48]
  text = learned["task" if spec.single_task else "shared"]["text"]
  text = np.asarray(text).reshape((-1,) + text.shape[-3:])             # [T or 1, J, L, d]
  for t in range(text.shape[0]):
    np.testing.assert_array_equal(text[t, 0], want)                   # exactly the embeddings
    if text.shape[1] > 1:
      assert not np.allclose(text[t, 1:], want)                       # deep prompts stay random
  random = init_learned(key(1), TINY, dataclasses.replace(spec, ctx_init=""), 3)
  rtext = np.asarray(random["task" if spec.single_task else "shared"]["text"])
  np.testing.assert_array_equal(rtext.reshape(text.shape)[:, 1:], text[:, 1:])  # same key draws


def _features(params, spec, learned, ct, share_prefix):
  from mmap_jax import heads
  prompts = task_prompts(learned, TINY, spec, num_tasks=ct.ids.shape[0])
  return np.asarray(heads.text_features(params, TINY, prompts.text, ct, share_prefix=share_prefix))


@pytest.mark.slow   # a long compile: full suite only
def test_maple_depth1_text_features_at_init_equal_clip_zero_shot(tokenizer, tiny_params):
  """With learned tokens = "a photo" and fixed "of a", the class prompt IS CLIP's
  "a photo of a {class}." at step 0, when only layer 0 is prompted (depth 1; so for CoOp's
  ctx_init too). MaPLe's deep text prompts (depth > 1) replace the hidden states at those
  positions from layer 1 on with their random init, so the features differ there."""
  from mmap_jax import heads
  names = [["dog", "golden_retriever", "alarm clock"], ["bus", "car"]]
  zs = heads.build_class_tokens(tokenizer, names, 0, "a photo of a {}.")
  want = np.asarray(heads.text_features(tiny_params, TINY, None, zs))
  for spec in (tiny_spec("maple_mt", length=2, depth=1),
               tiny_spec("coop_mt", ctx_init="a photo of a")):
    learned = init_learned(key(2), TINY, spec, 2, clip_params=tiny_params, tokenizer=tokenizer)
    ct = heads.build_class_tokens(tokenizer, names, spec.text_prompt_tokens,
                                  ctx_init=spec.learned_ctx_init)
    assert ct.ids.shape == zs.ids.shape
    np.testing.assert_array_equal(_features(tiny_params, spec, learned, ct, False), want)
    if spec.family == "maple":   # the trainer's shared-prefix path: the same up to rounding
      np.testing.assert_allclose(_features(tiny_params, spec, learned, ct, True), want,
                                 rtol=1e-5, atol=1e-6)
  deep = tiny_spec("maple_mt", length=2, depth=3)
  learned = init_learned(key(2), TINY, deep, 2, clip_params=tiny_params, tokenizer=tokenizer)
  ct = heads.build_class_tokens(tokenizer, names, 2, ctx_init=deep.learned_ctx_init)
  assert not np.allclose(_features(tiny_params, deep, learned, ct, False), want, atol=1e-3)
