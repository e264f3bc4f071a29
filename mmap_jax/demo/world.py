"""A procedurally generated multi-domain world: demo dataset + CLIP pretraining pairs.

No dataset or model weights can be downloaded in this project, so everything the
demo pipeline needs is drawn here with PIL polygons and vectorised numpy:

* ``OBJECTS``: ten object classes drawn from hand-made polygon shapes (ball, cup,
  house, tree, fish, star, car, key, umbrella, boat). Every sample varies pose
  (rotation, scale, aspect, position, mirror for asymmetric objects) and object
  colour, drawn from ``COLORS`` independently of the class, so colour is never
  the class.
* ``DOMAINS``: the four downstream demo domains (one MmAP task each):

  - ``photo``: shaded render (directional lighting gradient, specular highlight,
    darkened rim), soft drop shadow, textured background (smooth colour
    gradient, low/mid-frequency value noise, a "table" horizon) and sensor grain.
  - ``painting``: the ``photo`` render broken into many short, randomly oriented
    elliptical brush dabs (an anisotropic Voronoi of jittered dab centres) with
    per-dab colour jitter and bristle striation -- object and background alike.
  - ``clipart``: flat fills, thick black outlines, plain pastel background.
  - ``sketch``: grayscale (R == G == B) jittery double-stroked pencil outlines and
    optional shadow-side hatching on near-white paper; no fills.

  ``SIMILAR_DOMAINS = ("photo", "painting")``: painting is the photo render
  re-stroked, so the two share colour statistics, shading and backgrounds and are
  clearly closer to each other than any other pair (``clipart`` and ``sketch``
  share outlines but differ in colour, so they come second). On standardised
  simple statistics (saturation, brightness, edge density, flat area, coarse
  colour histogram) the photo-painting distance is ~0.75x the next closest
  pair (tests/test_demo_world.py checks < 0.85x). A task-grouping algorithm
  should pair photo with painting.

* ``PRETRAIN_STYLES``: the styles of the image-caption pretraining stream
  (``sample_pretraining_pair``), deliberately *different mixtures* of the same
  rendering features, so zero-shot transfer to ``DOMAINS`` is above chance but
  not perfect; no pretraining style reproduces a downstream domain exactly:

  - ``photograph``: shaded render, but a smooth untextured studio backdrop,
    no horizon, no grain, light always from the upper left (``photo`` has
    textured scenes and light from anywhere in the upper half).
  - ``cartoon``: flat fills with *thinner* outlines plus two-level cel shading on
    a saturated radial-gradient background (clipart x photo blend).
  - ``pixel art``: flat render at half resolution, hard edges, 1 px outline,
    4-level colour quantisation, nearest-neighbour upscaled.
  - ``line drawing``: single, nearly clean stroke (0-35 % of the sketch jitter)
    in *coloured* ink on pure white; no hatching.
  - ``pencil sketch``: grayscale single strokes at 35-60 % of the ``sketch``
    jitter (``sketch`` uses 90-125 %), cross-hatching, grainier paper.
  - ``watercolor``: bleeding, pale, edge-pooled washes on blotchy paper, with a
    faint clean pencil outline half the time (no dabs, no outlines of clipart).
  - ``oil painting``: larger (1.3x), flow-aligned (not random) dabs over a
    ``photograph`` render (``painting`` uses small random dabs over ``photo``).

* ``HELD_OUT``: (object, pretraining style) combinations never drawn for
  pretraining: the painterly ``oil painting`` of boat, key and umbrella; the
  ``photograph`` of fish and house; the ``cartoon`` of car; the ``pencil
  sketch`` of cup and star; the ``line drawing`` of tree. Every object still
  appears in at least four pretraining styles. The exact downstream renderings
  (``sketch`` jitter level, ``painting`` dab size, ``clipart`` outline width,
  ``photo`` textured scenes) are held out for *all* objects by construction.

Everything is deterministic in a ``np.random.Generator`` (``render``) or in
integer seeds (``generate_tree``, ``pretraining_batch``) with a separately
derived seed per image, so partial or parallel generation is byte-identical.
Polygons are drawn at 2x (as part ids into one label image, coloured by a
palette lookup) and box-downsampled for anti-aliased edges. A 64 px image takes
0.3-1.2 ms of CPU (the two dab-painting styles ~2 ms); a pretraining pair ~1 ms
on average.
"""
from __future__ import annotations

import colorsys
import concurrent.futures
import json
import math
import multiprocessing
import os
import pathlib
import shutil
import tempfile
import types
import zlib
from typing import Mapping, NamedTuple, Sequence

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OBJECTS: tuple[str, ...] = (
    "ball", "cup", "house", "tree", "fish", "star", "car", "key", "umbrella",
    "boat")
COLORS: tuple[str, ...] = (
    "red", "green", "blue", "yellow", "orange", "purple", "brown", "black",
    "white", "pink")
DOMAINS: tuple[str, ...] = ("photo", "clipart", "sketch", "painting")
SIMILAR_DOMAINS: tuple[str, str] = ("photo", "painting")
PRETRAIN_STYLES: tuple[str, ...] = (
    "photograph", "cartoon", "pixel art", "line drawing", "pencil sketch",
    "watercolor", "oil painting")
HELD_OUT: tuple[tuple[str, str], ...] = (
    ("boat", "oil painting"),
    ("car", "cartoon"),
    ("cup", "pencil sketch"),
    ("fish", "photograph"),
    ("house", "photograph"),
    ("key", "oil painting"),
    ("star", "pencil sketch"),
    ("tree", "line drawing"),
    ("umbrella", "oil painting"),
)

_PALETTE: Mapping[str, tuple[int, int, int]] = types.MappingProxyType({
    "red": (205, 35, 35),
    "green": (40, 155, 55),
    "blue": (35, 80, 205),
    "yellow": (240, 205, 35),
    "orange": (245, 130, 25),
    "purple": (125, 45, 170),
    "brown": (120, 72, 38),
    "black": (28, 28, 30),
    "white": (246, 246, 244),
    "pink": (245, 135, 180),
})
_FIXED_ROLE_COLORS: Mapping[str, tuple[int, int, int]] = types.MappingProxyType({
    "light": (222, 232, 242),  # windows, sails, eyes, hubcaps
    "dark": (38, 38, 44),  # wheels, pupils, handles, masts
    "wood": (112, 70, 36),  # trunks, doors
})

# Caption vocabulary per pretraining style (several phrasings each).
_STYLE_PHRASES: Mapping[str, tuple[str, ...]] = types.MappingProxyType({
    "photograph": ("photo", "photograph", "snapshot"),
    "cartoon": ("cartoon", "cartoon drawing", "comic illustration"),
    "pixel art": ("pixel art image", "pixelated sprite", "8-bit picture"),
    "line drawing": ("line drawing", "ink drawing", "pen outline"),
    "pencil sketch": ("pencil sketch", "pencil drawing", "graphite sketch"),
    "watercolor": ("watercolor", "watercolor painting", "aquarelle"),
    "oil painting": ("oil painting", "painting", "impasto painting"),
})
_TEMPLATES: tuple[str, ...] = (
    "{a_style} of {a_color} {obj}",
    "{a_color} {obj} drawn as {a_style}",
    "{a_style} of {a_obj}",
    "a picture of {a_color} {obj}",
    "{a_color} {obj} in {style} style",
    "{a_obj}, {style}",
    "this is {a_style} showing {a_color} {obj}",
    "{a_color} {obj}",
)

