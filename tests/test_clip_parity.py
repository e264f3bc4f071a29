"""Numerical parity of the JAX CLIP with transformers' CLIPModel, through every loader.

A random `CLIPModel` (every parameter perturbed, so layer-norm and bias handling matters) is saved
the way users get checkpoints: `save_pretrained` (safetensors), an OpenAI-layout state dict
(torch.save, nested/prefixed like open_clip training files, safetensors) and an OpenAI-style
TorchScript archive. Loading any of them must reproduce torch's image embeddings, text embeddings
and logits to ||a - b|| / ||b|| <= 1e-5 in float32, at a tiny shape and at ViT-B/16's real shape.
Measured errors are printed (pytest -s) and written to <basetemp>/parity_errors.json.
"""
from __future__ import annotations

import gc
import gzip
import json
import pathlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmap_jax.checkpoints import from_huggingface, from_openai  # noqa: E402
from mmap_jax.models import clip  # noqa: E402
from mmap_jax.models.config import VARIANTS  # noqa: E402
from mmap_jax.tokenizer import CLIP_NUM_MERGES, ClipTokenizer, canonical_vocab  # noqa: E402

TOL = 1e-5
PROMPTS = ["a photo of a cat.", "x",
           "a photo of a large brown dog sitting on the grass next to a red bicycle.",
           "an origami hummingbird &amp; a “quoted” word"]
TINY = dict(vision=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                        num_attention_heads=2, image_size=32, patch_size=8),
            text=dict(hidden_size=128, intermediate_size=512, num_hidden_layers=2,
                      num_attention_heads=2),
            projection_dim=64)
VIT_B16 = dict(vision=dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12,
                           num_attention_heads=12, image_size=224, patch_size=16),
               text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                         num_attention_heads=8),
               projection_dim=512)
_RECORD: dict[str, dict[str, float]] = {}


# ----------------------------------------------------------------------------- helpers (shared)

def rel(a, b) -> float:
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def make_hf_model(shape: dict[str, Any], seed: int = 0, act: str = "quick_gelu"):
  """A random CLIPModel in which every parameter (layer norms and biases too) is non-trivial."""
  torch.manual_seed(seed)
  config = transformers.CLIPConfig(
      text_config=dict(shape["text"], hidden_act=act, vocab_size=49408,
                       max_position_embeddings=77),
      vision_config=dict(shape["vision"], hidden_act=act),
      projection_dim=shape["projection_dim"])
  model = transformers.CLIPModel(config).eval()
  with torch.no_grad():
    for name, p in model.named_parameters():
      if name == "logit_scale":
        p.add_(0.1)
      elif p.ndim == 1:   # layer norms and biases (HF inits them to 1 / 0); matrices are random
        p.add_(0.05 * torch.randn_like(p))
  return model


def hf_to_openai(sd: dict[str, Any], v_layers: int, t_layers: int) -> dict[str, Any]:
  """The same weights under OpenAI's model.py names (written independently of naming.py)."""
  o = {"visual.conv1.weight": sd["vision_model.embeddings.patch_embedding.weight"],
       "visual.class_embedding": sd["vision_model.embeddings.class_embedding"],
       "visual.positional_embedding": sd["vision_model.embeddings.position_embedding.weight"],
       "visual.proj": sd["visual_projection.weight"].T.contiguous(),
       "token_embedding.weight": sd["text_model.embeddings.token_embedding.weight"],
       "positional_embedding": sd["text_model.embeddings.position_embedding.weight"],
       "text_projection": sd["text_projection.weight"].T.contiguous(),
       "logit_scale": sd["logit_scale"]}
  for hf, oa in (("vision_model.pre_layrnorm", "visual.ln_pre"),
                 ("vision_model.post_layernorm", "visual.ln_post"),
                 ("text_model.final_layer_norm", "ln_final")):
    o[f"{oa}.weight"], o[f"{oa}.bias"] = sd[f"{hf}.weight"], sd[f"{hf}.bias"]
  for hf_tower, oa_tower, n in (("vision_model", "visual.transformer", v_layers),
                                ("text_model", "transformer", t_layers)):
    for i in range(n):
      h, b = f"{hf_tower}.encoder.layers.{i}", f"{oa_tower}.resblocks.{i}"
      a = f"{h}.self_attn"
      o[f"{b}.attn.in_proj_weight"] = torch.cat([sd[f"{a}.{x}_proj.weight"] for x in "qkv"])
      o[f"{b}.attn.in_proj_bias"] = torch.cat([sd[f"{a}.{x}_proj.bias"] for x in "qkv"])
      for src, dst in ((f"{a}.out_proj", f"{b}.attn.out_proj"), (f"{h}.layer_norm1", f"{b}.ln_1"),
                       (f"{h}.layer_norm2", f"{b}.ln_2"), (f"{h}.mlp.fc1", f"{b}.mlp.c_fc"),
                       (f"{h}.mlp.fc2", f"{b}.mlp.c_proj")):
        o[f"{dst}.weight"], o[f"{dst}.bias"] = sd[f"{src}.weight"], sd[f"{src}.bias"]
  return o


