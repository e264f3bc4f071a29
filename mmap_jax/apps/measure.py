"""Measurement plumbing of the benchmarks: XLA's cost and memory analyses, peak memory, the
environment record, the JSON output, and where the PyTorch reference (a repository tool) lives."""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import platform
import resource
from typing import Any, Optional

import jax

TORCH_REFERENCE = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "torch_reference.py"


def cost_flops(compiled: Any) -> float:
  """FLOPs of one execution, per device, from XLA's cost analysis (0 if unknown)."""
  analysis = compiled.cost_analysis()
  analysis = analysis[0] if isinstance(analysis, (list, tuple)) else analysis
  return float((analysis or {}).get("flops", 0.0))


def costs(compiled: Any) -> dict[str, Any]:
  """Per-device FLOPs and temp bytes of a compiled SPMD program (XLA's analyses)."""
  mem = compiled.memory_analysis()
  return {"flops_per_device": cost_flops(compiled),
          "temp_bytes_per_device": int(mem.temp_size_in_bytes) if mem is not None else None}


def device_memory() -> dict[str, int]:
  """The allocator's counters of the local devices (max over them); {} where not reported."""
  stats = [d.memory_stats() or {} for d in jax.local_devices()]
  keys = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
  return {k: max(int(s[k]) for s in stats) for k in keys if all(k in s for s in stats)}


def peak_memory_bytes() -> int:
  """The device allocator's peak where reported (GPU/TPU), else this process's peak RSS."""
  return int(device_memory().get("peak_bytes_in_use")
             or resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)


def torch_reference_path() -> pathlib.Path:
  if not TORCH_REFERENCE.exists():
    raise FileNotFoundError(
        "vs_torch runs benchmarks/torch_reference.py, a repository tool that is not installed "
        "with the package: run the benchmark from a clone of the repository (the reference's own "
        f"command: python benchmarks/torch_reference.py --help); looked for {TORCH_REFERENCE}")
  return TORCH_REFERENCE


def environment() -> dict[str, Any]:
  return {"jax": jax.__version__, "python": platform.python_version(),
          "cpu_count": os.cpu_count(), "device_kind": jax.devices()[0].device_kind,
          "xla_flags": os.environ.get("XLA_FLAGS", ""),
          "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}


def write_json(result: dict[str, Any], path: Optional[str]) -> str:
  text = json.dumps(result, indent=2, default=float)
  if path:
    pathlib.Path(path).parent.mkdir(parents=True, exist_ok=True)
    pathlib.Path(path).write_text(text + "\n")
  return text