_SS = 2  # supersampling factor for polygon drawing
_TREE_TAG = 0x7D3E  # seed-stream tags, so tree and pretraining images never coincide
_PRETRAIN_TAG = 0x9A11
_SHEET_TAG = 0x51EE
_MANIFEST_VERSION = 1
_OUTLINE_ID = 255  # label id of outline pixels in _draw_layers
_COVER_LUT = (0,) + (255,) * 255  # label id -> coverage


# ----------------------------------------------------------------------------
# Shapes: polygons in unit coordinates ([-1, 1]^2, y pointing down).


class _Part(NamedTuple):
  """One drawable piece of an object."""
  kind: str  # "fill" (polygon), "hole" (erases earlier parts), "line" (stroke)
  role: str  # colour role: body, accent, light, dark, wood
  pts: np.ndarray  # [N, 2] unit coordinates
  width: float = 0.0  # stroke width for lines, unit coordinates
  outlined: bool = True  # clipart draws a black border round this line
  closed: bool = False  # lines only


def _frozen(a) -> np.ndarray:
  a = np.asarray(a, np.float64)
  a.setflags(write=False)
  return a


def _densify(pts, closed: bool, step: float = 0.1) -> np.ndarray:
  """Subdivide edges so sketch jitter can bend straight sides."""
  pts = np.asarray(pts, np.float64)
  nxt = np.roll(pts, -1, 0) if closed else pts[1:]
  cur = pts if closed else pts[:-1]
  out = []
  for a, b in zip(cur, nxt):
    k = max(1, int(math.ceil(np.linalg.norm(b - a) / step)))
    t = np.arange(k)[:, None] / k
    out.append(a + (b - a) * t)
  if not closed:
    out.append(pts[-1:])
  return _frozen(np.concatenate(out))


def _ellipse(cx, cy, rx, ry, start=0.0, end=360.0, n=32) -> np.ndarray:
  full = abs(end - start) >= 360
  t = np.deg2rad(np.linspace(start, end, n, endpoint=not full))
  return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _rect(x0, y0, x1, y1) -> np.ndarray:
  return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], np.float64)


def _quad(a, c, b, n=12) -> np.ndarray:
  t = np.linspace(0, 1, n)[:, None]
  a, b, c = map(np.asarray, (a, b, c))
  return (1 - t) ** 2 * a + 2 * t * (1 - t) * c + t ** 2 * b


def _fill(role, pts, shift=(0.0, 0.0)) -> _Part:
  return _Part("fill", role, _densify(np.asarray(pts) + shift, True))


def _hole(pts, shift=(0.0, 0.0)) -> _Part:
  return _Part("hole", "body", _densify(np.asarray(pts) + shift, True))


def _line(role, pts, width, outlined=True, closed=False,
          shift=(0.0, 0.0)) -> _Part:
  return _Part("line", role, _densify(np.asarray(pts) + shift, closed),
               width, outlined, closed)


def _build_shapes() -> Mapping[str, tuple[_Part, ...]]:
  """Polygon parts per object, in drawing order (later parts cover earlier)."""
  s = {}
  s["ball"] = (
      _fill("body", _ellipse(0, 0, 0.9, 0.9, n=48)),
      _line("accent", [[0, -0.9], [0, 0.9]], 0.05, False),
      _line("accent", [[-0.9, 0], [0.9, 0]], 0.05, False),
      _line("accent", _ellipse(-1.2, 0, 0.62, 0.78, -48, 48, 16), 0.05, False),
      _line("accent", _ellipse(1.2, 0, 0.62, 0.78, 132, 228, 16), 0.05, False),
  )
  cup = (-0.12, 0.0)
  body = np.concatenate([  # slanted sides, rounded bottom corners
      [[-0.6, -0.62], [0.6, -0.62]],
      _ellipse(0.28, 0.56, 0.17, 0.17, 0, 90, 6),
      _ellipse(-0.28, 0.56, 0.17, 0.17, 90, 180, 6),
  ])
  s["cup"] = (
      _fill("body", _ellipse(0.55, 0.02, 0.38, 0.36), cup),
      _hole(_ellipse(0.55, 0.02, 0.2, 0.19), cup),
      _fill("body", body, cup),
      _fill("accent", _ellipse(0, -0.62, 0.6, 0.14), cup),
      _fill("dark", _ellipse(0, -0.6, 0.5, 0.09), cup),
  )
  s["house"] = (
      _fill("accent", _rect(0.3, -0.78, 0.5, -0.3)),
      _fill("body", _rect(-0.62, -0.14, 0.62, 0.86)),
      _fill("accent", [[-0.86, -0.1], [0, -0.86], [0.86, -0.1]]),
      _fill("wood", _rect(-0.14, 0.36, 0.14, 0.86)),
      _fill("light", _rect(-0.5, 0.04, -0.24, 0.3)),
      _fill("light", _rect(0.24, 0.04, 0.5, 0.3)),
  )
  t = np.deg2rad(np.linspace(0, 360, 72, endpoint=False))
  r = 0.5 + 0.1 * np.abs(np.cos(3.5 * t)) ** 0.6
  crown = np.stack([r * np.cos(t), -0.34 + 0.9 * r * np.sin(t)], 1)
  s["tree"] = (
      _fill("wood", [[-0.12, 0.0], [0.12, 0.0], [0.13, 0.8], [0.26, 0.92],
                     [-0.26, 0.92], [-0.13, 0.8]]),
      _fill("body", crown),
  )
  s["fish"] = (
      _fill("body", [[0.38, 0.0], [0.92, -0.42], [0.8, 0.0], [0.92, 0.42]]),
      _fill("accent", [[-0.3, -0.3], [0.02, -0.6], [0.2, -0.28]]),
      _fill("body", _ellipse(-0.12, 0, 0.62, 0.38, n=40)),
      _line("accent", _ellipse(-0.1, 0, 0.18, 0.26, -70, 70, 10), 0.05, False),
      _fill("light", _ellipse(-0.48, -0.08, 0.12, 0.12, n=16)),
      _fill("dark", _ellipse(-0.5, -0.08, 0.06, 0.06, n=12)),
  )
  ang = np.deg2rad(-90 + 36 * np.arange(10))
  rad = np.where(np.arange(10) % 2 == 0, 0.96, 0.4)
  s["star"] = (_fill("body", np.stack([rad * np.cos(ang),
                                       0.06 + rad * np.sin(ang)], 1)),)
  car = (0.0, -0.14)
  s["car"] = (
      _fill("body", [[-0.5, 0.06], [-0.3, -0.36], [0.34, -0.36], [0.56, 0.06]],
            car),
      _fill("body", [[-0.92, 0.1], [-0.86, 0.02], [0.86, 0.02], [0.93, 0.1],
                     [0.93, 0.42], [-0.92, 0.42]], car),
      _fill("light", [[-0.38, 0.0], [-0.23, -0.28], [-0.03, -0.28],
                      [-0.03, 0.0]], car),
      _fill("light", [[0.05, 0.0], [0.05, -0.28], [0.3, -0.28], [0.44, 0.0]],
            car),
      _fill("dark", _ellipse(-0.5, 0.44, 0.22, 0.22, n=24), car),
      _fill("dark", _ellipse(0.5, 0.44, 0.22, 0.22, n=24), car),
      _fill("light", _ellipse(-0.5, 0.44, 0.09, 0.09, n=12), car),
      _fill("light", _ellipse(0.5, 0.44, 0.09, 0.09, n=12), car),
  )
  s["key"] = (
      _fill("body", _ellipse(-0.52, 0, 0.4, 0.4, n=36)),
      _hole(_ellipse(-0.52, 0, 0.17, 0.17, n=20)),
      _fill("body", [[-0.2, -0.1], [0.94, -0.1], [0.94, 0.1], [0.88, 0.1],
                     [0.88, 0.28], [0.76, 0.28], [0.76, 0.1], [0.68, 0.1],
                     [0.68, 0.34], [0.55, 0.34], [0.55, 0.1], [-0.2, 0.1]]),
  )
  canopy = [_ellipse(0, 0.06, 0.94, 0.8, 180, 360, 28)]
  for i in range(4):
    canopy.append(_ellipse(0.705 - 0.47 * i, 0.06, 0.235, 0.13, 0, -180, 8))
  canopy = np.concatenate(canopy)
  hook = np.concatenate([[[0.0, 0.06]], _ellipse(-0.16, 0.72, 0.16, 0.16,
                                                   0, 180, 10)])
  s["umbrella"] = (
      _line("dark", [[0, -0.72], [0, -0.92]], 0.07),
      _line("dark", hook, 0.08),
      _fill("body", canopy),
      _line("accent", _quad([0, -0.72], [-0.3, -0.5], [-0.47, 0.06]), 0.04,
            False),
      _line("accent", _quad([0, -0.72], [0.3, -0.5], [0.47, 0.06]), 0.04,
            False),
      _line("accent", [[0, -0.72], [0, 0.06]], 0.04, False),
  )
  s["boat"] = (
      _line("dark", [[0, 0.36], [0, -0.92]], 0.06),
      _fill("light", [[0.07, -0.86], [0.07, 0.24], [0.72, 0.24]]),
      _fill("light", [[-0.07, -0.7], [-0.07, 0.24], [-0.56, 0.24]]),
      _fill("body", [[-0.96, 0.34], [0.96, 0.34], [0.62, 0.76], [-0.62, 0.76]]),
      _line("accent", [[-0.82, 0.48], [0.82, 0.48]], 0.06, False),
  )
  assert set(s) == set(OBJECTS)
  return types.MappingProxyType(s)


