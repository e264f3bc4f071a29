r"""The ViT-B/16 block of the benchmark's train step, taken apart: dense products, attention's
batched products, the block and its attention forward and backward, against a matmul probe, all
timed in one process in interleaved rounds (medians), JSON out.

  python3 benchmarks/block_parts.py [--rounds 7] [--step_mix] [--out benchmarks/results/block_parts.json]
  python3 benchmarks/block_parts.py --tiny          # seconds (tests)

Why: the train step reaches ~65-70% of the probe while its large dense products run near the
probe, so this measures where the rest goes. `--step_mix` also compiles the benchmark's train
step and splits its dot FLOPs (optimised HLO) into plain dense products and batched ones (the
attention's), which with the measured rates bounds the step's achievable fraction of the probe.
`torch.bmm` on the attention's shape is timed too when torch is installed (a second opinion on
what these shapes allow on this CPU). Compiled with host_runtime.CPU_FAST_XLA_FLAGS, as the
benchmark is.
"""
from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import sys
import time
from typing import Any, Callable

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))
from mmap_jax.apps import host_runtime  # pylint: disable=g-import-not-at-top


def _cases(jax, jnp, clip, width: int, heads: int, images: int, tokens: int, probe: int):
  """name -> (fn, args, flops or None for XLA's count, group)."""
  key = iter(range(1_000))
  normal = lambda *s: jax.random.normal(jax.random.key(next(key)), s, jnp.float32)
  rows, d, bh = images * tokens, width // heads, images * heads
  block = clip._init_block(jax.random.key(next(key)), width, 12)  # pylint: disable=protected-access
  x = normal(images, tokens, width)
  mm = lambda a, b: a @ b
  mmT = lambda a, b: a @ b.T
  cases: dict[str, Any] = {f"probe {probe}^3": (mm, (normal(probe, probe), normal(probe, probe)),
                                                2.0 * probe ** 3, "probe")}
  for name, m, k, n in (("qkv", rows, width, 3 * width), ("out_proj", rows, width, width),
                        ("c_fc", rows, width, 4 * width), ("c_proj", rows, 4 * width, width)):
    cases[f"dense {name} [{m}x{k}]x[{k}x{n}]"] = (mm, (normal(m, k), normal(k, n)),
                                                  2.0 * m * k * n, "dense")
    cases[f"dense {name} backward dX [{m}x{n}]x[{k}x{n}]^T"] = (
        mmT, (normal(m, n), normal(k, n)), 2.0 * m * k * n, "dense")
  s = tokens
  ein = lambda spec: (lambda a, b: jnp.einsum(spec, a, b))
  for name, spec, sa, sb, contracted in (
      ("QK^T", "bqd,bkd->bqk", (bh, s, d), (bh, s, d), d),
      ("PV", "bqk,bkd->bqd", (bh, s, s), (bh, s, d), s),
      ("backward dP = dO V^T", "bqd,bkd->bqk", (bh, s, d), (bh, s, d), d),
      ("backward dV = P^T dO", "bqk,bqd->bkd", (bh, s, s), (bh, s, d), s),
      ("backward dQ = dS K", "bqk,bkd->bqd", (bh, s, s), (bh, s, d), s),
      ("backward dK = dS^T Q", "bqk,bqd->bkd", (bh, s, s), (bh, s, d), s)):
    out = 2.0 * bh * s * (s if spec.endswith("bqk") else d) * contracted
    cases[f"attention {name} [{bh} x {s}x{s}x{d}]"] = (ein(spec), (normal(*sa), normal(*sb)),
                                                       out, "attention")

  def vjp(f):
    def g(y, p):
      out, pull = jax.vjp(lambda z: f(z, p), y)
      return pull(0.01 * out)[0]
    return g

  def attention_core(qkv, p):
    del p
    return clip._softmax_attend(*qkv, None)  # pylint: disable=protected-access

  def whole_block(y, p):
    return clip.residual_block(y, p, heads, None, "quick_gelu")

  qkv = tuple(normal(images, tokens, heads, d) for _ in range(3))   # as _qkv returns them
  for name, f, arg in (("softmax attention", attention_core, qkv), ("block", whole_block, x)):
    cases[f"{name} forward"] = (f, (arg, block), None, name)
    cases[f"{name} forward+backward (d/dx)"] = (vjp(f), (arg, block), None, name)
  # The backward's largest elementwise passes, alone (FLOPs: XLA's count of the elementwise ops).
  logits = normal(images, heads, tokens, tokens)
  hidden = normal(rows, 4 * width)
  for name, f, arg in (
      (f"softmax [{images},{heads},{s},{s}]", lambda z, p: jax.nn.softmax(z, axis=-1), logits),
      (f"quick_gelu [{rows},{4 * width}]",
       lambda z, p: clip._checkpointed_activation(z, "quick_gelu"), hidden)):  # pylint: disable=protected-access
    cases[f"elementwise {name} forward"] = (f, (arg, None), None, "elementwise")
    cases[f"elementwise {name} forward+backward"] = (vjp(f), (arg, None), None, "elementwise")
  return cases


