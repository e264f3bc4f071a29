"""Multi-task head + prompted CLIP on the tiny config: logits, masking, gradients, training.

XLA compiles are the cost on CPU, so each jitted function below is built once (module level),
takes every array as an argument (not a closure) and is reused across tests; compiles use
optimisation level 0. Random CLIP params come from numpy (compiling threefry takes seconds).
"""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from mmap_jax import heads
from mmap_jax.heads import ClassTokens
from mmap_jax.models import clip
from mmap_jax.models.config import VARIANTS
from mmap_jax.prompts import METHODS, PromptSpec, init_learned, task_prompts

CFG = VARIANTS["tiny"]          # text width 48, vision width 64, 3 layers each
B16 = VARIANTS["ViT-B/16"]
jit = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
NAMES = (["dog", "cat", "golden_retriever", "fish", "horse"],
         ["alarm clock", "backpack", "bucket", "calculator", "candles", "desk lamp", "drill"],
         ["car", "bus", "train"])                                # 5, 7, 3 classes
GROUPS = ((0, 2), (1,))
MMAP = dict(length=4, source_length=2, depth=3, source_dim=16)   # 8 text tokens for mmap_mt


def key(seed):
  return jax.random.key(seed, impl="rbg")   # cheap to compile on CPU


def spec_of(method, **kw):
  extra = MMAP if method.startswith("mmap") else {}
  return PromptSpec(method=method, **{**extra, **kw}).validate(CFG)


def numpy_clip(cfg, seed=0):
  """`clip.init_params`' distributions (OpenAI scales), drawn with numpy."""
  rng = np.random.default_rng(seed)
  def leaf(path, s):
    names = [getattr(k, "key", "") for k in path]
    tower = cfg.text if names[0] == "text" else cfg.vision
    name, w = names[-1], tower.width
    if name == "logit_scale":
      return np.asarray(np.log(1 / 0.07), np.float32)
    if name in ("scale", "bias"):
      return (np.ones if name == "scale" else np.zeros)(s.shape, np.float32)
    if "conv1" in names:
      std = (3 * cfg.vision.patch_size ** 2) ** -0.5
    elif name == "embedding":
      std = 0.02
    elif names[:2] == ["text", "positional_embedding"]:
      std = 0.01
    elif names[-2] in ("out_proj", "c_proj"):
      std = w ** -0.5 * (2 * tower.layers) ** -0.5
    elif names[-2] == "c_fc":
      std = (2 * w) ** -0.5
    else:
      std = w ** -0.5
    return (std * rng.standard_normal(s.shape)).astype(np.float32)
  return jax.tree_util.tree_map_with_path(leaf, clip.param_shapes(cfg))


@pytest.fixture(scope="module")
def params():
  return jax.tree.map(jnp.asarray, numpy_clip(CFG))


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(1)
  images = jnp.asarray(rng.standard_normal((3, 4, 32, 32, 3)), jnp.float32)
  labels = jnp.asarray([rng.integers(0, len(n), 4) for n in NAMES], jnp.int32)
  return {"images": images, "labels": labels}


# ----------------------------------------------------------------------------- jitted pieces

@functools.partial(jit, static_argnames=("method",))
def _loss_and_grad(learned, params, ct, batch, method):
  spec = spec_of(method)
  fn = lambda l: heads.multitask_loss(l, params, CFG, spec, GROUPS if method == "mmap_mt" else None,
                                      ct, batch)
  return jax.value_and_grad(fn, has_aux=True)(learned)


@functools.partial(jit, static_argnames=("method",))
def _setup(seed, method):
  """(learned, per-task prompts) for a prompt method on the tiny CLIP, 3 tasks."""
  spec = spec_of(method)
  groups = GROUPS if method == "mmap_mt" else None
  learned = init_learned(key(seed), CFG, spec, 3, groups)
  return learned, task_prompts(learned, CFG, spec, groups, num_tasks=3)