def _blob(circles, centre=(0.0, 0.0), n=64, y_max=np.inf) -> np.ndarray:
  """Outline of a union of circles [(x, y, r)] seen from `centre` (star-shaped unions),
  cut at y <= y_max: one polygon, so outlines show no seams between the circles."""
  c = np.asarray(centre, np.float64)
  t = np.linspace(0, 2 * np.pi, n, endpoint=False)
  d = np.stack([np.cos(t), np.sin(t)], 1)
  best = np.zeros(n)
  for x, y, r in circles:
    q = np.array([x, y]) - c
    b = d @ q
    disc = b * b - q @ q + r * r
    best = np.maximum(best, np.where(disc >= 0, b + np.sqrt(np.maximum(disc, 0)), 0))
  pts = c + d * best[:, None]
  pts[:, 1] = np.minimum(pts[:, 1], y_max)
  return pts


def _build_more_shapes() -> Mapping[str, tuple[_Part, ...]]:
  """The world-2 objects beyond OBJECTS (`world_v2.OBJECTS`): 14 more silhouettes."""
  s = {}
  t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
  heart = np.stack([16 * np.sin(t) ** 3,
                    -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))],
                   1) / 17.5 + [0.0, -0.05]
  s["heart"] = (_fill("body", heart),
                _fill("light", _ellipse(-0.42, -0.42, 0.12, 0.09, n=12)))
  s["moon"] = (_fill("body", _ellipse(0, 0, 0.88, 0.88, n=48)),
               _hole(_ellipse(0.42, -0.18, 0.72, 0.72, n=48)),
               _fill("accent", _ellipse(-0.55, 0.2, 0.08, 0.08, n=10)))
  s["arrow"] = (
      _fill("body", [[-0.7, -0.08], [0.35, -0.08], [0.35, -0.36], [0.94, 0.0], [0.35, 0.36],
                     [0.35, 0.08], [-0.7, 0.08]]),
      _fill("accent", [[-0.94, -0.34], [-0.62, -0.34], [-0.42, 0.0], [-0.62, 0.34],
                       [-0.94, 0.34], [-0.74, 0.0]]),
  )
  bell = np.concatenate([[[-0.86, 0.6]], _quad([-0.62, 0.3], [-0.62, -0.72], [0, -0.72]),
                         _quad([0, -0.72], [0.62, -0.72], [0.62, 0.3]), [[0.86, 0.6]]])
  s["bell"] = (_fill("dark", _ellipse(0, 0.68, 0.16, 0.16, n=16)),
               _fill("body", bell),
               _fill("accent", _ellipse(0, -0.8, 0.13, 0.12, n=14)),
               _line("accent", [[-0.62, 0.32], [0.62, 0.32]], 0.06, False))
  s["bottle"] = (
      _fill("body", [[-0.13, -0.78], [0.13, -0.78], [0.13, -0.45], [0.38, -0.2], [0.38, 0.92],
                     [-0.38, 0.92], [-0.38, -0.2], [-0.13, -0.45]]),
      _fill("dark", _rect(-0.16, -0.94, 0.16, -0.76)),
      _fill("light", _rect(-0.38, 0.15, 0.38, 0.55)),
  )
  s["mushroom"] = (
      _fill("light", [[-0.2, -0.05], [0.2, -0.05], [0.28, 0.88], [-0.28, 0.88]]),
      _fill("body", np.concatenate([_ellipse(0, 0.05, 0.94, 0.82, 180, 360, 32),
                                    [[0.94, 0.05], [-0.94, 0.05]]])),
      _fill("light", _ellipse(-0.4, -0.3, 0.13, 0.11, n=12)),
      _fill("light", _ellipse(0.3, -0.45, 0.15, 0.12, n=12)),
      _fill("light", _ellipse(0.1, -0.12, 0.1, 0.08, n=12)),
  )
  s["sword"] = (
      _fill("body", [[-0.07, -0.96], [0.07, -0.82], [0.07, 0.3], [-0.07, 0.3]]),
      _fill("accent", _rect(-0.38, 0.3, 0.38, 0.42)),
      _fill("wood", _rect(-0.06, 0.42, 0.06, 0.8)),
      _fill("accent", _ellipse(0, 0.86, 0.1, 0.1, n=12)),
  )
  s["chair"] = (
      _fill("body", _rect(-0.55, -0.92, -0.36, 0.12)),
      _fill("body", _rect(-0.55, -0.02, 0.6, 0.16)),
      _fill("wood", _rect(-0.55, 0.16, -0.42, 0.92)),
      _fill("wood", _rect(0.46, 0.16, 0.6, 0.92)),
      _fill("accent", _rect(-0.55, -0.7, -0.36, -0.56)),
  )
  s["hammer"] = (
      _fill("wood", _rect(-0.1, -0.42, 0.1, 0.94)),
      _fill("body", [[-0.75, -0.86], [0.45, -0.86], [0.45, -0.42], [-0.75, -0.42],
                     [-0.85, -0.55], [-0.85, -0.73]]),
      _fill("body", [[0.45, -0.8], [0.9, -0.95], [0.78, -0.64], [0.45, -0.5]]),
  )
  u = np.linspace(0, 1, 24)
  kite_tail = np.stack([0.7 * u, 0.5 + 0.42 * u + 0.08 * np.sin(6 * np.pi * u)], 1)
  s["kite"] = (
      _line("dark", kite_tail, 0.04),
      _fill("body", [[-0.2, -0.94], [0.84, -0.5], [0, 0.5], [-0.92, -0.1]]),
      _line("accent", [[-0.2, -0.94], [0, 0.5]], 0.04, False),
      _line("accent", [[-0.92, -0.1], [0.84, -0.5]], 0.04, False),
  )
  s["rocket"] = (
      _fill("accent", [[-0.24, 0.05], [-0.6, 0.7], [-0.24, 0.55]]),
      _fill("accent", [[0.24, 0.05], [0.6, 0.7], [0.24, 0.55]]),
      _fill("body", np.concatenate([_quad([-0.26, 0.7], [-0.3, -0.5], [0, -0.96]),
                                    _quad([0, -0.96], [0.3, -0.5], [0.26, 0.7])])),
      _fill("light", _ellipse(0, -0.2, 0.13, 0.13, n=16)),
      _fill("dark", [[-0.18, 0.7], [0.18, 0.7], [0.1, 0.88], [-0.1, 0.88]]),
  )
  s["cloud"] = (
      _fill("body", _blob([(-0.55, 0.2, 0.36), (-0.1, -0.12, 0.5), (0.45, 0.08, 0.42),
                           (0.05, 0.3, 0.4)], centre=(0, 0.15), y_max=0.52)),
  )
  s["crown"] = (
      _fill("body", [[-0.86, 0.55], [-0.86, -0.55], [-0.45, -0.08], [0, -0.78], [0.45, -0.08],
                     [0.86, -0.55], [0.86, 0.55]]),
      _fill("accent", _rect(-0.86, 0.3, 0.86, 0.55)),
      _fill("light", _ellipse(0, 0.05, 0.12, 0.12, n=14)),
  )
  wave = np.linspace(-0.62, 0.86, 20)
  top = np.stack([wave, -0.86 + 0.08 * np.sin(3 * (wave + 0.62))], 1)
  s["flag"] = (
      _fill("dark", _rect(-0.74, -0.92, -0.62, 0.95)),
      _fill("body", np.concatenate([top, (top + [0, 0.72])[::-1]])),
      _fill("accent", _ellipse(0.1, -0.5, 0.16, 0.16, n=16)),
  )
  return types.MappingProxyType(s)


