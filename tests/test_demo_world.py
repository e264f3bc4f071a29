"""Tests for mmap_jax.demo.world, the procedurally generated demo world.

They check what the consumers rely on: determinism (arrays and PNG bytes),
the tree layout and its atomic write, that the four domains are measurably
different with SIMILAR_DOMAINS the closest pair, and that the pretraining
stream never shows a HELD_OUT combination.
"""
import itertools
import json
import pathlib

import numpy as np
import pytest
from PIL import Image

from mmap_jax.demo import world as dw

ALL_STYLES = dw.DOMAINS + dw.PRETRAIN_STYLES


def _features(img: np.ndarray) -> np.ndarray:
  """Simple image statistics: saturation, chroma, brightness, edges, histogram."""
  x = img.astype(np.float32) / 255
  mx, mn = x.max(-1), x.min(-1)
  sat = (mx - mn) / np.maximum(mx, 1e-3)
  gray = x.mean(-1)
  gy = np.abs(np.diff(gray, axis=0))[:, :-1]
  gx = np.abs(np.diff(gray, axis=1))[:-1]
  grad = np.hypot(gx, gy)
  bins = (x.reshape(-1, 3) > 0.5).astype(int) @ np.array([4, 2, 1])
  hist = np.bincount(bins, minlength=8) / gray.size
  stats = [sat.mean(), (mx - mn).mean(), gray.mean(), gray.std(),
           (grad > 0.08).mean(), grad.mean(), (gray > 0.9).mean(),
           (grad < 0.01).mean()]
  return np.concatenate([stats, hist])


def _domain_features(seed: int, per_class: int = 3) -> dict:
  return {d: np.stack([_features(dw.tree_image(seed, d, o, i, 48))
                       for o in dw.OBJECTS for i in range(per_class)])
          for d in dw.DOMAINS}


@pytest.fixture(scope="module")
def domain_features():
  return _domain_features(seed=0)


# ----------------------------------------------------------------------------
# Constants.


def test_constants_are_consistent():
  assert 8 <= len(dw.OBJECTS) <= 12 and len(set(dw.OBJECTS)) == len(dw.OBJECTS)
  assert all(o == o.lower() and "_" not in o for o in dw.OBJECTS)
  assert len(dw.COLORS) >= 8 and len(set(dw.COLORS)) == len(dw.COLORS)
  assert len(dw.DOMAINS) >= 4 and len(set(dw.DOMAINS)) == len(dw.DOMAINS)
  a, b = dw.SIMILAR_DOMAINS
  assert a != b and a in dw.DOMAINS and b in dw.DOMAINS
  # Pretraining styles are other renderings, not the downstream domains.
  assert not set(dw.PRETRAIN_STYLES) & set(dw.DOMAINS)
  assert len(dw.PRETRAIN_STYLES) >= 4
  for obj, style in dw.HELD_OUT:
    assert obj in dw.OBJECTS and style in dw.PRETRAIN_STYLES
  for obj in dw.OBJECTS:  # every object stays learnable from several styles
    allowed = [s for s in dw.PRETRAIN_STYLES if (obj, s) not in dw.HELD_OUT]
    assert len(allowed) >= 4, obj
  assert dw.HELD_OUT, "something must be held out"


# ----------------------------------------------------------------------------
# render().


@pytest.mark.parametrize("style", ALL_STYLES)
def test_every_object_renders(style):
  for k, obj in enumerate(dw.OBJECTS):
    img = dw.render(obj, dw.COLORS[k % len(dw.COLORS)], style,
                    np.random.default_rng(k), size=40)
    assert img.shape == (40, 40, 3) and img.dtype == np.uint8
    assert img.std() > 8, (obj, style)  # something was drawn


@pytest.mark.parametrize("size", [17, 32, 64, 96])
def test_render_sizes(size):
  for style in ALL_STYLES:
    img = dw.render("boat", "red", style, np.random.default_rng(0), size)
    assert img.shape == (size, size, 3) and img.dtype == np.uint8