@jit
def _zeroshot(params, ct, images):
  logits = heads.task_logits(params, CFG, None, ct, images)
  ref = jax.vmap(lambda ids, eot, im: clip.similarity_logits(    # the plain CLIP path
      params, clip.encode_image(params, CFG, im),
      clip.encode_text(params, CFG, clip.embed_tokens(params, ids), eot)))(ct.ids, ct.eot, images)
  return logits, ref


@functools.partial(jit, static_argnames=("share_prefix",))
def _text(params, text_prompts, ct, share_prefix):
  return heads.text_features(params, CFG, text_prompts, ct, share_prefix=share_prefix)


# ----------------------------------------------------------------------------- class tokens

def test_build_class_tokens(tok):
  ct = heads.build_class_tokens(tok, NAMES, 0)
  assert ct.ids.shape[:2] == (3, 7) and ct.ids.dtype == np.int32
  assert ct.class_mask.tolist() == [[True] * 5 + [False] * 2, [True] * 7, [True] * 3 + [False] * 4]
  assert tok.decode(ct.ids[0, 2, 1:ct.eot[0, 2]]) == "a photo of a golden retriever ."
  assert ct.ids.shape[2] == ct.eot.max() + 1                     # truncated to the longest
  np.testing.assert_array_equal(ct.ids[2, 3:], np.repeat(ct.ids[2, :1], 4, 0))  # valid dummies
  pr = heads.build_class_tokens(tok, NAMES, 8)
  x = tok.encode("X")[0]
  assert (pr.ids[..., 1:9] == x).all() and (pr.ids[..., 0] == tok.sot_token).all()
  assert tok.decode(pr.ids[1, 5, 9:pr.eot[1, 5]]) == "desk lamp ."
  with pytest.raises(ValueError, match="at least one class"):
    heads.build_class_tokens(tok, [["a"], []], 0)


# ----------------------------------------------------------------------------- logits and masking

def test_zeroshot_equals_plain_clip_and_padded_classes_get_no_probability(tok, params, data):
  ct = heads.build_class_tokens(tok, NAMES, 0)
  logits, ref = _zeroshot(params, ct, data["images"])
  assert logits.shape == (3, 4, 7) and np.isfinite(logits).all()
  np.testing.assert_array_equal(logits, ref)
  # Padded classes: zero probability, and the loss is the per-task loss on unpadded logits.
  probs = jax.nn.softmax(heads.masked_logits(logits, ct.class_mask), -1)
  assert float(jnp.abs(jnp.where(ct.class_mask[:, None], 0.0, probs)).max()) == 0.0
  per_task = heads.masked_cross_entropy(logits, data["labels"], ct.class_mask)
  for t, names in enumerate(NAMES):
    expect = optax.softmax_cross_entropy_with_integer_labels(
        logits[t, :, :len(names)], data["labels"][t]).mean()
    np.testing.assert_allclose(per_task[t], expect, rtol=1e-6)
  noisy = jnp.where(ct.class_mask[:, None], logits, 1e4)         # huge logits on padded slots
  np.testing.assert_array_equal(
      heads.masked_cross_entropy(noisy, data["labels"], ct.class_mask), per_task)
  g = jax.grad(lambda z: heads.masked_cross_entropy(z, data["labels"], ct.class_mask).sum())(logits)
  assert float(jnp.abs(jnp.where(ct.class_mask[:, None], 0.0, g)).max()) == 0.0
  # An example mask averages over real examples only.
  m = jnp.asarray([[1, 1, 0, 0]] * 3, jnp.float32)
  half = heads.masked_cross_entropy(logits[:, :2], data["labels"][:, :2], ct.class_mask)
  np.testing.assert_allclose(heads.masked_cross_entropy(logits, data["labels"], ct.class_mask, m),
                             half, rtol=1e-6)