class _Box(torch.nn.Module):
  """A scriptable container: TorchScript archives need a module tree with a forward."""

  def forward(self, x: torch.Tensor) -> torch.Tensor:
    return x


def save_torchscript(state_dict: dict[str, Any], path: pathlib.Path, dtype=torch.float32,
                     image_size: int = 224) -> None:
  """An OpenAI-style TorchScript .pt: the state dict as a scripted module tree, plus the
  input_resolution / context_length / vocab_size attributes OpenAI's archives carry."""
  root = _Box()
  for key, value in state_dict.items():
    *mods, leaf = key.split(".")
    m = root
    for name in mods:
      if not hasattr(m, name):
        m.add_module(name, _Box())
      m = getattr(m, name)
    m.register_parameter(leaf, torch.nn.Parameter(value.detach().to(dtype).clone(),
                                                  requires_grad=False))
  for name, v in (("input_resolution", image_size), ("context_length", 77),
                  ("vocab_size", 49408)):
    root.register_buffer(name, torch.tensor(v))
  torch.jit.script(root).save(str(path))


def write_hf_tokenizer_files(bpe_path, directory: pathlib.Path) -> None:
  """vocab.json + merges.txt as Hugging Face ships them, built from OpenAI's merge list."""
  lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
  merges = [tuple(l.split()) for l in lines[1:CLIP_NUM_MERGES + 1]]
  vocab = {t: i for i, t in enumerate(canonical_vocab(merges))}
  (directory / "vocab.json").write_text(json.dumps(vocab), encoding="utf-8")
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "\n".join(f"{a} {b}" for a, b in merges) + "\n", encoding="utf-8")


def torch_reference(model, ids: np.ndarray, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
  """One CLIPModel forward: projected (unnormalised) embeddings and logits_per_image."""
  with torch.no_grad():
    out = model(input_ids=torch.from_numpy(ids).long(), pixel_values=torch.from_numpy(images_nchw))
  img = out.vision_model_output.pooler_output.numpy()   # transformers 5: after the projection
  txt = out.text_model_output.pooler_output.numpy()
  e = model.config.projection_dim
  assert img.shape == (len(images_nchw), e) and txt.shape == (len(ids), e), (img.shape, txt.shape)
  np.testing.assert_allclose(img / np.linalg.norm(img, axis=-1, keepdims=True),
                             out.image_embeds.numpy(), rtol=1e-5, atol=1e-6)
  return {"image": img, "text": txt, "logits": out.logits_per_image.numpy()}


# Module-level, so loaders of the same architecture reuse one compilation.
encode_image = jax.jit(clip.encode_image, static_argnames=("cfg",))
encode_text = jax.jit(clip.encode_text, static_argnames=("cfg", "share_prefix", "pooled_only_last"))


def jax_outputs(params, cfg, ids: np.ndarray, images_nchw: np.ndarray) -> dict[str, np.ndarray]:
  """The plain path (full 77 context) and the truncated, unshared, all-positions text path."""
  images = jnp.asarray(images_nchw.transpose(0, 2, 3, 1))
  img = encode_image(params, cfg, images)
  txt = encode_text(params, cfg, clip.embed_tokens(params, ids), clip.eot_positions(ids))
  short = clip.truncate_to_longest(ids)
  assert short.shape[1] < ids.shape[1]
  txt_short = encode_text(params, cfg, clip.embed_tokens(params, short),
                          clip.eot_positions(short), share_prefix=False, pooled_only_last=False)
  return {"image": np.asarray(img), "text": np.asarray(txt),
          "logits": np.asarray(clip.similarity_logits(params, img, txt)),
          "text_truncated": np.asarray(txt_short),
          "logits_truncated": np.asarray(clip.similarity_logits(params, img, txt_short))}


def check_parity(name: str, ours: dict[str, np.ndarray], ref: dict[str, np.ndarray],
                 basetemp: pathlib.Path) -> None:
  errors = {
      "image_embeds": rel(ours["image"], ref["image"]),
      "text_embeds": rel(ours["text"], ref["text"]),
      "logits": rel(ours["logits"], ref["logits"]),
      "text_embeds_truncated": rel(ours["text_truncated"], ref["text"]),
      "logits_truncated": rel(ours["logits_truncated"], ref["logits"]),
  }
  _RECORD[name] = errors
  print(f"\nparity {name}: " + ", ".join(f"{k}={v:.2e}" for k, v in errors.items()))
  (basetemp / "parity_errors.json").write_text(json.dumps(_RECORD, indent=2, sort_keys=True))
  bad = {k: v for k, v in errors.items() if not v <= TOL}
  assert not bad, f"{name}: relative errors above {TOL}: {bad}"


# ----------------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def tokenizer(bpe_path):
  return ClipTokenizer.from_bpe_file(bpe_path)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory, tokenizer):
  """A tiny perturbed CLIPModel saved every way, with torch's outputs."""
  torch.set_num_threads(2)
  root = tmp_path_factory.mktemp("tiny_parity")
  model = make_hf_model(TINY, seed=1)
  model.save_pretrained(root / "hf")
  sd = hf_to_openai(model.state_dict(), 2, 2)
  torch.save(sd, root / "openai_state_dict.pt")
  torch.save({"epoch": 3, "name": "run", "state_dict": {f"module.{k}": v for k, v in sd.items()}},
             root / "open_clip_training.pt")
  save_torchscript(sd, root / "openai_torchscript.pt", image_size=32)
  from safetensors.torch import save_file
  save_file({k: v.contiguous() for k, v in sd.items()}, str(root / "open_clip_model.safetensors"))
  ids = tokenizer.tokenize(PROMPTS)
  images = np.random.RandomState(0).randn(2, 3, 32, 32).astype(np.float32)
  return {"root": root, "ids": ids, "images": images,
          "ref": torch_reference(model, ids, images)}


