"""CLIP image preprocessing (eval) and CoOp/MaPLe-style augmentation (train).

Eval matches OpenAI CLIP's `_transform` exactly: torchvision `Resize(n_px,
BICUBIC)` on a PIL image (short side -> n_px, long side truncated, PIL's
antialiased bicubic), `CenterCrop(n_px)`, then /255 and the OpenAI mean/std.
Train is torchvision's `RandomResizedCrop(n_px, scale, ratio, BICUBIC)` (same
sampling algorithm, 10 tries then a center-crop fallback) and an optional
horizontal flip, with randomness from an explicit numpy Generator so every
example's augmentation is a pure function of the pipeline seed.
Outputs are float32 HWC (the batch is NHWC).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import numpy as np
from PIL import Image

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_SCALE = (1.0 / (255.0 * np.asarray(CLIP_STD))).astype(np.float32)
_SHIFT = (np.asarray(CLIP_MEAN) / np.asarray(CLIP_STD)).astype(np.float32)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
  """Training augmentation.

  Attributes:
    random_resized_crop: if False, training images get the eval transform.
    scale: RandomResizedCrop area range (fraction of the image); CoOp and
      MaPLe use (0.08, 1.0).
    ratio: RandomResizedCrop aspect-ratio range.
    hflip: random horizontal flip with probability 1/2.
  """

  random_resized_crop: bool = True
  scale: tuple[float, float] = (0.08, 1.0)
  ratio: tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
  hflip: bool = True

  def __post_init__(self):
    lo, hi = self.scale
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"AugmentConfig.scale must satisfy 0 < lo <= hi <= 1, got {self.scale}")
    rlo, rhi = self.ratio
    if not 0.0 < rlo <= rhi:
      raise ValueError(f"AugmentConfig.ratio must satisfy 0 < lo <= hi, got {self.ratio}")
    object.__setattr__(self, "scale", (float(lo), float(hi)))
    object.__setattr__(self, "ratio", (float(rlo), float(rhi)))

  def min_decode_side(self, image_size: int) -> int:
    """Short side a decoded image needs so that no crop has to be upsampled.

    The smallest crop RandomResizedCrop can take has a short side of
    sqrt(scale_min / ratio_max) times the image's short side.
    """
    if not self.random_resized_crop:
      return image_size
    widest = max(self.ratio[1], 1.0 / self.ratio[0])
    return math.ceil(image_size / math.sqrt(self.scale[0] / widest))


@functools.lru_cache(maxsize=16)
def _row_constants(width: int) -> tuple[np.ndarray, np.ndarray]:
  return np.tile(_SCALE, width), np.tile(_SHIFT, width)


def normalize_into(pixels: np.ndarray, out: np.ndarray) -> np.ndarray:
  """uint8 HWC RGB -> (x/255 - mean)/std written into a float32 buffer.

  Works on [H, W*3] rows with per-row constant vectors: numpy's inner loop
  then runs over W*3 values instead of 3, which is ~10x faster.
  """
  h, w, _ = pixels.shape
  if not out.flags.c_contiguous:
    raise ValueError("normalize_into needs a C-contiguous output buffer")
  scale, shift = _row_constants(w)
  rows = out.reshape(h, w * 3)
  np.multiply(pixels.reshape(h, w * 3), scale, out=rows, casting="unsafe")
  np.subtract(rows, shift, out=rows)
  return out


def resize_short_side(image: Image.Image, size: int) -> Image.Image:
  """torchvision `Resize(size)` on a PIL image (bicubic)."""
  w, h = image.size
  short, long = (w, h) if w <= h else (h, w)
  if short == size:
    return image
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  return image.resize((new_w, new_h), Image.Resampling.BICUBIC)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  """torchvision `CenterCrop(size)` box (left, top, right, bottom)."""
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return left, top, left + size, top + size


def eval_pixels(image: Image.Image, size: int) -> np.ndarray:
  """CLIP eval transform up to uint8: resize short side, center crop."""
  image = resize_short_side(image, size)
  w, h = image.size
  if w < size or h < size:  # Only possible for degenerate 1-pixel-wide inputs.
    image = image.resize((max(w, size), max(h, size)), Image.Resampling.BICUBIC)
    w, h = image.size
  return np.asarray(image.crop(center_crop_box(w, h, size)))


def random_resized_crop_box(
    width: int, height: int, rng: np.random.Generator,
    scale: tuple[float, float], ratio: tuple[float, float],
) -> tuple[int, int, int, int]:
  """torchvision `RandomResizedCrop.get_params` -> box (left, top, right, bottom)."""
  area = width * height
  log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(log_lo, log_hi))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      top = int(rng.integers(0, height - h + 1))
      left = int(rng.integers(0, width - w + 1))
      return left, top, left + w, top + h
  in_ratio = width / height
  if in_ratio < min(ratio):
    w, h = width, int(round(width / min(ratio)))
  elif in_ratio > max(ratio):
    w, h = int(round(height * max(ratio))), height
  else:
    w, h = width, height
  top, left = (height - h) // 2, (width - w) // 2
  return left, top, left + w, top + h


def train_pixels(
    image: Image.Image, size: int, rng: np.random.Generator, augment: AugmentConfig,
) -> np.ndarray:
  """Training transform up to uint8: random resized crop + optional flip."""
  if augment.random_resized_crop:
    box = random_resized_crop_box(*image.size, rng, augment.scale, augment.ratio)
    # Resampling straight from the box == crop then resize, without a copy.
    image = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    pixels = np.asarray(image)
  else:
    pixels = eval_pixels(image, size)
  if augment.hflip and rng.random() < 0.5:
    pixels = np.ascontiguousarray(pixels[:, ::-1])
  return pixels


def eval_image(image: Image.Image, size: int) -> np.ndarray:
  """Full CLIP eval preprocessing -> float32 [size, size, 3]."""
  return normalize_into(eval_pixels(image, size), np.empty((size, size, 3), np.float32))


def train_image(
    image: Image.Image, size: int, rng: np.random.Generator, augment: AugmentConfig,
) -> np.ndarray:
  """Full training preprocessing -> float32 [size, size, 3]."""
  pixels = train_pixels(image, size, rng, augment)
  return normalize_into(pixels, np.empty((size, size, 3), np.float32))