MORE_OBJECTS: tuple[str, ...] = (
    "heart", "moon", "arrow", "bell", "bottle", "mushroom", "sword", "chair", "hammer", "kite",
    "rocket", "cloud", "crown", "flag")
_SHAPES = types.MappingProxyType({**_build_shapes(), **_build_more_shapes()})
assert tuple(_SHAPES)[len(OBJECTS):] == MORE_OBJECTS
_FLIPPABLE = frozenset({"cup", "fish", "car", "key", "umbrella", "boat",
                        "moon", "arrow", "chair", "hammer", "flag"})


# ----------------------------------------------------------------------------
# Scene sampling and polygon drawing.


class _Scene(NamedTuple):
  parts: tuple  # tuple of (part, pts_px [N, 2], width_px)
  centre: np.ndarray  # px, at the drawing resolution
  radius: float  # px, at the drawing resolution
  colors: Mapping[str, np.ndarray]  # role -> float RGB in [0, 1]


def _sample_scene(obj: str, color: str, rng: np.random.Generator,
                  canvas: int) -> _Scene:
  """Random pose and jittered role colours for one object on a canvas."""
  radius = rng.uniform(0.6, 0.88) * canvas / 2
  log_aspect = rng.uniform(-0.2, 0.2)
  angle = rng.uniform(-0.63, 0.63) if obj == "star" else rng.uniform(-0.35,
                                                                      0.35)
  flip = -1.0 if obj in _FLIPPABLE and rng.random() < 0.5 else 1.0
  c, s = math.cos(angle), math.sin(angle)
  scale = np.diag([flip * math.exp(log_aspect), math.exp(-log_aspect)])
  m = np.array([[c, -s], [s, c]]) @ scale * radius
  slack = max(canvas / 2 - radius, 0.0)
  centre = canvas / 2 + rng.uniform(-0.75, 0.75, 2) * slack
  parts = tuple((p, p.pts @ m.T + centre, p.width * radius)
                for p in _SHAPES[obj])
  base = np.clip(np.array(_PALETTE[color]) + rng.integers(-14, 15, 3), 0, 255)
  base = base / 255.0
  accent = base * 0.6 if base.mean() > 0.25 else base + 0.28
  colors = {"body": base, "accent": accent}
  colors.update({k: np.array(v) / 255.0 for k, v in _FIXED_ROLE_COLORS.items()})
  return _Scene(parts, centre, radius, types.MappingProxyType(colors))


def _flat_xy(pts: np.ndarray) -> list[float]:
  return pts.ravel().tolist()


def _closed(pts: np.ndarray) -> np.ndarray:
  return np.concatenate([pts, pts[:1]])


def _dilate(e: np.ndarray, r: int) -> np.ndarray:
  """Square binary dilation by r pixels (separable shifted maxima)."""
  for axis in (0, 1):
    out = e.copy()
    for k in range(1, r + 1):
      if axis == 0:
        out[k:] |= e[:-k]
        out[:-k] |= e[k:]
      else:
        out[:, k:] |= e[:, :-k]
        out[:, :-k] |= e[:, k:]
    e = out
  return e


def _draw_layers(scene: _Scene, canvas: int, outline: float = 0.0,
                 outline_rgb=(0, 0, 0)) -> tuple[Image.Image, Image.Image]:
  """Flat-colour layer [canvas, canvas, 3] (black outside) and coverage mask.

  Parts are drawn once, as ids into a label image; colours come from a lookup
  table, and outlines (if any) are the dilated boundaries between different
  ids -- much faster than PIL's wide curve-joined lines. The colour layer is
  black where the mask is 0, so after box downsampling it is premultiplied and
  composites as col + bg * (1 - a).
  """
  label = Image.new("L", (canvas, canvas))
  draw = ImageDraw.Draw(label)
  palette = np.zeros((256, 3), np.uint8)
  palette[_OUTLINE_ID] = outline_rgb
  seam = np.zeros(256, bool)
  ow = float(outline)
  for i, (part, pts, width) in enumerate(scene.parts, start=1):
    palette[i] = np.round(scene.colors[part.role] * 255)
    if part.kind == "fill":
      draw.polygon(_flat_xy(pts), fill=i)
    elif part.kind == "hole":
      draw.polygon(_flat_xy(pts), fill=0)
    else:
      if ow and not part.outlined:  # inner detail lines are drawn as ink
        seam[i] = True
        palette[i] = outline_rgb
        width = 0.8 * ow
      line_pts = _closed(pts) if part.closed else pts
      draw.line(_flat_xy(line_pts), fill=i, width=max(1, int(round(width))))
  if ow:
    lab = np.asarray(label)
    edges = np.zeros(lab.shape, bool)
    plain = ~seam[lab]
    edges[:, :-1] |= (lab[:, 1:] != lab[:, :-1]) & plain[:, 1:] & plain[:, :-1]
    edges[:-1] |= (lab[1:] != lab[:-1]) & plain[1:] & plain[:-1]
    edges = _dilate(edges, max(0, int(round((ow - 1) / 2))))
    label = Image.fromarray(np.where(edges, np.uint8(_OUTLINE_ID), lab))
  # A palette lookup in PIL is ~4x faster than numpy fancy indexing here.
  indexed = Image.frombuffer("P", label.size, label.tobytes(), "raw", "P", 0, 1)
  indexed.putpalette(palette.tobytes())
  return indexed.convert("RGB"), label.point(_COVER_LUT)


