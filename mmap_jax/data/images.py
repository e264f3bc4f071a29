"""Image files -> the one stored form: upright 8-bit RGB JPEG bytes.

Why JPEG bytes (`tfds.features.Image(encoding_format="jpeg")`):
  * Raw uint8 pixels would skip decoding but are ~10x larger than a JPEG of
    the same picture (DomainNet would need hundreds of GB instead of ~20 GB),
    so reading them from disk/page cache becomes the bottleneck instead.
  * PNG is lossless but decodes 3-5x slower than JPEG for photos and sketches.
  * JPEG also lets a reader decode at 1/2, 1/4 or 1/8 scale in the DCT domain
    (`decode_rgb(min_short_side=...)`), which makes very large photos cheap.
Every record decodes to the same thing (3 channels, 8 bits, no orientation
tag), so the input pipeline never branches on the source format. A source that
already is a baseline RGB JPEG without rotation is stored byte-for-byte (no
second lossy generation); everything else (PNG, grayscale, CMYK, alpha,
16-bit, EXIF-rotated, ...) is converted here and re-encoded at quality 95.
"""

from __future__ import annotations

import io
import os
from typing import Union

import numpy as np
from PIL import Image, ImageOps

PathLike = Union[str, os.PathLike]

JPEG_QUALITY = 95
_EXIF_ORIENTATION = 0x0112
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_SIXTEEN_BIT_MODES = frozenset({"I;16", "I;16L", "I;16B", "I;16N", "I"})


class UnreadableImageError(ValueError):
  """An image file that cannot be decoded; names the file and the reason."""

  def __init__(self, path: str, reason: str):
    super().__init__(f"unreadable image {path}: {reason}")
    self.path = path
    self.reason = reason


def _white_composite(image: Image.Image) -> Image.Image:
  """Alpha-composites on white: transparent clipart should not turn black."""
  rgba = image.convert("RGBA")
  white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
  return Image.alpha_composite(white, rgba).convert("RGB")


def _sixteen_bit_to_rgb(image: Image.Image) -> Image.Image:
  """Scales 16-bit (or 32-bit integer) gray levels to 8 bits."""
  values = np.asarray(image).astype(np.float64)
  if image.mode != "I" or values.max(initial=0) > 255:
    values = values / 257.0  # 65535 -> 255
  gray = np.clip(np.rint(values), 0, 255).astype(np.uint8)
  return Image.fromarray(gray, "L").convert("RGB")


def to_rgb(image: Image.Image) -> Image.Image:
  """Any PIL image -> upright 8-bit RGB (EXIF rotation applied, alpha on white)."""
  image = ImageOps.exif_transpose(image)
  mode = image.mode
  if mode == "RGB":
    return image
  if mode in _ALPHA_MODES or (mode == "P" and "transparency" in image.info):
    return _white_composite(image)
  if mode in _SIXTEEN_BIT_MODES:
    return _sixteen_bit_to_rgb(image)
  if mode == "F":
    gray = np.clip(np.rint(np.asarray(image)), 0, 255).astype(np.uint8)
    return Image.fromarray(gray, "L").convert("RGB")
  return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV


def _open_loaded(data: bytes, path: str) -> Image.Image:
  try:
    image = Image.open(io.BytesIO(data))
    image.load()  # Truncated or corrupt data fails here, not later.
  except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
    raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e
  return image


def storage_bytes(path: PathLike) -> bytes:
  """Reads, validates and converts one image file to the stored JPEG bytes.

  Raises:
    UnreadableImageError: the file is missing, unreadable or not a decodable
      image (the message names the file).
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read()
  except OSError as e:
    raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e
  image = _open_loaded(data, path)
  orientation = image.getexif().get(_EXIF_ORIENTATION, 1)
  if image.format == "JPEG" and image.mode == "RGB" and orientation == 1:
    return data
  try:
    rgb = to_rgb(image)
    out = io.BytesIO()
    rgb.save(out, format="JPEG", quality=JPEG_QUALITY)
  except (OSError, ValueError) as e:
    raise UnreadableImageError(path, f"{type(e).__name__}: {e}") from e
  return out.getvalue()


def decode_rgb(data: bytes, *, min_short_side: int | None = None) -> Image.Image:
  """Stored bytes -> RGB PIL image.

  Args:
    data: bytes written by `storage_bytes`.
    min_short_side: if set, a JPEG is decoded at the smallest DCT scale (1, 1/2,
      1/4, 1/8) whose short side is still >= this; much faster for big photos
      and, being an area average, no worse than resizing after a full decode.
  """
  image = Image.open(io.BytesIO(data))
  if min_short_side and image.format == "JPEG":
    image.draft("RGB", (min_short_side, min_short_side))
  if image.mode != "RGB":
    image = to_rgb(image)
  return image