def test_share_prefix_matches_and_placeholder_tokens_are_discarded(tok, params):
  spec = spec_of("mmap_mt")
  _, prompts = _setup(0, "mmap_mt")
  ct = heads.build_class_tokens(tok, NAMES, spec.text_prompt_tokens)
  shared = _text(params, prompts.text, ct, True)
  plain = _text(params, prompts.text, ct, False)
  assert shared.shape == (3, 7, CFG.embed_dim)
  np.testing.assert_allclose(shared, plain, rtol=1e-6, atol=1e-6)
  # Positions 1..L hold placeholders the layer-0 prompt replaces: other ids change nothing.
  ids = np.array(ct.ids)
  ids[..., 1:9] = np.random.default_rng(0).integers(1000, 40000, ids[..., 1:9].shape)
  np.testing.assert_array_equal(_text(params, prompts.text, ct._replace(ids=ids), True), shared)
  # ...while every prompted layer matters (prompts are read at layers 0..J-1).
  noise = jax.random.normal(key(7), prompts.text.shape[2:])     # not constant: LN would remove it
  for j in range(3):
    bumped = prompts.text.at[:, j].add(noise)
    assert float(jnp.abs(_text(params, bumped, ct, True) - shared).max()) > 1e-4, j


def _manual_towers(params, images, vis, ids, eot, txt):
  """Reference towers written out layer by layer: before block j (1 <= j < J) the prompt slots
  are overwritten with prompts[j] (what the previous block wrote there is discarded)."""
  swap = lambda x, start, p: x.at[:, start:start + p.shape[0]].set(p)
  v, pv = CFG.vision, params["visual"]
  x = jax.lax.conv_general_dilated(images, pv["conv1"]["kernel"], (v.patch_size,) * 2, "VALID",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"))
  x = x.reshape(x.shape[0], -1, v.width)
  x = jnp.concatenate([jnp.broadcast_to(pv["class_embedding"], (x.shape[0], 1, v.width)), x], 1)
  x = x + pv["positional_embedding"]
  x = jnp.concatenate([x, jnp.broadcast_to(vis[0], (x.shape[0],) + vis.shape[1:])], 1)
  x = clip.layer_norm(x, pv["ln_pre"])
  start = x.shape[1] - vis.shape[1]
  for i in range(v.layers):
    x = swap(x, start, vis[i]) if 1 <= i < vis.shape[0] else x
    x = clip.residual_block(x, pv["transformer"]["resblocks"][str(i)], v.heads, None,
                            CFG.activation)
  img = clip.layer_norm(x[:, 0], pv["ln_post"]) @ pv["proj"]
  t, pt = CFG.text, params["text"]
  y = clip.embed_tokens(params, ids).at[:, 1:1 + txt.shape[1]].set(txt[0])
  y = y + pt["positional_embedding"][:ids.shape[1]]
  mask = jnp.tril(jnp.ones((ids.shape[1],) * 2, bool))
  for i in range(t.layers):
    y = swap(y, 1, txt[i]) if 1 <= i < txt.shape[0] else y
    y = clip.residual_block(y, pt["transformer"]["resblocks"][str(i)], t.heads, mask,
                            CFG.activation)
  pooled = clip.layer_norm(y[jnp.arange(ids.shape[0]), eot], pt["ln_final"])
  return img, pooled @ pt["text_projection"]


@jit
def _towers(params, images, vis, ids, eot, txt):
  lib = (clip.encode_image(params, CFG, images, vis),
         clip.encode_text(params, CFG, clip.embed_tokens(params, ids), eot, txt, share_prefix=True))
  return lib, _manual_towers(params, images, vis, ids, eot, txt)


def test_deep_prompts_replace_not_accumulate(tok, params, data):
  spec = spec_of("mmap_st")
  _, prompts = _setup(1, "mmap_st")
  ct = heads.build_class_tokens(tok, NAMES, spec.text_prompt_tokens)
  args = (data["images"][0], prompts.visual[0], ct.ids[0], ct.eot[0], prompts.text[0])
  lib, replace = _towers(params, *args)
  for got, want in zip(lib, replace):
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)
  # Bumping one deep visual prompt moves the output (and the reference agrees again).
  bumped = args[1].at[2].add(jax.random.normal(key(8), args[1].shape[1:]))
  lib2, replace2 = _towers(params, args[0], bumped, *args[2:])
  assert float(jnp.abs(lib2[0] - lib[0]).max()) > 1e-3
  np.testing.assert_allclose(lib2[0], replace2[0], rtol=2e-5, atol=2e-5)


