r"""LoRA's two exact formulations timed on the benchmark's train step: the low-rank update kept
apart (x @ A @ B added in every targeted projection: `merged=False`, what training runs) against
W + (alpha/r) A B merged into the kernels before the encoders (`merged=True`). Both compiled in
one process, interleaved timed runs, XLA's FLOPs and per-step temp bytes, the loss of each.

  python3 benchmarks/peft_lora.py [--method lora_mt] [--targets q,v] [--layers 12]
      [--config batch_size=8] [--runs 3] [--out benchmarks/results/peft_lora.json]

Why it matters: with frozen kernels the backward pass needs no weight gradient; merged, every
targeted kernel gets one (tokens x d x d per target: a full-size matmul), unmerged only the
skinny A/B products do. `--layers N` keeps the ViT-B/16 widths and N blocks per tower (the
per-block costs are what differ) so the comparison runs in minutes on a small CPU host.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--method", default="lora_mt", choices=("lora_mt", "lora_st"))
  parser.add_argument("--targets", default="q,v")
  parser.add_argument("--rank", type=int, default=4)
  parser.add_argument("--layers", type=int, default=12, help="blocks per tower (12: ViT-B/16)")
  parser.add_argument("--config", default="", help="configs/benchmark.py argument")
  parser.add_argument("--runs", type=int, default=3, help="0: FLOPs, temp bytes, losses only")
  parser.add_argument("--warmup", type=int, default=1, help="untimed interleaved rounds first")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp
  from configs import benchmark as benchmark_config
  from mmap_jax import heads, peft
  from mmap_jax.apps import benchmark, host_runtime, measure
  from mmap_jax.prompts import multitask
  from mmap_jax.train import step as train_step

  config = benchmark_config.get_config(args.config)
  config.method = args.method
  config.prompt = {"lora_targets": args.targets, "lora_rank": args.rank}
  w = benchmark.build_workload(config)
  cfg = w.clip_cfg
  cfg = dataclasses.replace(cfg, vision=dataclasses.replace(cfg.vision, layers=args.layers),
                            text=dataclasses.replace(cfg.text, layers=args.layers))
  w = dataclasses.replace(w, clip_cfg=cfg)
  spec = w.spec
  frozen = {"clip": benchmark.random_clip_params(cfg, 0),
            "class_tokens": benchmark.class_tokens_for(w, spec)}
  learned = multitask.init_learned(jax.random.key(0, impl="rbg"), cfg, spec, w.num_tasks)
  # B = 0 at init would make the two losses trivially equal: perturb it.
  learned = jax.tree_util.tree_map_with_path(
      lambda p, x: x + 0.01 if jax.tree_util.keystr(p).endswith("['b']") else x, learned)
  part_key = "task" if spec.single_task else "shared"

  def loss_fn(merged):
    def fn(learned, frozen, batch):
      params = peft.apply(frozen["clip"], learned[part_key], spec, merged=merged)
      logits = heads.task_logits(
          params, cfg, None, frozen["class_tokens"], batch["image"], dtype=w.dtype,
          clip_per_task=multitask.clip_task_axes(params, spec, merged=merged))
      per_task = heads.masked_cross_entropy(logits, batch["label"],
                                            frozen["class_tokens"].class_mask)
      return (per_task.sum() if spec.single_task else per_task.mean()), {}
    return fn

  opt = benchmark.optimizer(spec)
  state = train_step.init_state(learned, opt)
  batches = [jax.device_put(b) for b in benchmark.host_batches(w, 2, 0)]
  compiled, flops, temp = {}, {}, {}
  for name, merged in (("unmerged", False), ("merged", True)):
    step = train_step.make_train_step(loss_fn(merged), opt, donate=False)
    compiled[name] = step.lower(state, frozen, batches[0]).compile()
    flops[name] = measure.cost_flops(compiled[name])
    mem = compiled[name].memory_analysis()
    temp[name] = int(mem.temp_size_in_bytes) if mem is not None else None
  losses = {k: float(c(state, frozen, batches[0])[1]["loss"]) for k, c in compiled.items()}
  times = {k: [] for k in compiled}
  for r in range(args.warmup + args.runs if args.runs else 0):  # interleaved: drift hits both
    for k, c in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(state, frozen, batches[r % 2]))
      if r >= args.warmup:
        times[k].append(time.perf_counter() - t0)
  med = {k: statistics.median(t) if t else None for k, t in times.items()}
  result = {"command": " ".join(sys.argv), "method": args.method, "targets": args.targets,
            "rank": args.rank, "layers_per_tower": args.layers, "workload": args.config,
            "num_tasks": w.num_tasks, "batch_size": w.batch_size,
            "backend": jax.default_backend(), "allocator": host_runtime.allocator_in_use(),
            "flops_per_step": flops, "temp_bytes": temp, "loss": losses,
            "flops_merged_over_unmerged": flops["merged"] / flops["unmerged"],
            "step_s_median": med,
            "merged_over_unmerged": med["merged"] / med["unmerged"] if args.runs else None,
            "all_s": {k: [round(x, 3) for x in t] for k, t in times.items()},
            "load_average": list(__import__("os").getloadavg())}
  text = json.dumps(result, indent=2)
  print(text)
  if args.out:
    pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
  main()
