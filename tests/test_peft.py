"""PEFT baselines (CLIP-Adapter, BitFit, LoRA; ST and MT): budgets, what is learned, gradients,
exactness at init, LoRA's two formulations, and one tiny end-to-end run per method.

Compiles are the cost on CPU: every jitted function is built once per method (module-level
caches, optimisation level 0) and reused across tests; the e2e runs share one tiny CLIP + data.
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmap_jax import heads, peft
from mmap_jax.models import clip
from mmap_jax.models.config import VARIANTS
from mmap_jax.prompts import multitask
from mmap_jax.prompts.spec import PromptSpec
from mmap_jax.train import step as train_step
from mmap_jax.train import run_spec
from tests import train_fixtures as fx
from tests.test_multitask_model import numpy_clip

CFG = VARIANTS["tiny"]          # embed 32, text width 48, vision width 64, 3 layers each
B16 = VARIANTS["ViT-B/16"]
T = 2
NAMES = (["dog", "cat", "golden_retriever"], ["car", "bus"])
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
PEFT_METHODS = ("clipadapter_st", "clipadapter_mt", "bitfit_st", "bitfit_mt", "lora_st",
                "lora_mt")
# Every side / target is exercised here (the defaults are image-only and q,v).
SPEC_KW = {"clipadapter": dict(adapter_on="both"), "bitfit": {}, "lora": dict(lora_targets="q,k,v,o",
                                                                            lora_rank=3)}


def spec_of(method, **kw):
  return PromptSpec(method=method, **{**SPEC_KW[method.split("_")[0]], **kw}).validate(CFG)


def paths(tree):
  return {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_leaves_with_path(tree)}


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(jnp.asarray, numpy_clip(CFG))


@pytest.fixture(scope="module")
def ct(tok):
  return heads.build_class_tokens(tok, NAMES, 0)     # PEFT methods use the zero-shot template


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(3)
  return {"images": jnp.asarray(rng.standard_normal((T, 3, 32, 32, 3)), jnp.float32),
          "labels": jnp.asarray([[0, 2, 1], [1, 0, 1]], jnp.int32)}


def perturbed(learned, seed=0):
  """Every learned leaf moved off its init (LoRA's B = 0 would zero A's gradient, by design)."""
  leaves, tree = jax.tree.flatten(learned)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [x + 0.05 * rng.standard_normal(x.shape).astype(np.float32)
                                   for x in leaves])


# ----------------------------------------------------------------------------- jitted pieces

@functools.lru_cache(maxsize=None)
def _loss_fn(method, **kw):
  spec = spec_of(method, **dict(kw))
  def fn(learned, params, ct, batch):
    loss, aux = heads.multitask_loss(learned, params, CFG, spec, None, ct, batch)
    return loss, aux["logits"]
  return fn


@functools.lru_cache(maxsize=None)
def _value_and_grad(method):
  return jit(jax.value_and_grad(_loss_fn(method), has_aux=True))


@functools.lru_cache(maxsize=None)
def _logits(method, **kw):
  return jit(lambda l, p, c, b: _loss_fn(method, **kw)(l, p, c, b)[1])


def _init(method, params, seed=0, **kw):
  return multitask.init_learned(jax.random.key(seed, impl="rbg"), CFG, spec_of(method, **kw), T,
                                clip_params=params)


# ----------------------------------------------------------------------------- spec / config

def test_defaults_and_single_task():
  s = PromptSpec(method="clipadapter_mt")
  assert (s.adapter_ratio, s.adapter_reduction, s.adapter_on) == (0.2, 4, "image")
  s = PromptSpec(method="lora_st")
  # CLIP-LoRA's shipped configuration (MaxZanella/CLIP-LoRA run_utils.py, loralib/layers.py).
  assert (s.lora_rank, s.lora_alpha, s.lora_target_list, s.lora_dropout, s.lora_scaling) == (
      2, 1.0, ("q", "k", "v"), 0.25, "sqrt_rank")
  assert s.lora_scale == pytest.approx(1 / np.sqrt(2))
  assert PromptSpec(method="lora_st", lora_scaling="rank", lora_rank=4,
                    lora_alpha=4.0).lora_scale == 1.0      # Hu et al.'s alpha / r
  assert PromptSpec(method="lora_mt", lora_targets="o, q,k").lora_target_list == ("q", "k", "o")
  assert PromptSpec(method="lora_mt", lora_targets="q+k+v+o").validate(B16).lora_target_list == (
      "q", "k", "v", "o")
  for m in PEFT_METHODS:
    s = PromptSpec(method=m).validate(B16)
    assert s.single_task == m.endswith("_st") and not s.has_prompts
    assert s.text_prompt_tokens == 0                 # the text side uses zeroshot_template


@pytest.mark.parametrize("kwargs, message", [
    (dict(method="clipadapter_mt", adapter_ratio=1.5), r"prompt.adapter_ratio=1.5 must be in \[0, 1\]"),
    (dict(method="clipadapter_st", adapter_reduction=0), "prompt.adapter_reduction=0 must be a positive"),
    (dict(method="clipadapter_st", adapter_reduction=3), "prompt.adapter_reduction=3 must divide the "
                                                         "embedding width 512"),
    (dict(method="clipadapter_mt", adapter_on="video"), "prompt.adapter_on='video'; allowed"),
    (dict(method="lora_mt", lora_rank=0), "prompt.lora_rank=0 must be a positive int"),
    (dict(method="lora_mt", lora_rank=600), "prompt.lora_rank=600 exceeds"),
    (dict(method="lora_st", lora_alpha=0.0), "prompt.lora_alpha=0.0 must be > 0"),
    (dict(method="lora_st", lora_targets="q,x"), "prompt.lora_targets='q,x' must list"),
    (dict(method="lora_st", lora_targets="q,q"), "prompt.lora_targets='q,q' must list"),
    (dict(method="lora_st", lora_targets="q+"), r"prompt.lora_targets='q\+' must list"),
    (dict(method="lora_st", lora_targets=""), "prompt.lora_targets='' must list"),
    (dict(method="lora_st", lora_dropout=1.0), r"prompt.lora_dropout=1.0 must be in \[0, 1\)"),
    (dict(method="lora_mt", lora_scaling="sqrt"), "prompt.lora_scaling='sqrt'; allowed"),
])
def test_validation_names_the_field(kwargs, message):
  with pytest.raises(ValueError, match=message):
    PromptSpec(**kwargs).validate(B16)


def test_config_validation_rejects_bad_peft_fields_before_loading():
  from configs import demo
  from mmap_jax.train import setup
  c = demo.get_config("method=lora_mt,runlocal")
  c.prompt.lora_targets = "q,w"
  with pytest.raises(setup.ConfigError, match=r"prompt\.lora_targets='q,w'"):
    setup.validate(c)
  c = demo.get_config("method=clipadapter_st,runlocal")
  c.prompt.adapter_ratio = -0.1
  with pytest.raises(setup.ConfigError, match=r"prompt\.adapter_ratio=-0\.1"):
    setup.validate(c)
  setup.validate(demo.get_config("method=bitfit_st,runlocal"))


# ----------------------------------------------------------------------------- budgets

def closed_form(method, cfg, t=4, *, adapter_on="image", reduction=4, rank=2, targets=3):
  e, v, x = cfg.embed_dim, cfg.vision, cfg.text
  one = {
      "clipadapter": {"image": 1, "text": 1, "both": 2}[adapter_on] * 2 * e * (e // reduction),
      "bitfit": 11 * v.width * v.layers + 2 * v.width + 11 * x.width * x.layers + x.width,
      "lora": targets * 2 * rank * (v.width * v.layers + x.width * x.layers),
  }[method.split("_")[0]]
  return t * one if method.endswith("_st") else one


def test_param_counts_closed_form_at_b16():
  rows = []
  for method in PEFT_METHODS:
    summ = multitask.param_summary(B16, PromptSpec(method=method), 4)
    assert summ["trainable"] == closed_form(method, B16), method
    assert summ["clip"] == 149_620_737
    rows.append(f"{method:15s} {summ['trainable']:>11,d} {summ['percent_of_clip']:8.4f}%")
  print("\nViT-B/16, 4 tasks\n" + "\n".join(rows))
  for kw, cf in ((dict(adapter_on="both"), dict(adapter_on="both")),
                 (dict(adapter_on="text", adapter_reduction=8), dict(adapter_on="text", reduction=8))):
    assert multitask.trainable_param_count(B16, PromptSpec(method="clipadapter_mt", **kw), 4) == \
        closed_form("clipadapter_mt", B16, **cf)
  lora4 = PromptSpec(method="lora_st", lora_targets="q,k,v,o", lora_rank=8)
  assert multitask.trainable_param_count(B16, lora4, 4) == closed_form("lora_st", B16, rank=8,
                                                                        targets=4)
  # BitFit's closed form is exactly the number of CLIP leaves named `bias`.
  biases = sum(int(np.prod(x.shape)) for k, x in paths(clip.param_shapes(B16)).items()
               if k.endswith("['bias']"))
  assert closed_form("bitfit_mt", B16) == biases == 171_008


# ----------------------------------------------------------------------------- what is learned

def test_learned_tree_holds_exactly_the_intended_leaves(params):
  clip_paths = paths(params)
  for method in PEFT_METHODS:
    learned = _init(method, params)
    lead = (T,) if method.endswith("_st") else ()
    part = learned["task" if method.endswith("_st") else "shared"]
    assert list(learned) == ["task" if method.endswith("_st") else "shared"]
    got = {k: x.shape for k, x in paths(part).items()}
    fam = method.split("_")[0]
    if fam == "bitfit":
      want = {k: lead + x.shape for k, x in clip_paths.items() if k.endswith("['bias']")}
      assert got == want
      for k, x in paths(part).items():        # initialised to the pretrained biases
        np.testing.assert_array_equal(x, np.broadcast_to(clip_paths[k], x.shape))
    elif fam == "clipadapter":
      e, h = CFG.embed_dim, CFG.embed_dim // 4
      assert got == {f"['{t}']['{f}']['kernel']": lead + s for t in ("visual", "text")
                     for f, s in (("fc1", (e, h)), ("fc2", (h, e)))}
    else:
      want = {}
      for tower, c in (("visual", CFG.vision), ("text", CFG.text)):
        for t in "qkvo":
          want[f"['{tower}']['{t}']['a']"] = lead + (c.layers, c.width, 3)
          want[f"['{tower}']['{t}']['b']"] = lead + (c.layers, 3, c.width)
      assert got == want
      assert all(float(jnp.abs(x).max()) == 0 for k, x in paths(part).items() if k.endswith("['b']"))
      a = paths(part)["['visual']['q']['a']"]
      assert 0.8 / np.sqrt(CFG.vision.width) < float(jnp.abs(a).max()) <= 1 / np.sqrt(CFG.vision.width)
    # The effective CLIP: every frozen leaf passes through untouched (the same array), every
    # other leaf is derived from the learned pytree and has its task axis.
    eff = multitask.clip_params_for(learned, params, spec_of(method))
    axes = paths(multitask.clip_task_axes(eff, spec_of(method)))
    for k, x in paths(eff).items():
      if k in clip_paths and axes.get(k) is None and not (fam == "bitfit" and k.endswith("['bias']")):
        assert x is clip_paths[k], (method, k)
      if method.endswith("_st"):
        derived = axes.get(k) == 0
        assert derived == (k not in clip_paths or (fam == "bitfit" and k.endswith("['bias']"))), k
        if derived:
          assert x.shape[0] == T


# ----------------------------------------------------------------------------- exactness at init

@pytest.fixture(scope="module")
def zeroshot_logits(params, ct, data):
  spec = PromptSpec(method="zeroshot").validate(CFG)
  fn = lambda p, c, b: heads.multitask_loss({}, p, CFG, spec, None, c, b)[1]["logits"]
  return jit(fn)(params, ct, data)


@pytest.mark.slow
@pytest.mark.parametrize("method", PEFT_METHODS)
def test_init_equals_zeroshot_exactly_and_every_learned_leaf_gets_gradient(
    method, params, ct, data, zeroshot_logits):
  """LoRA (B = 0) and BitFit (pretrained biases) at init, CLIP-Adapter with ratio 0: the logits
  are bit-identical to zero-shot CLIP's. At a perturbed point every learned leaf has a nonzero
  gradient (the frozen CLIP is not in the learned tree)."""
  kw = {"adapter_ratio": 0.0} if method.startswith("clipadapter") else {}
  logits = _logits(method, **kw)(_init(method, params, **kw), params, ct, data)
  np.testing.assert_array_equal(np.asarray(logits), np.asarray(zeroshot_logits))
  learned = perturbed(_init(method, params))
  (loss, _), grads = _value_and_grad(method)(learned, params, ct, data)
  assert np.isfinite(float(loss))
  assert jax.tree.structure(grads) == jax.tree.structure(learned)
  for k, g in paths(grads).items():
    assert float(jnp.abs(g).max()) > 0, (method, k)
    if method.endswith("_st"):                         # each task's slice moves
      assert all(float(jnp.abs(g[t]).max()) > 0 for t in range(T)), (method, k)


@pytest.mark.parametrize("family", ("clipadapter", "bitfit", "lora"))
def test_st_gradient_of_task_t_is_its_single_task_gradient(family, params, ct, data):
  """X_st sums per-task losses; the reference is X_mt on one task at a time through the
  grouping API (`heads.single_task_loss`: one vmap over tasks, a different code path)."""
  st = f"{family}_st"
  learned = perturbed(_init(st, params), seed=1)
  (loss, _), grads = _value_and_grad(st)(learned, params, ct, data)
  mt_spec = spec_of(f"{family}_mt")
  one = lambda shared, t, im, lb: heads.single_task_loss(shared, params, CFG, mt_spec, ct, t, im,
                                                         lb)
  ref_loss, ref = jit(jax.vmap(jax.value_and_grad(one)))(
      {"shared": learned["task"]}, jnp.arange(T), data["images"], data["labels"])
  np.testing.assert_allclose(loss, ref_loss.sum(), rtol=1e-5)
  for k, got in paths(grads["task"]).items():
    want = paths(ref["shared"])[k]
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()),
                               err_msg=k)


@pytest.mark.slow
def test_lora_merged_equals_unmerged(params, ct, data):
  """W + (alpha/r) A B folded into the kernels == x A B kept apart, for MT and ST: the cosine
  similarities (logits / exp(logit_scale)) agree to 1e-6 (float32 rounding of different sums).
  The merged CLIP is a plain CLIP (no LoRA leaves), what prediction runs."""
  for method in ("lora_mt", "lora_st"):
    spec = spec_of(method)
    learned = perturbed(_init(method, params), seed=2)
    def logits(l, p, merged, spec=spec):
      eff = multitask.clip_params_for(l, p, spec, merged=merged)
      return heads.task_logits(eff, CFG, None, ct, data["images"],
                               clip_per_task=multitask.clip_task_axes(eff, spec, merged=merged))
    scale = float(jnp.exp(params["logit_scale"]))
    un = jit(functools.partial(logits, merged=False))(learned, params) / scale
    me = jit(functools.partial(logits, merged=True))(learned, params) / scale
    np.testing.assert_allclose(me, un, rtol=0, atol=1e-6)
    assert float(jnp.abs(un).max()) > 0.01           # not trivially small
    one = multitask.task_clip_params(learned, params, spec, 1, merged=True)
    assert jax.tree.structure(one) == jax.tree.structure(params)
    assert not any("lora" in k for k in paths(one))


def test_task_clip_params_slices_one_task(params):
  """The evaluator's / predictor's per-task CLIP: PEFT *_st take the task's learned slice;
  fullft_st its CLIP copy; shared methods the same params for every task."""
  learned = perturbed(_init("bitfit_st", params), seed=4)
  one = multitask.task_clip_params(learned, params, spec_of("bitfit_st"), 1)
  bias = "['visual']['transformer']['resblocks']['0']['attn']['in_proj']['bias']"
  np.testing.assert_array_equal(paths(one)[bias], paths(learned["task"])[bias][1])
  assert paths(one)["['visual']['proj']"] is paths(params)["['visual']['proj']"]
  full = {"clip": jax.tree.map(lambda x: jnp.stack([x, x + 1]), params)}
  one = multitask.task_clip_params(full, params, PromptSpec(method="fullft_st"), 1)
  np.testing.assert_array_equal(one["visual"]["proj"], params["visual"]["proj"] + 1)
  assert multitask.task_clip_params({}, params, PromptSpec(method="zeroshot"), 0) is params


@pytest.mark.slow
def test_train_step_moves_only_learned_leaves(params, ct, data):
  """One real jitted SGD step (donated state): every learned leaf changes, the frozen CLIP
  (a jit argument) is bit-identical afterwards."""
  before = jax.tree.map(np.array, params)
  opt = optax.sgd(0.5)
  for method in ("bitfit_mt", "lora_st"):
    spec = spec_of(method)
    def loss_fn(learned, frozen, batch, spec=spec):
      loss, aux = heads.multitask_loss(learned, frozen["clip"], CFG, spec, None,
                                       frozen["class_tokens"], batch)
      return loss, {"per_task_loss": aux["per_task_loss"]}
    learned = perturbed(_init(method, params), seed=3)
    start = jax.tree.map(np.array, learned)
    state = train_step.init_state(learned, opt)
    step = train_step.make_train_step(loss_fn, opt)
    state, metrics = step(state, {"clip": params, "class_tokens": ct}, data)
    assert bool(metrics["finite"])
    for k, x in paths(state["learned"]).items():
      assert not np.array_equal(np.asarray(x), paths(start)[k]), (method, k)
    for k, x in paths(params).items():
      np.testing.assert_array_equal(np.asarray(x), paths(before)[k])


def test_adapter_formula(params):
  """clip.feature_adapter is the paper's ratio * relu(relu(f W1) W2) + (1 - ratio) * f."""
  spec = spec_of("clipadapter_mt", adapter_ratio=0.3)
  p = peft.adapter.init(jax.random.key(0, impl="rbg"), CFG, spec)["visual"]
  f = np.random.default_rng(0).standard_normal((5, CFG.embed_dim)).astype(np.float32)
  got = clip.feature_adapter(jnp.asarray(f), {**p, "ratio": jnp.float32(0.3)})
  h = np.maximum(f @ np.asarray(p["fc1"]["kernel"]), 0)
  want = 0.3 * np.maximum(h @ np.asarray(p["fc2"]["kernel"]), 0) + 0.7 * f
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- end to end