def step_dot_mix(config_arg: str, options: dict[str, str]) -> dict[str, float]:
  """FLOPs of the benchmark train step's dots (optimised HLO): plain (rank-2 output) vs batched."""
  from configs import benchmark as benchmark_config  # pylint: disable=g-import-not-at-top
  from mmap_jax.apps import benchmark, xla_profile  # pylint: disable=g-import-not-at-top
  _, step, state, frozen, batches = benchmark.single_train_step(
      benchmark_config.get_config(config_arg))
  compiled = step.lower(state, frozen, batches[0]).compile(compiler_options=options or None)
  instrs, _ = xla_profile.parse_hlo(compiled.as_text())
  mix = {"plain": xla_profile.dot_flops(instrs, batched=False),
         "batched": xla_profile.dot_flops(instrs, batched=True)}
  mix["total_cost_analysis"] = benchmark.cost_flops(compiled)
  return mix


def _torch_bmm(images: int, heads: int, tokens: int, d: int, rounds: int) -> dict[str, Any]:
  try:
    import torch  # pylint: disable=g-import-not-at-top
  except ImportError:
    return {"skipped": "torch not installed"}
  torch.set_num_threads(len(os.sched_getaffinity(0)))
  a, b = torch.randn(images * heads, tokens, d), torch.randn(images * heads, tokens, d)
  for _ in range(2):
    torch.bmm(a, b.transpose(1, 2))
  times = []
  for _ in range(rounds):
    t0 = time.perf_counter()
    torch.bmm(a, b.transpose(1, 2))
    times.append(time.perf_counter() - t0)
  flops = 2.0 * images * heads * tokens * tokens * d
  return {"s_median": statistics.median(times), "flops": flops,
          "gflops_per_s": flops / statistics.median(times) / 1e9, "threads": torch.get_num_threads()}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--rounds", type=int, default=7)
  parser.add_argument("--tiny", action="store_true", help="small shapes (a smoke run)")
  parser.add_argument("--step_mix", action="store_true", help="also split the step's dot FLOPs")
  parser.add_argument("--out", default=None)
  args = parser.parse_args()

  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from mmap_jax.apps import benchmark  # pylint: disable=g-import-not-at-top
  from mmap_jax.models import clip  # pylint: disable=g-import-not-at-top
  # ViT-B/16 at the benchmark's 4 tasks x 8 images and 197 + 16 prompt tokens.
  width, heads, images, tokens, probe = (64, 4, 2, 20, 256) if args.tiny else (768, 12, 32, 213, 2048)
  options = host_runtime.compiler_options()
  compiled: dict[str, tuple[Callable, tuple, float, str]] = {}
  for name, (fn, fargs, flops, group) in _cases(jax, jnp, clip, width, heads, images, tokens,
                                                 probe).items():
    c = jax.jit(fn).lower(*fargs).compile(compiler_options=options)
    jax.block_until_ready(c(*fargs))
    compiled[name] = (c, fargs, flops if flops is not None else benchmark.cost_flops(c), group)
  times: dict[str, list[float]] = {k: [] for k in compiled}
  for _ in range(args.rounds):                     # interleaved: host drift hits all alike
    for name, (c, fargs, _, _) in compiled.items():
      t0 = time.perf_counter()
      jax.block_until_ready(c(*fargs))
      times[name].append(time.perf_counter() - t0)
  probe_name = next(k for k, v in compiled.items() if v[3] == "probe")
  probe_rate = compiled[probe_name][2] / statistics.median(times[probe_name])
  rows = {}
  for name, (_, _, flops, group) in compiled.items():
    med = statistics.median(times[name])
    rows[name] = {"group": group, "s_median": med, "s_min": min(times[name]), "flops": flops,
                  "gflops_per_s": flops / med / 1e9, "of_probe_median": flops / med / probe_rate,
                  "all_s": [round(t, 5) for t in times[name]]}
  result: dict[str, Any] = {
      "shapes": {"width": width, "heads": heads, "images": images, "tokens": tokens},
      "compiler_options": options, "allocator": host_runtime.allocator_in_use(),
      "rounds": args.rounds, "probe_gflops_per_s_median": probe_rate / 1e9, "parts": rows,
      "torch_bmm_qk": _torch_bmm(images, heads, tokens, width // heads, args.rounds)}
  if args.step_mix:
    mix = step_dot_mix("tiny,parts=none" if args.tiny else "parts=none", options)
    rate = lambda g: statistics.median(r["of_probe_median"] for r in rows.values()
                                       if r["group"] == g)
    dense, attention = rate("dense"), rate("attention")
    total = mix["plain"] + mix["batched"]
    result["step_mix"] = {**mix, "batched_share": mix["batched"] / total,
                          "dense_of_probe": dense, "attention_of_probe": attention,
                          # time at these rates, everything else free: the fraction it allows
                          "bound_of_probe": total / (mix["plain"] / dense + mix["batched"] / attention)}
  print(benchmark.write_json(result, args.out))


if __name__ == "__main__":
  host_runtime.reexec_with_allocator()
  main()