def test_render_deterministic_in_rng():
  for style in ALL_STYLES:
    a = dw.render("car", "blue", style, np.random.default_rng(7))
    b = dw.render("car", "blue", style, np.random.default_rng(7))
    c = dw.render("car", "blue", style, np.random.default_rng(8))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c), style


def test_render_rejects_unknown_names():
  rng = np.random.default_rng(0)
  with pytest.raises(ValueError, match="object"):
    dw.render("dragon", "red", "photo", rng)
  with pytest.raises(ValueError, match="color"):
    dw.render("cup", "teal", "photo", rng)
  with pytest.raises(ValueError, match="style"):
    dw.render("cup", "red", "mosaic", rng)


def test_objects_differ_in_shape():
  """Same pose stream, same colour: different objects give different masks."""
  masks = []
  for obj in dw.OBJECTS:
    img = dw.render(obj, "black", "clipart", np.random.default_rng(3), 48)
    masks.append(img.mean(-1) < 128)  # outlines + black fill
  for (i, a), (j, b) in itertools.combinations(enumerate(masks), 2):
    iou = (a & b).sum() / (a | b).sum()
    assert iou < 0.8, (dw.OBJECTS[i], dw.OBJECTS[j], iou)


def test_object_colour_is_not_the_class():
  """Tree images of one class come in many palette colours."""
  palette = np.array([dw._PALETTE[c] for c in dw.COLORS], np.float32)
  for obj in ("ball", "star"):
    named = set()
    for i in range(40):
      img = dw.tree_image(0, "clipart", obj, i, 64).astype(np.float32)
      # The object covers the image centre; its median there is the fill.
      patch = img[28:36, 28:36].reshape(-1, 3)
      fill = np.median(patch, 0)
      named.add(int(np.argmin(((palette - fill) ** 2).sum(-1))))
    assert len(named) >= 6, (obj, named)
  # And the rendered object colour follows the requested colour.
  red = dw.render("star", "red", "clipart", np.random.default_rng(1), 64)
  blue = dw.render("star", "blue", "clipart", np.random.default_rng(1), 64)
  centre = (slice(24, 40), slice(24, 40))
  assert red[centre][..., 0].mean() > red[centre][..., 2].mean() + 60
  assert blue[centre][..., 2].mean() > blue[centre][..., 0].mean() + 60


# ----------------------------------------------------------------------------
# Domains differ, and SIMILAR_DOMAINS are the closest pair.


def test_sketch_is_grayscale_and_others_are_colourful(domain_features):
  for i in range(5):
    img = dw.tree_image(0, "sketch", dw.OBJECTS[i], i)
    assert np.array_equal(img[..., 0], img[..., 1])
    assert np.array_equal(img[..., 1], img[..., 2])
  chroma = {d: f[:, 1].mean() for d, f in domain_features.items()}
  assert chroma["sketch"] == 0
  for d in ("photo", "painting", "clipart"):
    assert chroma[d] > 0.05, (d, chroma)


def test_single_statistics_separate_domains(domain_features):
  mean = {d: f.mean(0) for d, f in domain_features.items()}
  flat, edges, white = 7, 4, 6  # feature indices
  # Clipart: large areas of exactly flat colour.
  assert mean["clipart"][flat] > 0.6
  assert all(mean[d][flat] < 0.5 for d in ("photo", "painting", "sketch"))
  # Painting: brush dabs give the highest edge density.
  assert mean["painting"][edges] > 1.5 * max(
      mean[d][edges] for d in ("photo", "clipart", "sketch"))
  # Sketch: mostly white paper; photo: almost no white.
  assert mean["sketch"][white] > 0.7 and mean["photo"][white] < 0.1


def test_nearest_centroid_recognises_domains(domain_features):
  """Domain centroids from one seed classify fresh images of another seed."""
  allf = np.concatenate(list(domain_features.values()))
  mu, sd = allf.mean(0), allf.std(0) + 1e-6
  centroids = np.stack([((domain_features[d] - mu) / sd).mean(0)
                        for d in dw.DOMAINS])
  fresh = _domain_features(seed=1, per_class=2)
  correct = total = 0
  for k, d in enumerate(dw.DOMAINS):
    z = (fresh[d] - mu) / sd
    pred = np.argmin(((z[:, None] - centroids[None]) ** 2).sum(-1), 1)
    correct += (pred == k).sum()
    total += len(z)
  assert correct / total >= 0.95


