"""Examples/s of the input pipeline alone (no model), at 224 px by default.

    python benchmarks/input_pipeline.py --out /tmp/input_pipeline.json

Builds (once, cached in --data-dir) an image_folder dataset of synthetic
photo-like JPEGs of DomainNet/Office-Home-like sizes (short side 300-480 px,
~40-90 KB), then times `train_iterator` (decode + random resized crop + flip
+ normalise + batch [T, B, H, W, 3]) or `eval_batches`: after a warm-up that
absorbs worker start-up, each run times --steps steps and reports examples/s;
the JSON holds every run, the median and the machine's CPU count.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import statistics
import sys
import tempfile
import time

import numpy as np
from PIL import Image

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from mmap_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from mmap_jax.data import sources  # pylint: disable=g-import-not-at-top

_SIZES = ((480, 360), (360, 480), (400, 300), (500, 375), (320, 320), (640, 480))


def _photo_like(rng: np.random.Generator, width: int, height: int) -> Image.Image:
  """Smooth colour field + fine texture: JPEG sizes close to real photos."""
  coarse = rng.integers(0, 256, (height // 24 + 2, width // 24 + 2, 3), np.uint8)
  base = np.asarray(Image.fromarray(coarse).resize((width, height), Image.Resampling.BICUBIC),
                    np.float32)
  base += rng.normal(0.0, 10.0, (height, width, 3)).astype(np.float32)
  return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def make_tree(root: pathlib.Path, *, num_domains: int, num_classes: int, per_class: int,
              seed: int = 0) -> pathlib.Path:
  """`<root>/d<i>/c<j>/<k>.jpg`, written once (a marker file says complete)."""
  done = root / "COMPLETE"
  if done.exists():
    return root
  rng = np.random.default_rng(seed)
  for d in range(num_domains):
    for c in range(num_classes):
      folder = root / f"d{d}" / f"class_{c:03d}"
      folder.mkdir(parents=True, exist_ok=True)
      for k in range(per_class):
        w, h = _SIZES[(d + c + k) % len(_SIZES)]
        _photo_like(rng, w, h).save(folder / f"{k}.jpg", quality=90)
  done.write_text("ok\n")
  return root


def _time_run(make_iter, steps: int, warmup: int, per_step: int) -> float:
  it = make_iter()
  try:
    for _ in range(warmup):
      next(it)
    start = time.perf_counter()
    for _ in range(steps):
      next(it)
    return steps * per_step / (time.perf_counter() - start)
  finally:
    close = getattr(it, "close", None)
    if close:
      close()


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument("--data-dir", default=os.path.join(tempfile.gettempdir(), "mmap_jax_bench"))
  p.add_argument("--out", default="input_pipeline.json", help="JSON result file")
  p.add_argument("--mode", choices=("train", "eval"), default="train")
  p.add_argument("--image-size", type=int, default=224)
  p.add_argument("--tasks", type=int, default=4)
  p.add_argument("--classes", type=int, default=8)
  p.add_argument("--per-class", type=int, default=40)
  p.add_argument("--batch-size", type=int, default=16, help="per task per step")
  p.add_argument("--workers", type=int, default=os.cpu_count() or 1)
  p.add_argument("--threads", type=int, default=1, help="decode threads per worker")
  p.add_argument("--steps", type=int, default=20)
  p.add_argument("--warmup", type=int, default=3)
  p.add_argument("--runs", type=int, default=5)
  args = p.parse_args(argv)

  data_dir = pathlib.Path(args.data_dir)
  root = make_tree(data_dir / "tree", num_domains=args.tasks, num_classes=args.classes,
                   per_class=args.per_class)
  tasks = sources.build_tasks("image_folder", root=str(root), data_dir=str(data_dir / "tfds"))

  if args.mode == "train":
    per_step = args.tasks * args.batch_size

    def make_iter():
      return pipeline.train_iterator(
          tasks, batch_size=args.batch_size, image_size=args.image_size, seed=0,
          worker_count=args.workers, num_threads=args.threads)
  else:
    per_step = args.batch_size

    def make_iter():
      def endless():
        while True:
          yield from pipeline.eval_batches(
              tasks, batch_size=args.batch_size, image_size=args.image_size,
              worker_count=args.workers, num_threads=args.threads)
      return endless()

  load_before = os.getloadavg()[0]
  runs = [_time_run(make_iter, args.steps, args.warmup, per_step) for _ in range(args.runs)]
  result = {
      "examples_per_s_median": statistics.median(runs),
      "examples_per_s_runs": runs,
      "mode": args.mode,
      "image_size": args.image_size,
      "tasks": args.tasks,
      "batch_size_per_task": args.batch_size,
      "workers": args.workers,
      "threads_per_worker": args.threads,
      "steps_per_run": args.steps,
      "warmup_steps": args.warmup,
      "train_examples": sum(t.info.num_train for t in tasks),
      "cpu_count": os.cpu_count(),
      # Other work on the machine slows every figure down: record how much.
      "load_avg_1min_before_after": [load_before, os.getloadavg()[0]],
      "machine": platform.processor() or platform.machine(),
      "command": " ".join([os.path.basename(sys.executable)] + sys.argv),
  }
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(f"{args.mode} @ {args.image_size}px: {result['examples_per_s_median']:.1f} examples/s "
        f"(median of {args.runs}; workers={args.workers}, threads={args.threads}, "
        f"{os.cpu_count()} CPUs) -> {args.out}")
  return result


if __name__ == "__main__":
  main()
