"""The accelerator benchmark: the fixed workload over dtypes, remat and batch sizes, with MFU.

For every (dtype, remat) setting the per-task batch doubles from `batch_start` until the device
runs out of memory (XLA's RESOURCE_EXHAUSTED is caught and ends that setting) or `max_batch`;
each row is the training step of `mmap_jax.apps.benchmark.bench_train_step` (the trainer's jitted
step, `steps_per_call` steps per call) with step time, images/s, XLA's FLOPs, MFU against the
device's peak for that dtype, and device memory. The same code runs on CPU (tests: the tiny
workload), where no table entry exists and the measured matmul peak is the reference.

MFU = achieved FLOP/s / (peak FLOP/s per device x devices used). FLOPs are XLA's cost analysis
of the single-step program (what the hardware executes, remat recomputation included).
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable, Optional

import jax
import ml_collections as mlc

from mmap_jax.apps import benchmark

TERA = 1e12


@dataclasses.dataclass(frozen=True)
class DevicePeak:
  """Dense (no sparsity) peak FLOP/s per chip. `float32` is what an f32 dot at XLA's DEFAULT
  precision runs at: TF32 tensor cores on Ampere/Hopper GPUs, one bf16 MXU pass on TPUs."""
  name: str
  bfloat16: float
  float32: float
  float32_note: str
  source: str


_GPU_F32 = "TF32 tensor cores (XLA's DEFAULT precision for f32 dots on Ampere and later)"
_TPU_F32 = "one bf16 MXU pass (XLA's DEFAULT precision for f32 dots on TPU)"

# (lower-case substrings of jax's device_kind that must all occur, peak); the first match wins.
KNOWN_DEVICES: tuple[tuple[tuple[str, ...], DevicePeak], ...] = (
    # NVIDIA H100 datasheet (nvidia.com/en-us/data-center/h100): SXM BF16 1,979 / TF32 989
    # TFLOPS, PCIe 1,513 / 756, both "with sparsity": dense is half.
    (("h100", "pcie"), DevicePeak("H100 PCIe", 756.5 * TERA, 378.0 * TERA, _GPU_F32,
                                  "NVIDIA H100 datasheet, dense = sparse / 2")),
    (("h100",), DevicePeak("H100 SXM", 989.4 * TERA, 494.7 * TERA, _GPU_F32,
                           "NVIDIA H100 datasheet, dense = sparse / 2")),
    # NVIDIA H200 datasheet (nvidia.com/en-us/data-center/h200): SXM BF16 1,979 / TF32 989,
    # NVL 1,671 / 835 TFLOPS with sparsity.
    (("h200", "nvl"), DevicePeak("H200 NVL", 835.5 * TERA, 417.5 * TERA, _GPU_F32,
                                 "NVIDIA H200 datasheet, dense = sparse / 2")),
    (("h200",), DevicePeak("H200 SXM", 989.4 * TERA, 494.7 * TERA, _GPU_F32,
                           "NVIDIA H200 datasheet, dense = sparse / 2")),
    # NVIDIA A100 datasheet (nvidia.com/en-us/data-center/a100): BF16 312, TF32 156 TFLOPS dense
    # (SXM and PCIe, 40 and 80 GB alike).
    (("a100",), DevicePeak("A100", 312.0 * TERA, 156.0 * TERA, _GPU_F32,
                           "NVIDIA A100 datasheet (dense)")),
    # Google Cloud TPU system architecture pages (cloud.google.com/tpu/docs/v4, v5e, v5p, v6e):
    # peak bf16 compute per chip.
    (("tpu", "v4"), DevicePeak("TPU v4", 275.0 * TERA, 275.0 * TERA, _TPU_F32,
                               "cloud.google.com/tpu/docs/v4")),
    (("tpu", "v5", "lite"), DevicePeak("TPU v5e", 197.0 * TERA, 197.0 * TERA, _TPU_F32,
                                       "cloud.google.com/tpu/docs/v5e")),
    (("tpu", "v5e"), DevicePeak("TPU v5e", 197.0 * TERA, 197.0 * TERA, _TPU_F32,
                                "cloud.google.com/tpu/docs/v5e")),
    (("tpu", "v5"), DevicePeak("TPU v5p", 459.0 * TERA, 459.0 * TERA, _TPU_F32,
                               "cloud.google.com/tpu/docs/v5p")),
    (("tpu", "v6"), DevicePeak("TPU v6e", 918.0 * TERA, 918.0 * TERA, _TPU_F32,
                               "cloud.google.com/tpu/docs/v6e")),
)


def known_peak(device_kind: str) -> Optional[DevicePeak]:
  kind = device_kind.lower()
  for needles, peak in KNOWN_DEVICES:
    if all(n in kind for n in needles):
      return peak
  return None


def is_out_of_memory(exc: BaseException) -> bool:
  """XLA's out-of-memory errors (compile- or run-time), as opposed to any other failure."""
  text = str(exc)
  return "RESOURCE_EXHAUSTED" in text or "out of memory" in text.lower()


