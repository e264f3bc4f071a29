"""Small generated image trees for the data tests (no downloads).

Regular images are a per-class colour (plus a gentle ramp), so any crop of
them still tells which class they came from.
"""

from __future__ import annotations

import io
import os
import pathlib
import struct
import zlib
from typing import Sequence

import numpy as np
from PIL import Image

OFFICE_HOME_DOMAINS = ("Art", "Clipart", "Product", "Real World")
# A class with a space and classes with underscores, as in the real layouts.
CLASSES = ("Alarm_Clock", "Desk Lamp", "flip_flops")
PALETTE = ((220, 40, 40), (40, 200, 60), (50, 70, 230), (230, 200, 40), (200, 60, 220),
           (40, 210, 210), (240, 140, 30), (120, 120, 120))


def class_color(label: int) -> np.ndarray:
  return np.asarray(PALETTE[label % len(PALETTE)], np.float32)


def color_label(pixels: np.ndarray) -> int:
  """Nearest palette class of an image's mean colour (uint8-scale pixels)."""
  mean = pixels.reshape(-1, 3).mean(0)
  return int(np.argmin([np.abs(mean - class_color(i)).sum() for i in range(len(PALETTE))]))


def flat_image(label: int, index: int, size=(40, 32)) -> Image.Image:
  """A class-coloured image: `index` nudges the shade, a +-12 level left-right
  ramp gives crops and flips something to change (the mean stays the colour)."""
  color = class_color(label) + (index % 5) - 2
  ramp = np.rint(np.linspace(-12, 12, size[0]))[None, :, None]
  pixels = np.clip(color + ramp, 0, 255).astype(np.uint8)
  return Image.fromarray(np.broadcast_to(pixels, (size[1], size[0], 3)).copy(), "RGB")


def png16_rgb(path: str, pixels: np.ndarray) -> None:
  """Writes a 16-bit RGB PNG by hand (PIL cannot write one)."""
  h, w, _ = pixels.shape
  raw = b"".join(b"\0" + pixels[y].astype(">u2").tobytes() for y in range(h))

  def chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

  ihdr = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
  with open(path, "wb") as f:
    f.write(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(raw))
            + chunk(b"IEND", b""))


def rotated_jpeg_bytes(image: Image.Image, orientation: int = 6) -> bytes:
  exif = Image.Exif()
  exif[0x0112] = orientation
  out = io.BytesIO()
  image.save(out, "JPEG", quality=95, exif=exif)
  return out.getvalue()


def write_special_images(folder: pathlib.Path, label: int) -> list[str]:
  """Grayscale, RGBA, CMYK, 16-bit gray and RGB PNG, EXIF-rotated JPEG files."""
  folder.mkdir(parents=True, exist_ok=True)
  color = class_color(label).astype(np.uint8)
  names = []
  Image.new("L", (30, 30), 128).save(folder / "gray.jpg", quality=95)
  rgba = Image.new("RGBA", (30, 30), (*color, 255))
  rgba.save(folder / "rgba.png")
  Image.new("RGB", (30, 30), tuple(int(c) for c in color)).convert("CMYK").save(
      folder / "cmyk.jpg", quality=95)
  Image.fromarray(np.full((30, 30), 40000, np.uint16)).save(folder / "gray16.png")
  png16_rgb(str(folder / "rgb16.png"), np.broadcast_to(color.astype(np.uint16) * 257, (30, 30, 3)))
  (folder / "rotated.jpg").write_bytes(rotated_jpeg_bytes(flat_image(label, 0, (40, 20))))
  names += ["gray.jpg", "rgba.png", "cmyk.jpg", "gray16.png", "rgb16.png", "rotated.jpg"]
  return names


def make_domain_tree(root: str | os.PathLike, domains: Sequence[str],
                     classes: Sequence[str] = CLASSES, per_class: int = 5,
                     sizes=((40, 32), (32, 48), (64, 40))) -> pathlib.Path:
  """`<root>/<domain>/<class>/<i>.jpg|png` of flat class-coloured images."""
  root = pathlib.Path(root)
  for d in domains:
    for label, cls in enumerate(classes):
      folder = root / d / cls
      folder.mkdir(parents=True, exist_ok=True)
      for i in range(per_class):
        image = flat_image(label, i, sizes[i % len(sizes)])
        if i % 2:
          image.save(folder / f"{i:03d}.png")
        else:
          image.save(folder / f"{i:03d}.jpg", quality=95)
  return root


def write_lists(root: pathlib.Path, list_dir: pathlib.Path, domains: Sequence[str],
                classes: Sequence[str], labels: Sequence[int] | None = None,
                test_every: int = 4) -> None:
  """DomainNet-style `<domain>_{train,test}.txt` lists of an existing tree."""
  list_dir.mkdir(parents=True, exist_ok=True)
  labels = list(range(len(classes))) if labels is None else list(labels)
  for d in domains:
    rows = {"train": [], "test": []}
    for cls, label in zip(classes, labels):
      files = sorted(p.name for p in (root / d / cls).iterdir())
      for i, name in enumerate(files):
        split = "test" if i % test_every == test_every - 1 else "train"
        rows[split].append(f"{d}/{cls}/{name} {label}")
    for split, lines in rows.items():
      (list_dir / f"{d}_{split}.txt").write_text("\n".join(lines) + "\n")
