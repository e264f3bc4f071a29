"""World 2 of the demo (issue 25): the demo in the paper's regime.

World 1 (`world`) kept every downstream rendering out of pretraining, so its CLIP transferred
like a domain-generalisation model (37% zero-shot). A real CLIP was pretrained on web data that
holds every Office-Home style family. World 2 reproduces that regime:

* ``OBJECTS``: 24 classes, world 1's ten and ``world.MORE_OBJECTS`` (heart, moon, arrow, bell,
  bottle, mushroom, sword, chair, hammer, kite, rocket, cloud, crown, flag), each a distinct
  silhouette (filled masks at one pose pairwise IoU < 0.8, tests/test_demo_world.py).
* ``DOMAINS``: world 1's four downstream domains and renderers (photo, clipart, sketch,
  painting), drawn from their own seed stream (``tree_image``), so world-2 trees never repeat
  world-1 images.
* ``FAMILIES``: every downstream domain has a style family in the pretraining stream, with
  other samples and other rendering parameters than the downstream rendering:

  - photo: ``photograph`` (world 1's studio render) and ``snapshot`` (a textured scene, but
    horizon at 35-60 % of the height instead of 60-85 %, 2x finer background texture, half the
    sensor grain);
  - painting: ``oil painting`` (flow-aligned dabs over a studio render) and ``impressionist
    painting`` (random dabs 1.5x larger and rounder than ``painting``'s, over a ``snapshot``);
  - clipart: ``cartoon`` (thin outlines, cel shading) and ``flat illustration`` (flat fills with
    a 0.028-size outline instead of 0.042, on a more saturated background);
  - sketch: ``pencil sketch`` (single stroke, cross-hatching) and ``doodle`` (the double stroke
    at 55-85 % of ``sketch``'s jitter, which uses 90-125 %; hatching 30 % of the time, not 70 %).

  plus ``pixel art``, ``line drawing`` and ``watercolor`` as further web-like styles. No
  (object, style) pair is held out: the downstream renderings themselves are.
* Captions: world 1's eight templates ("{a_style} of {a_color} {obj}", "a picture of ...",
  "{a_obj}, {style}", ...) with three phrasings per style.
* ``SIMILAR_PAIRS``: the planted affinity, (photo, painting) and (clipart, sketch): painting is
  the photo render re-stroked, sketch and clipart share outlines on light backgrounds. On simple
  image statistics that grouping has the smallest within-pair distances of the three pairings
  (tests/test_demo_world.py).
"""
from __future__ import annotations

import os
import types
import zlib
from typing import Sequence

import numpy as np

from mmap_jax.demo import world as w1

VERSION = 2
OBJECTS: tuple[str, ...] = w1.OBJECTS + w1.MORE_OBJECTS
COLORS = w1.COLORS
DOMAINS = w1.DOMAINS
SIMILAR_DOMAINS: tuple[str, str] = ("photo", "painting")
SIMILAR_PAIRS: tuple[tuple[str, str], ...] = (("photo", "painting"), ("clipart", "sketch"))
FAMILIES = types.MappingProxyType({
    "photo": ("photograph", "snapshot"),
    "painting": ("oil painting", "impressionist painting"),
    "clipart": ("cartoon", "flat illustration"),
    "sketch": ("pencil sketch", "doodle"),
})
PRETRAIN_STYLES: tuple[str, ...] = tuple(s for f in FAMILIES.values() for s in f) + (
    "pixel art", "line drawing", "watercolor")

_SNAPSHOT = {"light_range": (190, 350), "tex_div": 8, "horizon": (0.35, 0.6), "grain": 0.04}
_NEW_RENDERERS = {
    "snapshot": lambda scene, size, rng: w1._render_photo(scene, size, rng, **_SNAPSHOT),
    "impressionist painting": lambda scene, size, rng: w1._render_painting(
        scene, size, rng, cell_div=15, elong=1.8, **_SNAPSHOT),
    "flat illustration": lambda scene, size, rng: w1._render_clipart(
        scene, size, rng, outline=0.028, bg_sat=(0.25, 0.5)),
    "doodle": lambda scene, size, rng: w1._render_sketch(
        scene, size, rng, jitter=(0.55, 0.85), hatch_prob=0.3),
}
_RENDERERS = types.MappingProxyType({**{k: w1._RENDERERS[k] for k in DOMAINS},
                                     **{k: w1._RENDERERS.get(k) or _NEW_RENDERERS[k]
                                        for k in PRETRAIN_STYLES}})
