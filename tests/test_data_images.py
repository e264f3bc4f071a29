"""Image conversion to the stored form, and CLIP preprocessing."""

import io
import math

import numpy as np
import pytest
from PIL import Image

from mmap_jax.data import images
from mmap_jax.data import preprocess
from tests import data_trees


def _decoded(path) -> np.ndarray:
  return np.asarray(images.decode_rgb(images.storage_bytes(path)))


def test_rgb_jpeg_is_stored_byte_for_byte(tmp_path):
  path = tmp_path / "a.jpg"
  data_trees.flat_image(0, 0).save(path, quality=90)
  assert images.storage_bytes(path) == path.read_bytes()


def test_png_is_reencoded_as_rgb_jpeg(tmp_path):
  path = tmp_path / "a.png"
  data_trees.flat_image(1, 0, (20, 10)).save(path)
  data = images.storage_bytes(path)
  stored = Image.open(io.BytesIO(data))
  assert stored.format == "JPEG" and stored.mode == "RGB" and stored.size == (20, 10)
  np.testing.assert_allclose(np.asarray(stored).mean((0, 1)), data_trees.class_color(1) - 2, atol=3)


def test_special_modes_are_converted(tmp_path):
  data_trees.write_special_images(tmp_path, label=2)
  color = data_trees.class_color(2)
  gray = _decoded(tmp_path / "gray.jpg")
  assert gray.shape == (30, 30, 3) and np.all(np.abs(gray.astype(int) - 128) <= 2)
  np.testing.assert_allclose(_decoded(tmp_path / "rgba.png").mean((0, 1)), color, atol=3)
  np.testing.assert_allclose(_decoded(tmp_path / "cmyk.jpg").mean((0, 1)), color, atol=4)
  gray16 = _decoded(tmp_path / "gray16.png")  # 40000 / 257 = 155.6
  assert gray16.shape == (30, 30, 3) and np.all(np.abs(gray16.astype(int) - 156) <= 2)
  np.testing.assert_allclose(_decoded(tmp_path / "rgb16.png").mean((0, 1)), color, atol=3)


def test_rgba_composites_on_white(tmp_path):
  pixels = np.zeros((10, 20, 4), np.uint8)
  pixels[:, :10] = (255, 0, 0, 255)  # Opaque red left, fully transparent right.
  Image.fromarray(pixels, "RGBA").save(tmp_path / "a.png")
  out = _decoded(tmp_path / "a.png").astype(int)
  assert np.all(np.abs(out[:, 2:8] - (255, 0, 0)).max(-1) <= 8)
  assert np.all(out[:, 12:] >= 250)


def test_exif_rotation_is_applied(tmp_path):
  pixels = np.zeros((20, 40, 3), np.uint8)
  pixels[:, :20] = (255, 0, 0)  # Red left half, blue right half.
  pixels[:, 20:] = (0, 0, 255)
  (tmp_path / "r.jpg").write_bytes(data_trees.rotated_jpeg_bytes(Image.fromarray(pixels), 6))
  out = _decoded(tmp_path / "r.jpg").astype(int)
  # Orientation 6 = rotate 90 degrees clockwise to display: left half -> top.
  assert out.shape == (40, 20, 3)
  assert out[5, 10, 0] > 200 and out[5, 10, 2] < 60
  assert out[35, 10, 2] > 200 and out[35, 10, 0] < 60
  stored = Image.open(io.BytesIO(images.storage_bytes(tmp_path / "r.jpg")))
  assert stored.getexif().get(0x0112, 1) == 1


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\xff\xd8\xff\xe0garbage"])
def test_corrupt_file_is_named(tmp_path, content):
  path = tmp_path / "broken.jpg"
  path.write_bytes(content)
  with pytest.raises(images.UnreadableImageError, match="broken.jpg"):
    images.storage_bytes(path)