def test_similar_domains_are_the_closest_pair(domain_features):
  allf = np.concatenate(list(domain_features.values()))
  mu, sd = allf.mean(0), allf.std(0) + 1e-6
  means = {d: ((f - mu) / sd).mean(0) for d, f in domain_features.items()}
  dist = {frozenset(p): float(np.linalg.norm(means[p[0]] - means[p[1]]))
          for p in itertools.combinations(dw.DOMAINS, 2)}
  similar = dist.pop(frozenset(dw.SIMILAR_DOMAINS))
  assert similar < 0.85 * min(dist.values()), (similar, dist)


# ----------------------------------------------------------------------------
# generate_tree().


def _tree_files(root: pathlib.Path) -> dict:
  return {str(p.relative_to(root)): p.read_bytes()
          for p in sorted(root.rglob("*")) if p.is_file()}


def test_generate_tree_layout_and_manifest(tmp_path):
  root = tmp_path / "demo"
  manifest = dw.generate_tree(root, seed=3, images_per_class=2, size=32)
  assert sorted(p.name for p in root.iterdir()) == sorted(
      list(dw.DOMAINS) + ["manifest.json"])
  for d in dw.DOMAINS:
    folders = sorted(p.name for p in (root / d).iterdir())
    assert folders == sorted(o.replace(" ", "_") for o in dw.OBJECTS)
    for folder in folders:
      names = sorted(p.name for p in (root / d / folder).iterdir())
      assert names == ["0.png", "1.png"]
  img = np.asarray(Image.open(root / "sketch" / "key" / "1.png"))
  assert img.shape == (32, 32, 3) and img.dtype == np.uint8
  np.testing.assert_array_equal(img, dw.tree_image(3, "sketch", "key", 1, 32))
  assert json.loads((root / "manifest.json").read_text()) == manifest
  assert manifest["domains"] == list(dw.DOMAINS)
  assert manifest["classes"] == list(dw.OBJECTS)
  assert manifest["seed"] == 3 and manifest["size"] == 32
  assert manifest["counts"]["photo"]["boat"] == 2
  assert manifest["total"] == 2 * len(dw.DOMAINS) * len(dw.OBJECTS)
  # No temporary directory is left beside the tree.
  assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_generate_tree_is_byte_deterministic_and_partial_safe(tmp_path):
  kw = dict(images_per_class=2, size=24)
  dw.generate_tree(tmp_path / "a", seed=5, **kw)
  dw.generate_tree(tmp_path / "b", seed=5, **kw)
  dw.generate_tree(tmp_path / "c", seed=6, **kw)
  a, b, c = (_tree_files(tmp_path / n) for n in "abc")
  assert a == b
  pngs = [k for k in a if k.endswith(".png")]
  assert all(a[k] != c[k] for k in pngs)
  # A subset tree holds exactly the same bytes for the images it contains.
  dw.generate_tree(tmp_path / "part", seed=5, domains=("painting",),
                   objects=("umbrella", "cup"), **kw)
  part = _tree_files(tmp_path / "part")
  for k, v in part.items():
    if k.endswith(".png"):
      assert v == a[k], k
  assert len([k for k in part if k.endswith(".png")]) == 4
  # Worker processes write the very same bytes.
  dw.generate_tree(tmp_path / "par", seed=5, workers=2, **kw)
  assert _tree_files(tmp_path / "par") == a


def test_each_tree_image_has_its_own_stream():
  firsts = {dw.tree_image_rng(0, d, o, i).integers(2 ** 62)
            for d in dw.DOMAINS for o in dw.OBJECTS for i in range(3)}
  assert len(firsts) == len(dw.DOMAINS) * len(dw.OBJECTS) * 3
  assert (dw.tree_image_rng(0, "photo", "cup", 0).integers(2 ** 62) !=
          dw.tree_image_rng(1, "photo", "cup", 0).integers(2 ** 62))


