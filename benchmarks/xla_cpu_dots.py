r"""The benchmark's train step compiled under XLA:CPU's defaults, under each flag of
host_runtime.CPU_FAST_XLA_FLAGS alone, and under all of them, in one process; interleaved timed
runs, the loss of each, JSON out. The evidence behind CPU_FAST_XLA_FLAGS (WORKSPACE.md,
Performance).

  python3 benchmarks/xla_cpu_dots.py [--runs 6 --warmup 1] [--out benchmarks/results/xla_cpu_dots.json]
"""
from __future__ import annotations

import argparse
import pathlib
import statistics
import sys
import time

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mmap_jax.apps import host_runtime  # pylint: disable=g-import-not-at-top


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=6)
  parser.add_argument("--warmup", type=int, default=1, help="untimed interleaved rounds first")
  parser.add_argument("--config", default="parts=none", help="configs/benchmark.py argument")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  from configs import benchmark as benchmark_config
  from mmap_jax.apps import benchmark

  config = benchmark_config.get_config(args.config)
  _, step, state, frozen, host_batches = benchmark.single_train_step(config)
  batches = [jax.device_put(b) for b in host_batches]
  fast = host_runtime.compiler_options()
  alone = {f"only:{k}": {k: v} for k, v in fast.items()} if len(fast) > 1 else {}
  variants = {"xla_default": {}, **alone, "cpu_fast_xla_flags": fast}
  lowered = step.lower(state, frozen, batches[0])
  compiled = {k: lowered.compile(compiler_options=v) for k, v in variants.items()}
  losses = {k: float(c(state, frozen, batches[0])[1]["loss"]) for k, c in compiled.items()}
  times = {k: [] for k in compiled}
  for r in range(args.warmup + args.runs):         # interleaved: drift hits both alike
    for k, c in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(state, frozen, batches[r % 2]))
      if r >= args.warmup:
        times[k].append(time.perf_counter() - t0)
  result = {"workload": args.config, "flops_per_step": benchmark.cost_flops(compiled["xla_default"]),
            "allocator": host_runtime.allocator_in_use(), "compiler_options": variants,
            "loss": losses,
            "step_s_median": {k: statistics.median(t) for k, t in times.items()},
            "all_s": {k: [round(x, 3) for x in t] for k, t in times.items()}}
  result["speedup"] = {k: result["step_s_median"]["xla_default"] / t
                       for k, t in result["step_s_median"].items() if k != "xla_default"}
  print(benchmark.write_json(result, args.out))


if __name__ == "__main__":
  host_runtime.reexec_with_allocator()
  main()
