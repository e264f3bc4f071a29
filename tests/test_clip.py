"""Unit tests of the CLIP encoders' fast paths and deep-prompt semantics (parity with torch is in
test_clip_parity.py)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from mmap_jax.checkpoints import naming
from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig, TextConfig, VisionConfig

CFG = ClipConfig(embed_dim=32,
                 vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=3, heads=4),
                 text=TextConfig(width=48, layers=3, heads=4, context_length=24, vocab_size=300))
SOT, EOT, X = 298, 299, 7          # start, end, prompt-placeholder ids of the small vocabulary
L = 3                              # prompt tokens per layer


def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


@pytest.fixture(scope="module")
def params():
  """Random params (numpy: fast) in which layer norms and biases are non-trivial too."""
  rng = np.random.RandomState(0)
  flat = {}
  for name, shape in naming.expected_shapes(CFG).items():
    if name == "logit_scale":
      value = np.log(1 / 0.07)
    elif name.endswith("/scale"):
      value = 1 + 0.1 * rng.randn(*shape)
    elif name.endswith(("/bias", "class_embedding", "positional_embedding")):
      value = 0.1 * rng.randn(*shape)
    elif name.endswith("token_embedding/embedding"):
      value = 0.02 * rng.randn(*shape)
    else:                                              # kernels and projections: fan-in scaling
      value = rng.randn(*shape) / np.sqrt(np.prod(shape[:-1]))
    flat[name] = jnp.asarray(value, jnp.float32)
  return naming.unflatten(flat)


@pytest.fixture(scope="module")
def inputs():
  rng = np.random.RandomState(0)
  images = jnp.asarray(rng.randn(2, 32, 32, 3).astype(np.float32))
  lengths = [4, 9, 6]                                   # words after the placeholders
  ids = np.zeros((3, CFG.text.context_length), np.int32)
  for row, n in enumerate(lengths):
    seq = [SOT] + [X] * L + list(rng.randint(10, 290, n)) + [EOT]
    ids[row, :len(seq)] = seq
  return {"images": images, "ids": ids,
          "vp": {j: jnp.asarray(0.5 * rng.randn(j, L, CFG.vision.width).astype(np.float32))
                 for j in (1, 2, 3)},
          "tp": {j: jnp.asarray(0.5 * rng.randn(j, L, CFG.text.width).astype(np.float32))
                 for j in (1, 2, 3)}}


def image(params, inputs, j=None, **kw):
  return clip.encode_image(params, CFG, inputs["images"], None if j is None else inputs["vp"][j],
                           **kw)


def text(params, inputs, j=None, ids=None, **kw):
  ids = inputs["ids"] if ids is None else ids
  return clip.encode_text(params, CFG, clip.embed_tokens(params, ids),
                          clip.eot_positions(ids, EOT), None if j is None else inputs["tp"][j],
                          **kw)


# ----------------------------------------------------------------------------- fast paths

@pytest.mark.parametrize("j", [None, 2, 3])
def test_pooled_only_last_equals_full_last_block(params, inputs, j):
  assert rel(image(params, inputs, j), image(params, inputs, j, pooled_only_last=False)) <= 1e-6
  assert rel(text(params, inputs, j), text(params, inputs, j, pooled_only_last=False)) <= 1e-6


@pytest.mark.parametrize("j", [1, 2, 3])
@pytest.mark.parametrize("pooled_only_last", [True, False])
def test_shared_prefix_equals_unshared(params, inputs, j, pooled_only_last):
  plain = text(params, inputs, j, pooled_only_last=False)
  shared = text(params, inputs, j, share_prefix=True, pooled_only_last=pooled_only_last)
  assert rel(shared, plain) <= 1e-6


@pytest.mark.parametrize("j", [None, 2])
def test_truncating_to_the_longest_sequence_is_exact(params, inputs, j):
  short = clip.truncate_to_longest(inputs["ids"], EOT)
  assert short.shape[1] == 1 + L + 9 + 1
  assert rel(text(params, inputs, j, ids=short), text(params, inputs, j)) <= 1e-6


# ----------------------------------------------------------------------------- deep prompts

_ORIGINAL_BLOCK = clip.residual_block
_ORIGINAL_PREFIX_BLOCK = clip._prefix_suffix_block  # pylint: disable=protected-access


def _perturbing(original, at_call: int, start: int):
  """Wraps a block so that its `at_call`-th call's output is changed at prompt positions
  [start, start + L) only (negative start: counted from the end). The change varies across
  features: a constant shift would be erased by the next layer norm and prove nothing."""
  calls = [0]

  def disturb(x, s):
    delta = 3.0 * jnp.cos(0.7 * jnp.arange(x.shape[-1], dtype=x.dtype))
    return x.at[..., s:s + L, :].add(delta)

  def wrapped(*args, **kwargs):
    out = original(*args, **kwargs)
    i, calls[0] = calls[0], calls[0] + 1
    if i != at_call:
      return out
    if isinstance(out, tuple):                         # _prefix_suffix_block: (prefix, suffix)
      return disturb(out[0], start), out[1]
    return disturb(out, out.shape[-2] + start if start < 0 else start)
  return wrapped


@pytest.mark.parametrize("layer", [0, 1])
def test_visual_deep_prompts_replace_not_accumulate(params, inputs, monkeypatch, layer):
  """Disturbing block `layer`'s output at the prompt tokens is invisible when prompts[layer + 1]
  replaces them (layer 1 -> the pooled last block); it would survive if deeper prompts were
  added to the running tokens instead."""
  base = {j: image(params, inputs, j) for j in (layer + 1, layer + 2)}
  monkeypatch.setattr(clip, "residual_block", _perturbing(_ORIGINAL_BLOCK, layer, -L))
  np.testing.assert_array_equal(image(params, inputs, layer + 2), base[layer + 2])
  # With J = layer + 1 nothing replaces them, so the same disturbance must show.
  monkeypatch.setattr(clip, "residual_block", _perturbing(_ORIGINAL_BLOCK, layer, -L))
  assert rel(image(params, inputs, layer + 1), base[layer + 1]) > 1e-3


@pytest.mark.parametrize("layer", [0, 1])
@pytest.mark.parametrize("share_prefix", [False, True])
def test_text_deep_prompts_replace_not_accumulate(params, inputs, monkeypatch, share_prefix,
                                                  layer):
  """As for the image tower, at positions 1..L, with and without the shared-prefix path."""
  name = "_prefix_suffix_block" if share_prefix else "residual_block"
  original = _ORIGINAL_PREFIX_BLOCK if share_prefix else _ORIGINAL_BLOCK
  base = {j: text(params, inputs, j, share_prefix=share_prefix) for j in (layer + 1, layer + 2)}
  monkeypatch.setattr(clip, name, _perturbing(original, layer, 1))
  np.testing.assert_array_equal(text(params, inputs, layer + 2, share_prefix=share_prefix),
                                base[layer + 2])
  monkeypatch.setattr(clip, name, _perturbing(original, layer, 1))
  assert rel(text(params, inputs, layer + 1, share_prefix=share_prefix), base[layer + 1]) > 1e-3


def test_every_prompt_layer_is_used(params, inputs):
  """Changing prompts[j] changes the output for every j < J (in both towers)."""
  vp, tp = inputs["vp"][3], inputs["tp"][3]
  img0 = clip.encode_image(params, CFG, inputs["images"], vp)
  emb, eot = clip.embed_tokens(params, inputs["ids"]), clip.eot_positions(inputs["ids"], EOT)
  txt0 = clip.encode_text(params, CFG, emb, eot, tp)
  for j in range(3):
    # A change that varies across features (layer norms erase a constant shift).
    img = clip.encode_image(params, CFG, inputs["images"],
                            vp.at[j].add(jnp.cos(0.7 * jnp.arange(CFG.vision.width))))
    txt = clip.encode_text(params, CFG, emb, eot,
                           tp.at[j].add(jnp.cos(0.7 * jnp.arange(CFG.text.width))))
    assert rel(img, img0) > 1e-4 and rel(txt, txt0) > 1e-4, j


# ----------------------------------------------------------------------------- dtype, jit, remat

def test_bfloat16_compute_is_close_and_returns_float32(params, inputs):
  for fn in (image, text):
    for j in (None, 2):
      full = fn(params, inputs, j)
      half = fn(params, inputs, j, dtype=jnp.bfloat16)
      assert half.dtype == jnp.float32 and full.dtype == jnp.float32
      assert rel(half, full) < 3e-2, (fn.__name__, j, rel(half, full))


@pytest.mark.slow   # a long compile: full suite only
def test_jit_and_remat_give_identical_results(params, inputs, xla_default_codegen):
  vp, tp = inputs["vp"][2], inputs["tp"][2]
  emb, eot = clip.embed_tokens(params, inputs["ids"]), clip.eot_positions(inputs["ids"], EOT)

  def loss(prompts, remat):
    img = clip.encode_image(params, CFG, inputs["images"], prompts[0], remat=remat)
    txt = clip.encode_text(params, CFG, emb, eot, prompts[1], remat=remat, share_prefix=True)
    return jnp.sum(clip.similarity_logits(params, img, txt) ** 2), (img, txt)

  grad = {r: jax.jit(jax.value_and_grad(loss, has_aux=True), static_argnums=1)((vp, tp), r)
          for r in (False, True)}
  (l0, (img0, txt0)), g0 = grad[False]
  (l1, (img1, txt1)), g1 = grad[True]
  np.testing.assert_array_equal(img1, img0)
  np.testing.assert_array_equal(txt1, txt0)
  for a, b in zip(jax.tree.leaves(g1), jax.tree.leaves(g0)):
    assert rel(a, b) <= 1e-6
  # jit versus op-by-op execution.
  assert rel(img0, clip.encode_image(params, CFG, inputs["images"], vp)) <= 1e-6
  assert rel(txt0, clip.encode_text(params, CFG, emb, eot, tp, share_prefix=True)) <= 1e-6


def test_shape_errors_name_the_problem(params, inputs):
  with pytest.raises(ValueError, match="images must be 32x32, got 16x16"):
    clip.encode_image(params, CFG, jnp.zeros((1, 16, 16, 3)))
  with pytest.raises(ValueError, match=r"visual prompts must be \[J, L, 64\] with 1 <= J <= 3"):
    clip.encode_image(params, CFG, inputs["images"], jnp.zeros((4, L, 64)))
  ids = np.zeros((1, 30), np.int32)
  with pytest.raises(ValueError, match="exceed context_length 24"):
    clip.encode_text(params, CFG, clip.embed_tokens(params, ids), np.zeros(1, np.int32))