# ----------------------------------------------------------------------------- gradients

@pytest.mark.slow   # a long compile: full suite only
def test_single_task_methods_get_exact_single_task_gradients(tok, params, data):
  """mmap_st sums per-task losses: task t's gradient is its own single-task gradient.

  The reference comes from a different code path, the grouping API: `single_task_loss` (and so
  `per_task_loss_fn`) in one vmap over tasks, with each task's MmAP as the shared prompt set of
  a one-task problem.
  """
  spec = spec_of("mmap_st")
  ct = heads.build_class_tokens(tok, NAMES, spec.text_prompt_tokens)
  learned, _ = _setup(2, "mmap_st")
  (loss, aux), grads = _loss_and_grad(learned, params, ct, data, "mmap_st")
  np.testing.assert_allclose(loss, aux["per_task_loss"].sum(), rtol=1e-6)
  shared_spec = spec_of("mmap_shared")
  one = lambda shared, t, im, lb: heads.single_task_loss(shared, params, CFG, shared_spec, ct, t,
                                                         im, lb)
  ref_loss, ref = jit(jax.vmap(jax.value_and_grad(one)))(
      {"shared": learned["task"]}, jnp.arange(3), data["images"], data["labels"])
  np.testing.assert_allclose(ref_loss, aux["per_task_loss"], rtol=1e-5)
  for got, want in zip(jax.tree.leaves(grads["task"]), jax.tree.leaves(ref["shared"])):
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5 * float(jnp.abs(want).max()))
  assert float(jnp.abs(grads["task"]["source"]).max()) > 0


def test_grouping_api_shapes():
  """The documented call: per-task gradients of ONE shared MmAP, leaves [T, ...] (shapes only)."""
  spec = spec_of("mmap_shared")
  ct = ClassTokens(ids=jax.ShapeDtypeStruct((3, 7, 14), jnp.int32),
                   eot=jax.ShapeDtypeStruct((3, 7), jnp.int32),
                   class_mask=jax.ShapeDtypeStruct((3, 7), jnp.bool_))
  images = jax.ShapeDtypeStruct((3, 4, 32, 32, 3), jnp.float32)
  labels = jax.ShapeDtypeStruct((3, 4), jnp.int32)
  def run(ct, images, labels):
    k = jax.random.key(0)
    shared = init_learned(k, CFG, spec, 3)
    fn = heads.per_task_loss_fn(clip.init_params(k, CFG), CFG, spec)
    return shared, jax.vmap(jax.grad(fn), in_axes=(None, 0, 0, 0))(shared, ct, images, labels)
  shared, grads = jax.eval_shape(run, ct, images, labels)
  assert jax.tree.map(lambda g: g.shape, grads) == jax.tree.map(lambda p: (3,) + p.shape, shared)
  with pytest.raises(ValueError, match="use mmap_shared for per-task gradients"):
    heads.per_task_loss_fn(None, CFG, spec_of("mmap_mt"))({}, None, None, None)