def _reduce_img(img: Image.Image, factor: int) -> np.ndarray:
  """Box-downsample a PIL image to float32 in [0, 1]."""
  if factor > 1:
    img = img.reduce(factor)
  return np.asarray(img, np.float32) / 255.0


def _layers(scene: _Scene, size: int, outline: float = 0.0):
  rgb, mask = _draw_layers(scene, size * _SS, outline * _SS)
  return _reduce_img(rgb, _SS), _reduce_img(mask, _SS)


# ----------------------------------------------------------------------------
# Numpy image helpers (all float32 in [0, 1], at the output resolution).


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  small = rng.random((cells, cells), dtype=np.float32)
  return np.asarray(Image.fromarray(small).resize((size, size),
                                                  Image.Resampling.BICUBIC))


def _blur(a: np.ndarray, radius: float) -> np.ndarray:
  img = Image.fromarray(np.round(np.clip(a, 0, 1) * 255).astype(np.uint8))
  return np.asarray(img.filter(ImageFilter.GaussianBlur(radius)),
                    np.float32) / 255.0


def _shift(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
  out = np.zeros_like(a)
  h, w = a.shape[:2]
  ys, yd = (slice(0, h - dy), slice(dy, h)) if dy >= 0 else (slice(-dy, h),
                                                             slice(0, h + dy))
  xs, xd = (slice(0, w - dx), slice(dx, w)) if dx >= 0 else (slice(-dx, w),
                                                             slice(0, w + dx))
  out[yd, xd] = a[ys, xs]
  return out


def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32)
  return yy + 0.5, xx + 0.5


def _hsv(h: float, s: float, v: float) -> np.ndarray:
  return np.array(colorsys.hsv_to_rgb(h % 1.0, s, v), np.float32)


def _to_uint8(img: np.ndarray) -> np.ndarray:
  return np.round(np.clip(img, 0, 1) * 255).astype(np.uint8)


def _light_dir(rng: np.random.Generator, lo: float, hi: float) -> np.ndarray:
  """Unit vector pointing towards the light (angles in degrees, y down)."""
  a = np.deg2rad(rng.uniform(lo, hi))
  return np.array([math.cos(a), math.sin(a)], np.float32)  # (x, y)


# ----------------------------------------------------------------------------
# Renderers, one per domain / pretraining style.


def _shade(col, a, scene, size, light, rng, strength=1.0):
  """Directional shading + specular highlight + darkened rim (premultiplied)."""
  yy, xx = _grid(size)
  cx, cy = (scene.centre / _SS).tolist()  # python floats keep float32 math
  r = scene.radius / _SS
  field = np.clip(((xx - cx) * light[0] + (yy - cy) * light[1]) / r, -1, 1)
  shading = 1.0 + strength * (0.38 * field - 0.2)
  hx, hy = cx + 0.45 * r * light[0], cy + 0.45 * r * light[1]
  spec = np.exp(-((xx - hx) ** 2 + (yy - hy) ** 2) / (2 * (0.2 * r) ** 2))
  rim = _blur(a, max(1.0, 0.06 * size))
  shading = shading * (0.6 + 0.4 * rim)
  obj = col * shading[..., None] + (strength * rng.uniform(0.3, 0.55) * spec *
                                    a)[..., None]
  return obj


def _drop_shadow(bg, a, size, light, radius_px, rng, strength):
  off = -light * radius_px * rng.uniform(0.1, 0.2) + np.array([0, 0.06 *
                                                                radius_px])
  sh = _shift(_blur(a, max(1.0, 0.05 * size)), int(round(off[1])),
              int(round(off[0])))
  return bg * (1 - strength * sh)[..., None]