def test_generate_tree_is_atomic(tmp_path, monkeypatch):
  root = tmp_path / "demo"
  real_render = dw.render
  calls = []

  def checking_render(*args, **kwargs):
    assert not root.exists(), "final directory appeared before completion"
    calls.append(1)
    if len(calls) == 7:
      raise KeyboardInterrupt("simulated kill")
    return real_render(*args, **kwargs)

  monkeypatch.setattr(dw, "render", checking_render)
  with pytest.raises(KeyboardInterrupt):
    dw.generate_tree(root, images_per_class=2, size=16)
  assert not root.exists()
  assert list(tmp_path.iterdir()) == []  # the partial tmp tree was removed

  calls.clear()
  staging = set()

  def counting_render(*args, **kwargs):
    assert not root.exists(), "final directory appeared before completion"
    entries = list(tmp_path.iterdir())
    assert len(entries) == 1 and entries[0].name.startswith("demo.tmp-")
    staging.add(entries[0].stat().st_ino)
    calls.append(1)
    return real_render(*args, **kwargs)

  monkeypatch.setattr(dw, "render", counting_render)
  dw.generate_tree(root, images_per_class=1, size=16)
  assert len(calls) == len(dw.DOMAINS) * len(dw.OBJECTS)
  assert (root / "manifest.json").is_file()
  # The staging directory itself was renamed into place (not copied).
  assert staging == {root.stat().st_ino}
  assert [p.name for p in tmp_path.iterdir()] == ["demo"]


def test_generate_tree_existing_root(tmp_path):
  root = tmp_path / "demo"
  first = dw.generate_tree(root, images_per_class=1, size=16)
  mtime = (root / "photo" / "ball" / "0.png").stat().st_mtime_ns
  assert dw.generate_tree(root, images_per_class=1, size=16) == first
  assert (root / "photo" / "ball" / "0.png").stat().st_mtime_ns == mtime
  with pytest.raises(FileExistsError):
    dw.generate_tree(root, images_per_class=2, size=16)
  other = tmp_path / "other"
  other.mkdir()
  (other / "keep.txt").write_text("not ours")
  with pytest.raises(FileExistsError):
    dw.generate_tree(other, images_per_class=1, size=16)
  assert (other / "keep.txt").read_text() == "not ours"
  empty = tmp_path / "empty"
  empty.mkdir()
  dw.generate_tree(empty, images_per_class=1, size=16)
  assert (empty / "manifest.json").is_file()


# ----------------------------------------------------------------------------
# Pretraining pairs.


def test_sample_pretraining_pair():
  img, caption = dw.sample_pretraining_pair(np.random.default_rng(0), 48)
  assert img.shape == (48, 48, 3) and img.dtype == np.uint8
  assert isinstance(caption, str) and caption
  img2, caption2 = dw.sample_pretraining_pair(np.random.default_rng(0), 48)
  np.testing.assert_array_equal(img, img2)
  assert caption == caption2


def test_pretraining_batch_deterministic():
  imgs, caps = dw.pretraining_batch(seed=1, index=4, batch_size=6, size=32)
  assert imgs.shape == (6, 32, 32, 3) and imgs.dtype == np.uint8
  assert len(caps) == 6 and all(isinstance(c, str) for c in caps)
  imgs2, caps2 = dw.pretraining_batch(seed=1, index=4, batch_size=6, size=32)
  np.testing.assert_array_equal(imgs, imgs2)
  assert caps == caps2
  # Examples do not depend on the batch size, so batches can be split.
  imgs3, caps3 = dw.pretraining_batch(seed=1, index=4, batch_size=2, size=32)
  np.testing.assert_array_equal(imgs3, imgs[:2])
  assert caps3 == caps[:2]
  other, _ = dw.pretraining_batch(seed=1, index=5, batch_size=6, size=32)
  assert not np.array_equal(other, imgs)
  other, _ = dw.pretraining_batch(seed=2, index=4, batch_size=6, size=32)
  assert not np.array_equal(other, imgs)