@pytest.fixture(scope="module")
def e2e_env(tmp_path_factory, bpe_path):
  root = tmp_path_factory.mktemp("peft_e2e")
  return {"root": root, "clip": fx.make_tiny_clip(root / "clip", bpe_path),
          "data": str(root / "tfds")}


# Each PEFT layout through the trainer once: the adapter (clipadapter_mt), shared text and image
# weights (bitfit_mt) and per-task weights with LoRA's merge for prediction (lora_st). The other
# forms train through the same trainer code path, and their gradients are checked exactly above
# (test_st_gradient_of_task_t_is_its_single_task_gradient, the init tests of every form).
E2E_METHODS = ("clipadapter_mt", "bitfit_mt", "lora_st")


@pytest.mark.slow
@pytest.mark.parametrize("method", E2E_METHODS)
def test_end_to_end(method, e2e_env):
  """Train 6 steps, evaluate, write results; the checkpoint restores to the same accuracy and
  predicts (LoRA merged into a plain CLIP) the same classes as the evaluator."""
  from mmap_jax import predict
  from mmap_jax.checkpoints import store
  from mmap_jax.train import loop, setup, trained as trained_lib
  config = fx.tiny_config(e2e_env["clip"], e2e_env["data"], method=method)
  workdir = e2e_env["root"] / method
  result = loop.train_and_evaluate(config, str(workdir))
  saved = json.loads((workdir / "results.json").read_text())
  assert saved == json.loads(json.dumps(result)) and saved["method"] == method
  cfg, clip_params, tok = store.load(e2e_env["clip"])
  spec = run_spec.resolve(config).prompt_for(cfg)
  assert saved["trainable_params"] == multitask.param_summary(cfg, spec, 4)["trainable"] > 0
  for t in saved["tasks"].values():
    assert 0.0 <= t["accuracy"] <= 1.0
  # Trained: the restored (validation-selected) learned pytree moved away from its init.
  trained = trained_lib.load_trained(str(workdir))
  assert saved["trained_steps"] == 6
  assert trained.step == saved["step"] == saved["selection"]["step"] and trained.spec == spec
  init = multitask.init_learned(jax.random.key(config.seed), cfg, spec, 4, clip_params=clip_params)
  init_paths = paths(init)
  moved = [k for k, x in paths(trained.learned).items()
           if not np.array_equal(np.asarray(x), np.asarray(init_paths[k]))]
  assert moved, method
  if method.startswith("lora"):            # B starts at 0: after training it is not
    assert any(k.endswith("['b']") for k in moved)
  # Checkpoint/restore: evaluation of the workdir reproduces the run's accuracies.
  again = loop.evaluate_workdir(config, str(workdir), out=str(e2e_env["root"] / f"{method}_eval"))
  assert again["tasks"] == saved["tasks"]
  # Prediction from the checkpoint (trained.task_model; LoRA merged) matches the evaluator.
  params, prompts, classes = trained_lib.task_model(trained, cfg, clip_params, "sketch")
  assert prompts == (None, None) and not any("lora" in k for k in paths(params))
  classifier = predict.build_classifier(params, cfg, tok, classes, prompts,
                                        template=spec.zeroshot_template)
  task = next(t for t in setup.build_tasks(run_spec.resolve(config).data) if t.info.name == "sketch")
  accuracy = fx.predicted_accuracy(classifier, task, cfg.vision.image_size)
  assert accuracy == pytest.approx(saved["tasks"]["sketch"]["accuracy"])