_STYLE_PHRASES = types.MappingProxyType({
    **{k: w1._STYLE_PHRASES[k] for k in PRETRAIN_STYLES if k in w1._STYLE_PHRASES},
    "snapshot": ("snapshot", "photo", "photograph"),
    "impressionist painting": ("impressionist painting", "painting", "artwork"),
    "flat illustration": ("flat illustration", "clip art", "vector drawing"),
    "doodle": ("doodle", "sketch", "scribble"),
})
assert set(_STYLE_PHRASES) == set(PRETRAIN_STYLES)

_TREE_TAG = 0x7D3F   # world 1 uses 0x7D3E: the two worlds' trees never share a stream
_MANIFEST_VERSION = 1


def render(obj: str, color: str, domain_or_style: str, rng: np.random.Generator,
           size: int = 64) -> np.ndarray:
  """One object in a downstream domain or a world-2 pretraining style: uint8 [size, size, 3]."""
  if obj not in OBJECTS:
    raise ValueError(f"unknown object {obj!r}; expected one of {OBJECTS}")
  if color not in w1._PALETTE:
    raise ValueError(f"unknown color {color!r}; expected one of {COLORS}")
  if domain_or_style not in _RENDERERS:
    raise ValueError(f"unknown domain/style {domain_or_style!r}; expected one of "
                     f"{DOMAINS + PRETRAIN_STYLES}")
  if size < 8:
    raise ValueError(f"size must be >= 8, got {size}")
  scene = w1._sample_scene(obj, color, rng, size * w1._SS)
  return w1._to_uint8(_RENDERERS[domain_or_style](scene, size, rng))


def tree_image_rng(seed: int, domain: str, obj: str, index: int) -> np.random.Generator:
  return np.random.default_rng([_TREE_TAG, seed, zlib.crc32(domain.encode()),
                                zlib.crc32(obj.encode()), index])


def tree_image(seed: int, domain: str, obj: str, index: int, size: int = 64) -> np.ndarray:
  """One world-2 tree image, exactly as `generate_tree` writes it."""
  rng = tree_image_rng(seed, domain, obj, index)
  color = COLORS[int(rng.integers(len(COLORS)))]
  return render(obj, color, domain, rng, size)


def generate_tree(root: str | os.PathLike, *, seed: int = 0, images_per_class: int = 160,
                  size: int = 64, domains: Sequence[str] = DOMAINS,
                  objects: Sequence[str] = OBJECTS, workers: int = 1) -> dict:
  """<root>/<domain>/<class>/<i>.png + manifest.json, as `world.generate_tree` (deterministic,
  atomic, reused when the manifest matches), with world 2's classes and images."""
  domains, objects = tuple(domains), tuple(objects)
  w1.check_tree_request(domains, objects, images_per_class, DOMAINS, OBJECTS)
  manifest = {
      "world": VERSION, "format_version": _MANIFEST_VERSION, "seed": int(seed),
      "size": int(size), "images_per_class": int(images_per_class), "domains": list(domains),
      "classes": list(objects), "folders": {o: w1.folder_name(o) for o in objects},
      "counts": {d: {w1.folder_name(o): int(images_per_class) for o in objects}
                 for d in domains},
      "total": int(images_per_class) * len(domains) * len(objects),
      "similar_pairs": [list(p) for p in SIMILAR_PAIRS],
  }
  return w1.write_tree(root, manifest, seed=seed, images_per_class=images_per_class, size=size,
                       domains=domains, objects=objects, workers=workers, image_fn=tree_image)


def pretraining_spec(rng: np.random.Generator) -> w1.PretrainSpec:
  """(object, colour, style, caption) of one pretraining pair: style, object and colour uniform,
  one of world 1's caption templates and one of the style's phrasings."""
  style = PRETRAIN_STYLES[int(rng.integers(len(PRETRAIN_STYLES)))]
  obj = OBJECTS[int(rng.integers(len(OBJECTS)))]
  color = COLORS[int(rng.integers(len(COLORS)))]
  phrases = _STYLE_PHRASES[style]
  phrase = phrases[int(rng.integers(len(phrases)))]
  template = w1._TEMPLATES[int(rng.integers(len(w1._TEMPLATES)))]
  caption = template.format(a_style=w1._article(phrase), style=phrase,
                            a_color=w1._article(color), obj=obj, a_obj=w1._article(obj))
  return w1.PretrainSpec(obj, color, style, caption)
