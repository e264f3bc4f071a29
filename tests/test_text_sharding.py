"""The text tower split over the ("data",) mesh (parallel.TextSharding) equals the replicated one.

8 fake CPU devices (conftest). Each check compiles the same function twice, once with the class
prompts split over the mesh (and/or chunked) and once replicated, and compares loss and every
gradient leaf to 1e-5 of the leaf's largest magnitude (float32: only reduction orders differ).
"""
import functools

import jax
import jax.numpy as jnp
import ml_collections as mlc
import numpy as np
import optax
import pytest

from configs import common
from mmap_jax import heads, parallel
from mmap_jax.models import clip
from mmap_jax.models.config import VARIANTS
from mmap_jax.prompts import PromptSpec, init_learned
from mmap_jax.train import evaluate, setup, step as train_step
from mmap_jax.train import run_spec
from tests.test_multitask_model import CFG, GROUPS, NAMES, numpy_clip, spec_of

jit0 = functools.partial(jax.jit, compiler_options={"xla_backend_optimization_level": 0})
MESH = parallel.data_mesh()
SPLIT = parallel.text_sharding(MESH)
REPLICATED = parallel.REPLICATED_TEXT


def close(got, want, tol=1e-5):
  """Every leaf within tol x (its largest magnitude) of the reference."""
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    g, w = np.asarray(g, np.float64), np.asarray(w, np.float64)
    scale = max(np.abs(w).max(), 1e-30)
    assert np.abs(g - w).max() <= tol * scale, (np.abs(g - w).max(), scale)


@pytest.fixture(scope="module")
def params():
  return parallel.replicate(numpy_clip(CFG), MESH)


def learned_for(method, params, tok, seed=3):
  """The method's learned pytree, perturbed so no leaf (LoRA's zero B, ...) is trivial."""
  spec = spec_of(method, **({"depth": 3} if method.split("_")[0] in ("maple", "ivlp") else {}))
  groups = GROUPS if method == "mmap_mt" else None
  learned = init_learned(jax.random.key(0, impl="rbg"), CFG, spec, 3, groups,
                         clip_params=jax.tree.map(np.asarray, params), tokenizer=tok)
  rng = np.random.default_rng(seed)
  learned = jax.tree.map(lambda x: np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x))
                         .astype(np.float32), learned)
  ct = heads.build_class_tokens(tok, NAMES, spec.text_prompt_tokens,
                                ctx_init=spec.learned_ctx_init)
  return spec, groups, parallel.replicate(learned, MESH), parallel.replicate(ct, MESH)


def batch(num_tasks=3, per_task=8, seed=1):
  rng = np.random.default_rng(seed)
  images = rng.standard_normal((num_tasks, per_task, 32, 32, 3)).astype(np.float32)
  labels = np.stack([rng.integers(0, len(n), per_task) for n in NAMES]).astype(np.int32)
  return jax.device_put({"image": images, "label": labels}, parallel.task_batch_sharding(MESH))


def loss_and_grads(spec, groups, learned, frozen, data, text_sharding, **kw):
  fn = train_step.make_loss_fn(CFG, spec, groups, text_sharding=text_sharding, **kw)
  return jit0(jax.value_and_grad(fn, has_aux=True))(learned, frozen, data)


# Every family, each text-tower layout once: group + task prompts (mmap_mt), one shared MmAP
# (mmap_shared), shallow and deep text prompts (coop_mt; maple_st, ivlp_mt), no text prompt
# (vpt_mt), per-task text weights (lora_st), shared text weights (bitfit_mt, fullft_mt) and the
# adapter after the text features (clipadapter_mt). The other ST/MT forms of the PEFT families use
# the same layouts. The quick tier keeps two (group prompts, per-task LoRA).
# coop_mt runs without the shared text prefix (the default elsewhere), so both prefix paths split.
QUICK = ("mmap_mt", "lora_st")
METHODS = [pytest.param(m, m != "coop_mt", marks=() if m in QUICK else pytest.mark.slow)
           for m in ("mmap_mt", "lora_st", "maple_st", "coop_mt", "vpt_mt", "ivlp_mt",
                     "mmap_shared", "clipadapter_mt", "bitfit_mt", "fullft_mt")]