# ----------------------------------------------------------------------------- tests

def test_tiny_huggingface_parity(tiny, tmp_path_factory):
  loaded = from_huggingface.load(tiny["root"] / "hf")
  assert loaded.cfg.vision.heads == 2 and loaded.cfg.text.heads == 2
  check_parity("tiny/huggingface", jax_outputs(loaded.params, loaded.cfg, tiny["ids"],
                                               tiny["images"]), tiny["ref"],
               tmp_path_factory.getbasetemp())
  # The check has teeth: dropping one perturbed bias is far outside the tolerance.
  ln_post = loaded.params["visual"]["ln_post"]
  ln_post["bias"] = np.zeros_like(ln_post["bias"])
  images = jnp.asarray(tiny["images"].transpose(0, 2, 3, 1))
  assert rel(encode_image(loaded.params, loaded.cfg, images), tiny["ref"]["image"]) > 1e-3


@pytest.mark.parametrize("filename,fmt", [
    ("openai_state_dict.pt", "state-dict-torch"),
    ("open_clip_training.pt", "state-dict-torch"),
    ("openai_torchscript.pt", "openai-torchscript"),
    ("open_clip_model.safetensors", "state-dict-safetensors"),
])
def test_tiny_openai_parity(tiny, tmp_path_factory, filename, fmt):
  loaded = from_openai.load(tiny["root"] / filename)
  assert loaded.source["format"] == fmt
  check_parity(f"tiny/{filename}", jax_outputs(loaded.params, loaded.cfg, tiny["ids"],
                                               tiny["images"]), tiny["ref"],
               tmp_path_factory.getbasetemp())


@pytest.mark.slow   # a long compile: full suite only
def test_vit_b16_parity(tmp_path_factory, tokenizer):
  """ViT-B/16's real shape through the HF and the OpenAI state-dict loaders (~1.5 GB peak)."""
  torch.set_num_threads(2)
  root = tmp_path_factory.mktemp("vit_b16_parity")
  model = make_hf_model(VIT_B16, seed=2)
  ids = tokenizer.tokenize(PROMPTS)
  images = np.random.RandomState(1).randn(2, 3, 224, 224).astype(np.float32)
  ref = torch_reference(model, ids, images)
  model.save_pretrained(root / "hf")
  torch.save(hf_to_openai(model.state_dict(), 12, 12), root / "openai.pt")
  del model
  gc.collect()

  loaded = from_huggingface.load(root / "hf")
  assert loaded.cfg == VARIANTS["ViT-B/16"], loaded.cfg
  check_parity("vit_b16/huggingface", jax_outputs(loaded.params, loaded.cfg, ids, images), ref,
               tmp_path_factory.getbasetemp())
  hf_cfg = loaded.cfg
  del loaded
  gc.collect()

  loaded = from_openai.load(root / "openai.pt")
  assert loaded.cfg == hf_cfg           # heads = width // 64 gives ViT-B/16's 12 and 8
  check_parity("vit_b16/openai_state_dict", jax_outputs(loaded.params, loaded.cfg, ids, images),
               ref, tmp_path_factory.getbasetemp())