def test_truncated_jpeg_is_rejected(tmp_path):
  path = tmp_path / "cut.jpg"
  Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8)).save(path)
  path.write_bytes(path.read_bytes()[:600])
  with pytest.raises(images.UnreadableImageError, match="cut.jpg"):
    images.storage_bytes(path)


def test_missing_file_is_named(tmp_path):
  with pytest.raises(images.UnreadableImageError, match="nothere.png"):
    images.storage_bytes(tmp_path / "nothere.png")


def test_draft_decode_keeps_the_requested_short_side():
  out = io.BytesIO()
  Image.new("RGB", (1000, 800), (10, 200, 30)).save(out, "JPEG")
  assert images.decode_rgb(out.getvalue(), min_short_side=190).size == (250, 200)
  assert images.decode_rgb(out.getvalue(), min_short_side=500).size == (1000, 800)


# ------------------------------------------------------------ preprocess ---


def test_eval_transform_matches_openai_clip_reference():
  rng = np.random.default_rng(0)
  image = Image.fromarray(rng.integers(0, 256, (50, 70, 3), np.uint8))
  out = preprocess.eval_image(image, 32)
  # OpenAI: Resize(32, BICUBIC) -> (44, 32); CenterCrop(32): left = round(6.0).
  ref = np.asarray(image.resize((44, 32), Image.Resampling.BICUBIC), np.float32)[:, 6:38] / 255.0
  ref = (ref - np.asarray(preprocess.CLIP_MEAN)) / np.asarray(preprocess.CLIP_STD)
  assert out.shape == (32, 32, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out, ref, atol=1e-5)


def test_normalisation_constants():
  white = preprocess.normalize_into(np.full((1, 1, 3), 255, np.uint8),
                                    np.empty((1, 1, 3), np.float32))
  expected = (1 - np.asarray(preprocess.CLIP_MEAN)) / np.asarray(preprocess.CLIP_STD)
  np.testing.assert_allclose(white[0, 0], expected, rtol=1e-6)


def test_random_resized_crop_box_respects_scale_and_ratio():
  rng = np.random.default_rng(0)
  for _ in range(200):
    l, t, r, b = preprocess.random_resized_crop_box(300, 200, rng, (0.3, 0.5), (0.75, 4 / 3))
    assert 0 <= l < r <= 300 and 0 <= t < b <= 200
    area = (r - l) * (b - t) / (300 * 200)
    assert 0.28 <= area <= 0.52
    assert 0.7 <= (r - l) / (b - t) <= 1.4


def test_train_transform_is_seeded_and_configurable():
  image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (60, 80, 3), np.uint8))
  aug = preprocess.AugmentConfig()
  a = preprocess.train_image(image, 24, np.random.default_rng(5), aug)
  b = preprocess.train_image(image, 24, np.random.default_rng(5), aug)
  c = preprocess.train_image(image, 24, np.random.default_rng(6), aug)
  np.testing.assert_array_equal(a, b)
  assert not np.array_equal(a, c)
  off = preprocess.AugmentConfig(random_resized_crop=False, hflip=False)
  np.testing.assert_array_equal(
      preprocess.train_image(image, 24, np.random.default_rng(0), off),
      preprocess.eval_image(image, 24))
  flip_only = preprocess.AugmentConfig(random_resized_crop=False, hflip=True)
  flips = {preprocess.train_image(image, 24, np.random.default_rng(s), flip_only)[0, 0, 0]
           for s in range(20)}
  assert len(flips) == 2  # Both the plain and the mirrored image occur.
  with pytest.raises(ValueError, match="scale"):
    preprocess.AugmentConfig(scale=(0.5, 0.2))


def test_min_decode_side_never_upsamples_the_smallest_crop():
  aug = preprocess.AugmentConfig(scale=(0.08, 1.0))
  side = aug.min_decode_side(224)
  assert side * math.sqrt(0.08 / (4 / 3)) >= 224 - 1e-6
  assert preprocess.AugmentConfig(random_resized_crop=False).min_decode_side(224) == 224
