"""Class probabilities for images: zero-shot CLIP, or a trained workdir's prompts for a task.

The library behind `launch.predict`: a `Classifier` encodes the class prompts once (with learned
text prompts when given) and classifies preprocessed images in fixed-size batches (one compile).
"""
from __future__ import annotations

import dataclasses
import functools
import pathlib
from typing import Any, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from mmap_jax import heads, resources
from mmap_jax.checkpoints import store
from mmap_jax.data import preprocess
from mmap_jax.data.images import UnreadableImageError, to_rgb
from mmap_jax.models import clip
from mmap_jax.models.config import ClipConfig
from mmap_jax.tokenizer import ClipTokenizer

DEFAULT_TEMPLATE = "a photo of a {}."

@dataclasses.dataclass(frozen=True)
class Classifier:
  """Everything fixed across images: CLIP, the class text features, the visual prompts."""
  cfg: ClipConfig
  params: Any                          # device arrays
  class_names: tuple[str, ...]
  text_features: jax.Array             # [C, E], unit norm
  visual_prompts: Optional[jax.Array]  # [J, L, W_v] or None


@functools.partial(jax.jit, static_argnames=("cfg",))
def _text_features(params, cfg: ClipConfig, ids, eot, text_prompts):
  feats = clip.encode_text(params, cfg, clip.embed_tokens(params, ids), eot, text_prompts,
                           share_prefix=text_prompts is not None)
  return clip.normalize(feats)


@functools.partial(jax.jit, static_argnames=("cfg",))
def _probabilities(params, cfg: ClipConfig, images, text_features, visual_prompts):
  feats = clip.encode_image(params, cfg, images, visual_prompts)
  logits = jnp.exp(params["logit_scale"]) * clip.normalize(feats) @ text_features.T
  return jax.nn.softmax(logits, axis=-1)


def build_classifier(params: Any, cfg: ClipConfig, tokenizer: ClipTokenizer,
                     class_names: Sequence[str], prompts: Any = None,
                     template: str = DEFAULT_TEMPLATE,
                     ctx_init: Optional[str] = None) -> Classifier:
  """Encodes the class prompts once. `prompts`: None or a `PromptTokens` (text/visual [J, L, W]).

  `ctx_init`: the trained spec's `learned_ctx_init` (its fixed words follow the learned tokens).
  """
  if not class_names or any(not c.strip() for c in class_names):
    raise ValueError(f"class names must be non-empty, got {list(class_names)!r}")
  if template.count("{}") != 1:
    raise ValueError(f"template {template!r} must contain exactly one '{{}}'")
  text_prompts = getattr(prompts, "text", None)
  visual_prompts = getattr(prompts, "visual", None)
  num_prompt_tokens = 0 if text_prompts is None else int(np.shape(text_prompts)[-2])
  tokens = heads.build_class_tokens(tokenizer, [list(class_names)], num_prompt_tokens,
                                    zeroshot_template=template,
                                    context_length=cfg.text.context_length,
                                    ctx_init=ctx_init if text_prompts is not None else None)
  params = jax.device_put(params)
  text = _text_features(params, cfg, jnp.asarray(tokens.ids[0]), jnp.asarray(tokens.eot[0]),
                        None if text_prompts is None else jnp.asarray(text_prompts))
  return Classifier(cfg, params, tuple(class_names), text,
                    None if visual_prompts is None else jnp.asarray(visual_prompts))


def classify(classifier: Classifier, images: np.ndarray, batch_size: int = 32) -> np.ndarray:
  """Preprocessed images [N, H, W, 3] -> class probabilities [N, C].

  Every batch is padded to the same size, so the image tower compiles once.
  """
  n = len(images)
  if n == 0:
    return np.zeros((0, len(classifier.class_names)), np.float32)
  batch = max(1, min(batch_size, n))
  out = []
  for start in range(0, n, batch):
    chunk = np.asarray(images[start:start + batch], np.float32)
    pad = batch - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.float32)])
    probs = _probabilities(classifier.params, classifier.cfg, jnp.asarray(chunk),
                           classifier.text_features, classifier.visual_prompts)
    out.append(np.asarray(probs)[:batch - pad])
  return np.concatenate(out)


def load_image(path: str | pathlib.Path, image_size: int) -> np.ndarray:
  """One file -> CLIP eval preprocessing (float32 [size, size, 3]); errors name the file."""
  try:
    with Image.open(path) as image:
      image.load()
      rgb = to_rgb(image)
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UnreadableImageError(str(path), f"{type(e).__name__}: {e}") from e
  return preprocess.eval_image(rgb, image_size)


def predict_files(clip_dir: str | pathlib.Path, class_names: Optional[Sequence[str]],
                  image_paths: Sequence[str | pathlib.Path], prompts: Any = None,
                  template: str = DEFAULT_TEMPLATE, batch_size: int = 32,
                  workdir: Optional[str] = None, task: Optional[str] = None,
                  step: Optional[int] = None) -> list[dict[str, Any]]:
  """[{"image", "probabilities": {class: p}, "top"}] for each image, in order.

  With `workdir` + `task`, the trained prompts of that task replace `prompts` and the class
  names default to the task's.
  """
  if not image_paths:
    raise ValueError("no image files given")
  trained = None
  if workdir is not None:
    from mmap_jax.train import trained as trained_lib
    if not task:
      raise ValueError("--task is required with --workdir")
    trained = trained_lib.load_trained(workdir, step)
    if clip_dir is None:
      clip_dir = trained.clip_path
      if clip_dir == "demo":
        clip_dir = resources.demo_clip_dir(check=True)
  if clip_dir is None:
    raise ValueError("--clip is required (or --workdir of a run that names its CLIP)")
  cfg, params, tokenizer = store.load(clip_dir)
  if trained is not None:
    params, prompts, task_classes = trained_lib.task_model(trained, cfg, params, task)
    class_names = class_names or list(task_classes)
  if not class_names:
    raise ValueError("--classes is required without --workdir")
  classifier = build_classifier(params, cfg, tokenizer, class_names, prompts, template,
                                ctx_init=trained.spec.learned_ctx_init if trained else None)
  images = np.stack([load_image(p, cfg.vision.image_size) for p in image_paths])
  probs = classify(classifier, images, batch_size)
  names = classifier.class_names
  return [{"image": str(path),
           "probabilities": {c: float(p) for c, p in zip(names, row)},
           "top": names[int(np.argmax(row))]}
          for path, row in zip(image_paths, probs)]


def format_table(results: Sequence[dict[str, Any]]) -> str:
  lines = []
  for r in results:
    ranked = sorted(r["probabilities"].items(), key=lambda kv: -kv[1])
    lines.append(f"{r['image']}: {r['top']}")
    lines += [f"  {p:7.2%}  {c}" for c, p in ranked]
  return "\n".join(lines)
