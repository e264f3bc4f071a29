r"""Pod scaling of the train step with the text tower split over the mesh (issue 28's table).

Runs `launch.benchmark` with `compile_only` (XLA's per-device FLOPs and temp bytes of the compiled
SPMD program; nothing is timed or allocated) for N = 1, 8, 32 fake CPU devices
(XLA_FLAGS=--xla_force_host_platform_device_count=N, set here per run), ViT-B/16 MmAP-MT, float32,
for the Office-Home recipe shape (T=4, C=65) and the DomainNet one (T=6, C=345) with 8 images
per task (32 at N=32, so each device still holds one image per task), ImageNet-1k-shaped tasks
(1 x 1000 and 4 x 1000 classes) at N=8, each with parallel.shard_text on and off. One JSON per
run under benchmarks/text_sharding/ (kept: a rerun only fills the missing ones), then the
markdown table benchmarks/text_sharding.md. Each compile takes minutes on 2 cores.

  python3 benchmarks/text_sharding.py                 # every missing run, then the table
  python3 benchmarks/text_sharding.py --only dn_b8    # runs whose name contains dn_b8
  python3 benchmarks/text_sharding.py --table_only
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]
OUT = REPO / "benchmarks" / "text_sharding"
SHAPES = {"oh": (4, 65), "dn": (6, 345), "in1": (1, 1000), "in4": (4, 1000)}
# (shape, images per task, devices, shard_text, also the grouping step[, parallel.text_chunk]):
# the targets first.
RUNS = [("dn", 8, 8, True, True), ("dn", 8, 1, True, True), ("oh", 8, 1, True, True),
        ("oh", 8, 8, True, True), ("oh", 32, 1, True, False), ("oh", 32, 32, True, False),
        ("dn", 32, 1, True, False), ("dn", 32, 32, True, False),
        ("in1", 8, 8, True, False), ("in4", 8, 8, True, False), ("in4", 8, 8, True, False, 25),
        ("in1", 8, 8, True, False, 25), ("in4", 8, 8, False, False), ("dn", 8, 8, False, True),
        ("oh", 8, 8, False, True), ("in1", 8, 8, False, False), ("oh", 32, 32, False, False),
        ("dn", 32, 32, False, False), ("in4", 8, 1, True, False)]


def name(shape: str, batch: int, devices: int, shard: bool, chunk: int = 0) -> str:
  return (f"{shape}_b{batch}_n{devices}" + ("" if shard or devices == 1 else "_replicated")
          + (f"_chunk{chunk}" if chunk else ""))


def run_one(shape: str, batch: int, devices: int, shard: bool, grouping: bool,
            chunk: int = 0) -> None:
  tasks, classes = SHAPES[shape]
  out = OUT / f"{name(shape, batch, devices, shard, chunk)}.json"
  if out.exists():
    return
  args = (f"compile_only,num_tasks={tasks},num_classes={classes},batch_size={batch},"
          f"shard_text={str(shard).lower()},text_chunk={chunk}" + (",grouping" if grouping else ""))
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu")
  print(f"{out.name}: {args}", file=sys.stderr, flush=True)
  subprocess.run([sys.executable, "-m", "launch.benchmark",
                  f"--config=configs/benchmark.py:{args}", f"--out={out}"],
                 cwd=REPO, env=env, check=True, stdout=subprocess.DEVNULL)


def _load(shape, batch, devices, shard=True, chunk=0):
  path = OUT / f"{name(shape, batch, devices, shard, chunk)}.json"
  return json.loads(path.read_text()) if path.exists() else None


def _eff(one, many, part):
  if part not in many:
    return "", ""
  n, flops = many["devices"], many[part]["flops_per_device"]
  if not one or part not in one:
    return f"{flops / 1e12:.3f}", ""
  return f"{flops / 1e12:.3f}", f"{one[part]['flops_per_device'] / (n * flops):.0%}"


def table() -> str:
  """Per-device FLOPs (efficiency = single-device FLOPs / (N x per-device)) and temp bytes."""
  lines = ["| shape | images/task | N | shard_text | text_chunk | train TFLOP/device | efficiency "
           "| grouping TFLOP/device | grouping efficiency | temp GiB/device | temp vs 1 device |",
           "|---|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|"]
  for run in sorted(RUNS, key=lambda r: (r[0], r[1], r[2], not r[3], r[5:])):
    shape, batch, devices, shard, chunk = run[:4] + (run[5] if len(run) > 5 else 0,)
    many, one = _load(shape, batch, devices, shard, chunk), _load(shape, batch, 1)
    if many is None:
      continue
    train, eff = _eff(one, many, "train_step") if not chunk else ("(loop)", "")
    group, geff = _eff(one, many, "grouping_step")
    temp = many["train_step"]["temp_bytes_per_device"]
    ratio = (f"{temp / one['train_step']['temp_bytes_per_device']:.2f}"
             if one and devices > 1 else "")
    t, c = SHAPES[shape]
    on = "(1 device)" if devices == 1 else str(shard).lower()
    lines.append(f"| {shape} (T={t}, C={c}) | {batch} | {devices} | {on} | "
                 f"{chunk} | {train} | {eff if devices > 1 else ''} | {group} | "
                 f"{geff if devices > 1 else ''} | {temp / 2**30:.2f} | {ratio} |")
  return "\n".join(lines)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--only", default="", help="run only names containing this")
  p.add_argument("--table_only", action="store_true")
  args = p.parse_args()
  OUT.mkdir(parents=True, exist_ok=True)
  if not args.table_only:
    for run in RUNS:
      if args.only in name(*run[:4], *run[5:]):
        run_one(*run)
  text = table()
  (REPO / "benchmarks" / "text_sharding.md").write_text(
      "Generated by `python3 benchmarks/text_sharding.py` (ViT-B/16 MmAP-MT, float32, XLA cost "
      "and memory analysis of the compiled step on N fake CPU devices). Efficiency = single-device "
      "FLOPs / (N x per-device FLOPs). (loop): XLA's cost analysis counts a while loop's body "
      "once, so the FLOPs of text_chunk > 0 (a lax.map over chunks) are not comparable.\n\n"
      + text + "\n")
  print(text)


if __name__ == "__main__":
  main()