def test_captions_mention_object_and_never_held_out():
  rng = np.random.default_rng(0)
  specs = [dw.pretraining_spec(rng) for _ in range(4000)]
  held_out = set(dw.HELD_OUT)
  for spec in specs:
    assert (spec.obj, spec.style) not in held_out, spec
    words = spec.caption.replace(",", "").split()
    assert f" {spec.obj} " in f" {' '.join(words)} ", spec  # whole words
    colours_named = [c for c in dw.COLORS if c in words]
    assert colours_named in ([], [spec.color]), spec
  assert {s.style for s in specs} == set(dw.PRETRAIN_STYLES)
  assert {s.obj for s in specs} == set(dw.OBJECTS)
  assert len({s.caption for s in specs}) > 500  # varied wording
  templates_with_style = [s for s in specs if any(
      w in s.caption for w in ("photo", "cartoon", "pixel", "drawing",
                               "sketch", "water", "painting", "8-bit"))]
  assert len(templates_with_style) > len(specs) // 2
  # The phrasing of a held-out style never sits next to its held-out object.
  for s in specs:
    if "oil painting" in s.caption:
      assert not {"boat", "key", "umbrella"} & set(s.caption.split())
  # Articles are right.
  assert not any(" a 8-bit" in s.caption or s.caption.startswith("a 8-bit")
                 or " a umbrella" in s.caption or " a oil" in s.caption
                 for s in specs)


def test_pretraining_styles_are_not_the_downstream_renderings():
  """Same scene randomness, different rendering for every style/domain pair."""
  for obj in ("cup", "fish"):
    imgs = {s: dw.render(obj, "green", s, np.random.default_rng(11), 48)
            for s in ALL_STYLES}
    for style in dw.PRETRAIN_STYLES:
      for domain in dw.DOMAINS:
        diff = np.abs(imgs[style].astype(int) - imgs[domain].astype(int))
        assert diff.mean() > 3, (obj, style, domain)


def test_contact_sheet():
  sheet = dw.contact_sheet(size=24, styles=("photo", "sketch"), gap=1)
  assert sheet.shape == (len(dw.OBJECTS) * 25 + 1, 2 * 25 + 1, 3)
  assert sheet.dtype == np.uint8


# ----------------------------------------------------------------------------
# World 2 (mmap_jax/demo/world_v2.py): the paper's regime of issue 25.


from mmap_jax.demo import world_v2 as w2  # noqa: E402