def device_memory() -> dict[str, Any]:
  """The allocator's counters of the local devices (max over them); {} where not reported."""
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: max(int(s[k]) for s in stats) for k in keys if all(k in s for s in stats)}


def _row(w, config, clip_params, device_ct, pl, peak_per_device: float, k: int) -> dict[str, Any]:
  flops = benchmark.single_step_flops(w, config, clip_params, device_ct, pl) if k > 1 else None
  t = benchmark.bench_train_step(w, config, clip_params, device_ct, pl, k, flops)
  achieved = t["flops"] / t["s_median"] if t["flops"] else None
  devices = pl.devices
  return {"step_s_median": t["s_median"], "step_s_min": t["s_min"], "step_s_max": t["s_max"],
          "images_per_s": w.images_per_step / t["s_median"], "images_per_step": w.images_per_step,
          "flops_per_step": t["flops"], "achieved_flops_per_s": achieved,
          "mfu": achieved / (peak_per_device * devices) if achieved else None,
          "devices": devices, "compile_s": t["compile_s"], "temp_bytes": t["temp_bytes"],
          "memory": t["memory"], "device_memory": device_memory(), "final_loss": t["final_loss"],
          "finite": t["finite"], "all_s": t["all_s"], "steps_per_call": k}


def _split(value) -> list[str]:
  return [x.strip() for x in str(value).replace("|", ",").split(",") if x.strip()]