def _render_photo(scene, size, rng, studio: bool = False, *,
                  light_range=(190, 350), tex_div: int = 4, horizon=(0.6, 0.85),
                  grain: float = 0.08):
  """Shaded object on a studio backdrop or a textured scene. The keyword ranges are the
  downstream `photo` rendering's; the world-2 pretraining styles draw with others."""
  col, a = _layers(scene, size)
  yy, xx = _grid(size)
  h = rng.random()
  c1 = _hsv(h, rng.uniform(0.1, 0.5), rng.uniform(0.55, 0.9))
  c2 = _hsv(h + rng.uniform(-0.15, 0.15), rng.uniform(0.1, 0.5),
            rng.uniform(0.3, 0.7))
  g = _light_dir(rng, 0, 360)
  t = np.clip(0.5 + ((xx - size / 2) * g[0] + (yy - size / 2) * g[1]) / size,
              0, 1)[..., None]
  bg = c1 * (1 - t) + c2 * t
  if studio:
    light = _light_dir(rng, 200, 250)
  else:
    light = _light_dir(rng, *light_range)
    bg = bg * (0.8 + 0.4 * _smooth_noise(rng, size, 4))[..., None]
    tex = _smooth_noise(rng, size, max(4, size // tex_div)) - 0.5
    bg = bg + 0.16 * tex[..., None] * rng.uniform(0.5, 1.0)
    horizon = rng.uniform(*horizon) * size
    floor = np.clip((yy - horizon) / 1.5, 0, 1)[..., None]
    bg = bg * (1 - 0.3 * floor) + 0.3 * floor * _hsv(rng.random(), 0.3, 0.45)
  bg = _drop_shadow(bg, a, size, light, scene.radius / _SS, rng,
                    0.6 if studio else 0.45)
  out = _shade(col, a, scene, size, light, rng) + bg * (1 - a)[..., None]
  if not studio:
    grain_level = grain
    grain = rng.random((size, size), dtype=np.float32) - 0.5  # luminance grain
    out = out + grain_level * grain[..., None]
  return out


def _dabs(img, rng, cell: float, elong: float, jitter: float,
          flow: bool) -> np.ndarray:
  """Re-paint img as oriented elliptical brush dabs (anisotropic Voronoi).

  Each pixel takes the colour of the dab (among the 3x3 neighbouring jittered
  grid cells) with the smallest anisotropic, priority-offset distance; dab
  colours are sampled from a slightly blurred img at the dab centre plus
  brightness/colour jitter, with bristle striation and dark seams between dabs.
  """
  size = img.shape[0]
  g = int(size // cell) + 3
  iy, ix = np.mgrid[0:g, 0:g].astype(np.float32)
  cy = (iy - 1 + rng.random((g, g), dtype=np.float32)) * cell
  cx = (ix - 1 + rng.random((g, g), dtype=np.float32)) * cell
  if flow:
    ang = _smooth_noise(rng, g, 3) * 2 * np.pi + rng.normal(0, 0.25, (g, g))
  else:
    ang = rng.uniform(0, np.pi, (g, g))
  prio = rng.random((g, g), dtype=np.float32) * 0.5
  phase = rng.uniform(0, 2 * np.pi, g * g).astype(np.float32)
  # Dab colour: img averaged over a small cross at the dab centre (cheaper
  # than blurring the whole image).
  sy = np.round(cy).astype(np.intp)
  sx = np.round(cx).astype(np.intp)
  dab_col = sum(img[np.clip(sy + oy, 0, size - 1), np.clip(sx + ox, 0, size - 1)]
                for oy, ox in ((0, 0), (-1, 0), (1, 0), (0, -1), (0, 1))) / 5
  dab_col = dab_col * (1 + rng.normal(0, jitter, (g, g, 1)))
  dab_col = (dab_col + rng.normal(0, 0.5 * jitter, (g, g, 3))).reshape(-1, 3)

  # Candidate dabs per pixel: [9, size, size]. Reductions over the leading
  # axis are fast in numpy (min over a trailing axis of 9 is ~50x slower).
  pix = np.arange(size, dtype=np.float32) + 0.5
  ci = (pix // cell).astype(np.intp) + 1
  off = np.array([-1, 0, 1])
  rows = (ci[None, :] + off[:, None]) * g  # [3, size]
  cols = ci[None, :] + off[:, None]  # [3, size]
  flat = (rows[:, None, :, None] + cols[None, :, None, :]).reshape(
      9, size, size)
  take = lambda v: np.take(v.astype(np.float32).ravel(), flat)
  uy = pix[None, :, None] - take(cy)
  ux = pix[None, None, :] - take(cx)
  tx, ty = take(np.cos(ang)), take(np.sin(ang))
  along = ux * tx + uy * ty
  across = uy * tx - ux * ty
  la, lb = (elong * cell * 0.75) ** 2, (cell * 0.75 / elong ** 0.5) ** 2
  d = along * along * (1 / la) + across * across * (1 / lb) + take(prio)
  best = d.min(0)
  is_best = d == best
  k = (is_best * np.arange(9, dtype=np.int8)[:, None, None]).max(0)[None]
  second = np.where(is_best, np.float32(np.inf), d).min(0)
  win = np.take_along_axis(flat, k, 0)[0]
  stripe = np.take_along_axis(across, k, 0)[0] * (2.6 * 2 * np.pi / cell)
  bristle = 1 + 0.07 * np.sin(stripe + np.take(phase, win))
  seam = 1 - 0.12 * np.exp(-(second - best) / 0.15)  # dark gaps between dabs
  return np.take(dab_col, win, axis=0) * (bristle * seam)[..., None]


def _render_painting(scene, size, rng, *, cell_div: float = 22, elong: float = 2.8,
                     **photo):
  base = _render_photo(scene, size, rng, **photo)
  return _dabs(base, rng, cell=max(2.0, size / cell_div), elong=elong, jitter=0.05,
               flow=False)


def _render_oil(scene, size, rng):
  base = _render_photo(scene, size, rng, studio=True)
  return _dabs(base, rng, cell=max(3.0, 1.3 * size / 20), elong=2.2,
               jitter=0.06, flow=True)


def _render_clipart(scene, size, rng, *, outline: float = 0.042, bg_sat=(0.04, 0.22)):
  col, a = _layers(scene, size, outline=max(1.5, outline * size))
  bg = _hsv(rng.random(), rng.uniform(*bg_sat), rng.uniform(0.93, 1.0))
  return col + bg * (1 - a)[..., None]


def _render_cartoon(scene, size, rng):
  col, a = _layers(scene, size, outline=max(1.0, 0.022 * size))
  yy, xx = _grid(size)
  light = _light_dir(rng, 200, 340)
  cx, cy = (scene.centre / _SS).tolist()  # python floats keep float32 math
  field = ((xx - cx) * light[0] + (yy - cy) * light[1]) / (scene.radius / _SS)
  cel = np.where(field < -0.25, 0.72, 1.0).astype(np.float32)
  h = rng.random()
  d = np.sqrt((yy - size / 2) ** 2 + (xx - size / 2) ** 2) / size
  bg = (_hsv(h, rng.uniform(0.45, 0.8), rng.uniform(0.75, 0.95)) *
        (1 - 0.5 * d)[..., None])
  return col * cel[..., None] + bg * (1 - a)[..., None]


def _render_pixel_art(scene, size, rng):
  lo = max(8, size // 2)
  small = scene._replace(parts=tuple(
      (p, pts * (lo / (size * _SS)), w * lo / (size * _SS))
      for p, pts, w in scene.parts))
  rgb, mask = _draw_layers(small, lo, outline=1.0)
  a = _reduce_img(mask, 1)[..., None]
  bg = _hsv(rng.random(), rng.uniform(0.3, 0.7), rng.uniform(0.5, 0.9))
  img = _reduce_img(rgb, 1) * a + bg * (1 - a)
  img = np.round(img * 3) / 3
  img = np.repeat(np.repeat(img, size // lo, 0), size // lo, 1)
  if img.shape[0] != size:  # sizes not divisible by 4
    img = np.asarray(Image.fromarray(_to_uint8(img)).resize(
        (size, size), Image.Resampling.NEAREST), np.float32) / 255.0
  return img


def _strokes(scene, size, rng, jitter: float, passes: int,
             width: float) -> tuple[np.ndarray, np.ndarray]:
  """Jittery pencil/ink outline strokes: (ink, object mask), [size, size] each.

  The jitter is smoothed noise (hand tremor) plus a per-stroke offset, scaled
  by the part's size so that small details stay readable.
  """
  canvas = size * _SS
  ink = Image.new("L", (canvas, canvas))
  mask = Image.new("L", (canvas, canvas))
  di, dm = ImageDraw.Draw(ink), ImageDraw.Draw(mask)
  counts = [len(pts) for _, pts, _ in scene.parts]
  starts = np.cumsum([0] + counts).tolist()
  all_pts = np.concatenate([pts for _, pts, _ in scene.parts])
  extent = np.array([np.ptp(pts, 0).max() for _, pts, _ in scene.parts])
  part_amp = (jitter * scene.radius * 0.026 *
              np.minimum(1.0, extent / (0.8 * scene.radius)) ** 0.7)
  point_amp = np.repeat(part_amp, counts)[:, None]
  for part, pts, _ in scene.parts:
    if part.kind != "line":
      dm.polygon(_flat_xy(pts), fill=0 if part.kind == "hole" else 255)
  n_parts = len(counts)
  for _ in range(passes):
    wobble = rng.standard_normal(all_pts.shape)
    wobble = (wobble + np.roll(wobble, 1, 0) + np.roll(wobble, -1, 0)) / 1.7
    offset = np.repeat(rng.standard_normal((n_parts, 2)) * part_amp[:, None],
                       counts, 0)
    xy_all = (all_pts + point_amp * wobble + offset).ravel().tolist()
    widths = np.maximum(1, np.round(width * _SS * rng.uniform(
        0.8, 1.25, n_parts))).astype(int).tolist()
    levels = rng.integers(170, 256, n_parts).tolist()
    for j, (part, _, _) in enumerate(scene.parts):
      xy = xy_all[2 * starts[j]:2 * starts[j + 1]]
      if part.kind != "line" or part.closed:
        # Close the loop; with several passes overshoot it, like a hand would.
        k = max(1, counts[j] // 8) if passes > 1 else 0
        xy = xy + xy[:2 * (k + 1)]
      di.line(xy, fill=levels[j], width=widths[j])
  return _reduce_img(ink, _SS), _reduce_img(mask, _SS)


def _hatch(mask, scene, rng, angles, spacing: float) -> np.ndarray:
  """Parallel hatching lines (coverage in [0, 1]) on the object's shadow side."""
  size = mask.shape[0]
  yy, xx = _grid(size)
  light = _light_dir(rng, 200, 250)
  cx, cy = (scene.centre / _SS).tolist()
  field = ((xx - cx) * light[0] + (yy - cy) * light[1]) / (scene.radius / _SS)
  out = np.zeros_like(yy)
  for ang in angles:
    u = xx * math.cos(ang) + yy * math.sin(ang)
    line = np.clip(1 - np.abs(np.mod(u, spacing) - spacing / 2) / 0.7, 0, 1)
    out = np.maximum(out, line)
  return out * mask * (field < -0.1)


def _render_sketch(scene, size, rng, *, jitter=(0.9, 1.25), hatch_prob: float = 0.7):
  ink, mask = _strokes(scene, size, rng, rng.uniform(*jitter), 2, 1.1)
  if rng.random() < hatch_prob:
    hatch = _hatch(mask, scene, rng, [rng.uniform(0.6, 1.0)],
                   rng.uniform(4, 6) * size / 64)
    ink = np.maximum(ink, 0.45 * hatch)
  paper = rng.uniform(0.94, 0.99) + 0.02 * (
      rng.random(ink.shape, dtype=np.float32) - 0.5)
  gray = paper * (1 - rng.uniform(0.72, 0.88) * ink)
  return np.repeat(gray[..., None], 3, -1)


def _render_pencil(scene, size, rng):
  ink, mask = _strokes(scene, size, rng, rng.uniform(0.35, 0.6), 1, 1.0)
  a = rng.uniform(0.5, 1.0)
  ink = np.maximum(ink, 0.37 * _hatch(mask, scene, rng, [a, a + 1.4],
                                      3.5 * size / 64))
  paper = (rng.uniform(0.88, 0.95) - 0.06 * _smooth_noise(rng, size, 16) +
           0.08 * (rng.random(ink.shape, dtype=np.float32) - 0.5))
  gray = paper * (1 - rng.uniform(0.6, 0.8) * ink)
  return np.repeat(gray[..., None], 3, -1)


def _render_line_drawing(scene, size, rng):
  ink, _ = _strokes(scene, size, rng, rng.uniform(0.0, 0.35), 1, 1.2)
  ink = ink[..., None]
  body = np.asarray(scene.colors["body"], np.float32)
  ink_col = body * 0.55 if body.mean() > 0.6 else body
  return 1 - ink * (1 - ink_col)


def _render_watercolor(scene, size, rng):
  col, a = _layers(scene, size)
  pigment = col / np.maximum(a, 1e-3)[..., None]
  pigment = 0.35 + 0.65 * pigment  # washes are pale
  soft = _blur(a, max(1.0, 0.03 * size))
  bleed = np.clip((soft + 0.45 * (_smooth_noise(rng, size, 8) - 0.5)) * 1.6 -
                  0.3, 0, 1)
  pool = np.clip(bleed - _blur(bleed, max(1.0, 0.05 * size)), 0, 1)
  density = np.clip(bleed * rng.uniform(0.7, 0.9) + 1.5 * pool, 0, 1)
  paper = 0.97 - 0.05 * _smooth_noise(rng, size, 6)
  wash = paper[..., None] * (1 - density[..., None] * (1 - pigment))
  wash = wash * (1 - 0.05 * _smooth_noise(rng, size, size // 2))[..., None]
  if rng.random() < 0.5:
    ink, _ = _strokes(scene, size, rng, 0.2, 1, 0.8)
    wash = wash * (1 - 0.35 * ink)[..., None]
  return wash


_RENDERERS = types.MappingProxyType({
    "photo": _render_photo,
    "clipart": _render_clipart,
    "sketch": _render_sketch,
    "painting": _render_painting,
    "photograph": lambda scene, size, rng: _render_photo(scene, size, rng,
                                                         studio=True),
    "cartoon": _render_cartoon,
    "pixel art": _render_pixel_art,
    "line drawing": _render_line_drawing,
    "pencil sketch": _render_pencil,
    "watercolor": _render_watercolor,
    "oil painting": _render_oil,
})
assert set(_RENDERERS) == set(DOMAINS) | set(PRETRAIN_STYLES)


def render(obj: str, color: str, domain_or_style: str,
           rng: np.random.Generator, size: int = 64) -> np.ndarray:
  """Draw one object in a downstream domain or pretraining style.

  Returns uint8 [size, size, 3]; all randomness (pose, shades, textures) comes
  from rng, so the same generator state gives the same image.
  """
  if obj not in _SHAPES:
    raise ValueError(f"unknown object {obj!r}; expected one of {OBJECTS + MORE_OBJECTS}")
  if color not in _PALETTE:
    raise ValueError(f"unknown color {color!r}; expected one of {COLORS}")
  if domain_or_style not in _RENDERERS:
    raise ValueError(f"unknown domain/style {domain_or_style!r}; expected one "
                     f"of {DOMAINS + PRETRAIN_STYLES}")
  if size < 8:
    raise ValueError(f"size must be >= 8, got {size}")
  scene = _sample_scene(obj, color, rng, size * _SS)
  return _to_uint8(_RENDERERS[domain_or_style](scene, size, rng))


# ----------------------------------------------------------------------------
# Downstream demo tree.


def _name_key(name: str) -> int:
  return zlib.crc32(name.encode("utf-8"))


def tree_image_rng(seed: int, domain: str, obj: str,
                   index: int) -> np.random.Generator:
  """The generator for one tree image: independent of which others are made."""
  return np.random.default_rng(
      [_TREE_TAG, seed, _name_key(domain), _name_key(obj), index])


def folder_name(obj: str) -> str:
  """Class folder name: spaces become underscores."""
  return obj.replace(" ", "_")


def tree_image(seed: int, domain: str, obj: str, index: int,
               size: int = 64) -> np.ndarray:
  """One demo-tree image, exactly as generate_tree writes it."""
  rng = tree_image_rng(seed, domain, obj, index)
  color = COLORS[int(rng.integers(len(COLORS)))]
  return render(obj, color, domain, rng, size)


def _manifest(seed, images_per_class, size, domains, objects) -> dict:
  return {
      "format_version": _MANIFEST_VERSION,
      "seed": int(seed),
      "size": int(size),
      "images_per_class": int(images_per_class),
      "domains": list(domains),
      "classes": list(objects),
      "folders": {o: folder_name(o) for o in objects},
      "counts": {d: {folder_name(o): int(images_per_class) for o in objects}
                 for d in domains},
      "total": int(images_per_class) * len(domains) * len(objects),
      "similar_domains": list(SIMILAR_DOMAINS),
  }


def _write_class(tmp: str, seed: int, domain: str, obj: str,
                 images_per_class: int, size: int, image_fn=None) -> None:
  """Write one <domain>/<class> folder of the tree (also run in workers).

  `image_fn(seed, domain, obj, index, size)` draws one image (default: this world's
  `tree_image`; a module-level function, so it pickles to spawned workers)."""
  image_fn = image_fn or tree_image
  folder = pathlib.Path(tmp) / domain / folder_name(obj)
  folder.mkdir(parents=True)
  for i in range(images_per_class):
    img = image_fn(seed, domain, obj, i, size)
    # Level 1: ~2x faster than the default and no larger for noisy art.
    Image.fromarray(img).save(folder / f"{i}.png", compress_level=1)


def check_tree_request(domains: Sequence[str], objects: Sequence[str], images_per_class: int,
                       known_domains: Sequence[str], known_objects: Sequence[str]) -> None:
  """A tree request names only a world's domains and objects and at least one image each."""
  for d in domains:
    if d not in known_domains:
      raise ValueError(f"unknown domain {d!r}; expected one of {tuple(known_domains)}")
  for o in objects:
    if o not in known_objects:
      raise ValueError(f"unknown object {o!r}; expected one of {tuple(known_objects)}")
  if images_per_class < 1:
    raise ValueError("images_per_class must be >= 1")


def generate_tree(root: str | os.PathLike, *, seed: int = 0,
                  images_per_class: int = 40, size: int = 64,
                  domains: Sequence[str] = DOMAINS,
                  objects: Sequence[str] = OBJECTS,
                  workers: int = 1) -> dict:
  """Write <root>/<domain>/<class_folder>/<index>.png plus <root>/manifest.json.

  Deterministic in seed (byte-identical files, whatever the subset or the
  number of workers). Files are written into a sibling <root>.tmp-XXXX
  directory that is renamed to root only when complete, so an interrupted run
  never leaves a root that looks finished. If root already holds a manifest
  equal to the requested one, it is returned untouched; an existing empty root
  directory is replaced; any other existing root raises FileExistsError (we
  never delete data we did not write).

  workers > 1 renders class folders in that many spawned processes (safe next
  to an initialised JAX; the caller's main module must be import-safe, i.e.
  guarded by `if __name__ == "__main__"`). Start-up costs ~1 s, so it only
  pays for trees of a few thousand images.
  """
  domains, objects = tuple(domains), tuple(objects)
  check_tree_request(domains, objects, images_per_class, DOMAINS, OBJECTS)
  manifest = _manifest(seed, images_per_class, size, domains, objects)
  return write_tree(root, manifest, seed=seed, images_per_class=images_per_class, size=size,
                    domains=domains, objects=objects, workers=workers)


WORLD_VERSIONS = (1, 2)


def generate_world_tree(version: int, root: str | os.PathLike, **kwargs) -> dict:
  """`generate_tree` of demo world `version` (1: this module; 2: `world_v2`), so the demo
  dataset builder reaches both worlds through this one module."""
  if version == 1:
    return generate_tree(root, **kwargs)
  if version == 2:
    from mmap_jax.demo import world_v2  # world_v2 builds on this module: imported on use.
    return world_v2.generate_tree(root, **kwargs)
  raise ValueError(f"demo_world={version}; known worlds: {WORLD_VERSIONS}")


def write_tree(root: str | os.PathLike, manifest: dict, *, seed: int, images_per_class: int,
               size: int, domains: Sequence[str], objects: Sequence[str], workers: int = 1,
               image_fn=None) -> dict:
  """`generate_tree`'s writer for any world: `image_fn` draws the images (default this world's
  `tree_image`), `manifest` is what root's manifest.json must equal. Same atomicity and reuse
  rules as `generate_tree`."""
  root = pathlib.Path(root)
  if root.exists():
    existing = root / "manifest.json"
    if existing.is_file():
      if json.loads(existing.read_text()) == manifest:
        return manifest
      raise FileExistsError(f"{root} holds a different demo tree; remove it")
    if not root.is_dir() or any(root.iterdir()):
      raise FileExistsError(f"{root} exists and is not an empty directory")
  root.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=root.name + ".tmp-",
                                      dir=root.parent))
  jobs = [(str(tmp), seed, d, o, images_per_class, size, image_fn)
          for d in domains for o in objects]
  try:
    if workers <= 1:
      for job in jobs:
        _write_class(*job)
    else:
      pool = concurrent.futures.ProcessPoolExecutor(
          workers, mp_context=multiprocessing.get_context("spawn"))
      try:
        for _ in pool.map(_write_class, *zip(*jobs)):
          pass
      finally:
        pool.shutdown(wait=True, cancel_futures=True)
    (tmp / "manifest.json").write_text(
        json.dumps(manifest, indent=2, sort_keys=True) + "\n")
    if root.is_dir():  # empty, checked above
      root.rmdir()
    os.rename(tmp, root)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  return manifest


# ----------------------------------------------------------------------------
# Pretraining image-caption pairs.


class PretrainSpec(NamedTuple):
  """What one pretraining pair shows, and how its caption is phrased."""
  obj: str
  color: str
  style: str
  caption: str


def _article(word: str) -> str:
  return ("an " if word[0] in "aeiou8" else "a ") + word  # "an 8-bit picture"


def pretraining_spec(rng: np.random.Generator) -> PretrainSpec:
  """Draw (object, colour, style, caption), never a HELD_OUT combination."""
  style = PRETRAIN_STYLES[int(rng.integers(len(PRETRAIN_STYLES)))]
  allowed = [o for o in OBJECTS if (o, style) not in HELD_OUT]
  obj = allowed[int(rng.integers(len(allowed)))]
  color = COLORS[int(rng.integers(len(COLORS)))]
  phrases = _STYLE_PHRASES[style]
  phrase = phrases[int(rng.integers(len(phrases)))]
  template = _TEMPLATES[int(rng.integers(len(_TEMPLATES)))]
  caption = template.format(
      a_style=_article(phrase), style=phrase, a_color=_article(color),
      obj=obj, a_obj=_article(obj))
  return PretrainSpec(obj, color, style, caption)


def sample_pretraining_pair(rng: np.random.Generator,
                            size: int = 64) -> tuple[np.ndarray, str]:
  """One (image uint8 [size, size, 3], caption) pair for contrastive pretraining."""
  spec = pretraining_spec(rng)
  return render(spec.obj, spec.color, spec.style, rng, size), spec.caption


def pretraining_batch(seed: int, index: int, batch_size: int,
                      size: int = 64) -> tuple[np.ndarray, list[str]]:
  """Batch `index` of the pretraining stream for `seed`: deterministic, and each
  example has its own derived generator, so batches can be built in parallel."""
  images = np.empty((batch_size, size, size, 3), np.uint8)
  captions = []
  for i in range(batch_size):
    rng = np.random.default_rng([_PRETRAIN_TAG, seed, index, i])
    images[i], caption = sample_pretraining_pair(rng, size)
    captions.append(caption)
  return images, captions


# ----------------------------------------------------------------------------
# Visual check.


def contact_sheet(size: int = 64, styles: Sequence[str] = DOMAINS,
                  seed: int = 0, gap: int = 2) -> np.ndarray:
  """Grid of every object (rows) in every domain/style (columns), uint8 RGB."""
  styles = tuple(styles)
  h = len(OBJECTS) * (size + gap) + gap
  w = len(styles) * (size + gap) + gap
  sheet = np.full((h, w, 3), 255, np.uint8)
  for r, obj in enumerate(OBJECTS):
    for c, style in enumerate(styles):
      rng = np.random.default_rng([_SHEET_TAG, seed, r, c])
      color = COLORS[int(rng.integers(len(COLORS)))]
      y, x = gap + r * (size + gap), gap + c * (size + gap)
      sheet[y:y + size, x:x + size] = render(obj, color, style, rng, size)
  return sheet