def test_world2_shape_of_model_and_data():
  from mmap_jax.models.config import get_variant
  assert len(w2.OBJECTS) >= 24 and len(set(w2.OBJECTS)) == len(w2.OBJECTS)
  assert w2.OBJECTS[:len(dw.OBJECTS)] == dw.OBJECTS
  cfg = get_variant("demo_v2")
  assert (cfg.vision.image_size // cfg.vision.patch_size) ** 2 >= 64
  assert cfg.vision.layers >= 6 and cfg.text.layers >= 6
  # Every downstream domain has a pretraining style family; no style is a downstream domain.
  assert set(w2.FAMILIES) == set(w2.DOMAINS)
  family_styles = [s for f in w2.FAMILIES.values() for s in f]
  assert set(family_styles) <= set(w2.PRETRAIN_STYLES)
  assert not set(w2.PRETRAIN_STYLES) & set(w2.DOMAINS)
  assert all(len(f) >= 2 for f in w2.FAMILIES.values())


def test_world2_silhouettes_are_distinct():
  masks = {o: w2.render(o, "black", "clipart", np.random.default_rng(3), 48).mean(-1) < 128
           for o in w2.OBJECTS}
  for a, b in itertools.combinations(w2.OBJECTS, 2):
    iou = (masks[a] & masks[b]).sum() / (masks[a] | masks[b]).sum()
    assert iou < 0.8, (a, b, iou)


def test_world2_family_styles_are_other_renderings_of_the_domain():
  """Same object, pose and colour stream: a family style never reproduces its domain's image."""
  for domain, styles in w2.FAMILIES.items():
    for style in styles:
      for i in range(3):
        a = w2.render("cup", "red", domain, np.random.default_rng(i), 48)
        b = w2.render("cup", "red", style, np.random.default_rng(i), 48)
        assert np.abs(a.astype(int) - b.astype(int)).mean() > 4, (domain, style)


def test_world2_tree_is_deterministic_balanced_and_not_world1(tmp_path):
  np.testing.assert_array_equal(w2.tree_image(0, "photo", "kite", 3),
                                w2.tree_image(0, "photo", "kite", 3))
  assert not np.array_equal(w2.tree_image(0, "photo", "cup", 3),
                            dw.tree_image(0, "photo", "cup", 3))
  assert not np.array_equal(w2.tree_image(0, "photo", "kite", 3),
                            w2.tree_image(1, "photo", "kite", 3))
  kw = dict(seed=0, images_per_class=3, size=32, domains=("photo", "sketch"),
            objects=("moon", "flag", "cup"))
  m1 = w2.generate_tree(tmp_path / "a", **kw)
  m2 = w2.generate_tree(tmp_path / "b", **kw)
  assert _tree_files(tmp_path / "a") == _tree_files(tmp_path / "b")
  assert m1["world"] == 2 and m1["counts"] == {d: {o: 3 for o in kw["objects"]}
                                               for d in kw["domains"]}
  for d in kw["domains"]:
    for o in kw["objects"]:
      assert len(list((tmp_path / "a" / d / o).glob("*.png"))) == 3
  assert w2.generate_tree(tmp_path / "a", **kw) == m1   # reused
  with pytest.raises(FileExistsError):   # a world-1 tree is another tree
    dw.generate_tree(tmp_path / "a", seed=0, images_per_class=3, size=32,
                     domains=("photo", "sketch"), objects=("cup",))


def test_world2_planted_affinity_two_pairs():
  """photo-painting and clipart-sketch: that pairing has the smallest within-pair distances."""
  feats = {d: np.stack([_features(w2.tree_image(0, d, o, i, 48))
                        for o in w2.OBJECTS for i in range(2)]) for d in w2.DOMAINS}
  allf = np.concatenate(list(feats.values()))
  mu, sd = allf.mean(0), allf.std(0) + 1e-6
  means = {d: ((f - mu) / sd).mean(0) for d, f in feats.items()}
  dist = lambda a, b: float(np.linalg.norm(means[a] - means[b]))
  pairings = {}
  for partner in ("clipart", "sketch", "painting"):
    rest = [d for d in w2.DOMAINS if d not in ("photo", partner)]
    pairings[("photo", partner)] = dist("photo", partner) + dist(*rest)
  planted = pairings.pop(("photo", "painting"))
  assert planted < 0.75 * min(pairings.values()), (planted, pairings)
  others = [dist(a, b) for a, b in itertools.combinations(w2.DOMAINS, 2)
            if (a, b) not in w2.SIMILAR_PAIRS]
  for a, b in w2.SIMILAR_PAIRS:
    assert dist(a, b) < min(others), (a, b, dist(a, b), others)


def test_world2_pretraining_stream_covers_every_family_with_several_templates():
  specs = [w2.pretraining_spec(np.random.default_rng([5, i])) for i in range(600)]
  assert {s.style for s in specs} == set(w2.PRETRAIN_STYLES)
  assert {s.obj for s in specs} == set(w2.OBJECTS)
  assert all(s.obj in s.caption for s in specs)
  # Several templates: the skeletons of template words differ ("... of ...", "... drawn as
  # ...", "a picture of ...", "... in ... style", "this is ... showing ...", "..., ...").
  markers = {"drawn", "picture", "style", "showing", "this", ","}
  skeletons = {tuple(w for w in s.caption.replace(",", " ,").split() if w in markers)
               for s in specs}
  assert len(skeletons) >= 5, skeletons
  image = w2.render(specs[0].obj, specs[0].color, specs[0].style, np.random.default_rng(0), 32)
  assert image.shape == (32, 32, 3) and image.dtype == np.uint8
  with pytest.raises(ValueError, match="object"):
    w2.render("ball2", "red", "photo", np.random.default_rng(0))