def test_mmap_mt_sgd_lowers_loss_and_only_prompts_get_gradients(tok, params, data):
  spec = spec_of("mmap_mt")
  ct = heads.build_class_tokens(tok, NAMES, spec.text_prompt_tokens)
  learned, _ = _setup(4, "mmap_mt")
  losses = []
  for _ in range(4):
    (loss, aux), grads = _loss_and_grad(learned, params, ct, data, "mmap_mt")
    losses.append(float(loss))
    learned = jax.tree.map(lambda p, g: p - 0.5 * g, learned, grads)
  assert losses[-1] < losses[0] - 1e-3, losses
  np.testing.assert_allclose(aux["mean_task_loss"], aux["per_task_loss"].mean(), rtol=1e-6)
  # The gradient pytree is exactly the prompt pytree: group + task MmAPs, no CLIP leaf.
  assert jax.tree.structure(grads) == jax.tree.structure(learned)
  assert sorted(grads) == ["group", "task"]
  assert clip.count_params(grads) == 5 * (3 * 2 * 16 + 2 * 3 + 2 * 4)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def test_full_finetuning_trains_clip_and_leaves_frozen_copy_alone(tok, params, data):
  spec = spec_of("fullft_mt")
  ct = heads.build_class_tokens(tok, NAMES, 0)
  learned = init_learned(key(5), CFG, spec, 3, clip_params=params)
  assert clip.count_params(learned) == clip.count_params(params)
  fn = lambda l, p: heads.multitask_loss(l, p, CFG, spec, None, ct, data)[0]
  g_learned, g_frozen = jit(jax.grad(fn, argnums=(0, 1)))(learned, params)
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(g_frozen))
  flat = jax.tree_util.tree_leaves_with_path(g_learned["clip"])
  moved = {jax.tree_util.keystr(p) for p, g in flat if float(jnp.abs(g).max()) > 0}
  for name in ("['visual']['conv1']['kernel']", "['text']['token_embedding']['embedding']",
               "['visual']['transformer']['resblocks']['0']['attn']['in_proj']['kernel']",
               "['text']['text_projection']", "['logit_scale']"):
    assert name in moved, name


# ----------------------------------------------------------------------------- every method

@pytest.mark.parametrize("method", METHODS)
def test_every_method_traces_through_the_loss(tok, method):
  """Wiring of all 14 methods (vmap axes, per-task CLIP for fullft_st), shapes only."""
  spec = spec_of(method, **({"depth": 3} if method.split("_")[0] in ("maple", "ivlp") else {}))
  ct = heads.build_class_tokens(tok, NAMES, spec.text_prompt_tokens,
                                ctx_init=spec.learned_ctx_init)
  batch = {"images": jax.ShapeDtypeStruct((3, 2, 32, 32, 3), jnp.float32),
           "labels": jax.ShapeDtypeStruct((3, 2), jnp.int32)}
  def run(params, batch):
    groups = GROUPS if method == "mmap_mt" else None
    learned = init_learned(jax.random.key(0), CFG, spec, 3, groups, clip_params=params,
                           tokenizer=tok)
    return learned, heads.multitask_loss(learned, params, CFG, spec, groups, ct, batch)
  learned, (loss, aux) = jax.eval_shape(run, clip.param_shapes(CFG), batch)
  assert loss.shape == () and aux["logits"].shape == (3, 2, 7)
  lead = {"st": 3, "mt": None, "shared": None, "none": None}[spec.sharing]
  if spec.family == "fullft":
    leaf = learned["clip"]["logit_scale"]
    assert leaf.shape == (() if lead is None else (lead,))
  if spec.method == "mmap_mt":
    assert learned["group"]["source"].shape[0] == 2 and learned["task"]["source"].shape[0] == 3


# ----------------------------------------------------------------------------- ViT-B/16 shapes

def test_b16_shapes_via_eval_shape():
  spec = PromptSpec(method="mmap_mt").validate(B16)
  groups = ((0, 1), (2, 3))
  ct = ClassTokens(ids=jax.ShapeDtypeStruct((4, 65, 30), jnp.int32),
                   eot=jax.ShapeDtypeStruct((4, 65), jnp.int32),
                   class_mask=jax.ShapeDtypeStruct((4, 65), jnp.bool_))
  batch = {"images": jax.ShapeDtypeStruct((4, 2, 224, 224, 3), jnp.float32),
           "labels": jax.ShapeDtypeStruct((4, 2), jnp.int32)}
  def run(ct, batch):
    k = jax.random.key(0)
    learned = init_learned(k, B16, spec, 4, groups)
    return heads.multitask_loss(learned, clip.init_params(k, B16), B16, spec, groups, ct, batch,
                                dtype=jnp.bfloat16, remat=True)
  loss, aux = jax.eval_shape(run, ct, batch)
  assert loss.shape == () and aux["per_task_loss"].shape == (4,)
  assert aux["logits"].shape == (4, 2, 65) and aux["logits"].dtype == jnp.float32