@pytest.mark.parametrize("method,share_prefix", METHODS)
def test_split_text_tower_equals_replicated(tok, params, method, share_prefix):
  spec, groups, learned, ct = learned_for(method, params, tok)
  frozen, data = {"clip": params, "class_tokens": ct}, batch()
  kw = {"share_prefix": share_prefix}
  (loss, _), grads = loss_and_grads(spec, groups, learned, frozen, data, SPLIT, **kw)
  (ref, _), ref_grads = loss_and_grads(spec, groups, learned, frozen, data, REPLICATED, **kw)
  close(loss, ref)
  close(grads, ref_grads)


@pytest.mark.parametrize("text_sharding", [
    pytest.param(parallel.TextSharding(parallel.data_mesh(jax.devices()[:4]), chunk=1),
                 marks=pytest.mark.slow),  # 2 chunks/device
    pytest.param(parallel.TextSharding(MESH, chunk=1), marks=pytest.mark.slow),  # 1 chunk
    pytest.param(parallel.TextSharding(None, chunk=3), marks=pytest.mark.slow)])  # 3, replicated
def test_chunked_text_encoder_equals_replicated(tok, params, text_sharding):
  spec, groups, learned, ct = learned_for("mmap_mt", params, tok)
  devices = text_sharding.mesh.devices.size if text_sharding.mesh is not None else 8
  mesh = parallel.data_mesh(jax.devices()[:devices])
  put = lambda x: parallel.replicate(jax.tree.map(np.asarray, x), mesh)
  learned, frozen = put(learned), put({"clip": params, "class_tokens": ct})
  data = jax.device_put(jax.tree.map(np.asarray, batch()), parallel.task_batch_sharding(mesh))
  got = loss_and_grads(spec, groups, learned, frozen, data, text_sharding, remat=True)
  want = loss_and_grads(spec, groups, learned, frozen, data, REPLICATED)
  close(got, want)


@pytest.mark.slow
def test_split_holds_with_remat_accumulation_and_steps_per_call(tok, params):
  """K=2 optimizer steps per call with 2 micro-batches each: the same state as replicated (the
  default shared text prefix; without it: test_split_text_tower_equals_replicated[coop_mt-False])."""
  spec, groups, learned, ct = learned_for("mmap_mt", params, tok)
  frozen = {"clip": params, "class_tokens": ct}
  opt = optax.adamw(1e-3)
  data = [batch(seed=s) for s in (1, 2)]
  batches = jax.device_put(jax.tree.map(lambda *x: np.stack([np.asarray(v) for v in x]), *data),
                           jax.sharding.NamedSharding(MESH, jax.sharding.PartitionSpec(
                               None, None, parallel.DATA_AXIS)))

  def run(text_sharding):
    fn = train_step.make_loss_fn(CFG, spec, groups, remat=True,
                                 text_sharding=text_sharding)
    steps = train_step.make_train_steps(fn, opt, accum_steps=2, donate=False)
    return steps(train_step.init_state(learned, opt), frozen, batches)

  (state, metrics), (ref_state, ref_metrics) = run(SPLIT), run(REPLICATED)
  close(metrics["loss"], ref_metrics["loss"])
  close(state["learned"], ref_state["learned"])


@pytest.mark.slow
def test_split_in_bfloat16_stays_close(tok, params):
  spec, groups, learned, ct = learned_for("mmap_mt", params, tok)
  frozen, data = {"clip": params, "class_tokens": ct}, batch()
  (loss, _), grads = loss_and_grads(spec, groups, learned, frozen, data, SPLIT,
                                    dtype=jnp.bfloat16)
  (ref, _), ref_grads = loss_and_grads(spec, groups, learned, frozen, data, REPLICATED,
                                       dtype=jnp.bfloat16)
  close(loss, ref, tol=2e-2)
  close(grads, ref_grads, tol=5e-2)


@pytest.mark.slow   # a long compile: full suite only
def test_grouping_gradients_and_evaluation_text_split(tok, params):
  """The grouping step's per-task gradients (vmap over tasks) and evaluation's text features."""
  spec, _, learned, ct = learned_for("mmap_shared", params, tok)
  data = batch()

  def per_task(text_sharding):
    fn = heads.per_task_loss_fn(params, CFG, spec, text_sharding=text_sharding)
    return jit0(jax.vmap(jax.grad(fn), in_axes=(None, 0, 0, 0)))(
        learned, ct, data["image"], data["label"])
  close(per_task(SPLIT), per_task(REPLICATED))

  def text(text_sharding):
    text_fn, _ = evaluate.make_eval_fns(CFG, spec, None, 3, text_sharding=text_sharding)
    return text_fn(learned, params, ct)
  close(text(SPLIT), text(REPLICATED))