def run_sweep(config: mlc.ConfigDict, *, log: Callable[[str], None] = print,
              row_fn: Callable[..., dict[str, Any]] = _row) -> dict[str, Any]:
  """All (dtype, remat, batch) rows of the sweep; returns the JSON dict (`rows`, `peaks`, ...)."""
  t_start = time.perf_counter()
  benchmark.set_compiler_options(config)
  dev = jax.devices()[0]
  table = known_peak(dev.device_kind)
  dtypes, remats = _split(config.sweep_dtypes), [r.lower() in ("1", "true") for r in
                                                 _split(config.sweep_remat)]
  sizes = [int(x) for x in _split(config.peak_sizes)]
  probes, peaks = {}, {}
  for dtype in dtypes:
    probes[dtype] = benchmark.measure_matmul_peak(sizes, int(config.peak_runs),
                                                  float(config.peak_warmup_s), dtype=dtype)
    if table is not None:
      peaks[dtype] = {"flops_per_s": getattr(table, dtype), "source": f"table: {table.name} "
                      f"({table.source})" + (f"; f32 = {table.float32_note}"
                                             if dtype == "float32" else "")}
    else:
      peaks[dtype] = {"flops_per_s": probes[dtype]["flops_per_s_best"],
                      "source": f"probe: best {dtype} matmul ({probes[dtype]['best_variant']})"}
    log(f"{dtype} peak {peaks[dtype]['flops_per_s'] / TERA:.2f} TFLOP/s per device "
        f"({peaks[dtype]['source']}); probe best {probes[dtype]['flops_per_s_best'] / TERA:.3f}")
  k = int(config.get("steps_per_call", 1))
  rows = []
  base = benchmark.build_workload(config)
  clip_params = None
  for dtype in dtypes:
    for remat in remats:
      batch = int(config.batch_start)
      while batch <= int(config.max_batch):
        c = mlc.ConfigDict(config.to_dict())
        c.dtype, c.remat, c.batch_size = dtype, remat, batch
        w = benchmark.build_workload(c)
        pl = benchmark.Placement.for_workload(w, int(c.eval_batch_size))
        if clip_params is None or pl.devices != clip_params[0]:
          clip_params = (pl.devices, pl.put(benchmark.random_clip_params(base.clip_cfg,
                                                                         int(c.seed))))
        device_ct = pl.put(w.class_tokens)
        row = {"dtype": dtype, "remat": remat, "batch_size_per_task": batch}
        try:
          row.update(row_fn(w, c, clip_params[1], device_ct, pl, peaks[dtype]["flops_per_s"], k))
        except Exception as exc:  # pylint: disable=broad-except
          if not is_out_of_memory(exc):
            raise
          row.update(oom=True, error=str(exc).splitlines()[0][:500])
          rows.append(row)
          log(f"{dtype} remat={remat} batch {batch}/task: out of memory; next setting")
          break
        rows.append(row)
        log(_line(row))
        batch *= 2
        gc.collect()
  result = {"backend": jax.default_backend(), "device_kind": dev.device_kind,
            "devices": len(jax.devices()), "known_device": table.name if table else None,
            "peaks": peaks, "matmul_probe": probes, "steps_per_call": k, "rows": rows,
            "best": _best(rows), "workload": {"model": config.model, "method": config.method,
                                              "num_tasks": int(config.num_tasks),
                                              "num_classes": int(config.num_classes)},
            "environment": benchmark.environment(), "total_s": time.perf_counter() - t_start}
  log(table_text(result))
  return result


def _line(r: dict[str, Any]) -> str:
  mem = r["device_memory"].get("peak_bytes_in_use") or r["memory"]["bytes"] or 0
  return (f"{r['dtype']:>8} remat={str(r['remat']):5} batch {r['batch_size_per_task']:>4}/task: "
          f"{r['step_s_median'] * 1e3:9.2f} ms/step {r['images_per_s']:9.1f} img/s "
          f"MFU {100 * (r['mfu'] or 0):5.1f}%  mem {mem / 2**30:6.2f} GiB")


def _best(rows: list[dict[str, Any]]) -> dict[str, Any]:
  """Per dtype, the row with the highest MFU."""
  out = {}
  for r in rows:
    if r.get("mfu") is not None and (r["dtype"] not in out or r["mfu"] > out[r["dtype"]]["mfu"]):
      out[r["dtype"]] = {k: r[k] for k in ("remat", "batch_size_per_task", "mfu", "images_per_s",
                                           "step_s_median")}
  return out


def table_text(result: dict[str, Any]) -> str:
  """The sweep as a markdown table (what WORKSPACE.md quotes)."""
  lines = [f"{result['device_kind']} x {result['devices']} ({result['backend']}); peaks: "
           + ", ".join(f"{d} {p['flops_per_s'] / TERA:.1f} TFLOP/s ({p['source']})"
                       for d, p in result["peaks"].items()),
           "", "| dtype | remat | batch/task | step (ms) | images/s | MFU | peak memory "
           "(GiB) | XLA temp (GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    if r.get("oom"):
      lines.append(f"| {r['dtype']} | {r['remat']} | {r['batch_size_per_task']} | out of memory "
                   "| | | | |")
      continue
    mem = r["device_memory"].get("peak_bytes_in_use") or r["memory"]["bytes"] or 0
    lines.append(f"| {r['dtype']} | {r['remat']} | {r['batch_size_per_task']} | "
                 f"{r['step_s_median'] * 1e3:.2f} | {r['images_per_s']:.1f} | "
                 f"{100 * (r['mfu'] or 0):.1f}% | {mem / 2**30:.2f} | "
                 f"{(r['temp_bytes'] or 0) / 2**30:.2f} |")
  return "\n".join(lines)
