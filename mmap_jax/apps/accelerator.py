"""The accelerator benchmark: the fixed workload over dtypes, remat and batch sizes, with MFU.

For every (dtype, remat) setting the per-task batch doubles from `batch_start` until the device
runs out of memory (XLA's RESOURCE_EXHAUSTED is caught and ends that setting) or `max_batch`;
each row is the trainer's step as `mmap_jax.apps.benchmark` builds and times it
(`steps_per_call` steps per call) with step time, images/s, XLA's FLOPs, MFU against the
device's peak for that dtype (the table below; None on devices it does not list, e.g. CPU), and
device memory.

MFU = achieved FLOP/s / (peak FLOP/s per device x devices). FLOPs are XLA's cost analysis of
the single-step program (what the hardware executes, remat recomputation included).
"""
from __future__ import annotations

import dataclasses
import gc
import time
from typing import Any, Callable, Optional

import jax
import ml_collections as mlc

from mmap_jax.apps import benchmark, measure

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


def _row(w, config, peak_per_device: Optional[float], k: int) -> dict[str, Any]:
  compiled, args, batches, compile_s = benchmark.train_step_program(w, config, 1, abstract=False)
  cost = measure.costs(compiled)
  if k > 1:
    del compiled
    compiled, args, batches, compile_s = benchmark.train_step_program(w, config, k,
                                                                      abstract=False)
  t = benchmark.time_steps(compiled, args, batches, k, config)
  devices = jax.device_count()
  flops = cost["flops_per_device"] * devices
  achieved = flops / t["s_median"]
  return {"step_s_median": t["s_median"], "step_s_min": t["s_min"], "step_s_max": t["s_max"],
          "images_per_s": w.images_per_step / t["s_median"], "images_per_step": w.images_per_step,
          "flops_per_step": flops, "achieved_flops_per_s": achieved,
          "mfu": achieved / (peak_per_device * devices) if peak_per_device else None,
          "devices": devices, "compile_s": compile_s,
          "temp_bytes_per_device": cost["temp_bytes_per_device"],
          "device_memory": measure.device_memory(), "final_loss": t["final_loss"],
          "finite": t["finite"], "all_s": t["all_s"], "steps_per_call": k}


def _split(value) -> list[str]:
  return [x.strip() for x in str(value).replace("|", ",").split(",") if x.strip()]


def run_sweep(config: mlc.ConfigDict, *, log: Callable[[str], None] = print,
              row_fn: Callable[..., dict[str, Any]] = _row) -> dict[str, Any]:
  """All (dtype, remat, batch) rows of the sweep; returns the JSON dict (`rows`, `peaks`, ...)."""
  t_start = time.perf_counter()
  dev = jax.devices()[0]
  table = known_peak(dev.device_kind)
  dtypes, remats = _split(config.sweep_dtypes), [r.lower() in ("1", "true") for r in
                                                 _split(config.sweep_remat)]
  peaks = {d: {"flops_per_s": getattr(table, d), "source": f"{table.name} ({table.source})"
               + (f"; f32 = {table.float32_note}" if d == "float32" else "")} if table else
           {"flops_per_s": None, "source": f"{dev.device_kind} is not in KNOWN_DEVICES: no MFU"}
           for d in dtypes}
  k = int(config.get("steps_per_call", 1))
  rows = []
  for dtype in dtypes:
    for remat in remats:
      batch = int(config.batch_start)
      while batch <= int(config.max_batch):
        c = mlc.ConfigDict(config.to_dict())
        c.dtype, c.remat, c.batch_size, c.compile_only = dtype, remat, batch, False
        row = {"dtype": dtype, "remat": remat, "batch_size_per_task": batch}
        try:
          row.update(row_fn(benchmark.build_workload(c), c, peaks[dtype]["flops_per_s"], k))
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
            "devices": jax.device_count(), "known_device": table.name if table else None,
            "peaks": peaks, "steps_per_call": k, "rows": rows, "best": _best(rows),
            "workload": {"model": config.model, "method": config.method,
                         "num_tasks": int(config.num_tasks),
                         "num_classes": int(config.num_classes)},
            "environment": measure.environment(), "total_s": time.perf_counter() - t_start}
  log(table_text(result))
  return result


def _line(r: dict[str, Any]) -> str:
  mem = r["device_memory"].get("peak_bytes_in_use") or 0
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
           + ", ".join(f"{d} {(p['flops_per_s'] or 0) / TERA:.1f} TFLOP/s ({p['source']})"
                       for d, p in result["peaks"].items()),
           "", "| dtype | remat | batch/task | step (ms) | images/s | MFU | peak memory "
           "(GiB) | XLA temp (GiB) |", "|---|---|---:|---:|---:|---:|---:|---:|"]
  for r in result["rows"]:
    if r.get("oom"):
      lines.append(f"| {r['dtype']} | {r['remat']} | {r['batch_size_per_task']} | out of memory "
                   "| | | | |")
      continue
    mem = r["device_memory"].get("peak_bytes_in_use") or 0
    lines.append(f"| {r['dtype']} | {r['remat']} | {r['batch_size_per_task']} | "
                 f"{r['step_s_median'] * 1e3:.2f} | {r['images_per_s']:.1f} | "
                 f"{100 * (r['mfu'] or 0):.1f}% | {mem / 2**30:.2f} | "
                 f"{(r['temp_bytes_per_device'] or 0) / 2**30:.2f} |")
  return "\n".join(lines)