def _text_flops(text_sharding, num_classes=64):
  ids = jax.ShapeDtypeStruct((2, num_classes, 12), jnp.int32)
  eot = jax.ShapeDtypeStruct((2, num_classes), jnp.int32)
  ct = heads.ClassTokens(ids, eot, jax.ShapeDtypeStruct((2, num_classes), jnp.bool_))
  fn = jax.jit(lambda p, ct: heads.text_features(p, CFG, None, ct, text_sharding=text_sharding))
  compiled = fn.lower(clip.param_shapes(CFG), ct).compile()
  return float(compiled.cost_analysis()["flops"])


def test_each_device_encodes_only_its_share_of_the_classes():
  """Per-device FLOPs of the compiled text features: about 1/8 of the replicated ones."""
  split, replicated = _text_flops(SPLIT), _text_flops(REPLICATED)
  assert split <= 0.15 * replicated, (split, replicated)


def test_parallel_fields_are_validated_before_compiling():
  c = common.base_config()
  c.clip.path = "unused"
  c.parallel = mlc.ConfigDict({"shard_text": "yes", "text_chunk": -2})   # e.g. from JSON
  with pytest.raises(setup.ConfigError) as e:
    setup.validate(c)
  assert "parallel.text_chunk=-2" in str(e.value) and "parallel.shard_text='yes'" in str(e.value)
  c.parallel = mlc.ConfigDict({"shard_text": False, "text_chunk": 4})
  assert run_spec.resolve(c).text_sharding(MESH) == parallel.TextSharding(None, 4)
  c.parallel.shard_text = True
  assert run_spec.resolve(c).text_sharding(MESH).shards == 8


def test_padded_classes():
  t = parallel.TextSharding(MESH)
  assert [t.padded_classes(c) for c in (1, 8, 65, 345)] == [8, 8, 72, 352]
  assert parallel.TextSharding(MESH, chunk=4).padded_classes(65) == 96   # 8 x ceil(9/4)*4
  assert parallel.TextSharding(None, chunk=16).padded_classes(65) == 80


@pytest.mark.slow
def test_b16_shaped_model_split_equals_replicated(tok):
  """ViT-B/16 widths, heads and patch size (2 layers per tower, 64 px images to stay cheap),
  MmAP-MT with d_s=256, random weights: loss and gradients as replicated."""
  import dataclasses
  b16 = VARIANTS["ViT-B/16"]
  cfg = dataclasses.replace(b16, vision=dataclasses.replace(b16.vision, layers=2, image_size=64),
                            text=dataclasses.replace(b16.text, layers=2))
  spec = PromptSpec(method="mmap_mt", length=4, source_length=2, depth=2,
                    source_dim=256).validate(cfg)
  params = parallel.replicate(numpy_clip(cfg), MESH)
  learned = init_learned(jax.random.key(0, impl="rbg"), cfg, spec, 3, GROUPS)
  rng = np.random.default_rng(4)
  learned = parallel.replicate(jax.tree.map(
      lambda x: np.asarray(x) + 0.05 * rng.standard_normal(np.shape(x)).astype(np.float32),
      learned), MESH)
  ct = parallel.replicate(heads.build_class_tokens(tok, NAMES, spec.text_prompt_tokens), MESH)
  images = rng.standard_normal((3, 8, 64, 64, 3)).astype(np.float32)
  labels = np.stack([rng.integers(0, len(n), 8) for n in NAMES]).astype(np.int32)
  data = jax.device_put({"image": images, "label": labels}, parallel.task_batch_sharding(MESH))
  frozen = {"clip": params, "class_tokens": ct}

  def run(text_sharding):
    fn = train_step.make_loss_fn(cfg, spec, GROUPS, text_sharding=text_sharding)
    return jit0(jax.value_and_grad(fn, has_aux=True))(learned, frozen, data)
  close(run(SPLIT), run(REPLICATED))
